"""Lower dynamics: the problem's own lower update rule (``Functions.lower_step``) and horizon resets.

A problem whose lower variables are trained by something other than gradient descent on g (a
learned optimizer, Therien et al. 2024) supplies

    lower_step(x, y, grad_y, lower_state, t) -> (y, lower_state)      one update of y
    init_lower_state(y) -> lower_state                               its initial state (a tree)

Engines that honour it (``supports_lower_step``: Unrolled, PES) keep in their state the lower
state ``lower``, the count ``t`` of lower steps since the last reset, and the starting point
``y0``, ``lower0``. A lower run has a finite horizon: once ``t`` reaches ``horizon``, y and the
lower state return to their starting values and ``t`` to 0. The reset is a ``torch.where`` on a
flag derived from ``t`` (no Python branching on tensor values), so the step stays vmappable.
Variety across horizons comes from the data side (each lower batch is a new minibatch); the
initial task network is the same at every reset.

Data-driven truncations (meta-training over a task family, Metz et al. 2022; Vicol et al. 2021):
a lower batch may be a ``Truncation``, one minibatch per lower step of the outer step, plus a
``restart`` the problem reads in ``lower_restart(y, lower_state, restart) -> (y, lower_state)``
before the first step: the data stream decides which runs start a new task (a fresh network, a
new dataset, a new horizon, their own step counts), so restarts can be staggered across runs and
tasks differ from one run to the next. The engine's own ``horizon`` is then None. With
``pairs=True`` every leaf carries a leading axis of PES pairs (each pair its own data and tasks);
``fresh`` (bool [pairs]) says which pairs' runs restart, so PES resets their perturbations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import Tensor

from hypergrad import kernels
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Functions
from hypergrad.recipe import GradY
from hypergrad.tree import Tree
from hypergrad.truncation import Truncation, at, check_length, last, pair, sample

__all__ = ["META_LOSSES", "DynamicsState", "Truncation", "at", "begin", "check_length", "init", "last", "pair", "reset",
           "reset_due", "run", "sample", "taped_grad_y", "upper_metrics", "where"]


META_LOSSES = ("final", "mean")
"""A truncation's meta-loss: f after its last lower step, or the mean of f after each of its steps."""


class DynamicsState(TypedDict):
    """The state entries of a lower run under the problem's dynamics."""

    lower: Tree
    """The lower dynamics' own state (a tree: a learned optimizer's moments, say)."""
    t: Tensor
    """Lower steps since the last reset (0-d int64)."""
    y0: Tree
    """y at the start of every run."""
    lower0: Tree
    """The lower state at the start of every run."""


def begin(fns: Functions, y: Tree, lower: Tree, batch: Any, horizon: int | None, owner: str,
          steps: int) -> tuple[Tree, Tree]:
    """(y, lower state) a truncation of ``steps`` lower steps starts from: the problem's ``lower_restart`` applied
    where the data restarts runs.

    Raises ValueError, naming ``owner``, when a Truncation's length is not ``steps`` (the data's clock and the
    engine's would drift apart), or it restarts runs but the problem cannot (no ``lower_restart``) or the engine
    also restarts them (``horizon`` given): two clocks would disagree.
    """
    check_length(batch, steps, owner)
    if not isinstance(batch, Truncation) or batch.restart is None:
        return y, lower
    if fns.lower_restart is None:
        raise ValueError(f"{owner}: the data's Truncation carries restarts, but {fns.name} defines no "
                         "lower_restart(y, lower_state, restart) to apply them")
    if horizon is not None:
        raise ValueError(f"{owner}(horizon={horizon}): the data's Truncation restarts the lower runs itself; "
                         "set horizon=None")
    return fns.lower_restart(y, lower, batch.restart)


def init(fns: Functions, y: Tree, owner: str) -> DynamicsState:
    """State entries of the lower dynamics: ``lower``, ``t``, ``y0``, ``lower0``.

    Raises ValueError naming ``owner`` when ``lower_step`` comes without ``init_lower_state``.
    """
    if fns.init_lower_state is None:
        raise ValueError(f"{owner}: {fns.name} defines lower_step but not init_lower_state(y) -> lower state")
    lower = fns.init_lower_state(y)
    device = next(iter(y.values())).device
    return {
        "lower": lower,
        "t": torch.zeros((), dtype=torch.int64, device=device),
        "y0": {k: v.clone() for k, v in y.items()},
        "lower0": {k: v.clone() for k, v in lower.items()},
    }


