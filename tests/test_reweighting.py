"""problems.reweighting.MetaWeightNet (Shu et al. 2019): the data are as specified, V is a weight in (0, 1),
a constant V is uniform training, the config trains through the CLI, and one-step Unrolled's hypergradient
equals a hand-written torch.autograd reference in float64."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import hypergrad
from bilevel.cli import main
from problems.cleaning import N_CLASSES
from problems.reweighting import MetaWeightNet, noisy_imbalanced_digits

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "reweighting_digits.yaml"


def test_imbalance_and_noise_are_as_specified():
    split = noisy_imbalanced_digits(seed=3, imbalance=10.0, noise=0.4, n_max=110, meta_per_class=10,
                                    test_per_class=50)
    problem = MetaWeightNet(seed=3)
    expected = [round(110 * 10 ** (-r / 9)) for r in range(10)]
    assert problem.class_counts.tolist() == expected == [110, 85, 66, 51, 40, 31, 24, 18, 14, 11]
    n = sum(expected)
    assert problem.train_labels.shape == (n,) and problem.train_images.shape == (n, 1, 8, 8)
    # Training examples per digit, by TRUE label, follow the ranks; meta and test sets are balanced.
    per_digit = torch.bincount(problem.true_train_labels, minlength=N_CLASSES)
    assert per_digit[problem.class_order].tolist() == expected
    assert torch.bincount(problem.meta_labels, minlength=N_CLASSES).tolist() == [10] * N_CLASSES
    assert torch.bincount(problem.test_labels, minlength=N_CLASSES).tolist() == [50] * N_CLASSES
    # Exactly 40 % of the labels are wrong, each flipped one to another class, and the flips reach every class.
    wrong = problem.train_labels != problem.true_train_labels
    assert int(problem.corrupted.sum()) == round(0.4 * n) == 180
    assert torch.equal(wrong, problem.corrupted)
    assert set(problem.train_labels[wrong].tolist()) == set(range(N_CLASSES))
    # The three sets are disjoint rows of the 1797 digits.
    sets = [set(split[k].tolist()) for k in ("train", "meta", "test")]
    assert sum(map(len, sets)) == len(set().union(*sets)) == n + 100 + 500
    # The seed draws which digit is rare.
    assert not torch.equal(MetaWeightNet(seed=4).class_order, problem.class_order)


def test_refuses_more_examples_than_a_digit_has():
    with pytest.raises(ValueError, match="fewer than"):
        MetaWeightNet(n_max=170)


def test_weights_lie_in_the_open_unit_interval_and_constant_v_is_uniform_training():
    problem = MetaWeightNet(seed=0)
    losses, weights = problem.training_weights()
    assert losses.shape == weights.shape == (problem.train_labels.shape[0],)
    grid = problem.weight_function(torch.linspace(0, 20, 201))
    for w in (weights, grid):
        assert bool(((w > 0) & (w < 1)).all())
    batch = next(iter(problem.data()[0]))
    assert not torch.allclose(problem.lower_objective(batch), batch[0].new_zeros(()))
    with torch.no_grad():  # V = sigmoid(0.7) for every loss: the normalized g is the plain mean
        problem.upper[2].weight.zero_()
        problem.upper[2].bias.fill_(0.7)
    torch.testing.assert_close(problem.lower_objective(batch), problem.uniform_objective(batch))


def test_config_trains_three_steps_through_the_cli(tmp_path, capsys):
    main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--model.log_histograms_every", "0"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=3.ckpt")
    out = capsys.readouterr().out
    assert "MetaWeightNet: final metrics" in out and "weight_corrupted" in out
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    fresh = MetaWeightNet(seed=0)
    # Three outer steps moved V (the upper level) and the BatchNorm running statistics.
    assert not torch.equal(state["problem.upper.0.weight"], fresh.upper[0].weight.detach())
    assert not torch.equal(state["problem.lower.1.running_mean"], fresh.lower[1].running_mean)


def _reference_hypergradient(problem: MetaWeightNet, batch, meta, lr: float) -> dict[str, torch.Tensor]:
    """dF/dtheta of F(theta) = CE(meta; w - lr grad_w g(theta, w; batch)) by plain torch.autograd, written out."""
    w = {k: p.detach().clone().requires_grad_(True) for k, p in problem.lower.named_parameters()}
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in problem.upper.named_parameters()}
    images, labels = batch
    losses = F.cross_entropy(functional_call(problem.lower, w, (images,)), labels, reduction="none")
    v = functional_call(problem.upper, theta, (losses.detach(),))
    weighted = (v * losses).sum() / (v.sum() if problem.normalize else losses.shape[0])
    g = weighted + 0.5 * problem.mu * sum(p.square().sum() for p in w.values())
    grads = torch.autograd.grad(g, list(w.values()), create_graph=True)
    w1 = {k: p - lr * d for (k, p), d in zip(w.items(), grads, strict=True)}
    f = F.cross_entropy(functional_call(problem.lower, w1, (meta[0],)), meta[1])
    return dict(zip(theta, torch.autograd.grad(f, list(theta.values())), strict=True))


@pytest.mark.parametrize("normalize", [True, False])
def test_one_step_unrolled_hypergradient_matches_autograd_reference(normalize):
    problem = MetaWeightNet(seed=1, n_max=20, meta_per_class=2, test_per_class=1, batch_size=8, channels=2,
                            hidden=6, normalize=normalize, dtype="float64")
    batch, meta = next(iter(problem.data()[0])), problem.data()[1]
    assert batch[0].dtype == torch.float64 and batch[0].shape == (8, 1, 8, 8) and meta[0].shape == (20, 1, 8, 8)
    engine = hypergrad.Unrolled(inner_steps=1, inner_lr=0.5)
    got = engine.hypergradient(problem, batch, meta)
    want = _reference_hypergradient(problem, batch, meta, lr=0.5)
    assert set(got) == set(want) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    flat_got = torch.cat([got[k].flatten() for k in want])
    flat_want = torch.cat([want[k].flatten() for k in want])
    assert flat_want.norm() > 1e-6  # a real signal, not two zeros agreeing
    relative = ((flat_got - flat_want).norm() / flat_want.norm()).item()
    assert relative < 1e-8, relative  # (NaN fails too)
