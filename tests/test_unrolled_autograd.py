"""Unrolled in a plain eager call unrolls on autograd's tape; under vmap or compile on torch.func. Same numbers.

The tape path (``hypergrad.dynamics.taped_grad_y`` and one ``torch.autograd.grad``) is checked against the
torch.func path (forced with ``hypergrad.unrolled._TAPE = False``) on an MLP with LayerNorm in float64: plain,
truncated, restarted from y0 = lower_start(x) (MAML, differentiated through y0), under lower dynamics with a
horizon, and both; over several outer steps, so the states carried from step to step agree too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from hypergrad import Functions, Unrolled, dynamics, kernels
from hypergrad import unrolled as unrolled_module

D = torch.float64


def problem(restart: bool, dynamic: bool) -> tuple[Functions, dict, dict, tuple]:
    """Per-parameter L2 on a 5-8-3 MLP with LayerNorm; x also holds y0 (``restart``), a log step size (``dynamic``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    y = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = {f"decay.{k}": torch.full_like(v, -2.0) + 0.1 * torch.randn_like(v) for k, v in y.items()}
    if restart:
        x |= {f"init.{k}": v + 0.1 * torch.randn_like(v) for k, v in y.items()}
    if dynamic:
        x["log_lr"] = torch.tensor(-1.5, dtype=D)

    def loss(params: dict, data: tuple) -> torch.Tensor:
        inputs, labels = data
        return F.cross_entropy(functional_call(net, params, (inputs,)), labels)

    def g(x: dict, y: dict, data: tuple) -> torch.Tensor:
        return loss(y, data) + 0.5 * sum((x[f"decay.{k}"].exp() * y[k].square()).sum() for k in y)

    def f(x: dict, y: dict, data: tuple) -> torch.Tensor:
        return loss(y, data)

    def lower_step(x: dict, y: dict, grad_y: dict, lower: dict, t: torch.Tensor) -> tuple[dict, dict]:
        # Heavy ball with a step size learned in x and one that shrinks with t: every input matters.
        m = {k: 0.8 * lower[k] + grad_y[k] for k in y}
        lr = x["log_lr"].exp() / (1 + 0.1 * t)
        return {k: y[k] - lr * m[k] for k in y}, m

    fns = Functions(
        f=f, g=g, name="LayerNormMLP",
        lower_start=(lambda x: {k: x[f"init.{k}"] for k in y}) if restart else None,
        lower_step=lower_step if dynamic else None,
        init_lower_state=(lambda y: {k: torch.zeros_like(v) for k, v in y.items()}) if dynamic else None,
    )
    gen = torch.Generator().manual_seed(1)
    batches = tuple((torch.randn(16, 5, generator=gen, dtype=D), torch.randint(0, 3, (16,), generator=gen))
                    for _ in range(2))
    return fns, x, y, batches


def run(engine: Unrolled, fns: Functions, x: dict, y: dict, batches: tuple, tape: bool, monkeypatch,
        steps: int = 3) -> tuple[list, dict]:
    """The hypergradients of ``steps`` outer steps and the final state, on the tape or on torch.func."""
    monkeypatch.setattr(unrolled_module, "_TAPE", tape)
    state, grads = engine.init(fns, x, y), []
    for _ in range(steps):
        _, hypergrad, metrics = engine.estimate(fns, engine.inner(fns, state, batches[0]), batches)
        grads.append((hypergrad, metrics))
        state, _ = engine.step(fns, state, batches)
    return grads, state


def assert_same(a, b) -> None:
    """Equal to rounding in float64 (in practice bit for bit: the same formulas in the same order)."""
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


CASES = {
    "plain": (dict(inner_steps=6, inner_lr=0.3), False, False),
    "truncated": (dict(inner_steps=6, inner_lr=0.3, truncate=2), False, False),
    "lower_start": (dict(inner_steps=4, inner_lr=0.3), True, False),
    "lower_start truncated": (dict(inner_steps=4, inner_lr=0.3, truncate=3), True, False),
    "dynamics with horizon": (dict(inner_steps=3, horizon=7), False, True),
    "dynamics truncated": (dict(inner_steps=4, truncate=2), False, True),
    "dynamics and lower_start": (dict(inner_steps=3), True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tape_equals_torch_func(case: str, monkeypatch) -> None:
    options, restart, dynamic = CASES[case]
    fns, x, y, batches = problem(restart, dynamic)
    engine = Unrolled(outer_lr=0.05, **options)
    taped = []
    real = dynamics.taped_grad_y
    monkeypatch.setattr(dynamics, "taped_grad_y", lambda *a: taped.append(1) or real(*a))
    func_grads, func_state = run(engine, fns, x, y, batches, False, monkeypatch)
    assert not taped
    tape_grads, tape_state = run(engine, fns, x, y, batches, True, monkeypatch)
    assert len(taped) == 3 * engine.differentiated_steps * 2  # each step's estimate and the one in step()
    for (tape_h, tape_m), (func_h, func_m) in zip(tape_grads, func_grads, strict=True):
        assert_same(tape_h, func_h)
        assert_same(tape_m, func_m)
        assert all(v.abs().sum() > 0 for k, v in tape_h.items() if k.startswith("decay"))
        if dynamic:
            assert tape_h["log_lr"] != 0
        if restart and "truncate" not in options:  # differentiated through y0 = lower_start(x)
            assert all(v.abs().sum() > 0 for k, v in tape_h.items() if k.startswith("init"))
    assert_same(tape_state, func_state)
    assert not any(v.requires_grad for v in tape_state.values() if isinstance(v, torch.Tensor))


def test_vmap_takes_torch_func_and_agrees(monkeypatch) -> None:
    """A population's vmap (batch 1 here) cannot go on the tape: it takes torch.func and gives the same numbers."""
    fns, x, y, batches = problem(True, True)
    engine = Unrolled(inner_steps=3)
    state = engine.init(fns, x, y)
    taped = []
    real = dynamics.taped_grad_y
    monkeypatch.setattr(dynamics, "taped_grad_y", lambda *a: taped.append(1) or real(*a))
    plain = engine.estimate(fns, state, batches)[1]
    assert len(taped) == 3
    batched = vmap(lambda s: engine.estimate(fns, s, batches)[1])(tree_map(lambda v: v[None], state))
    assert len(taped) == 3
    torch.testing.assert_close({k: v[0] for k, v in batched.items()}, plain, rtol=1e-12, atol=1e-15)


def test_counted_gradients_take_torch_func(monkeypatch) -> None:
    """A replaced kernels.grad_y (experiments.oracles counts by replacing it) sees every step's gradient."""
    from experiments.oracles import count_oracles

    fns, x, y, batches = problem(False, False)
    engine = Unrolled(inner_steps=5)
    state = engine.init(fns, x, y)
    plain = engine.estimate(fns, state, batches)[1]
    with count_oracles() as calls:
        counted = engine.estimate(fns, state, batches)[1]
    assert calls["gradients"] == 5  # the steps; the metrics come from the last step's own gradient
    assert_same(counted, plain)
    assert kernels.grad_y is unrolled_module._FUNC_GRAD_Y


def test_no_grad_caller_and_zero_steps(monkeypatch) -> None:
    """The tape is recorded under a caller's no_grad too; with T = 0 and f free of x, dF/dx = 0 as with vjp."""
    fns, x, y, batches = problem(False, False)
    engine = Unrolled(inner_steps=4)
    state = engine.init(fns, x, y)
    with torch.no_grad():
        quiet = engine.estimate(fns, state, batches)[1]
    assert_same(quiet, engine.estimate(fns, state, batches)[1])
    zero = Unrolled(inner_steps=0)
    for tape in (True, False):
        monkeypatch.setattr(unrolled_module, "_TAPE", tape)
        hypergrad = zero.estimate(fns, zero.init(fns, x, y), batches)[1]
        assert all(torch.equal(v, torch.zeros_like(x[k])) for k, v in hypergrad.items())


def test_the_tape_holds_what_torch_func_holds(monkeypatch) -> None:
    """Peak memory of an estimate: the tape keeps each step's graph as torch.func does, not more per step.

    It keeps one thing more, whatever T: the first step's terms in y alone (here the network's forward and
    backward at y0), which torch.func leaves off the record because y0 is a constant there.
    """
    from experiments.bench import common, models

    torch.manual_seed(0)
    fns, x, y, batches = models.l2_problem(models.mlp(width=64, depth=1), batch_size=16)
    peaks = {}
    for steps in (5, 10):
        engine = Unrolled(inner_steps=steps, inner_lr=0.1)
        state = engine.init(fns, x, y)
        for tape in (True, False):
            monkeypatch.setattr(unrolled_module, "_TAPE", tape)
            run = lambda e=engine, s=state: e.estimate(fns, s, batches)  # noqa: E731
            peaks[tape, steps] = common.peak_bytes(run, torch.device("cpu"))
    slope = {tape: (peaks[tape, 10] - peaks[tape, 5]) / 5 for tape in (True, False)}
    assert peaks[True, 10] <= 1.1 * peaks[False, 10]
    assert slope[True] <= 1.02 * slope[False]


@pytest.mark.parametrize("tape", [True, False])
def test_metrics_are_those_of_the_last_steps_gradient(monkeypatch, tape: bool) -> None:
    """lower_objective and lower_stationarity: g and |grad_y g| at y_{T-1}, by hand, on both paths."""
    monkeypatch.setattr(unrolled_module, "_TAPE", tape)
    fns, x, y, batches = problem(False, False)
    engine = Unrolled(inner_steps=3, inner_lr=0.2)
    state = engine.init(fns, x, y)
    _, _, metrics = engine.estimate(fns, state, batches)
    for _ in range(2):  # y_{T-1} by hand: two gradient steps
        y = {k: v.detach().requires_grad_() for k, v in y.items()}
        gy = dict(zip(y, torch.autograd.grad(fns.g(x, y, batches[0]), list(y.values())), strict=True))
        y = {k: v - 0.2 * gy[k] for k, v in y.items()}
    y = {k: v.detach().requires_grad_() for k, v in y.items()}
    value = fns.g(x, y, batches[0])
    gy = torch.autograd.grad(value, list(y.values()))
    torch.testing.assert_close(metrics["lower_objective"], value.detach())
    torch.testing.assert_close(metrics["lower_stationarity"], torch.sqrt(sum(v.square().sum() for v in gy)))
