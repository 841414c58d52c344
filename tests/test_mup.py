"""muP: the MLP family's initialization and multipliers, MuAdam/MuSGD groups, and the coordinate check.

The coordinate check follows Yang et al. 2022 (Tensor Programs V, Fig. 5): a few Adam steps at a
fixed learning rate on real data (sklearn's digits), mean |activation| per layer against width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bilevel.learned_optimizer import LearnedOptimizer
from bilevel.mup import MuMLP, coordinate_check, coordinate_trajectory, mlp, mu_param_groups

WIDTHS = [64, 128, 256, 512, 1024]
BASE = 64


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])


def adam_factory(lr: float = 1e-2):
    return lambda model: torch.optim.Adam(mu_param_groups(model, lr, "adam"))


def check(parametrization: str, data) -> dict[int, list[float]]:
    return coordinate_check(lambda w: mlp(64, 10, BASE, w / BASE, depth=3, parametrization=parametrization),
                            WIDTHS, data, steps=4, optimizer_factory=adam_factory(), seeds=(0, 1))


def test_coordinate_check_is_flat_under_mup(digits):
    result = check("mup", digits)
    for layer in range(4):
        values = [result[w][layer] for w in WIDTHS]
        assert min(values) > 0.01, (layer, values)  # the layer did move: flat, not dead
        assert max(values) / min(values) < 2.0, (layer, values)


def test_coordinate_check_grows_under_sp(digits):
    result = check("sp", digits)
    logits = [result[w][-1] for w in WIDTHS]
    # Adam moves every SP weight by O(lr) per coordinate, so the logits' change grows like the width.
    assert logits[-1] / logits[0] > 4.0, logits
    assert max(logits[2:]) > 2.0 * max(logits[:2]), logits


def test_the_learned_optimizer_is_width_stable_under_mup_only(digits):
    # The premise of muLO (Thérien et al. 2024): the LO's update scaled by s_p keeps the coordinates flat in width.
    def lo(model):
        return LearnedOptimizer(model.named_parameters(), step_mult=0.01, multipliers=model.multipliers)

    widths = [64, 256, 512]
    for parametrization in ("mup", "sp"):
        trajectory = coordinate_trajectory(lambda w, par=parametrization: mlp(64, 10, BASE, w / BASE, depth=3,
                                                                           parametrization=par),
                                           widths, digits, steps=3, optimizer_factory=lo)
        assert all(len(rows) == 4 for rows in trajectory.values())
        logits = [trajectory[w][-1][-1] for w in widths]
        if parametrization == "mup":
            assert [trajectory[w][0][-1] for w in widths] == [0.0] * 3  # zero-initialized output layer
            assert max(logits) / min(logits) < 2.0, logits
        else:
            assert logits[-1] / logits[0] > 3.0, logits


def test_mup_initialization_and_multipliers():
    torch.manual_seed(0)
    model = mlp(64, 10, base_width=32, width_mult=8, depth=3)
    assert model.width == 256 and model.width_mult == 8.0 and model.output_mult == 1 / 8
    assert torch.count_nonzero(model.output.weight) == 0
    assert model.input.weight.var().item() == pytest.approx(1 / 64, rel=0.1)
    assert model.hidden[0].weight.var().item() == pytest.approx(1 / 256, rel=0.05)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("bias"))
    assert set(model.multipliers) == {n for n, _ in model.named_parameters()}
    assert model.multipliers["hidden.0.weight"] == model.multipliers["hidden.1.weight"] == 1 / 8
    assert {model.multipliers[n] for n in ("input.weight", "input.bias", "hidden.0.bias", "output.weight")} == {1.0}
    assert model.sgd_multipliers["input.weight"] == model.sgd_multipliers["output.weight"] == 8.0
    assert model.sgd_multipliers["hidden.0.bias"] == 8.0
    assert model.sgd_multipliers["hidden.0.weight"] == model.sgd_multipliers["output.bias"] == 1.0
    # The multipliers are a map on the module; nothing is hung on the tensors.
    assert all(set(vars(p)) <= {"_is_param"} for p in model.parameters())


def test_sp_has_unit_multipliers_and_mup_matches_sp_at_base_width():
    sp = mlp(64, 10, 32, 4.0, parametrization="sp")
    assert sp.output_mult == 1.0 and torch.count_nonzero(sp.output.weight) > 0
    assert set(sp.multipliers.values()) == {1.0} and set(sp.sgd_multipliers.values()) == {1.0}
    base = mlp(64, 10, 32, 1.0)
    assert base.output_mult == 1.0 and set(base.multipliers.values()) == {1.0}


def test_forward_applies_the_output_multiplier():
    torch.manual_seed(0)
    model = mlp(8, 3, 4, 2.0)
    with torch.no_grad():
        model.output.weight.normal_()
    x = torch.randn(5, 8)
    h = model.activations(x)[-2]
    assert torch.allclose(model(x), (h @ model.output.weight.T + model.output.bias) / 2.0)


def test_output_bias_option_scales_the_bias_or_not():
    # muLO scales the whole readout, (W h + b) / m; mup's MuReadout only W h: (W h) / m + b.
    x = torch.randn(5, 8)
    logits = {}
    for output_bias in ("scaled", "unscaled"):
        torch.manual_seed(0)
        model = mlp(8, 3, 4, 4.0, output_bias=output_bias)
        assert model.output_bias == output_bias and model.output_mult == 0.25
        with torch.no_grad():
            model.output.weight.normal_()
            model.output.bias.copy_(torch.tensor([1.0, -2.0, 4.0]))
        h = model.activations(x)[-2]
        logits[output_bias] = model(x)
        wh = h @ model.output.weight.T
        want = (wh + model.output.bias) / 4 if output_bias == "scaled" else wh / 4 + model.output.bias
        torch.testing.assert_close(logits[output_bias], want)
    # Same weights and inputs: the logits differ by exactly b / 4 - b = -(3/4) b.
    torch.testing.assert_close(logits["scaled"] - logits["unscaled"],
                               -0.75 * torch.tensor([1.0, -2.0, 4.0]).expand(5, 3))
    assert MuMLP(8, 3, 4).output_bias == "scaled"  # muLO's convention is the default
    with pytest.raises(ValueError, match="output_bias"):
        mlp(8, 3, 4, output_bias="none")


def test_mulo_multipliers_are_hidden_lr_mult_over_fan_in():
    model = mlp(64, 10, base_width=32, width_mult=4.0, depth=3)
    mulo = model.mulo_multipliers(hidden_lr_mult=2.0)
    assert set(mulo) == set(model.multipliers)
    assert mulo["hidden.0.weight"] == mulo["hidden.1.weight"] == 2.0 / 128
    assert {v for k, v in mulo.items() if not k.startswith("hidden.") or k.endswith("bias")} == {1.0}
    # The same as ours up to the constant hidden_lr_mult / base_width on the hidden weights.
    assert model.mulo_multipliers(32.0) == model.multipliers
    assert set(mlp(64, 10, 32, 4.0, parametrization="sp").mulo_multipliers().values()) == {1.0}


def test_mu_param_groups_scale_the_learning_rates():
    model = mlp(64, 10, 32, 4.0, depth=2)
    names = {id(p): n for n, p in model.named_parameters()}
    for rule, table in (("adam", model.multipliers), ("sgd", model.sgd_multipliers)):
        groups = mu_param_groups(model, 0.1, rule, weight_decay=0.01, momentum=0.9)
        seen = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
        assert seen == {n: pytest.approx(0.1 * s) for n, s in table.items()}
        assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 0.01) for g in groups)  # decay per step
        assert all(g["momentum"] == 0.9 for g in groups)
    assert "weight_decay" not in mu_param_groups(model, 0.1)[0]
    plain = torch.nn.Linear(3, 2)
    assert [g["lr"] for g in mu_param_groups(plain, 0.5)] == [0.5]
    # One MuAdam step moves a hidden weight by lr / width_mult per coordinate (Adam's first step is lr * sign(g)).
    torch.manual_seed(0)
    with torch.no_grad():
        model.output.weight.normal_()  # zero output weights would leave the hidden gradients at zero
    opt = torch.optim.Adam(mu_param_groups(model, 0.1))
    before = model.hidden[0].weight.detach().clone()
    F.cross_entropy(model(torch.rand(16, 64)), torch.arange(16) % 10).backward()
    opt.step()
    moved = (model.hidden[0].weight.detach() - before).abs()
    assert torch.count_nonzero(moved) > moved.numel() // 2
    assert moved.max().item() == pytest.approx(0.1 / 4, rel=1e-3)
    assert moved[moved > 0].median().item() == pytest.approx(0.1 / 4, rel=1e-2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="parametrization"):
        MuMLP(4, 2, 8, 1.0, parametrization="ntk")
    with pytest.raises(ValueError, match="width_mult"):
        mlp(4, 2, 8, 0.0)
    with pytest.raises(ValueError, match="depth"):
        mlp(4, 2, 8, 1.0, depth=0)
    with pytest.raises(ValueError, match="rule"):
        mu_param_groups(mlp(4, 2, 8), 0.1, "lamb")
    with pytest.raises(ValueError, match="nope"):
        mu_param_groups(mlp(4, 2, 8), 0.1, multipliers={"nope": 2.0})
    with pytest.raises(TypeError, match="activations"):
        coordinate_check(lambda w: torch.nn.Linear(4, w), [2], (torch.rand(3, 4), torch.zeros(3, dtype=torch.long)),
                         1, adam_factory())
