"""muLO's learned optimizer (MuAdafacMLPLOpt): one step against the official formulas written out by hand,
meta-learned decays (meta-gradient = finite differences), vmap over particles, the seeded init, the
LORule interface shared with the reduced LO, and the torch.optim wrapper's save/load."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import grad, vmap

from bilevel.learned import (
    AdafacLONet,
    LearnedOptimizer,
    LearnedOptimizerNet,
    LORule,
    adafac_init_state,
    adafac_rule,
    adafac_step,
    make_rule,
    mlp,
    reduced_rule,
    rule_of,
    theta_of,
)
from bilevel.learned.adafac import FEATURES, INPUTS

D = torch.float64
TAUS = [1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5]


# -- the official formulas, by hand ------------------------------------------------------------------------------


def decay(d0: float, offset: float, clip: bool) -> float:
    """param_to_decay(decay_to_param(d0) + offset) = 1 - exp(10 (log(1 - d0) / 10 + offset)); clip for rms/adafactor."""
    d = 1 - math.exp(10 * (math.log(1 - d0) / 10 + offset))
    return min(max(d, 0.0), 1.0) if clip else d


def rsqrt_floor(x: torch.Tensor) -> torch.Tensor:
    """common.safe_rsqrt: 1 / sqrt(max(x, 1e-9))."""
    return 1 / torch.sqrt(torch.clamp(x, min=1e-9))


def hand_channels(theta: dict, p: torch.Tensor, g: torch.Tensor, st: dict) -> tuple[list, dict]:
    """The 28 input channels of muLO's ``_mod`` for one 2-d or 1-d tensor, and its new accumulators."""
    mom = [decay(b, x, False) for b, x in zip((0.9, 0.99, 0.999), theta["momentum_decays"].tolist(), strict=True)]
    beta = decay(0.999, theta["rms_decays"][0].item(), True)
    fac = [decay(b, x, True) for b, x in zip((0.9, 0.99, 0.999), theta["adafactor_decays"].tolist(), strict=True)]
    m = [mom[k] * st["m"][..., k] + (1 - mom[k]) * g for k in range(3)]
    v = beta * st["rms"][..., 0] + (1 - beta) * g * g
    q = g * g + 1e-30
    new = {"m": torch.stack(m, -1), "rms": v[..., None]}
    fac_g, rows, cols, fac_mom = [], [], [], []
    if p.dim() == 2:
        rows_n, cols_n = p.shape
        big = 1 if cols_n >= rows_n else 0  # factored_dims: d0 = the larger axis (the later one on a tie)
        small = 1 - big
        v_row, v_col = [], []
        for k in range(3):
            r = fac[k] * st["v_row"][:, k] + (1 - fac[k]) * q.mean(big)
            c = fac[k] * st["v_col"][:, k] + (1 - fac[k]) * q.mean(small)
            v_row.append(r)
            v_col.append(c)
            scale = rsqrt_floor(r / (r.mean() + 1e-9)).unsqueeze(big) * rsqrt_floor(c).unsqueeze(small)
            fac_g.append(g * scale)
            rows.append(r.unsqueeze(big).expand(rows_n, cols_n))
            cols.append(c.unsqueeze(small).expand(rows_n, cols_n))
            fac_mom.append(m[k] * scale)
        new["v_row"], new["v_col"] = torch.stack(v_row, -1), torch.stack(v_col, -1)
    else:
        diag = []
        for k in range(3):
            vd = fac[k] * st["v_diag"][..., k] + (1 - fac[k]) * q
            diag.append(vd)
            fac_g.append(g * rsqrt_floor(vd + 1e-9))
            rows.append(vd)
            cols.append(vd)
            fac_mom.append(m[k] * (vd + 1e-6) ** -0.5)
        new["v_diag"] = torch.stack(diag, -1)
    inv = 1 / torch.sqrt(v + 1e-6)
    channels = [g, p, *m, v, *(mk * inv for mk in m), inv, *fac_g, *rows, *cols,
                *(1 / torch.sqrt(r + 1e-8) for r in rows), *(1 / torch.sqrt(c + 1e-8) for c in cols), *fac_mom]
    return channels, new


def hand_update(theta: dict, channels: list, p: torch.Tensor, t: float, s_p: float, step_mult: float):
    """p - d exp(0.001 a) step_mult s_p per element; (d, a) = MLP([28 normalized channels, 11 step features])."""
    channels = [x / math.sqrt(1e-5 + (x**2).mean().item()) for x in channels]
    time = [math.tanh(t / tau - 1) for tau in TAUS]
    new_p = torch.empty_like(p)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in p.shape)).reshape(p.numel(), -1).tolist():
        index = tuple(index)
        x = torch.tensor([ch[index].item() for ch in channels] + time, dtype=D)
        h = torch.relu(theta["net.0.weight"] @ x + theta["net.0.bias"])
        h = torch.relu(theta["net.2.weight"] @ h + theta["net.2.bias"])
        d, a = (theta["net.4.weight"] @ h + theta["net.4.bias"]).tolist()
        new_p[index] = p[index] - d * math.exp(0.001 * a) * step_mult * s_p
    return new_p


