"""Memory of Unrolled and the IFT engines, counted by live tensor storages (``LiveBytes``) on a small MLP.

Not timed. The tolerances are fractions of P, the bytes of one copy of the lower variables y: every
failure these tests guard against (a graph or a vector kept per step or per iteration) costs at least
one P per step, usually several, while what legitimately varies is a few scalars.
"""

from __future__ import annotations

import pytest
import torch

from experiments.bench import memory, models
from experiments.bench.common import LiveBytes, peak_bytes
from hypergrad import CG, Neumann, Unrolled
from hypergrad.engine import Engine

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return models.l2_problem(models.mlp(width=16, depth=1), batch_size=32)


def _p(problem) -> int:
    return memory.state_bytes(problem[2])


def _peak(problem, engine: Engine) -> int:
    fns, x, y, batches = problem
    state = engine.init(fns, x, y)
    return peak_bytes(lambda: engine.step(fns, state, batches), CPU)


def _live_after_steps(problem, engine: Engine, steps: int, keep: bool = False) -> tuple[list[int], int]:
    fns, x, y, batches = problem
    live, kept = [], []
    with LiveBytes() as mode:
        state = engine.init(fns, x, y)
        for _ in range(steps):
            state, _ = engine.step(fns, state, batches)
            if keep:
                kept.append(state)  # a leak on purpose: the control case
            live.append(mode.live)
    return live, memory.state_bytes(state)


@pytest.mark.parametrize("engine", [Unrolled(inner_steps=4), CG(iters=5, inner_steps=2)],
                         ids=lambda e: type(e).__name__)
def test_live_bytes_do_not_grow_over_outer_steps(problem, engine: Engine) -> None:
    p = _p(problem)
    live, state = _live_after_steps(problem, engine, 20)
    assert max(live) - min(live) <= p // 4, live
    # Back to baseline: after a step only the state is alive (x, y, Adam moments, CG's v), no graph.
    assert state <= live[-1] <= state + p // 4


def test_the_live_count_sees_a_leak(problem) -> None:
    # Control: keeping every state (x, y, two Adam moments: 4 P) must show as growth, or the test above proves nothing.
    p = _p(problem)
    live, _ = _live_after_steps(problem, Unrolled(inner_steps=2), 6, keep=True)
    growth = [b - a for a, b in zip(live[:-1], live[1:], strict=True)]
    assert min(growth) >= 3 * p


def test_unrolled_peak_grows_with_t_by_what_one_step_keeps(problem) -> None:
    p = _p(problem)
    # From T = 2 on: the first step starts from the detached y, which its graph does not own.
    peaks = {t: _peak(problem, Unrolled(inner_steps=t)) for t in (2, 4, 8)}
    assert peaks[2] < peaks[4] < peaks[8]
    slope_a, slope_b = (peaks[4] - peaks[2]) / 2, (peaks[8] - peaks[4]) / 4
    assert abs(slope_a - slope_b) <= 0.05 * slope_b  # linear in T
    # The slope is y_t plus what autograd keeps for one differentiated step, not twice that (which a
    # reverse pass by torch.func.grad costs: it records the backward over the unroll).
    fns, x, y, batches = problem
    saved = memory.saved_per_step(fns, x, y, batches[0])
    predicted = sum(saved.values())
    assert saved["y copy"] == p
    assert abs(slope_b - predicted) <= 0.1 * predicted, (slope_b / p, predicted / p)


def test_truncation_caps_unrolled_memory_near_t_equal_k(problem) -> None:
    one_step = _peak(problem, Unrolled(inner_steps=2)) - _peak(problem, Unrolled(inner_steps=1))
    for k in (1, 3):
        truncated = _peak(problem, Unrolled(inner_steps=12, truncate=k))
        reference = _peak(problem, Unrolled(inner_steps=k))
        # The 12 - k undifferentiated steps keep nothing: within half a differentiated step of T = k.
        assert abs(truncated - reference) <= one_step // 2, (k, truncated, reference, one_step)


@pytest.mark.parametrize("make", [lambda k: CG(iters=k, inner_steps=1), lambda k: Neumann(terms=k, inner_steps=1)],
                         ids=["CG", "Neumann"])
def test_implicit_peak_does_not_grow_with_k(problem, make) -> None:
    p = _p(problem)
    peaks = [_peak(problem, make(k)) for k in (2, 8, 32)]
    # A vector kept per iteration would add >= 30 P from K = 2 to K = 32; allow a quarter of one.
    assert max(peaks) - min(peaks) <= p // 4, [v / p for v in peaks]
