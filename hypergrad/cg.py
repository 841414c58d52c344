"""IFT hypergradient with conjugate gradient for H v = grad_y f (Grazzi et al. 2020; Pedregosa 2016)."""

from __future__ import annotations

from hypergrad import checks, solvers
from hypergrad.implicit import ImplicitEngine


class CG(ImplicitEngine):
    """v from ``iters`` CG iterations on H v = grad_y f, warm-started at the previous outer step's v.

    With ``warm_start=False`` every solve starts from v = 0 and saves the warm start's HVP: the
    better choice when x moves far between outer steps, or for one-off hypergradients.

    Exact after dim(y) iterations on a quadratic lower level. Iterations past |r| <= tol |b|
    leave v unchanged (their HVPs are still computed: no data-dependent control flow).

    Oracle calls per outer step: ``inner_steps`` gradients of g, 1 gradient of f, ``iters`` + 1
    HVPs (one for the warm start's residual; ``iters`` without a warm start), 1 mixed VJP. In the
    default reverse-over-reverse mode the HVPs share one recorded gradient of g
    (``kernels.hvp_operator``): each then costs one reverse pass.

    Args:
        iters: CG iterations (HVPs).
        tol: relative residual at which to stop improving v.
        warm_start: start each solve from the previous v (True) or from 0 (False).
        inner_steps, inner_lr, outer_lr, outer_optimizer: see ``hypergrad.Engine``.
        hvp_mode: how H v is taken, one of ``hypergrad.kernels.HVP_MODES``; None (default) uses the
            device's entry of ``kernels.DEFAULT_HVP_MODES`` (reverse-over-reverse, measured fastest on CPU).
    """

    def __init__(self, *, iters: int = 10, tol: float = 1e-10, inner_steps: int = 10, inner_lr: float = 0.1,
                 outer_lr: float = 0.01, outer_optimizer: str = "adam", hvp_mode: str | None = None,
                 warm_start: bool = True) -> None:
        super().__init__(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr, outer_optimizer=outer_optimizer)
        self.set_hvp_mode(hvp_mode)
        self.iters = checks.nonnegative_int("CG", "iters", iters)
        self.tol = checks.nonnegative("CG", "tol", tol)
        if not isinstance(warm_start, bool):
            raise TypeError(f"CG: warm_start must be True or False, got {warm_start!r}")
        self.warm_start = warm_start

    def solve(self, matvec, b, state):
        return solvers.cg(matvec, b, iters=self.iters, tol=self.tol, v0=state["v"] if self.warm_start else None)
