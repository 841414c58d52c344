"""Unrolled differentiation (reverse-mode iterative differentiation, ITD).

Maclaurin, Duvenaud, Adams 2015; Franceschi, Donini, Frasconi, Pontil 2017; truncation as in
Shaban, Cheng, Hatch, Boots 2019. With a lower level restarted from x at every outer step
(``Functions.lower_start``) it is MAML (Finn, Abbeel, Levine 2017), and with ``first_order=True``
first-order MAML (Finn et al. 2017; Nichol, Achiam, Schulman 2018).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch
from torch import Tensor

from hypergrad import checks, dynamics, kernels, recipe
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics, restart_lower
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

    With a restarted lower level (``Functions.lower_start``: y0 = lower_start(x), e.g. y0 = x in MAML)
    every outer step's run begins at y0 (with lower dynamics: their initial state at y0 and t = 0)
    and, without truncation, the reverse pass goes through y0 into x too, so MAML's second-order
    terms are exact. With ``truncate=k < T`` the first T - k steps from y0 are not differentiated and
    the path through y0 is dropped with them. ``first_order=True`` runs all T steps undifferentiated
    and takes dy_T/dy0 as the identity: dF/dx = grad_x f + (d lower_start/dx)^T grad_y f at (x, y_T),
    first-order MAML; it needs ``lower_start`` (otherwise dF/dx would be grad_x f alone).

    Oracle calls per outer step: T gradients of g, of which k (= T without truncation; 0 with
    ``first_order``) are differentiated in reverse (about 2 more gradients' work each, with their
    activations held), and 1 gradient of f. The logged ``lower_objective`` and ``lower_stationarity``
    are those of the last step's own gradient, at y_{T-1} on that step's minibatch: one more gradient
    at y_T would cost 1-12 % of the time at T = 50 down to 5 (experiments/results/speed/unrolled.md).
    With ``first_order`` no step is recorded, and they cost that one gradient at y_T.

    How the k steps are recorded: in a plain eager call on autograd's tape (each gradient taken with
    ``create_graph``, ``dynamics.taped_grad_y``, and the reverse pass one ``torch.autograd.grad``), as
    TorchOpt's MetaSGD and higher do; under a torch.func transform (a population's vmap) or
    ``torch.compile`` (``kernels._plain_call``) with torch.func (``vjp`` over ``torch.func.grad`` steps),
    which composes with them. The two give the same numbers; the tape skips torch.func's per-op wrapping,
    which costs as much as the math on small problems. Both hold the k steps' graphs until the reverse
    pass; the tape also holds, once, the first step's terms in y alone (y0 is a leaf on the tape, a
    constant to torch.func): 1.2 MiB, about one parameter copy, on the MLP of memory.md.

    Under a process group every step descends on the mean over ranks of grad_y g
    (``kernels.grad_y`` / ``dynamics.taped_grad_y``), and the reverse pass averages the adjoint at each
    of those steps (``distributed.MeanOverRanks``), so each rank's local dF/dx has the true hypergradient
    as its mean over ranks: it is averaged once at the end, with f and the problem's metrics.

    Args:
        inner_steps: T.
        inner_lr: the step size a of the unrolled gradient steps.
        truncate: k, the number of final steps to differentiate; None = all T.
        horizon: with lower dynamics, lower steps before y and the lower state restart; None = never.
            Refused with ``lower_start`` (which restarts them at every outer step).
        first_order: with ``lower_start``, do not differentiate the T steps (dy_T/dy0 = I): first-order
            MAML. Refused with ``truncate``, and for problems without ``lower_start``.
        meta_loss: "final": f after the last step; "mean": the mean of f after each of the k differentiated
            steps (each on its own minibatch when the upper batch is a
            ``hypergrad.dynamics.Truncation``), as in meta-training learned optimizers.
        outer_lr, outer_optimizer, outer_clip: see ``hypergrad.recipe`` (outer_clip: the global norm the
            meta-gradient is clipped to; None: not clipped).
    """

    supports_lower_step = True
    supports_lower_start = True

    inner_steps: int = recipe.inner_steps()
    inner_lr: float = recipe.inner_lr()
    truncate: int | None = hyperparameter(checks.OrNone(checks.POSITIVE_INT), None, at_most="inner_steps")
    horizon: int | None = hyperparameter(checks.OrNone(checks.POSITIVE_INT), None, at_least="inner_steps")
    first_order: bool = hyperparameter(checks.BOOLEAN, False)
    meta_loss: str = hyperparameter(checks.one_of(dynamics.META_LOSSES), "final")
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()
    outer_clip: float | None = recipe.outer_clip()

    @property
    def differentiated_steps(self) -> int:
        """k: the final inner steps the reverse pass goes through (0 with ``first_order``)."""
        if self.first_order:
            return 0
        return self.inner_steps if self.truncate is None else self.truncate

    def validate(self) -> None:
        if self.first_order and self.truncate is not None:
            raise checks.Inconsistent(
                f"Unrolled: first_order=True differentiates no inner step, so truncate={self.truncate} has no "
                "meaning; pass one of them"
            )

    def check_functions(self, fns: Functions) -> None:
        """The base's refusals, and the combinations a restarted lower level rules out (horizon, first_order)."""
        super().check_functions(fns)
        if fns.lower_start is not None and self.horizon is not None:
            raise ValueError(
                f"{fns.name} defines lower_start, which restarts the lower level at every outer step, so "
                f"Unrolled(horizon={self.horizon}) has nothing to do; drop horizon"
            )
        if self.first_order and fns.lower_start is None:
            raise ValueError(
                f"Unrolled(first_order=True) takes dy_T/dy0 as the identity, which reaches x only through a lower "
                f"level restarted from x; {fns.name} defines no lower_start(x), so the hypergradient would be "
                "grad_x f alone. Define lower_start or use first_order=False"
            )

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> UnrolledState:
        """x, y (projected onto X), the outer optimizer's state, step 0; the lower dynamics' entries if any."""
        start = self.start(fns, x, y)
        state: UnrolledState = {"x": start["x"], "y": start["y"], "outer": self.outer_transform().init(start["x"]),
                                "step": start["step"]}
        if fns.lower_step is not None:
            state = {**state, **dynamics.init(fns, state["y"], "Unrolled")}
        return state

    def inner(self, fns: Functions, state: UnrolledState, lower_batch: Any) -> UnrolledState:
        """The undifferentiated first T - k steps (none without truncation), from lower_start(x) when restarted."""
        steps = self.inner_steps - self.differentiated_steps
        y = restart_lower(fns, state["x"]) if fns.lower_start is not None else state["y"]
        if fns.lower_step is None:
            dynamics.check_length(lower_batch, self.inner_steps, "Unrolled")
            return {**state, "y": self.descend(fns.g, state["x"], y, lower_batch, steps)}
        if fns.lower_start is not None:
            lower, t = _fresh_dynamics(fns, y, state["t"])
        else:
            y, lower, t = dynamics.reset(state, self.horizon)
        y, lower = dynamics.begin(fns, y, lower, lower_batch, self.horizon, "Unrolled", self.inner_steps)
        y, lower, t = dynamics.run(fns, state["x"], y, lower, t, lower_batch, steps)
        return {**state, "y": y, "lower": lower, "t": t}

    def estimate(self, fns: Functions, state: UnrolledState, batches: Batches) -> tuple[UnrolledState, Tree, Metrics]:
        """The last k steps, recorded, and dF/dx by one reverse pass through them (and y0 = lower_start(x))."""
        lower_batch, upper_batch = batches
        for batch in batches:
            if isinstance(batch, dynamics.Truncation) and batch.pairs:
                raise ValueError("Unrolled: the data's Truncation is per PES pair (pairs=True); only PES takes it")
        y_start, k = state["y"], self.differentiated_steps
        first = self.inner_steps - k  # the truncation's steps the inner phase took
        dynamic = fns.lower_step is not None
        # Without truncation a restarted run is differentiated from its start: y0 = lower_start(x) inside the transform.
        through_start = fns.lower_start is not None and not self.first_order and k == self.inner_steps
        tape = _on_tape(state)
        taken = dynamics.taped_grad_y if tape else kernels.grad_y
        last_step: dict[str, Tensor] = {}
        taken_steps = [0]

        def gradient(g: kernels.Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tensor]:
            # The metrics come from the last step's own gradient (at y_{T-1}): one more gradient of g at y_T would
            # cost 8-11 % of an outer step at T = 5 (experiments/results/speed/unrolled.md). Its norm is taken at
            # the k-th (last) step only, and no step's gradient is held beyond its update.
            gy, value = taken(g, x, y, batch)
            taken_steps[0] += 1
            if taken_steps[0] == k:
                last_step["lower_objective"], last_step["lower_stationarity"] = value.detach(), T.norm(T.detach(gy))
            return gy, value

        def upper_after_unroll(x: Tree) -> tuple[Tensor, tuple[Tree, _LowerRun, dict[str, Tensor]]]:
            extra: _LowerRun = {}  # a dict (torch.func's auxiliary outputs hold tensors, not None)
            y = fns.lower_start(x) if through_start and fns.lower_start is not None else y_start
            if dynamic:
                lower, t = _fresh_dynamics(fns, y, state["t"]) if through_start else (state["lower"], state["t"])
            # "final": all k steps, then f; "mean": f after each step (on that step's upper minibatch).
            chunks = [(first + i, 1) for i in range(k)] if self.meta_loss == "mean" and k else [(first, k)]
            total: Tensor | float = 0.0
            for start, steps in chunks:
                if dynamic:
                    y, lower, t = dynamics.run(fns, x, y, lower, t, lower_batch, steps, gradient, start)
                else:
                    y = self.descend(fns.g, x, y, lower_batch, steps, gradient, start)
                upper_at = dynamics.at(upper_batch, start) if steps == 1 else dynamics.last(upper_batch)
                total = total + fns.f(x, y, upper_at)
            if dynamic:
                extra = {"lower": T.detach(lower), "t": t}
            return cast(Tensor, total) / len(chunks), (T.detach(y), extra, dict(last_step))

        if self.first_order:
            f_value, hypergrad = self._first_order(fns, state["x"], y_start, dynamics.last(upper_batch))
            y_end, extra, last = y_start, _LowerRun(), dict[str, Tensor]()
        elif tape:
            # A plain eager call: the same unroll on autograd's tape, about twice as fast as under torch.func on
            # small problems (experiments/results/speed/unrolled.md). autograd.grad without create_graph records
            # nothing and frees each step's saved tensors as it passes them, as the vjp's pullback below does.
            x = {key: v.detach().requires_grad_() for key, v in state["x"].items()}
            with torch.enable_grad():
                f_value, (y_end, extra, last) = upper_after_unroll(x)
                hypergrad = _reverse(f_value, x)
            f_value = f_value.detach()
        else:
            # Under vmap or compile. vjp, not grad: grad runs the reverse pass inside its transform with create_graph,
            # recording the backward over the unroll and keeping it with every step's saved tensors: twice the memory
            # (experiments/results/speed/memory.md). The pullback runs after the transform has exited.
            f_value, pullback, (y_end, extra, last) = kernels.vjp_with_aux(upper_after_unroll, state["x"])
            (hypergrad,) = pullback(torch.ones_like(f_value), retain_graph=False)
        # f and the pullback saw this rank's upper batch: one all-reduce averages the hypergradient and the values.
        problem_metrics = dynamics.upper_metrics(fns, state["x"], y_end, dynamics.last(upper_batch), reduce=False)
        hypergrad, f_value, problem_metrics = mean_over_ranks((hypergrad, f_value, problem_metrics))
        if last:
            g_value, stationarity = last["lower_objective"], last["lower_stationarity"]
        else:  # no step was differentiated (first_order): the metrics cost one gradient at y_T
            gy, g_value = kernels.grad_y(fns.g, state["x"], y_end, dynamics.last(lower_batch))
            stationarity = T.norm(gy)
        metrics = {
            "upper_objective": f_value,
            "lower_objective": g_value,
            "hypergradient_norm": T.norm(hypergrad),
            "lower_stationarity": stationarity,
            **problem_metrics,
        }
        return {**state, "y": y_end, **extra}, hypergrad, metrics

    @staticmethod
    def _first_order(fns: Functions, x: Tree, y: Tree, upper_batch: Any) -> tuple[Tensor, Tree]:
        """(f, grad_x f + (d lower_start/dx)^T grad_y f) at (x, y_T): dy_T/dy0 taken as the identity (FOMAML).

        This rank's values (no all-reduce): the caller averages them with the metrics in one.
        """
        if fns.lower_start is None:
            raise ValueError(f"Unrolled(first_order=True): {fns.name} defines no lower_start(x)")
        f_value, pull_f = kernels.vjp_of(lambda x, y: fns.f(x, y, upper_batch), x, y)
        fx, fy = pull_f(torch.ones_like(f_value))
        _, pull_start = kernels.vjp_of(fns.lower_start, x)
        (through_start,) = pull_start(fy)
        return f_value.detach(), T.add(fx, through_start)


