"""Exact IFT hypergradient with a dense Hessian solve: the reference for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypergrad import implicit, recipe, solvers
from hypergrad.implicit import ImplicitEngine, ImplicitState
from hypergrad.solvers import Solution
from hypergrad.tree import Tree


@dataclass(frozen=True, kw_only=True, repr=False)
class Exact(ImplicitEngine):
    """dF/dx = grad_x f - J H^-1 grad_y f with H formed densely and solved directly.

    Exact for any nonsingular H, indefinite included. ``damping`` lam solves (H + lam I) v = b
    instead (ridge), which bounds v near a singular H; a step whose solve is not finite (H exactly
    singular) or has |H v - b| / |b| > ``fallback_residual`` uses v = inner_lr grad_y f and sets the
    metric ``solve_fallback``.

    Oracle calls per outer step: ``inner_steps`` gradients of g, 1 gradient of f, dim(y) HVPs
    (vmapped, to form H), 1 mixed VJP; O(dim(y)^2) memory. Small problems only. Damping and the
    fallback cost no oracle call.

    Args:
        damping: lam >= 0 added to H's diagonal.
        fallback_residual: the relative residual above which a step uses the fallback; None: never.
        inner_steps, inner_lr, outer_lr, outer_optimizer: see ``hypergrad.recipe``.
    """

    inner_steps: int = recipe.inner_steps()
    inner_lr: float = recipe.inner_lr()
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()
    damping: float = implicit.damping()
    fallback_residual: float | None = implicit.fallback_residual(1.0)

    def solve(self, matvec: Callable[[Tree], Tree], b: Tree, state: ImplicitState) -> Solution:
        return solvers.dense(matvec, b, damping=self.damping)
