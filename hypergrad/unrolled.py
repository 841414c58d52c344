"""Unrolled differentiation (reverse-mode iterative differentiation, ITD).

Maclaurin, Duvenaud, Adams 2015; Franceschi, Donini, Frasconi, Pontil 2017; truncation as in
Shaban, Cheng, Hatch, Boots 2019.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor

from hypergrad import checks, dynamics, kernels, recipe
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.outer import OuterState
from hypergrad.recipe import GradientDescent, OuterOptimizer
from hypergrad.tree import Tree


class _UnrolledState(EngineState):
    outer: OuterState


class UnrolledState(_UnrolledState, total=False):
    """x, y, step and the outer optimizer's state; with lower dynamics also their entries (``hypergrad.dynamics``)."""

    lower: Tree
    t: Tensor
    y0: Tree
    lower0: Tree


class _LowerRun(TypedDict, total=False):
    lower: Tree
    t: Tensor


@dataclass(frozen=True, kw_only=True, repr=False)
class Unrolled(GradientDescent, OuterOptimizer, Engine[UnrolledState]):
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
        outer_lr, outer_optimizer: see ``hypergrad.recipe``.
    """

    supports_lower_step = True

    inner_steps: int = recipe.inner_steps()
    inner_lr: float = recipe.inner_lr()
    truncate: int | None = hyperparameter(checks.OrNone(checks.POSITIVE_INT), None, at_most="inner_steps")
    horizon: int | None = hyperparameter(checks.OrNone(checks.POSITIVE_INT), None, at_least="inner_steps")
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()

    @property
    def differentiated_steps(self) -> int:
        return self.inner_steps if self.truncate is None else self.truncate

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> UnrolledState:
        """x, y (projected onto X), the outer optimizer's state, step 0; the lower dynamics' entries if any."""
        start = self.start(fns, x, y)
        state: UnrolledState = {"x": start["x"], "y": start["y"], "outer": self.outer_transform().init(start["x"]),
                                "step": start["step"]}
        if fns.lower_step is not None:
            state = {**state, **dynamics.init(fns, state["y"], "Unrolled")}
        return state

    def inner(self, fns: Functions, state: UnrolledState, lower_batch: Any) -> UnrolledState:
        """The undifferentiated first T - k steps (none without truncation)."""
        steps = self.inner_steps - self.differentiated_steps
        if fns.lower_step is None:
            return {**state, "y": self.descend(fns.g, state["x"], state["y"], lower_batch, steps)}
        y, lower, t = dynamics.reset(state, self.horizon)
        y, lower, t = dynamics.run(fns, state["x"], y, lower, t, lower_batch, steps)
        return {**state, "y": y, "lower": lower, "t": t}

    def estimate(self, fns: Functions, state: UnrolledState, batches: Batches) -> tuple[UnrolledState, Tree, Metrics]:
        """The last k steps, recorded, and dF/dx by one reverse pass through them."""
        lower_batch, upper_batch = batches
        y_start, k = state["y"], self.differentiated_steps
        dynamic = fns.lower_step is not None

        def upper_after_unroll(x: Tree) -> tuple[Tensor, tuple[Tree, _LowerRun]]:
            extra: _LowerRun = {}  # a dict (torch.func's auxiliary outputs hold tensors, not None)
            if dynamic:
                y, lower, t = dynamics.run(fns, x, y_start, state["lower"], state["t"], lower_batch, k)
                extra = {"lower": T.detach(lower), "t": t}
            else:
                y = self.descend(fns.g, x, y_start, lower_batch, k)
            return fns.f(x, y, upper_batch), (T.detach(y), extra)

        # vjp, not grad: grad runs the reverse pass inside its transform with create_graph, recording the
        # backward over the unroll and keeping it with every step's saved tensors: twice the memory
        # (experiments/results/speed/memory.md). The pullback runs after the transform has exited.
        f_value, pullback, (y_end, extra) = kernels.vjp_with_aux(upper_after_unroll, state["x"])
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
