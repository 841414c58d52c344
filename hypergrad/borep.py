"""BO-REP: bilevel optimization with lower-level initialization refinement and periodic updates.

Hao, Gong, Liu, "Bilevel optimization under unbounded smoothness: a new algorithm and convergence
analysis", ICLR 2024. For upper objectives whose smoothness grows with the gradient (RNNs, LSTMs):
normalized momentum on x, and a lower level that is refined once and then updated only every
``period`` steps (ALGORITHMS.md section 5).

Data-dependent steps without Python branching: the refinement (step 0) and the periodic update
(step % period == 0) run inside the ``cond`` higher-order operator (``torch.ops.higher_order.cond``,
the operator ``torch.cond`` lowers to), with both branches returning y raveled into one vector:

- eager: its dense kernel runs only the taken branch, so the off-steps cost no lower gradient;
- ``torch.func.vmap`` with a batched step (a population stacked by ``init``): both branches run and
  each member selects its own result (members may be at different steps); with an unbatched step
  (``in_dims=None`` for ``"step"``) the branch is taken once for all and the off-steps are free;
- ``torch.compile``: the operator is captured as one graph node.

The public ``torch.cond`` is not called directly because in eager mode it first traces both branches
with dynamo and refuses lower objectives that dynamo cannot capture whole (an ``nn.LSTM``, any Python
side effect), exactly the models BO-REP is for. ``torch.where`` would run the lower update every
step and lose the saving that the periodic update exists for. The single raveled output sidesteps
the operator's vmap rule for a batched predicate, which keeps only the first output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from hypergrad import checks, kernels, outer, recipe, solvers
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.implicit import implicit_estimate
from hypergrad.recipe import GradientDescent
from hypergrad.tree import Tree

ESTIMATORS = ("neumann", "linear-system")


class _BOREPState(EngineState):
    m: Tree
    """The momentum (shapes of x): the outer transform's state."""


class BOREPState(_BOREPState, total=False):
    """x, y, step, the momentum m, and z (shapes of y) for the "linear-system" estimator."""

    z: Tree


def when(pred: Tensor, update: Callable[[Tree, Tree, Any], Tree], x: Tree, y: Tree, batch: Any) -> Tree:
    """``update(x, y, batch)`` where the 0-d bool ``pred`` holds, else ``y``; only the taken branch runs in eager.

    Every tensor of x, y and the batch is an operand of the operator (none is captured), so that a
    population vmapped over any of them stays correct. Returns a tree with the shapes of y, whose
    leaves must share one dtype (y travels raveled).
    """
    flat_y, unravel = T.ravel(y)
    leaves, spec = pytree.tree_flatten((x, batch))
    is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
    tensors = tuple(leaf for leaf, t in zip(leaves, is_tensor, strict=True) if t)

    def rebuild(operands: tuple[Tensor, ...]) -> tuple[Tree, Any]:
        it = iter(operands)
        return pytree.tree_unflatten([next(it) if t else leaf for leaf, t in zip(leaves, is_tensor, strict=True)], spec)

    def taken(flat: Tensor, *operands: Tensor) -> tuple[Tensor]:
        x_, batch_ = rebuild(operands)
        return (T.ravel(update(x_, unravel(flat), batch_))[0],)

    def skipped(flat: Tensor, *operands: Tensor) -> tuple[Tensor]:
        return (flat.clone(),)  # a branch output may not alias an operand

    (out,) = torch.ops.higher_order.cond(pred, taken, skipped, (flat_y, *tensors))
    return unravel(out)