def _fresh_dynamics(fns: Functions, y: Tree, t: Tensor) -> tuple[Tree, Tensor]:
    """The lower dynamics' initial state at y and a step count of 0 (a restarted run, ``lower_start``)."""
    if fns.init_lower_state is None:
        raise ValueError(f"Unrolled: {fns.name} defines lower_step but not init_lower_state(y) -> lower state")
    return fns.init_lower_state(y), torch.zeros_like(t)


_TAPE = True
"""Unroll on autograd's tape in plain eager calls; False forces the torch.func path (tests compare the two)."""
_FUNC_GRAD_Y = kernels.grad_y


def _on_tape(state: UnrolledState) -> bool:
    """Whether this estimate unrolls on autograd's tape: a plain eager call (no torch.func transform, no compile).

    Also as ``kernels`` records its own plain-call graphs (``kernels._recordable``): not where autograd is switched
    off below us, nor on an x or y that belongs to a caller's graph (torch.func composes with it). A replaced
    ``kernels.grad_y`` (``experiments.oracles`` counts gradients by replacing it) is honoured by taking the
    torch.func path, which calls it: the tape would bypass it. Both paths give the same numbers.
    """
    return _TAPE and kernels.grad_y is _FUNC_GRAD_Y and kernels._recordable(state["x"], state["y"])


def _reverse(f_value: Tensor, x: Tree) -> Tree:
    """d f_value / dx by one reverse pass over the tape, freeing it; zeros where f does not depend on x (as vjp)."""
    if not f_value.requires_grad:  # e.g. T = 0 and f not a function of x
        return {k: torch.zeros_like(v) for k, v in x.items()}
    grads = torch.autograd.grad(f_value, list(x.values()), materialize_grads=True)
    return dict(zip(x, grads, strict=True))
