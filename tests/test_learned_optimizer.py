"""The learned optimizer: one step against the formula written out by hand, purity (vmap, grad in theta),
the torch.optim wrapper's state_dict and save/load, and training an MLP on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import grad, vmap

from bilevel.learned_optimizer import (
    LearnedOptimizer,
    LearnedOptimizerNet,
    lo_init_state,
    lo_step,
    theta_of,
)
from bilevel.mup import mlp

D = torch.float64


def rand_state(params: dict, gen: torch.Generator) -> dict:
    """A state as after some steps: random momenta, positive second moments."""
    state = {}
    for k, v in lo_init_state(params).items():
        r = torch.randn(v.shape, generator=gen, dtype=D)
        state[k] = r.abs() * 0.1 if k.endswith(("/v", "/row", "/col")) else r
    return state


def mlp_update(theta: dict, channels: list, p: torch.Tensor, t: float, s_p: float, step_mult: float):
    """p - d exp(0.001 a) step_mult s_p per element; (d, a) = MLP([14 normalized channels, 11 step features])."""
    eps = 1e-16
    channels = [x / math.sqrt((x**2).mean().item() + eps) for x in channels]
    taus = [1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5]
    time = [torch.tensor(math.tanh(t / tau - 1), dtype=D) for tau in taus]
    new_p = torch.empty_like(p)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in p.shape)).reshape(p.numel(), -1).tolist():
        index = tuple(index)
        x = torch.stack([ch[index] for ch in channels] + time)
        h = torch.relu(theta["net.0.weight"] @ x + theta["net.0.bias"])
        h = torch.relu(theta["net.2.weight"] @ h + theta["net.2.bias"])
        d, a = theta["net.4.weight"] @ h + theta["net.4.bias"]
        new_p[index] = p[index] - d * math.exp(0.001 * a.item()) * step_mult * s_p
    return new_p


def by_hand(theta: dict, p: torch.Tensor, g: torch.Tensor, st: dict, t: float, s_p: float, step_mult: float):
    """The update of one (R, C) matrix, from the docstring of bilevel.learned_optimizer."""
    R, C = p.shape
    eps = 1e-16
    m = [b * st[f"m{b}"] + (1 - b) * g for b in (0.9, 0.99, 0.999)]
    v = 0.999 * st["v"] + 0.001 * g**2
    r = torch.stack([0.999 * st["row"][i] + 0.001 * sum(g[i, j] ** 2 for j in range(C)) / C for i in range(R)])
    c = torch.stack([0.999 * st["col"][j] + 0.001 * sum(g[i, j] ** 2 for i in range(R)) / R for j in range(C)])
    vf = torch.stack([torch.stack([r[i] * c[j] / (r.mean() + eps) for j in range(C)]) for i in range(R)])
    rms, row, col = (v + eps).sqrt(), (r + eps).sqrt()[:, None].expand(R, C), (c + eps).sqrt()[None, :].expand(R, C)
    channels = [g, p, *m, rms, *(mb / (v + eps).sqrt() for mb in m), row, col, *(mb / (vf + eps).sqrt() for mb in m)]
    return mlp_update(theta, channels, p, t, s_p, step_mult), m, v, r, c


def by_hand_vector(theta: dict, p: torch.Tensor, g: torch.Tensor, st: dict, t: float, step_mult: float):
    """The update of a vector: no row/column factors, their channels fall back to v."""
    eps = 1e-16
    m = [b * st[f"m{b}"] + (1 - b) * g for b in (0.9, 0.99, 0.999)]
    v = 0.999 * st["v"] + 0.001 * g**2
    rms = (v + eps).sqrt()
    channels = [g, p, *m, rms, *(mb / rms for mb in m), rms, rms, *(mb / rms for mb in m)]
    return mlp_update(theta, channels, p, t, 1.0, step_mult)


def test_one_step_equals_the_formula():
    gen = torch.Generator().manual_seed(0)
    net = LearnedOptimizerNet(init="random", output_scale=1.0, generator=gen).double()
    theta = theta_of(net)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=D), "b": torch.randn(4, generator=gen, dtype=D)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=D) for k, v in params.items()}
    state = rand_state(params, gen)
    new, new_state = lo_step(theta, net, params, grads, state, torch.tensor(7), {"w": 0.25}, step_mult=0.01)
    st_w = {k.split("/")[1]: v for k, v in state.items() if k.startswith("w/")}
    want, m, v, r, c = by_hand(theta, params["w"], grads["w"], st_w, 7.0, 0.25, 0.01)
    assert not torch.allclose(new["w"], params["w"], atol=1e-4)  # the step is not negligible
    torch.testing.assert_close(new["w"], want, rtol=1e-10, atol=1e-12)
    for b, mb in zip((0.9, 0.99, 0.999), m, strict=True):
        torch.testing.assert_close(new_state[f"w/m{b}"], mb)
    torch.testing.assert_close(new_state["w/v"], v)
    torch.testing.assert_close(new_state["w/row"], r)
    torch.testing.assert_close(new_state["w/col"], c)
    assert "b/row" not in new_state
    st_b = {k.split("/")[1]: v for k, v in state.items() if k.startswith("b/")}
    torch.testing.assert_close(new["b"], by_hand_vector(theta, params["b"], grads["b"], st_b, 7.0, 0.01),
                               rtol=1e-10, atol=1e-12)


def test_default_init_starts_at_normalized_adam_direction():
    # With the random part of the output layer switched off, d is exactly m_0.9 / sqrt(v) normalized over the tensor.
    net = LearnedOptimizerNet(output_scale=0.0).double()
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=D)}
    grads = {"w": torch.randn(5, 3, generator=gen, dtype=D)}
    state = rand_state(params, gen)
    new, st = lo_step(theta_of(net), net, params, grads, state, torch.tensor(3), {"w": 0.5}, step_mult=0.1)
    direction = st["w/m0.9"] / (st["w/v"] + 1e-16).sqrt()
    direction = direction / direction.pow(2).mean().sqrt()
    torch.testing.assert_close(new["w"], params["w"] - 0.1 * 0.5 * direction)


def test_lo_step_is_vmappable_and_differentiable_in_theta():
    torch.manual_seed(0)
    net = LearnedOptimizerNet().double()
    theta = theta_of(net)
    params = {"w": torch.randn(5, 4, dtype=D), "b": torch.randn(4, dtype=D), "s": torch.randn((), dtype=D)}

    def loss(p):
        return (p["w"].sum(0) * p["b"]).pow(2).sum() + p["s"] ** 2 + p["w"].pow(2).sum()

    def unroll(th):  # three LO steps, then the loss: a meta-objective
        p, st = params, lo_init_state(params)
        for t in range(3):
            p, st = lo_step(th, net, p, grad(loss)(p), st, torch.tensor(t), {"w": 0.5}, 0.1)
        return loss(p)

    meta = grad(unroll)(theta)
    key, eps = "net.0.weight", 1e-6
    direction = torch.zeros_like(theta[key])
    direction[0, 6], direction[3, 2] = 1.0, 0.5
    fd = (unroll({**theta, key: theta[key] + eps * direction}) - unroll({**theta, key: theta[key] - eps * direction}))
    assert (meta[key] * direction).sum().abs() > 1e-3
    torch.testing.assert_close((meta[key] * direction).sum(), fd / (2 * eps), rtol=1e-6, atol=1e-9)

    particles = {k: v + 0.01 * torch.randn(4, *v.shape, dtype=D) for k, v in theta.items()}
    batched = vmap(unroll)(particles)
    looped = torch.stack([unroll({k: v[i] for k, v in particles.items()}) for i in range(4)])
    torch.testing.assert_close(batched, looped)
    assert batched.std() > 0


def test_meta_gradient_is_finite_where_gradients_are_exactly_zero():
    # Masked coordinates have g = 0 (so v = 0) at every step while still on the graph through p: a square root
    # without eps there gives 0 * inf = nan in the meta-gradient.
    torch.manual_seed(0)
    net = LearnedOptimizerNet(init="random", output_scale=1.0)
    params = {"w": torch.randn(4, 6), "b": torch.randn(6)}
    mask = (torch.arange(6) % 2).float()

    def loss(p):
        return (p["w"] ** 2 * mask).sum() + (p["b"] ** 2 * mask).sum()

    def unroll(th):
        p, st = params, lo_init_state(params)
        for t in range(3):
            p, st = lo_step(th, net, p, grad(loss)(p), st, torch.tensor(t), None, 0.1)
        return loss(p)

    meta = grad(unroll)(theta_of(net))
    assert all(torch.isfinite(v).all() for v in meta.values())
    assert any(v.abs().max() > 0 for v in meta.values())


def digits_problem():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, x, y, steps: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_training_an_mlp_on_digits_lowers_the_loss():
    x, y = digits_problem()
    torch.manual_seed(0)
    model = mlp(64, 10, base_width=32, width_mult=2.0)
    initial = F.cross_entropy(model(x), y).item()
    assert initial == pytest.approx(math.log(10), rel=1e-3)  # zero-initialized output layer
    opt = LearnedOptimizer(model.named_parameters(), step_mult=1e-3, multipliers=model.multipliers)
    final = train(opt, model, x, y, 200)
    assert final < 0.5 * initial, (initial, final)
    assert opt.param_groups[0]["lo_step"] == 200

    # Not a property of any per-parameter MLP: an un-meta-trained random LO leaves the loss where it was.
    torch.manual_seed(0)
    model = mlp(64, 10, base_width=32, width_mult=2.0)
    net = LearnedOptimizerNet(init="random", generator=torch.Generator().manual_seed(0))
    opt = LearnedOptimizer(model.named_parameters(), net=net, step_mult=1e-3, multipliers=model.multipliers)
    assert train(opt, model, x, y, 200) > 0.9 * initial


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    twin = small_model(99)
    twin.load_state_dict(model.state_dict())
    return twin


def run(opt, model, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb, yb = torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def test_state_dict_round_trip_and_save_load(tmp_path):
    mults = {"0.weight": 0.5}
    model = small_model(0)
    net = LearnedOptimizerNet(output_scale=0.3, generator=torch.Generator().manual_seed(1))
    opt = LearnedOptimizer(model.named_parameters(), net=net, step_mult=0.01, multipliers=mults)
    run(opt, model, 5, seed=0)

    # A second optimizer with another net and no history becomes the first one after load_state_dict.
    twin = copy_of(model)
    other = LearnedOptimizer(twin.named_parameters(), net=LearnedOptimizerNet(), step_mult=0.01, multipliers=mults)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lo_step"] == 5
    run(opt, model, 3, seed=1)
    run(other, twin, 3, seed=1)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # save/load carries theta and step_mult (not the per-parameter history): a fresh LO for a fresh model.
    opt.save(tmp_path / "lo.pt")
    a, b = small_model(3), small_model(3)
    fresh = LearnedOptimizer(a.named_parameters(), net=net, step_mult=0.01, multipliers=mults)
    loaded = LearnedOptimizer.load(tmp_path / "lo.pt", b.named_parameters(), multipliers=mults)
    assert loaded.param_groups[0]["step_mult"] == 0.01
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[k], v, rtol=0, atol=0)
    run(fresh, a, 4, seed=2)
    run(loaded, b, 4, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_parameters_without_gradient_are_left_alone():
    model = small_model(0)
    frozen = model[0].weight.detach().clone()
    opt = LearnedOptimizer(model.named_parameters())
    model(torch.randn(4, 6)).sum().backward()
    model[0].weight.grad = None
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight.grad, torch.zeros_like(model[2].weight))


def test_added_param_groups_are_named_and_scaled():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = LearnedOptimizer([("a", a)], net=LearnedOptimizerNet(output_scale=0.0), step_mult=0.1)
    opt.add_param_group({"params": [b], "multipliers": [0.5]})
    assert opt.param_groups[1]["names"] == ["g1.0"]
    a.grad, b.grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    # Same gradient, same (normalized) direction; the second group's update is half as large.
    assert a.abs().min() > 0
    torch.testing.assert_close(b, 0.5 * a)


def test_bad_inputs_are_named():
    net = LearnedOptimizerNet()
    theta = theta_of(net)
    p = {"w": torch.zeros(2, 3)}
    state = lo_init_state(p)
    with pytest.raises(ValueError, match="no gradient for parameter 'w'"):
        lo_step(theta, net, p, {}, state, torch.tensor(0))
    with pytest.raises(ValueError, match="gradient of 'w' has shape"):
        lo_step(theta, net, p, {"w": torch.zeros(3, 2)}, state, torch.tensor(0))
    with pytest.raises(ValueError, match="'v'"):
        lo_step(theta, net, p, {"w": torch.zeros(2, 3)}, state, torch.tensor(0), {"v": 2.0})
    with pytest.raises(ValueError, match="'w/row'"):
        lo_step(theta, net, p, {"w": torch.zeros(2, 3)}, lo_init_state({"w": torch.zeros(6)}), torch.tensor(0))
    with pytest.raises(ValueError, match="contains '/'"):
        lo_init_state({"a/b": torch.zeros(2)})
    with pytest.raises(ValueError, match="step_mult"):
        LearnedOptimizer(small_model(0).parameters(), step_mult=0.0)
    with pytest.raises(ValueError, match="empty"):
        LearnedOptimizer([])
    with pytest.raises(ValueError, match="init"):
        LearnedOptimizerNet(init="zeros")
    with pytest.raises(ValueError, match="not unique"):
        LearnedOptimizer([("a", torch.zeros(2)), ("a", torch.zeros(3))])
    opt = LearnedOptimizer([("a", torch.zeros(2))])
    with pytest.raises(ValueError, match="not unique"):
        opt.add_param_group({"params": [torch.zeros(1)], "names": ["a"]})
    with pytest.raises(ValueError, match="'nope'"):
        LearnedOptimizer(small_model(0).named_parameters(), multipliers={"nope": 1.0})
