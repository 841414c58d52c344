"""Implicit differentiation (IFT): the part shared by Exact, Neumann and CG.

    dF/dx = grad_x f - J v,   H v = grad_y f,   H = d_yy g,   J v = grad_x <grad_y g, v>

(Lorraine, Vicol, Duvenaud 2020; Grazzi, Franceschi, Pontil, Salzo 2020). The engines differ only
in ``solve``: how they approximate v.

A lower level restarted from x (``Functions.lower_start``) starts every outer step's inner descent
at y0 = lower_start(x); the estimate is the IFT's at the y it reaches, which treats y as y*(x) and
so ignores y0's dependence on x. iMAML (Rajeswaran, Finn, Kakade, Levine 2019) is CG on
g(x, y) = L(y; support) + lam/2 |y - x|^2 restarted from y0 = x: J v = -lam v and H = d_yy L + lam I.

When H is not positive definite (a neural network's lower level away from a minimum) a solve can
fail: CG meets p'Hp <= 0, a Neumann series diverges. ``Fallback`` is the safeguard of ALGORITHMS.md
section 8: a step whose relative residual |H v - b| / |b| exceeds a threshold, or whose v is not
finite, uses the bounded estimate v = alpha b instead, resets the warm start and says so in the
metric ``solve_fallback``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hypergrad import checks, kernels
from hypergrad import tree as T
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics, restart_lower
from hypergrad.finite import all_finite, leaf_norms
from hypergrad.outer import OuterState
from hypergrad.plain import plain_call
from hypergrad.recipe import GradientDescent, OuterOptimizer
from hypergrad.solvers import CGSolution, Solution, tree_where
from hypergrad.tree import Tree


class Fallback(NamedTuple):
    """The safeguard for a failed solve: v = alpha b where residual > threshold or v is not finite.

    Why v = alpha b (ALGORITHMS.md section 8 offers it or a damped Neumann series with alpha below
    1 / lambda_max from power iterations): under ``torch.func.vmap`` and ``torch.compile`` the
    fallback is a ``torch.where``, so both branches are computed on every step; alpha b costs no
    HVP, where power iterations would add HVPs to every step, failed or not. With alpha the inner
    step size it is the Neumann series with no terms after the first, i.e. the hypergradient of one
    differentiated inner gradient step (Luketina et al. 2016), and |v| = alpha |b| whatever H is.
    """

    threshold: float
    """The relative residual |H v - b| / |b| above which a solve counts as failed."""
    alpha: float
    """The scale of the fallback v = alpha b."""


def safeguard(solution: Solution | CGSolution, b: Tree, fallback: Fallback) -> tuple[Tree, Tree, Tensor]:
    """(v for the hypergradient, v for the next warm start, failed) from a solution of H v = b.

    Where the solve failed (residual above ``fallback.threshold``, NaN included, or v not finite) the
    step uses alpha b and the warm start is reset to 0, so a bad v does not seed the next solve;
    elsewhere both are the solver's v. ``failed`` is a 0-d bool. Under a torch.func transform or compile
    nothing branches on it (both branches are computed, masked); a plain call reads the verdict back once
    (on a GPU one synchronization, as the loop's step guard makes one per step) and, where the solve held,
    returns v itself: the same numbers without the masked copies.
    """
    if plain_call() and _held(solution, fallback.threshold):
        # A plain call may branch on the verdict (one read-back): a solve that held costs no masked copies of v.
        return solution.v, solution.v, torch.zeros((), dtype=torch.bool, device=solution.residual.device)
    failed = ~(solution.residual <= fallback.threshold) | ~all_finite(solution.v)
    zeros = T.zeros_like(b)
    return tree_where(failed, T.scale(b, fallback.alpha), solution.v), tree_where(failed, zeros, solution.v), failed


def _held(solution: Solution | CGSolution, threshold: float) -> bool:
    """Whether a solve surely held: residual <= threshold and every leaf's norm finite, in one read-back.

    One fused norm per leaf (``finite.leaf_norms``, as the loop's step guard); a non-finite norm (a NaN or
    an inf in v, or the overflow of a huge finite leaf) is not decided here: the exact masked check in
    ``safeguard`` does it.
    """
    norms = leaf_norms({"v": solution.v})
    values = torch.stack([solution.residual, *(n.to(solution.residual.dtype) for n in norms)]).tolist()
    return values[0] <= threshold and all(math.isfinite(value) for value in values[1:])


def implicit_estimate(fns: Functions, x: Tree, y: Tree, batches: Batches,
                      solve: Callable[[Callable[[Tree], Tree], Tree], Solution | CGSolution],
                      hvp_mode: str | None = None, fallback: Fallback | None = None,
                      ) -> tuple[Tree, Tree, Metrics]:
    """(v, grad_x f - J v, metrics) at (x, y), with v = solve(H, grad_y f) by the caller's solver.

    Shared by every engine built on the IFT formula (Exact, Neumann, CG, BO-REP): one gradient of f,
    the solver's HVPs, one mixed VJP that also yields |grad_y g| and g. ``hvp_mode`` (one of
    ``kernels.HVP_MODES``; None: the device's default) picks how H v is taken; in reverse-over-reverse
    mode the products share one recorded gradient of g (about one gradient more, each product then
    costs a single reverse pass; see experiments/results/speed/kernels.md), and on a plain call (no
    torch.func transform, no compile) J v is one more reverse pass through that same graph
    (``kernels.mixed_vjp(operator=...)``), as hand-written code would take it.

    With ``fallback`` (see ``Fallback``) a failed solve's v is replaced by alpha grad_y f in J v, the
    returned v (the caller's next warm start) is 0 there, and the metric ``solve_fallback`` is 1.0;
    without it (BO-REP) v is the solver's, as it is. ``solve_residual`` is the solver's own
    residual, so a fallback step shows the failure that caused it (a non-finite one as the dtype's
    largest value). A solution with fields beyond ``v`` and ``residual`` (``solvers.CGSolution``'s
    ``negative_curvature``) adds them as metrics.

    Returns:
        v (shapes of y), the hypergradient (shapes of x), metrics (0-d tensors).
    """
    lower_batch, upper_batch = batches
    fx, fy, f_value = kernels.grad_xy(fns.f, x, y, upper_batch)
    operator = kernels.hvp_operator(fns.g, x, y, lower_batch, hvp_mode)
    solution = solve(operator, fy)
    residual = solution.residual
    v = v_next = solution.v
    failed: Tensor | None = None
    if fallback is not None:
        v, v_next, failed = safeguard(solution, fy, fallback)
        # A solve that blew up has no finite residual. The fallback handled it, so the metric reports the
        # failure as the dtype's largest value rather than NaN: logs and the loop's step guard stay finite.
        residual = torch.where(torch.isfinite(residual), residual, torch.finfo(residual.dtype).max)
    # J v from the solve's own recorded gradient of g where it has one: no second gradient of g.
    jv, gy, g_value = kernels.mixed_vjp(fns.g, x, y, lower_batch, v, operator=operator)
    hypergrad = T.sub(fx, jv)
    metrics = {
        "upper_objective": f_value,
        "lower_objective": g_value,
        "hypergradient_norm": T.norm(hypergrad),
        "lower_stationarity": T.norm(gy),
        "solve_residual": residual,
    }
    metrics.update({name: value for name, value in solution._asdict().items() if name not in ("v", "residual")})
    if failed is not None:
        metrics["solve_fallback"] = failed.to(residual.dtype)
    return v_next, hypergrad, metrics


class ImplicitState(EngineState):
    """The state of Exact, Neumann and CG: x, y, step, the outer optimizer's state and the last adjoint."""

    outer: OuterState
    v: Tree
    """The last adjoint v (shapes of y): CG warm-starts from it; kept by every IFT engine so states look alike."""


class ImplicitEngine(GradientDescent, OuterOptimizer, Engine[ImplicitState]):
    """An IFT engine: ``inner_steps`` gradient steps on g, then dF/dx with v from ``solve(matvec, b, state)``.

    Fields shared by Exact, Neumann and CG (declared in each with the functions below, beside
    ``hypergrad.recipe``'s ``inner_steps``, ``inner_lr``, ``outer_lr``, ``outer_optimizer``):
        damping: lam >= 0; the solve is on H + lam I (ridge). 0 by default: the exact IFT on
            convex lower levels.
        fallback_residual: a step whose solve ends with |H v - b| / |b| above this (or a
            non-finite v) uses v = ``fallback_scale()`` grad_y f and restarts the warm start from 0
            (``Fallback``); None turns the safeguard off. Default 1.0: a v worse than v = 0 in the
            residual is no solution (Neumann's default is 10: see its docstring).
        hvp_mode: how H v is taken (``kernels.HVP_MODES``); None: ``kernels.DEFAULT_HVP_MODES`` by device.
            Exact forms H densely and has no such field.
    """

    damping: float
    """lam in (H + lam I) v = b."""
    fallback_residual: float | None
    """The relative residual above which the step falls back to v = alpha b; None: no safeguard."""
    hvp_mode: str | None = None
    """How the solver's HVPs are taken (``kernels.HVP_MODES``); None: ``kernels.DEFAULT_HVP_MODES`` by device."""

    supports_lower_start = True

    def solve(self, matvec: Callable[[Tree], Tree], b: Tree, state: ImplicitState) -> Solution | CGSolution:
        """v ~ H^-1 b (shapes of b), with the solver's relative residual."""
        raise NotImplementedError

    def fallback_scale(self) -> float:
        """alpha in the fallback v = alpha b: ``inner_lr``, the step the inner gradient descent is stable with.

        Inner gradient descent on g converges only if inner_lr < 2 / lambda_max(H), so alpha b
        is at most the size the user's own step implies; Neumann overrides it with its series step.
        """
        return self.inner_lr

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> ImplicitState:
        """x, y (projected onto X), the outer optimizer's state, step 0 and v = 0."""
        start = self.start(fns, x, y)
        return {"x": start["x"], "y": start["y"], "outer": self.outer_transform().init(start["x"]),
                "step": start["step"], "v": T.zeros_like(start["y"])}

    def inner(self, fns: Functions, state: ImplicitState, lower_batch: Any) -> ImplicitState:
        """``inner_steps`` gradient steps of size ``inner_lr`` on g(x, .), from lower_start(x) when restarted."""
        y = restart_lower(fns, state["x"]) if fns.lower_start is not None else state["y"]
        return {**state, "y": self.descend(fns.g, state["x"], y, lower_batch, self.inner_steps)}

    def estimate(self, fns: Functions, state: ImplicitState, batches: Batches) -> tuple[ImplicitState, Tree, Metrics]:
        """grad_x f - J v at the state's (x, y); v (the next warm start) goes into the state."""
        solve = lambda matvec, b: self.solve(matvec, b, state)  # noqa: E731
        fallback = None if self.fallback_residual is None else Fallback(self.fallback_residual, self.fallback_scale())
        v, hypergrad, metrics = implicit_estimate(fns, state["x"], state["y"], batches, solve, self.hvp_mode,
                                                  fallback)
        return {**state, "v": v}, hypergrad, metrics


# -- the fields of the IFT engines (``ImplicitEngine``'s docstring) ----------------------------------


def damping() -> Any:
    return checks.hyperparameter(checks.NONNEGATIVE, 0.0)


def fallback_residual(default: float | None = 1.0) -> Any:
    # 1.0 by default: it never triggers on a convex lower level whose solve converges (every existing golden test
    # unchanged) and turned CG's NaN runs on a tanh MLP and a BatchNorm CNN into finite ones (numbers next to CG's
    # defaults). Neumann there stayed finite either way; its series runs slightly above residual 1 on such
    # networks, so its own default threshold is 10 (neumann.py).
    return checks.hyperparameter(checks.OrNone(checks.POSITIVE), default)


def hvp_mode() -> Any:
    return checks.hyperparameter(checks.OrNone(checks.one_of(kernels.HVP_MODES)), None)
