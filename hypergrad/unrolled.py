"""Unrolled differentiation (reverse-mode iterative differentiation, ITD).

Maclaurin, Duvenaud, Adams 2015; Franceschi, Donini, Frasconi, Pontil 2017; truncation as in
Shaban, Cheng, Hatch, Boots 2019.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import vjp

from hypergrad import checks, dynamics, kernels
from hypergrad import tree as T
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Batches, Engine, Functions, Metrics, State
from hypergrad.tree import Tree


class Unrolled(Engine):
    """Differentiate f(x, y_T(x)) through ``inner_steps`` T gradient steps from the detached y.

    With ``truncate=k`` only the last k steps are differentiated (the first T - k run without a
    graph), so memory is set by k. The inner phase runs the undifferentiated steps; the estimate
    phase runs and differentiates the rest.

    With lower dynamics (``Functions.lower_step``, e.g. a learned optimizer: ``hypergrad.dynamics``)
    the unrolled steps are the problem's updates instead of gradient steps, the state carries their
    lower state and step count ``t``, and after ``horizon`` lower steps y restarts from its initial
    value (truncated backprop through a long lower run, as in meta-training learned optimizers).

    Oracle calls per outer step: T gradients of g, of which k (= T without truncation) are
    differentiated in reverse (about 2 more gradients' work each, with their activations held),
    1 gradient of f, and 1 extra gradient of g at y_T for the stationarity metric.

    Under a process group every step descends on the mean over ranks of grad_y g
    (``kernels.grad_y``), and the reverse pass averages the adjoint at each of those steps
    (``distributed.MeanOverRanks``), so each rank's local dF/dx has the true hypergradient as its mean
    over ranks: it is averaged once at the end, with f and the problem's metrics.

    Args:
        inner_steps: T.
        inner_lr: the step size a of the unrolled gradient steps.
        truncate: k, the number of final steps to differentiate; None = all T.
        horizon: with lower dynamics, lower steps before y and the lower state restart; None = never.
        outer_lr, outer_optimizer: see ``hypergrad.Engine``.
    """

    supports_lower_step = True

    def __init__(self, *, inner_steps: int = 10, inner_lr: float = 0.1, truncate: int | None = None,
                 horizon: int | None = None, outer_lr: float = 0.01, outer_optimizer: str = "adam") -> None:
        super().__init__(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr, outer_optimizer=outer_optimizer)
        if truncate is not None:
            checks.positive_int("Unrolled", "truncate", truncate)
            if truncate > inner_steps:
                raise ValueError(f"Unrolled: truncate must be <= inner_steps ({inner_steps}), got {truncate}")
        self.truncate = truncate
        if horizon is not None and checks.positive_int("Unrolled", "horizon", horizon) < inner_steps:
            raise ValueError(f"Unrolled: horizon must be >= inner_steps ({inner_steps}), got {horizon}")
        self.horizon = horizon

    @property
    def differentiated_steps(self) -> int:
        return self.inner_steps if self.truncate is None else self.truncate

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> State:
        state = super().init(fns, x, y, lower_batch)
        if fns.lower_step is not None:
            state.update(dynamics.init(fns, state["y"], "Unrolled"))
        return state

    def inner(self, fns: Functions, state: State, lower_batch: Any) -> State:
        steps = self.inner_steps - self.differentiated_steps
        if fns.lower_step is None:
            return {**state, "y": self.descend(fns.g, state["x"], state["y"], lower_batch, steps)}
        state = dynamics.reset(state, self.horizon)
        y, lower, t = dynamics.run(fns, state["x"], state["y"], state["lower"], state["t"], lower_batch, steps)
        return {**state, "y": y, "lower": lower, "t": t}

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        lower_batch, upper_batch = batches
        y_start, k = state["y"], self.differentiated_steps
        dynamic = fns.lower_step is not None

        def upper_after_unroll(x: Tree) -> tuple[Any, tuple]:
            if dynamic:
                y, lower, t = dynamics.run(fns, x, y_start, state["lower"], state["t"], lower_batch, k)
                extra = {"lower": T.detach(lower), "t": t}
            else:
                y, extra = self.descend(fns.g, x, y_start, lower_batch, k), {}
            return fns.f(x, y, upper_batch), (T.detach(y), extra)

        # vjp, not grad: grad runs the reverse pass inside its transform with create_graph, recording the
        # backward over the unroll and keeping it with every step's saved tensors: twice the memory
        # (experiments/results/speed/memory.md). The pullback runs after the transform has exited.
        f_value, pullback, (y_end, extra) = vjp(upper_after_unroll, state["x"], has_aux=True)
        (hypergrad,) = pullback(torch.ones_like(f_value), retain_graph=False)
        # f and the pullback saw this rank's upper batch: one all-reduce averages the hypergradient and the values.
        problem_metrics = dynamics.upper_metrics(fns, state["x"], y_end, upper_batch, reduce=False)
        hypergrad, f_value, problem_metrics = mean_over_ranks((hypergrad, f_value, problem_metrics))
        gy, g_value = kernels.grad_y(fns.g, state["x"], y_end, lower_batch)
        metrics = {
            "upper_objective": f_value,
            "lower_objective": g_value,
            "hypergradient_norm": T.norm(hypergrad),
            "lower_stationarity": T.norm(gy),
            **problem_metrics,
        }
        return {**state, "y": y_end, **extra}, hypergrad, metrics
