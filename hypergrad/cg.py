"""IFT hypergradient with conjugate gradient for H v = grad_y f (Grazzi et al. 2020; Pedregosa 2016)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypergrad import checks, implicit, recipe, solvers
from hypergrad.checks import hyperparameter
from hypergrad.implicit import ImplicitEngine, ImplicitState
from hypergrad.solvers import CGSolution
from hypergrad.tree import Tree


@dataclass(frozen=True, kw_only=True, repr=False)
class CG(ImplicitEngine):
    """v from ``iters`` CG iterations on H v = grad_y f, warm-started at the previous outer step's v.

    With ``warm_start=False`` every solve starts from v = 0 and saves the warm start's HVP: the
    better choice when x moves far between outer steps, or for one-off hypergradients.

    Exact after dim(y) iterations on a quadratic lower level. Iterations past |r| <= tol |b|
    leave v unchanged (their HVPs are still computed: no data-dependent control flow).

    Nonconvex lower levels (H = d_yy g indefinite; ALGORITHMS.md section 8): by default CG stops
    improving v at the first direction with p'Hp <= curvature_eps |p|^2 and keeps the last iterate
    (truncated CG, Steihaug 1983; v = grad_y f if that happens at once from a cold start), and a
    step whose solve still fails (|H v - b| / |b| > ``fallback_residual`` or v not finite) uses
    v = inner_lr grad_y f and restarts the warm start from 0. ``damping`` solves (H + damping I) v = b;
    ``normal=True`` runs CG on H^2 v = H b, positive definite whenever H is nonsingular. On a convex
    lower level with a solve that converges none of this triggers: plain CG, bit for bit.

    Oracle calls per outer step: ``inner_steps`` gradients of g, 1 gradient of f, ``iters`` + 1
    HVPs (one for the warm start's residual; ``iters`` without a warm start), 2 ``iters`` (+ 1 with a
    warm start) with ``normal=True``, 1 mixed VJP; damping, truncation and the fallback cost none.
    In the default reverse-over-reverse mode the HVPs share one recorded gradient of g
    (``kernels.hvp_operator``): each then costs one reverse pass.

    Metrics beyond the IFT ones: ``negative_curvature`` (1.0 on a step whose solve met a direction of
    nonpositive curvature, in either ``negative_curvature`` mode) and ``solve_fallback`` (1.0 on a
    step that used the fallback; absent with ``fallback_residual=None``).

    Args:
        iters: CG iterations (HVPs; twice as many with ``normal``).
        tol: relative residual at which to stop improving v.
        warm_start: start each solve from the previous v (True) or from 0 (False).
        damping: lam >= 0 in (H + lam I) v = grad_y f (ridge); residuals are of that system.
        normal: CG on the normal equations H^2 v = H grad_y f (H damped); its residual logged is
            still |H v - grad_y f| / |grad_y f|.
        negative_curvature: "stop" (truncated CG, the default) or "skip" (take no step along that
            direction and go on: the behaviour before this option).
        curvature_eps: the curvature p'Hp / |p|^2 at or below which a direction counts as nonpositive.
        fallback_residual: the relative residual above which a step uses the fallback; None: never
            (with ``negative_curvature="skip"``, the behaviour before either option).
        inner_steps, inner_lr, outer_lr, outer_optimizer: see ``hypergrad.recipe``.
        hvp_mode: how H v is taken, one of ``hypergrad.kernels.HVP_MODES``; None (default) uses the
            device's entry of ``kernels.DEFAULT_HVP_MODES`` (reverse-over-reverse, measured fastest on CPU).
    """

    # Defaults negative_curvature="stop", fallback_residual=1.0 (damping 0, normal False keep convex results
    # unchanged). Measured by `python -m experiments.nonconvex` (experiments/results/nonconvex.md), 150 outer
    # steps, 3 seeds: on the tanh MLP and the BatchNorm CNN, CG() and the README's CG went NaN before these
    # options (residual past 1e16, NaN by step 17-36) and stay finite with them, falling back on 144-150 of
    # 150 steps. normal=True solves those systems (residual <= 0.91, no fallback) at twice the HVPs.
    iters: int = hyperparameter(checks.NONNEGATIVE_INT, 10)
    tol: float = hyperparameter(checks.NONNEGATIVE, 1e-10)
    inner_steps: int = recipe.inner_steps()
    inner_lr: float = recipe.inner_lr()
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()
    hvp_mode: str | None = implicit.hvp_mode()
    warm_start: bool = hyperparameter(checks.BOOLEAN, True)
    damping: float = implicit.damping()
    normal: bool = hyperparameter(checks.BOOLEAN, False)
    negative_curvature: str = hyperparameter(checks.one_of(solvers.NEGATIVE_CURVATURE), "stop")
    curvature_eps: float = hyperparameter(checks.NONNEGATIVE, 0.0)
    fallback_residual: float | None = implicit.fallback_residual(1.0)

    def solve(self, matvec: Callable[[Tree], Tree], b: Tree, state: ImplicitState) -> CGSolution:
        return solvers.cg(matvec, b, iters=self.iters, tol=self.tol, v0=state["v"] if self.warm_start else None,
                          damping=self.damping, normal=self.normal, negative_curvature=self.negative_curvature,
                          curvature_eps=self.curvature_eps)
