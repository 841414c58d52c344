"""IFT hypergradient with a truncated Neumann series for H^-1 (Lorraine, Vicol, Duvenaud 2020)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from hypergrad import checks, implicit, recipe, solvers
from hypergrad.checks import hyperparameter
from hypergrad.implicit import ImplicitEngine, ImplicitState
from hypergrad.solvers import Solution
from hypergrad.tree import Tree


@dataclass(frozen=True, kw_only=True, repr=False)
class Neumann(ImplicitEngine):
    """v = alpha * sum_{j=0..terms} (I - alpha H)^j grad_y f;  dF/dx = grad_x f - J v.

    Converges as ``terms`` grows only for 0 < alpha < 2 / lambda_max(H). ``terms=0`` means
    H^-1 ~ alpha I. Equals differentiating ``terms + 1`` gradient steps of size alpha started
    (detached) at y*(x).

    Nonconvex lower levels (H indefinite; ALGORITHMS.md section 8): a negative eigenvalue lambda
    grows by (1 + alpha |lambda|) per term. ``damping`` lam replaces H by H + lam I (convergent once
    lam > |lambda_min| and alpha < 2 / (lambda_max + lam)); by default a step whose series ends with
    a residual r > ``fallback_residual`` (or a non-finite v) uses the first term alone, v = alpha
    grad_y f, and says so in the metric ``solve_fallback``. Here r (the metric ``solve_residual``) is
    |(I - alpha H)^terms b| / |b|, the series' last term over its first (``solvers.neumann``): exactly
    the residual |H v' - b| / |b| of the series without that last term, at no HVP; v's own residual
    would cost one more. The default threshold is 10, not CG's 1: with the terms growing
    monotonically, r bounds each term's growth, so the series stays bounded by alpha (terms + 1) r |b|
    and, with r a little above 1, is still the hypergradient of ``terms + 1`` differentiated inner
    steps, as Unrolled computes it. On the tanh MLP of ``experiments/nonconvex.py`` v's own residual
    was 1.05-1.17 on every step (a threshold of 1 replaced every step's series by its first term); a
    series that blew up (8e5-3e8 on its iMAML-style sinusoid, ``experiments/results/nonconvex.md``)
    falls back. On a positive definite H with alpha < 2 / lambda_max, r < 1: never.

    Oracle calls per outer step: ``inner_steps`` gradients of g, 1 gradient of f, ``terms`` HVPs,
    1 mixed VJP; damping and the residual cost none. In the default reverse-over-reverse mode the
    HVPs share one recorded gradient of g (``kernels.hvp_operator``): each then costs one reverse
    pass, and on a plain call the mixed VJP is one more reverse pass through that graph. A step that
    falls back takes J at the fallback's v instead of the series'.

    Args:
        terms: K, the number of Neumann terms after the first (K HVPs).
        alpha: the series step a; None (default) uses ``inner_lr`` as the paper's code does.
        inner_steps, inner_lr, outer_lr, outer_optimizer: see ``hypergrad.recipe``.
        hvp_mode: how H v is taken, one of ``hypergrad.kernels.HVP_MODES``; None (default) uses the
            device's entry of ``kernels.DEFAULT_HVP_MODES`` (reverse-over-reverse, measured fastest on CPU).
        damping: lam >= 0; the series runs on H + lam I (ridge).
        fallback_residual: the relative residual above which a step uses v = alpha grad_y f; None: never
            (the behaviour before this option).
    """

    terms: int = hyperparameter(checks.NONNEGATIVE_INT, 10)
    alpha: float | None = hyperparameter(checks.OrNone(checks.POSITIVE), None, derive=lambda engine: engine.inner_lr)
    inner_steps: int = recipe.inner_steps()
    inner_lr: float = recipe.inner_lr()
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()
    hvp_mode: str | None = implicit.hvp_mode()
    damping: float = implicit.damping()
    fallback_residual: float | None = implicit.fallback_residual(10.0)

    def fallback_scale(self) -> float:
        """The series' own step: the fallback is then the series' first term."""
        return self._alpha

    @property
    def _alpha(self) -> float:
        return cast(float, self.alpha)  # never None once constructed: derived from inner_lr then

    def solve(self, matvec: Callable[[Tree], Tree], b: Tree, state: ImplicitState) -> Solution:
        return solvers.neumann(matvec, b, terms=self.terms, alpha=self._alpha, damping=self.damping)