def run(fns: Functions, x: Tree, y: Tree, lower: Tree, t: Tensor, batch: Any, steps: int,
        gradient: GradY | None = None, first: int = 0) -> tuple[Tree, Tree, Tensor]:
    """``steps`` lower updates from (y, lower) at lower-step count ``t``: returns (y, lower, t + steps).

    The i-th update uses ``at(batch, first + i)``: the truncation's own minibatch when ``batch`` is a
    ``Truncation`` (``first`` is the number of its steps already taken), else ``batch`` every time.

    Each update takes the gradient of g(x, ., batch) at the current y, by ``gradient``: ``kernels.grad_y``
    (differentiable in x under a transform: Unrolled's truncated backprop under vmap or compile), or
    ``taped_grad_y`` (differentiable on autograd's tape: Unrolled in a plain eager call). Under a process
    group either is the mean over ranks (one all-reduce per step, differentiable).
    """
    step = fns.lower_step
    if step is None:
        raise ValueError(f"{fns.name} has no lower dynamics (lower_step) to run")
    gradient = gradient or kernels.grad_y  # looked up per call: experiments.oracles counts by replacing it
    for i in range(steps):
        grad_y, _ = gradient(fns.g, x, y, at(batch, first + i))
        y, lower = step(x, y, grad_y, lower, t)
        t = t + 1
    return y, lower, t


def taped_grad_y(fn: kernels.Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tensor]:
    """(grad_y fn(x, y), fn(x, y)) recorded on autograd's tape (create_graph): ``kernels.grad_y`` without torch.func.

    For Unrolled's plain eager unroll, which its reverse pass differentiates by ``torch.autograd.grad``:
    the same formulas as ``kernels.grad_y`` (the same numbers) without torch.func's per-op wrapping,
    which costs as much as the math on small problems (experiments/results/speed/unrolled.md). Not
    composable with torch.func transforms (``kernels._plain_call`` decides). Leaves of y that do not
    require grad yet (the detached start of the unroll) get a fresh leaf that does; a leaf g does not
    use gets a zero gradient, as in torch.func. Under a process group: the mean over ranks of both,
    one differentiable all-reduce, as ``kernels.grad_y``.
    """
    y = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in y.items()}
    value = fn(x, y, batch)
    return mean_over_ranks((kernels.autograd_grad(value, y, create_graph=True), value))


def reset_due(t: Tensor, horizon: int | None) -> Tensor:
    """0-d bool: the horizon is reached (always False without a horizon)."""
    if horizon is None:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    return t >= horizon


def where(flag: Tensor, start: Tree, current: Tree) -> Tree:
    """``start`` where ``flag`` else ``current``, leaf by leaf; ``start`` broadcasts over leading dims."""
    return {k: torch.where(flag, start[k].to(current[k].dtype), current[k]) for k in current}


def reset(state: Mapping[str, Any], horizon: int | None) -> tuple[Tree, Tree, Tensor]:
    """(y, lower, t) of ``state``, returned to their starting values when the horizon is reached."""
    flag = reset_due(state["t"], horizon)
    return (where(flag, state["y0"], state["y"]), where(flag, state["lower0"], state["lower"]),
            torch.where(flag, torch.zeros_like(state["t"]), state["t"]))


def upper_metrics(fns: Functions, x: Tree, y: Tree, batch: Any, reduce: bool = True) -> dict[str, Tensor]:
    """The problem's own metrics at (x, y) on the upper batch, detached ({} when it has none): 0-d tensors.

    Means over ranks under a process group (one all-reduce); ``reduce=False`` leaves them local for a
    caller that averages them together with other values in one all-reduce.
    """
    if fns.upper_metrics is None:
        return {}
    metrics = {k: v.detach() for k, v in fns.upper_metrics(x, y, batch).items()}
    return mean_over_ranks(metrics) if reduce else metrics
