"""LV-HBA: proximal Lagrangian value function, Hessian-free (Yao, Yu, Zeng, Zhang, ICLR 2024).

"Constrained bi-level optimization: proximal Lagrangian value function approach and Hessian-free
algorithm". The lower level may have constraints coupling x and y, c(x, y) <= 0, need not be
strongly convex and may have many solutions. In the paper F is the upper and f the lower
objective; here f is upper and g is lower (shared/ALGORITHMS.md, section 6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hypergrad import checks, feasible, kernels, outer
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.tree import Tree

Projection = Callable[[Tree, Tree], tuple[Tree, Tree]]

CONSTRAINT_JACOBIAN = "lvhba/c_jacobian"
CONSTRAINT_OFFSET = "lvhba/c_offset"
"""The entries of LV-HBA's direction beside d_x: the affine form A w + o of c read from the lower batch."""


class LVHBAState(EngineState):
    """x, y, step, theta (a proximal lower solution, shapes of y), the multipliers mu >= 0 and their centre z >= 0."""

    theta: Tree
    mu: Tensor
    """One multiplier per entry of c(x, y, lower_batch)."""
    z: Tensor


@dataclass(frozen=True, kw_only=True, repr=False)
class LVHBA(Engine[LVHBAState]):
    """Single-loop LV-HBA: a descent-ascent step on the proximal Lagrangian value function, then a
    projected gradient step on the penalized problem min f / c_k + g - v_gamma.

    State: x, y, theta (a proximal lower solution, shapes of y), mu >= 0 and z >= 0 (multipliers
    and their proximal centre, the shape of c's output), step k. One step, c_k = c0 (k + 1)^p::

        inner:     d_theta = grad_y g(x, theta) + mu^T grad_y c(x, theta) + (theta - y) / gamma1
                   d_mu    = -c(x, theta) + (mu - z) / gamma2
                   theta <- P_Y(theta - eta d_theta);   mu <- max(0, mu - eta d_mu)
        estimate:  d_x = grad_x f(x, y) / c_k + grad_x g(x, y) - grad_x g(x, theta) - mu^T grad_x c(x, theta)
                   d_y = grad_y f(x, y) / c_k + grad_y g(x, y) - (y - theta) / gamma1
                   d_z = (z - mu) / gamma2                          (new theta, mu)
                   y <- y - alpha d_y;   z <- max(0, z - beta d_z)
        outer:     (x, y) <- P_C(x - alpha d_x, y);   k <- k + 1

    P_C projects onto C = {c(x, y) <= 0, x in X, y in Y}: exactly for constraints affine in (x, y)
    (``hypergrad.feasible``: closed form for one entry, ``sweeps`` Dykstra cycles otherwise),
    or with the user's ``projection``. Without it y leaves C and the method diverges.

    Why this split: ``estimate`` sees the batches, so it computes every direction and takes the
    steps that need no hypergradient, y - alpha d_y (projected later) and z; ``outer`` takes the x
    step and projects (x, y) onto C together, since P_C couples them. The affine form of c is read
    from the lower batch, which ``outer`` does not see, so it travels with d_x in the direction
    ``estimate`` returns, under ``CONSTRAINT_JACOBIAN`` and ``CONSTRAINT_OFFSET`` (absent with a user
    projection or no constraints). States hold only x, y, theta, mu, z, step, between phases too.
    ``inner`` is the theta / mu step, the lower-level work. The direction's x entries (all that
    ``hypergradient`` gives) are d_x, the x-gradient of the penalized objective f / c_k + g - v_gamma,
    not an estimate of dF/dx.

    Multipliers have the shape of c(x, y, lower_batch), read at ``init``: pass ``lower_batch``
    there when the constraints depend on the data (``init`` evaluates c on None otherwise). The
    constraints must keep their shape from batch to batch (full-batch constraints). mu and z start
    at 0; (x, y) starts projected onto C.

    Oracle calls per step: 4 gradients (g at (x, theta) in y; f and g at (x, y) in x and y; g at
    (x, theta) in x), 2 constraint VJPs (mu^T grad_y c, mu^T grad_x c at (x, theta)), no HVPs; plus
    the projection: with the affine P_C, one Jacobian of c (m VJPs batched by jacrev) and, for
    m > 1 entries or with sets X, Y, ``sweeps`` cycles over the m half-spaces.

    Data parallelism: under a process group every gradient, constraint value, constraint VJP and
    affine form of c is the mean over ranks, which is c on the union of the shards when c is a mean
    over the batch or does not depend on it. Constraints with one entry per example (an SVM's
    margins) are not means: sharding them changes their shape, which LV-HBA does not support.

    Metrics: ``upper_objective`` f(x, y), ``lower_objective`` g(x, y), ``hypergradient_norm`` |d_x|,
    ``lower_stationarity`` |grad_y g(x, y)|, ``lagrangian_stationarity`` |grad_y g + mu^T grad_y c| at
    (x, theta), ``constraint_violation`` max c(x, y) (<= 0: feasible), ``multiplier_norm`` |mu|,
    ``penalty`` c_k, ``theta_gap`` |theta - y|; all at the step's starting (x, y), after inner.

    Args:
        alpha: step size of (x, y). Official code: 0.008-0.01.
        beta: step size of z. Official code: 0.02-0.1.
        eta: step size of (theta, mu). Official code: 0.01.
        gamma1: proximal parameter of theta (> 0). Official code: 10.
        gamma2: proximal parameter of mu (> 0). Official code: 10.
        c0, p: the penalty schedule c_k = c0 (k + 1)^p, p in (0, 1/2) as the theory requires.
            Official toy: 0.025 (k+1)^0.3. Measured from a start at 0: on P6 (REFERENCE_PROBLEMS) the
            official values reach x* within 1.3 % in 3000 steps (c0 = 1 oscillates there); on the
            coupled toy P5 they are still 28 % off after 5e4 steps, where alpha = eta = 0.02,
            c0 = 3, p = 0.45 reach 0.5 % in 3000 steps.
        projection: a user map (x, y) -> (x, y) onto {c(x, y) <= 0} (trees of the shapes of x, y),
            required when c is not affine in (x, y); None: the exact affine projection. X and Y
            (if any) are applied after it.
        sweeps: Dykstra cycles of the affine projection when c has several entries or the problem
            has sets X, Y.
    """

    supports_constraints = True
    supports_lower_set = True

    alpha: float = hyperparameter(checks.POSITIVE, 0.008)
    beta: float = hyperparameter(checks.POSITIVE, 0.02)
    eta: float = hyperparameter(checks.POSITIVE, 0.01)
    gamma1: float = hyperparameter(checks.POSITIVE, 10.0)
    gamma2: float = hyperparameter(checks.POSITIVE, 10.0)
    c0: float = hyperparameter(checks.POSITIVE, 0.025)
    p: float = hyperparameter(checks.POSITIVE, 0.3)
    projection: Projection | None = hyperparameter(checks.Callback("None or a callable (x, y) -> (x, y)"), None)
    sweeps: int = hyperparameter(checks.POSITIVE_INT, 20)

    def validate(self) -> None:
        if not self.p < 0.5:
            raise checks.OutOfRange(f"LVHBA: p must lie in (0, 1/2) (c_k = c0 (k+1)^p), got {self.p!r}")

    def outer_transform(self) -> outer.Transform:
        """x <- x - alpha d_x (``outer`` then projects (x, y) onto C)."""
        return outer.sgd(self.alpha)

    # -- the protocol ------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> LVHBAState:
        """State at (x, y) projected onto C; mu, z = 0 with the shape of c(x, y, lower_batch)."""
        self.check_functions(fns)
        x, y = self._project(fns, T.detach(x), T.detach(y), lower_batch)
        mu = torch.zeros_like(self._constraint_value(fns, x, y, lower_batch))
        step = torch.zeros((), dtype=torch.int64, device=next(iter(x.values())).device)
        return {"x": x, "y": y, "theta": T.tree_map(torch.clone, y), "mu": mu, "z": mu.clone(), "step": step}

    def inner(self, fns: Functions, state: LVHBAState, lower_batch: Any) -> LVHBAState:
        """One projected descent-ascent step on (theta, mu)."""
        x, y, theta, mu, z = state["x"], state["y"], state["theta"], state["mu"], state["z"]
        g_theta, _ = kernels.grad_y(fns.g, x, theta, lower_batch)
        c_theta, (_, c_vjp_y) = self._constraint_vjp(fns, x, theta, lower_batch, mu)
        d_theta = T.add(T.add(g_theta, c_vjp_y), T.scale(T.sub(theta, y), 1.0 / self.gamma1))
        d_mu = -c_theta + (mu - z) / self.gamma2
        theta = T.axpy(-self.eta, d_theta, theta)
        if fns.project_y is not None:
            theta = fns.project_y(theta)
        return {**state, "theta": theta, "mu": torch.clamp(mu - self.eta * d_mu, min=0.0)}

    def estimate(self, fns: Functions, state: LVHBAState, batches: Batches) -> tuple[LVHBAState, Tree, Metrics]:
        """d_x (returned, with the affine form of c), the y and z steps (in the state), and the metrics."""
        lower_batch, upper_batch = batches
        x, y, theta, mu, z = state["x"], state["y"], state["theta"], state["mu"], state["z"]
        c_k = self.penalty(state["step"], mu.dtype)
        fx, fy, f_value = kernels.grad_xy(fns.f, x, y, upper_batch)
        gx, gy, g_value = kernels.grad_xy(fns.g, x, y, lower_batch)
        gx_theta, gy_theta, _ = kernels.grad_xy(fns.g, x, theta, lower_batch)
        _, (c_vjp_x, c_vjp_y) = self._constraint_vjp(fns, x, theta, lower_batch, mu)
        d_x = T.sub(T.add(T.scale(fx, 1.0 / c_k), gx), T.add(gx_theta, c_vjp_x))
        d_y = T.sub(T.add(T.scale(fy, 1.0 / c_k), gy), T.scale(T.sub(y, theta), 1.0 / self.gamma1))
        d_z = (z - mu) / self.gamma2
        direction = dict(d_x)
        if fns.c is not None and self.projection is None:
            affine, c_value = mean_over_ranks(feasible.linearize(fns.c, x, y, lower_batch))
            direction.update({CONSTRAINT_JACOBIAN: affine.jac, CONSTRAINT_OFFSET: affine.offset})
        else:
            c_value = self._constraint_value(fns, x, y, lower_batch)
        metrics = {
            "upper_objective": f_value,
            "lower_objective": g_value,
            "hypergradient_norm": T.norm(d_x),
            "lower_stationarity": T.norm(gy),
            "lagrangian_stationarity": T.norm(T.add(gy_theta, c_vjp_y)),
            "constraint_violation": _max(c_value),
            "multiplier_norm": torch.linalg.vector_norm(mu),
            "penalty": c_k,
            "theta_gap": T.norm(T.sub(theta, y)),
        }
        # The y and z steps need no hypergradient: taken here; y is projected with x in ``outer``.
        y = T.axpy(-self.alpha, d_y, y)
        z = torch.clamp(z - self.beta * d_z, min=0.0)
        return {**state, "y": y, "z": z}, direction, metrics

    def outer(self, fns: Functions, state: LVHBAState, hypergrad: Tree) -> LVHBAState:
        """x <- x - alpha d_x, then (x, y) <- P_C(x, y) (the affine form of c from ``hypergrad``); k <- k + 1."""
        t = state["step"] + 1
        d_x = {k: hypergrad[k] for k in state["x"]}
        x, _ = self.outer_transform().update(state["x"], d_x, {}, t)
        affine = None
        if CONSTRAINT_JACOBIAN in hypergrad:
            affine = feasible.Affine(hypergrad[CONSTRAINT_JACOBIAN], hypergrad[CONSTRAINT_OFFSET])
        x, y = self._project(fns, x, state["y"], None, affine)
        return {**state, "x": x, "y": y, "step": t}

    # -- pieces ------------------------------------------------------------------------------

    def penalty(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        """c_k = c0 (k + 1)^p from the 0-d step tensor k (a 0-d tensor of ``dtype``)."""
        return self.c0 * (step.to(dtype) + 1.0) ** self.p

    def _project(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any,
                 affine: feasible.Affine | None = None) -> tuple[Tree, Tree]:
        """P_C(x, y): the user's projection, else the affine one (c read on lower_batch unless
        ``affine`` is given), else X x Y alone."""
        if fns.c is None or self.projection is not None:
            if self.projection is not None:
                x, y = self.projection(x, y)
            x = x if fns.project_x is None else fns.project_x(x)
            return x, (y if fns.project_y is None else fns.project_y(y))
        if affine is None:
            affine = mean_over_ranks(feasible.linearize(self._batch_checked(fns), x, y, lower_batch)[0])
        w, unflatten = feasible.flatten_pair(x, y)
        project_set = feasible.product_projection(unflatten, fns.project_x, fns.project_y)
        return unflatten(feasible.project_flat(affine, w, sweeps=self.sweeps, project_set=project_set))

    def _constraint_value(self, fns: Functions, x: Tree, y: Tree, batch: Any) -> Tensor:
        """c(x, y, batch) (mean over ranks); an empty vector (no multipliers) when the problem has no constraints."""
        if fns.c is None:
            return torch.zeros(0, dtype=_dtype(x), device=next(iter(x.values())).device)
        return mean_over_ranks(self._batch_checked(fns)(x, y, batch))

    def _constraint_vjp(self, fns: Functions, x: Tree, y: Tree, batch: Any, mu: Tensor) -> tuple[Tensor, tuple]:
        """(c(x, y), (mu^T grad_x c, mu^T grad_y c)): one VJP, averaged over ranks in one all-reduce; zeros
        without constraints."""
        c = fns.c
        if c is None:
            return mu, (T.zeros_like(x), T.zeros_like(y))
        value, pullback = kernels.vjp_of(lambda x_, y_: c(x_, y_, batch), x, y)
        return mean_over_ranks((value, pullback(mu)))

    def _batch_checked(self, fns: Functions) -> Callable[[Tree, Tree, Any], Tensor]:
        """c, with a clear error when it needs a lower batch that ``init`` was not given."""
        constraint = fns.c
        if constraint is None:
            raise ValueError(f"{fns.name} has no lower_constraints")

        def c(x: Tree, y: Tree, batch: Any) -> Tensor:
            try:
                return constraint(x, y, batch)
            except Exception as err:
                if batch is not None:
                    raise
                raise ValueError(
                    f"LVHBA sizes its multipliers (one per constraint entry) and projects onto C with "
                    f"{fns.name}.lower_constraints, which failed without a batch: pass the lower batch, "
                    f"engine.init(fns, x, y, lower_batch=...)"
                ) from err
        return c


def _max(value: Tensor) -> Tensor:
    """max over the entries of c (-inf without constraints)."""
    if value.numel() == 0:
        return torch.full((), float("-inf"), dtype=value.dtype, device=value.device)
    return value.max()


def _dtype(x: Tree) -> torch.dtype:
    return next(iter(x.values())).dtype