def random_theta(seed: int) -> tuple[AdafacLONet, dict]:
    """A net and its theta with nonzero decay offsets and biases (so every part of theta matters)."""
    gen = torch.Generator().manual_seed(seed)
    net = AdafacLONet(generator=gen).double()
    theta = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=D) for k, v in theta_of(net).items()}
    return net, theta


def rand_state(params: dict, net: AdafacLONet, gen: torch.Generator) -> dict:
    """A state as after some steps: random momenta, positive second moments."""
    state = {}
    for k, v in adafac_init_state(params, net).items():
        r = torch.randn(v.shape, generator=gen, dtype=D)
        state[k] = r if k.endswith("/m") else r.abs() * 0.1
    return state


def test_one_step_equals_the_official_formulas():
    net, theta = random_theta(0)
    gen = torch.Generator().manual_seed(1)
    # (3, 4): the columns are the larger axis; (5, 2): the rows are, so the roles of v_row / v_col swap;
    # (3, 3): a tie, where d0 is the later axis (the columns).
    params = {"w": torch.randn(3, 4, generator=gen, dtype=D), "u": torch.randn(5, 2, generator=gen, dtype=D),
              "sq": torch.randn(3, 3, generator=gen, dtype=D), "b": torch.randn(4, generator=gen, dtype=D)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=D) for k, v in params.items()}
    state = rand_state(params, net, gen)
    mults = {"w": 0.25, "u": 3.0}
    new, new_state = adafac_step(theta, net, params, grads, state, torch.tensor(7), mults, step_mult=0.01)
    assert set(new_state) == set(state)
    for name in params:
        st = {k.split("/")[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
        channels, accumulators = hand_channels(theta, params[name], grads[name], st)
        assert len(channels) == 28
        want = hand_update(theta, channels, params[name], 7.0, mults.get(name, 1.0), 0.01)
        assert not torch.allclose(new[name], params[name], atol=1e-4)  # the step is not negligible
        torch.testing.assert_close(new[name], want, rtol=1e-10, atol=1e-12)
        for key, value in accumulators.items():
            torch.testing.assert_close(new_state[f"{name}/{key}"], value, rtol=1e-12, atol=1e-14)
    assert new_state["w/v_row"].shape == (3, 3) and new_state["u/v_row"].shape == (2, 3)


def test_default_step_mult_and_multiplier_scale_the_step():
    net, theta = random_theta(2)
    p = {"w": torch.randn(4, 3, dtype=D)}
    g = {"w": torch.randn(4, 3, dtype=D)}
    state = adafac_init_state(p, net)
    base, _ = adafac_step(theta, net, p, g, state, torch.tensor(0))  # net.step_mult = 0.001
    scaled, _ = adafac_step(theta, net, p, g, state, torch.tensor(0), {"w": 2.0}, step_mult=0.01)
    torch.testing.assert_close(scaled["w"] - p["w"], 20.0 * (base["w"] - p["w"]))


# -- differentiability, vmap ------------------------------------------------------------------------------------


def problem() -> tuple[dict, Callable]:
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=D), "b": torch.randn(4, generator=gen, dtype=D),
              "s": torch.randn((), generator=gen, dtype=D)}

    def loss(p):
        return (p["w"].sum(0) * p["b"]).pow(2).sum() + p["s"] ** 2 + p["w"].pow(2).sum()

    return params, loss


def unroller(net: AdafacLONet, steps: int):
    params, loss = problem()
    state0 = rand_state(params, net, torch.Generator().manual_seed(4))

    def unroll(th):  # a meta-objective: the loss after some LO steps
        p, st = params, state0
        for t in range(steps):
            p, st = adafac_step(th, net, p, grad(loss)(p), st, torch.tensor(t + 3), {"w": 0.5}, 0.1)
        return loss(p)

    return unroll


def test_the_decays_are_meta_learned():
    net, theta = random_theta(5)
    unroll = unroller(net, 2)
    meta = grad(unroll)(theta)
    eps = 1e-6
    for key in ("momentum_decays", "rms_decays", "adafactor_decays"):
        direction = torch.linspace(1.0, -0.5, theta[key].numel(), dtype=D)
        fd = (unroll({**theta, key: theta[key] + eps * direction})
              - unroll({**theta, key: theta[key] - eps * direction})) / (2 * eps)
        analytic = (meta[key] * direction).sum()
        assert analytic.abs() > 1e-6, (key, analytic)
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=0)


