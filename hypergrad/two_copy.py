"""The two-copy engine of F2SA and Penalty (Kwon, Kwon, Wright, Nowak, ICML 2023 and ICLR 2024).

Both track two copies of the lower variables,

    z ~ argmin_{y in Y} g(x, y),        y ~ argmin_{y in Y} [w_f f + w_g g](x, y),

and move x along the gradient of the penalty function L_lam(x) = min_y [f + lam g] - lam min_z g
with lam = w_g / w_f (Danskin's theorem: only first derivatives at the two minimizers):

    d = grad_x f(x, y) + lam (grad_x g(x, y) - grad_x g(x, z))

One outer step k (T = ``inner_steps``):

    inner:     T times  z <- P_Y(z - gamma_z grad_y g(x, z))
    estimate:  T times  y <- P_Y(y - gamma_y (w_f grad_y f(x, y) + w_g grad_y g(x, y)));  d at (x, y, z)
    outer:     x <- P_X(the engine's outer transform along d);  the schedule's entries at k + 1

z and y do not interact at fixed x, so the order is immaterial; y's steps need the upper batch,
so they run in ``estimate``. Everything that differs between the two methods is a ``Schedule``:
F2SA's (w_f, w_g) = (1, lam_k) with decaying steps and a growing lam_k, Penalty's (sigma_k, 1),
lam = 1 / sigma_k, with constant steps; and each engine's outer transform. With ``momentum``
every gradient is a STORM estimate (``hypergrad.first_order``) with the schedule's eta.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, TypedDict

import torch
from torch import Tensor

from hypergrad import checks, first_order
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.first_order import Storm, chain, dtype_of
from hypergrad.outer import OuterState
from hypergrad.tree import Tree


class ScheduleEntries(TypedDict, total=False):
    """The state entry of a schedule: F2SA's multiplier lam_k or Penalty's sigma_k (0-d)."""

    lam: Tensor
    sigma: Tensor


class _TwoCopyState(EngineState):
    outer: OuterState
    z: Tree
    """The lower copy z ~ y*(x) (shapes of y); y is the penalized copy."""


class TwoCopyState(_TwoCopyState, ScheduleEntries, total=False):
    """x, y, z, step, the outer transform's state, the schedule's entry; ``storm`` with momentum."""

    storm: Storm


class Penalized(NamedTuple):
    """The penalized copy's step at one outer step, and what the direction and the metrics take from it."""

    lr: Tensor | float
    """The step size of y."""
    w_f: Tensor | float
    w_g: Tensor | float
    """y descends on w_f f + w_g g."""
    lam: Tensor
    """The multiplier of the direction, w_g / w_f."""
    metrics: Metrics
    """The schedule's own metric ({"lam": lam_k} or {"sigma": sigma_k})."""


class Schedule(Protocol):
    """What distinguishes F2SA from Penalty, at the state's outer step k."""

    def entries(self, step: Tensor, dtype: torch.dtype) -> ScheduleEntries:
        """The state's schedule entry at outer step ``step`` (0-d int64), in ``dtype``."""
        ...

    def lower_lr(self, state: TwoCopyState) -> Tensor | float:
        """The step size of z."""
        ...

    def penalized(self, state: TwoCopyState) -> Penalized: ...

    def storm_eta(self, state: TwoCopyState) -> Tensor:
        """STORM's eta (0-d, the state's dtype)."""
        ...


class TwoCopy(Engine[TwoCopyState]):
    """Two copies of y and the direction of the penalty function; a ``Schedule`` makes it F2SA or Penalty.

    Subclasses are dataclasses declaring ``inner_steps`` (T >= 1), ``momentum`` and their schedule's
    hyperparameters, and build the schedule in ``penalty_schedule``.
    """

    inner_steps: int
    momentum: bool

    @property
    def penalty_schedule(self) -> Schedule:
        raise NotImplementedError

    def lower_solution(self, state: TwoCopyState) -> Tree:
        # z tracks y*(x); y minimizes the penalized f + lam g and is pulled toward the upper objective.
        return state["z"]

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> TwoCopyState:
        """x, y (projected onto X, Y), z = y, step 0, the schedule's entry at step 0; STORM chains with momentum."""
        start = self.start(fns, x, y)
        x, y, step = start["x"], start["y"], start["step"]
        state: TwoCopyState = {"x": x, "y": y, "outer": self.outer_transform().init(x), "step": step, "z": dict(y),
                               **self.penalty_schedule.entries(step, dtype_of(start))}
        if self.momentum:
            state["storm"] = first_order.storm_memory(x, y)
        return state

    def inner(self, fns: Functions, state: TwoCopyState, lower_batch: Any) -> TwoCopyState:
        """T (projected) steps of z on g(x, .)."""
        storm = state.get("storm")
        lr = self.penalty_schedule.lower_lr(state)
        z, memory = first_order.descend_lower(fns.g, state["x"], state["z"], lower_batch, lr, self.inner_steps,
                                              fns.project_y, chain(storm, "z"), self._keeps(state))
        new: TwoCopyState = {**state, "z": z}
        if storm is not None and memory is not None:
            new["storm"] = {**storm, "z": memory}
        return new

    def estimate(self, fns: Functions, state: TwoCopyState, batches: Batches) -> tuple[TwoCopyState, Tree, Metrics]:
        """T (projected) steps of y on w_f f + w_g g, then the direction d at (x, y, z)."""
        x, storm, keeps = state["x"], state.get("storm"), self._keeps(state)
        pen = self.penalty_schedule.penalized(state)
        y, y_memory = first_order.descend_penalized(fns, x, state["y"], batches, pen.lr, pen.w_f, pen.w_g,
                                                    self.inner_steps, chain(storm, "y"), keeps)
        d, pieces, d_memory = first_order.direction(fns, x, y, state["z"], batches, pen.lam, chain(storm, "d"),
                                                    None if keeps is None else keeps[0])
        state = {**state, "y": y}
        if storm is not None and y_memory is not None and d_memory is not None:
            state["storm"] = {**storm, "y": y_memory, "d": d_memory}
        metrics = first_order.metrics(fns, state, d, pieces, pen.lam, pen.w_f, pen.w_g, pen.lr, batches[1])
        return state, d, {**metrics, **pen.metrics}

    def outer(self, fns: Functions, state: TwoCopyState, hypergrad: Tree) -> TwoCopyState:
        """The projected outer step (``Engine.outer``), then the schedule's entry at k + 1."""
        state = super().outer(fns, state, hypergrad)
        return {**state, **self.penalty_schedule.entries(state["step"], dtype_of(state))}

    def _keeps(self, state: TwoCopyState) -> tuple[Tensor, Tensor] | None:
        """STORM's 1 - eta for the first gradient of a chain in this step and for the others; None without momentum."""
        if not self.momentum:
            return None
        eta = self.penalty_schedule.storm_eta(state)
        return first_order.storm_keep(eta, state["step"], True), first_order.storm_keep(eta, state["step"], False)


def momentum() -> Any:
    """STORM estimators for every gradient."""
    return checks.hyperparameter(checks.BOOLEAN, False)


def momentum_eta() -> Any:
    """STORM's eta (at k = 0 for F2SA), in (0, 1]."""
    return checks.hyperparameter(checks.Real("in (0, 1]", lambda v: 0 < v <= 1), 0.5)