@dataclass(frozen=True, kw_only=True, repr=False)
class BOREP(GradientDescent, Engine[BOREPState]):
    """BO-REP (Hao, Gong, Liu, ICLR 2024): periodic lower updates and normalized momentum on x.

    Step k (state["step"] = k, y and the momentum m carried over; m_0 = 0)::

        if k == 0:           y <- refine_steps SGD steps on g(x_0, .)                 (refinement, once)
        if k % period == 0:  y^0 = y; N times: y^t = P_ball(y^0, radius)(y^{t-1} - inner_lr grad_y g(x_k, y^{t-1}))
                             y <- mean(y^1..y^N) if average else y^N
        h = grad_x f - J v,  v = (1/C) sum_{q=0..Q-1} (I - H/C)^q grad_y f           ("neumann", the paper)
                             v = z <- z - z_lr (H z - grad_y f)                       ("linear-system", official code)
        m <- beta m + (1 - beta) h
        x <- P_X(x - outer_lr m / |m|)                    |m| over the whole tree: |dx| = outer_lr (0 if m = 0)

    Oracle calls per outer step: ``inner_steps``/``period`` lower gradients amortized (plus
    ``refine_steps`` once), 2 gradients (grad f in x and y together, grad_y g with the mixed VJP),
    Q - 1 HVPs for "neumann" (its logged residual is the series', |(I - H/C)^(Q-1) b| / |b|: no HVP)
    (or 1 HVP for "linear-system", whose residual of the previous z comes with it), 1 mixed VJP.
    Under vmap with a batched step the lower update is computed every step (see the module doc).

    State: ``x``, ``y``, ``m`` (momentum, shapes of x), ``step``, and ``z`` (shapes of y) for
    "linear-system". Metrics: the standard four plus ``momentum_norm`` |m| after this step,
    ``step_size`` (= outer_lr) and ``solve_residual``.

    Args:
        estimator: "neumann" (the paper's truncated series) or "linear-system" (the official
            code's one gradient step per outer step on H z = grad_y f, z kept across steps).
        refine_steps: SGD steps on g(x_0, .) at the first step (step size ``inner_lr``); 0 = none.
        period: the lower update runs when step % period == 0 (official code: 2-3).
        inner_steps: N, SGD steps per lower update (official code: 3-10).
        inner_lr: their step size.
        radius: the lower iterates stay in the ball of this radius (Euclidean, whole tree) around
            the y that the update starts from; None = no projection (the official code).
        average: y <- mean of the N new iterates (True, the paper) or the last one (False).
        beta: momentum (0.9).
        outer_lr: the length of every x step (before P_X).
        terms: Q, the number of Neumann terms (Q - 1 HVPs); "neumann" only.
        hessian_scale: C >= the smoothness of g in y; None = 1 / inner_lr. "neumann" only.
        z_lr: step size of the z update (1e-2); "linear-system" only.

    Defaults: beta, z_lr and average as in the paper and its code; period 2, inner_steps 10,
    inner_lr = outer_lr = 0.05 from the official data-cleaning script; refine_steps 100 and terms 10
    are this library's choices (the paper sets them from its theory, the official code has neither).
    """

    outer_state_key = "m"  # the momentum m is BO-REP's outer state

    estimator: str = hyperparameter(checks.one_of(ESTIMATORS), "neumann")
    refine_steps: int = hyperparameter(checks.NONNEGATIVE_INT, 100)
    period: int = hyperparameter(checks.POSITIVE_INT, 2)
    inner_steps: int = recipe.inner_steps(10, minimum=1)
    inner_lr: float = recipe.inner_lr(0.05)
    radius: float | None = hyperparameter(checks.OrNone(checks.POSITIVE), None)
    average: bool = hyperparameter(checks.BOOLEAN, True)
    beta: float = hyperparameter(checks.Real("in [0, 1)", lambda v: 0 <= v < 1), 0.9)
    outer_lr: float = recipe.outer_lr(0.05)
    terms: int = hyperparameter(checks.POSITIVE_INT, 10)
    hessian_scale: float | None = hyperparameter(checks.OrNone(checks.POSITIVE), None,
                                                 derive=lambda engine: 1.0 / engine.inner_lr)
    z_lr: float = hyperparameter(checks.POSITIVE, 1e-2)

    def outer_transform(self) -> outer.NormalizedMomentum:
        """m <- beta m + (1 - beta) h;  x <- x - outer_lr m / |m|."""
        return outer.normalized_momentum(self.outer_lr, self.beta)

    # -- the three phases ------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> BOREPState:
        """x, y (copied, x projected onto X), m = 0, step = 0, and z = 0 for "linear-system".

        ``lower_batch`` is not needed (the refinement runs at the first step, on that step's lower batch).
        """
        start = self.start(fns, x, y)
        state: BOREPState = {"x": start["x"], "y": start["y"], "m": self.outer_transform().init(start["x"]),
                             "step": start["step"]}
        if self.estimator == "linear-system":
            state["z"] = T.zeros_like(start["y"])
        return state

    def inner(self, fns: Functions, state: BOREPState, lower_batch: Any) -> BOREPState:
        """Refinement at step 0, then the periodic lower update; y is left as is on the other steps."""
        x, y, k = state["x"], state["y"], state["step"]
        if self.refine_steps > 0:
            y = when(k == 0, lambda x_, y_, b: self.descend(fns.g, x_, y_, b, self.refine_steps), x, y, lower_batch)
        y = when(k % self.period == 0, lambda x_, y_, b: self.update_lower(fns.g, x_, y_, b), x, y, lower_batch)
        return {**state, "y": y}

    def estimate(self, fns: Functions, state: BOREPState, batches: Batches) -> tuple[BOREPState, Tree, Metrics]:
        """h = grad_x f - J v with v from the chosen estimator; metrics include the coming |m|."""
        def solve(hvp: Callable[[Tree], Tree], fy: Tree) -> solvers.Solution:
            if self.estimator == "neumann":
                # (1/C) sum_{j=0..Q-1} (I - H/C)^j b: Q - 1 HVPs (the residual is the series', at no HVP).
                return solvers.neumann(hvp, fy, terms=self.terms - 1, alpha=1.0 / cast(float, self.hessian_scale))
            r = T.sub(hvp(state["z"]), fy)  # H z - b at the previous z: one HVP
            return solvers.Solution(T.axpy(-self.z_lr, r, state["z"]), solvers.relative_residual(r, fy))

        v, hypergrad, metrics = implicit_estimate(fns, state["x"], state["y"], batches, solve)
        if self.estimator == "linear-system":
            state = {**state, "z": v}
        metrics["momentum_norm"] = T.norm(self.outer_transform().momentum(state["m"], hypergrad))
        metrics["step_size"] = torch.full_like(metrics["upper_objective"], self.outer_lr)
        return state, hypergrad, metrics

    # -- helpers ---------------------------------------------------------------------------------

    def update_lower(self, g: Callable, x: Tree, y: Tree, batch: Any) -> Tree:
        """N projected SGD steps from y in the ball around y; their mean (``average``) or the last iterate."""
        start, total = y, T.zeros_like(y)
        for _ in range(self.inner_steps):  # unrolled in Python: inner_steps is a hyperparameter, not data
            gy, _ = kernels.grad_y(g, x, y, batch)
            y = T.axpy(-self.inner_lr, gy, y)
            if self.radius is not None:
                gap = T.sub(y, start)
                shrink = torch.clamp(self.radius / torch.clamp(T.norm(gap), min=1e-30), max=1.0)
                y = T.axpy(shrink, gap, start)
            if self.average:
                total = T.add(total, y)
        return T.scale(total, 1.0 / self.inner_steps) if self.average else y