def test_vmap_over_particles_equals_separate_calls():
    net, theta = random_theta(6)
    unroll = unroller(net, 2)
    gen = torch.Generator().manual_seed(7)
    particles = {k: v + 0.01 * torch.randn(2, *v.shape, generator=gen, dtype=D) for k, v in theta.items()}
    batched = vmap(unroll)(particles)
    looped = torch.stack([unroll({k: v[i] for k, v in particles.items()}) for i in range(2)])
    torch.testing.assert_close(batched, looped)
    assert batched[0] != batched[1]


def test_gradient_cleaning_nan_and_clip():
    torch.manual_seed(0)
    net = AdafacLONet().double()
    clip = AdafacLONet(clip_grad=True).double()
    clip.load_state_dict(net.state_dict())
    p = {"w": torch.randn(3, 4, dtype=D), "b": torch.randn(4, dtype=D)}
    g = {"w": 100 * torch.randn(3, 4, dtype=D), "b": 100 * torch.randn(4, dtype=D)}
    norm = torch.sqrt(sum((x * x).sum() for x in g.values()))
    st = adafac_init_state(p, net)
    clipped, _ = adafac_step(theta_of(clip), clip, p, g, st, torch.tensor(1))
    by_hand, _ = adafac_step(theta_of(net), net, p, {k: v / norm for k, v in g.items()}, st, torch.tensor(1))
    for k in p:
        torch.testing.assert_close(clipped[k], by_hand[k])
    bad = {"w": g["w"].clone(), "b": g["b"].clone()}
    bad["w"][0, 0] = float("nan")
    new, new_st = adafac_step(theta_of(net), net, p, bad, st, torch.tensor(1))
    assert all(torch.isfinite(v).all() for v in [*new.values(), *new_st.values()])


# -- init, settings -----------------------------------------------------------------------------------------------


def test_random_init_is_seeded_and_shaped_as_the_official_one():
    def theta(seed):
        return theta_of(AdafacLONet(generator=torch.Generator().manual_seed(seed)))

    a, b, c = theta(0), theta(0), theta(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])
    assert len(FEATURES) == 28 and INPUTS == 39
    net = AdafacLONet()
    assert net.inputs == 39 and net.features == 28
    assert [tuple(layer.weight.shape) for layer in net.layers()] == [(32, 39), (32, 32), (2, 32)]
    for layer in net.layers():
        fan_in = layer.weight.shape[1]
        assert layer.weight.abs().max() <= 2 / math.sqrt(fan_in)  # truncated at 2 stddev
        assert torch.count_nonzero(layer.bias) == 0
    # haiku's TruncatedNormal(1/sqrt(fan_in)) has no variance correction: std = 0.8796 / sqrt(fan_in).
    assert (a["net.0.weight"].std() * math.sqrt(39)).item() == pytest.approx(0.8796, abs=0.05)
    assert all(torch.count_nonzero(a[k]) == 0 for k in ("momentum_decays", "rms_decays", "adafactor_decays"))
    assert AdafacLONet(**net.settings()).settings() == net.settings()


def test_both_rules_run_behind_one_interface():
    params, loss = problem()
    results = {}
    for rule in (reduced_rule(), adafac_rule(), rule_of(AdafacLONet()), rule_of(LearnedOptimizerNet())):
        assert isinstance(rule, LORule)
        rule.net.double()
        theta = theta_of(rule.net)
        p, st = params, rule.init_state(params)
        for t in range(2):
            p, st = rule.step(theta, p, grad(loss)(p), st, torch.tensor(t), {"w": 0.5}, 0.01)
        results[rule.kind] = loss(p)
        assert torch.isfinite(results[rule.kind])
    assert set(results) == {"reduced", "adafac"}
    assert make_rule("adafac", {"hidden": 8}).net.hidden == 8


# -- the torch.optim wrapper --------------------------------------------------------------------------------------


