"""Exact IFT hypergradient with a dense Hessian solve: the reference for tests."""

from __future__ import annotations

from hypergrad import solvers
from hypergrad.implicit import ImplicitEngine


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
        inner_steps, inner_lr, outer_lr, outer_optimizer: see ``hypergrad.Engine``.
    """

    def __init__(self, *, inner_steps: int = 10, inner_lr: float = 0.1, outer_lr: float = 0.01,
                 outer_optimizer: str = "adam", damping: float = 0.0, fallback_residual: float | None = 1.0) -> None:
        super().__init__(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr, outer_optimizer=outer_optimizer,
                         damping=damping, fallback_residual=fallback_residual)

    def solve(self, matvec, b, state):
        return solvers.dense(matvec, b, damping=self.damping)