def digits_problem():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:512] / 16.0, dtype=torch.float32), torch.tensor(y[:512])


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, x, y, steps: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_learned_optimizer_trains_with_the_adafac_rule_and_round_trips(tmp_path):
    x, y = digits_problem()
    torch.manual_seed(0)
    model = mlp(64, 10, base_width=32, width_mult=2.0)
    net = AdafacLONet(generator=torch.Generator().manual_seed(0))
    opt = LearnedOptimizer(model.named_parameters(), net=net, multipliers=model.mulo_multipliers(32.0))
    assert opt.param_groups[0]["step_mult"] == net.step_mult == 0.001
    losses = train(opt, model, x, y, 30)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    assert opt.param_groups[0]["lo_step"] == 30

    # save/load: kind and settings travel with theta; the loaded LO takes bit-identical steps.
    custom = AdafacLONet(hidden=16, exp_mult=0.01, clip_grad=True, initial_rms_decays=(0.99,),
                         generator=torch.Generator().manual_seed(1))
    saver = LearnedOptimizer([("p", torch.zeros(1))], net=custom, step_mult=0.02)
    saver.save(tmp_path / "mulo.pt")
    blob = torch.load(tmp_path / "mulo.pt", weights_only=True)
    assert blob["format"] == "bilevel.learned.LearnedOptimizer/2" and blob["kind"] == "adafac"
    torch.manual_seed(5)
    a = mlp(64, 10, base_width=32, width_mult=2.0)
    b = mlp(64, 10, base_width=32, width_mult=2.0)
    b.load_state_dict(a.state_dict())
    fresh = LearnedOptimizer(a.named_parameters(), net=custom, step_mult=0.02, multipliers=a.multipliers)
    loaded = LearnedOptimizer.load(tmp_path / "mulo.pt", b.named_parameters(), multipliers=b.multipliers)
    assert loaded.rule.kind == "adafac" and loaded.rule.settings == custom.settings()
    assert loaded.param_groups[0]["step_mult"] == 0.02
    train(fresh, a, x, y, 3, seed=1)
    train(loaded, b, x, y, 3, seed=1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_reduced_optimizer_files_still_load(tmp_path):
    net = LearnedOptimizerNet(hidden=8, output_scale=0.3, generator=torch.Generator().manual_seed(2))
    # Format 1, as written before the muLO optimizer existed.
    torch.save({"theta": net.state_dict(), "hidden": 8, "step_mult": 0.05}, tmp_path / "v1.pt")
    LearnedOptimizer([("p", torch.zeros(1))], net=net, step_mult=0.05).save(tmp_path / "v2.pt")
    for file in ("v1.pt", "v2.pt"):
        a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        b.load_state_dict(a.state_dict())
        loaded = LearnedOptimizer.load(tmp_path / file, b.named_parameters())
        assert loaded.rule.kind == "reduced" and loaded.net.hidden == 8
        reference = LearnedOptimizer(a.named_parameters(), net=net, step_mult=0.05)
        for opt, model in ((reference, a), (loaded, b)):
            for _ in range(2):
                opt.zero_grad()
                model(torch.ones(2, 5)).pow(2).sum().backward()
                opt.step()
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_bad_inputs_are_named(tmp_path):
    net = AdafacLONet()
    theta = theta_of(net)
    p = {"w": torch.zeros(2, 3)}
    state = adafac_init_state(p, net)
    with pytest.raises(ValueError, match="no gradient for parameter 'w'"):
        adafac_step(theta, net, p, {}, state, torch.tensor(0))
    with pytest.raises(ValueError, match="gradient of 'w' has shape"):
        adafac_step(theta, net, p, {"w": torch.zeros(3, 2)}, state, torch.tensor(0))
    with pytest.raises(ValueError, match="'v'"):
        adafac_step(theta, net, p, {"w": torch.zeros(2, 3)}, state, torch.tensor(0), {"v": 2.0})
    with pytest.raises(ValueError, match="nothing for 'w/v_row'"):
        adafac_step(theta, net, p, {"w": torch.zeros(2, 3)}, {k: v for k, v in state.items() if k != "w/v_row"},
                    torch.tensor(0))
    with pytest.raises(ValueError, match=r"shape \(6, 3\) for 'w/m'"):
        adafac_step(theta, net, p, {"w": torch.zeros(2, 3)}, adafac_init_state({"w": torch.zeros(6)}),
                    torch.tensor(0))
    with pytest.raises(ValueError, match="theta has no"):
        adafac_step({k: v for k, v in theta.items() if k != "rms_decays"}, net, p, {"w": torch.zeros(2, 3)}, state,
                    torch.tensor(0))
    with pytest.raises(ValueError, match="contains '/'"):
        adafac_init_state({"a/b": torch.zeros(2)})
    with pytest.raises(ValueError, match="hidden"):
        AdafacLONet(hidden=0)
    with pytest.raises(ValueError, match="initial_rms_decays"):
        AdafacLONet(initial_rms_decays=(1.0,))
    with pytest.raises(ValueError, match="do not broadcast"):
        AdafacLONet(initial_adafactor_decays=(0.9, 0.99))
    with pytest.raises(ValueError, match="AdafacLONet"):
        adafac_rule(LearnedOptimizerNet())
    with pytest.raises(ValueError, match="rule_of"):
        rule_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown LO kind"):
        make_rule("sgd", {})  # type: ignore[arg-type]
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved learned optimizer"):
        LearnedOptimizer.load(tmp_path / "other.pt", [torch.zeros(1)])
