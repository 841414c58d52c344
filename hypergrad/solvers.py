"""Linear solvers for H v = b, all of one shape: ``solve(matvec, b, **opts) -> Solution``.

``matvec`` is a symmetric linear map on trees (usually ``hypergrad.kernels.hvp_operator``); ``b`` is
a tree. Every solver runs a fixed number of iterations with no Python branching on tensor values, so
it runs under ``torch.func.vmap`` and ``torch.compile``; CG's tolerance and its stop at negative
curvature freeze the iterate with a mask instead of breaking the loop.

When H = d_yy g is not positive definite (a neural network away from a minimum; ALGORITHMS.md
section 8) every solver takes ``damping`` (solve (H + damping I) v = b, the "ridge" of JAXopt and
TorchOpt) and CG also takes ``normal=True`` (CG on H^2 v = H b, positive definite whenever H is
nonsingular) and ``negative_curvature="stop"`` (truncated CG, Steihaug 1983).

The returned ``residual`` is |H v - b| / |b| of the system solved (damped: |(H + damping I) v - b| / |b|),
the number the engines log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hypergrad import loops, tree
from hypergrad.tree import Tree

MatVec = Callable[[Tree], Tree]


NEGATIVE_CURVATURE = ("stop", "skip")
"""What CG does at a direction p with p'Hp <= curvature_eps |p|^2: end the solve there (truncated
CG) or skip that step and go on (the behaviour before negative curvature was handled)."""


class Solution(NamedTuple):
    v: Tree
    """The approximate solution of H v = b (shapes of b)."""
    residual: Tensor
    """|H v - b| / |b|, a 0-d tensor (``neumann``: that of the series without its last term)."""


class CGSolution(NamedTuple):
    """CG's solution: that of every solver plus whether it met nonpositive curvature.

    Fields beyond ``v`` and ``residual`` are logged as metrics by ``hypergrad.implicit``.
    """

    v: Tree
    """The approximate solution of H v = b (shapes of b)."""
    residual: Tensor
    """|H v - b| / |b|, a 0-d tensor."""
    negative_curvature: Tensor
    """1.0 (0-d, dtype of b) where some search direction had p'Hp <= curvature_eps |p|^2, else 0.0."""


def relative_residual(r: Tree, b: Tree) -> Tensor:
    """|r| / |b| (0-d), with |b| = 0 read as 1 so a zero right-hand side gives no NaN."""
    bnorm = tree.norm(b)
    return tree.norm(r) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def damped(matvec: MatVec, damping: float) -> MatVec:
    """The map v -> H v + damping v; ``matvec`` itself when damping = 0 (the same arithmetic, bit for bit)."""
    if damping == 0.0:
        return matvec
    damped_matvec = lambda p: tree.axpy(damping, p, matvec(p))  # noqa: E731
    return loops.mark_loop_safe(damped_matvec) if loops.is_loop_safe(matvec) else damped_matvec


def _folds(matvec: MatVec) -> bool:
    """Whether a solver's iterations run as one compiled loop (``hypergrad.loops.fori_loop``) rather than unrolled.

    Under ``torch.compile`` (unless within ``loops.fold_loops(False)``) with a ``matvec`` marked
    ``loops.mark_loop_safe`` (one a compiled loop body can call: no ``torch.func`` pullback built outside
    it), so compile time does not grow with the iterations;
    eagerly never: the plain Python loop, bit for bit the numbers of the loop written out.
    """
    return loops.folding() and loops.is_loop_safe(matvec)


def _safe_ratio(num: Tensor, den: Tensor, take: Tensor) -> Tensor:
    """num / den where ``take`` holds, 0 elsewhere; never NaN, whatever den is where not taken."""
    return torch.where(take, num / torch.where(take, den, 1.0), 0.0)


def cg(matvec: MatVec, b: Tree, *, iters: int, tol: float = 0.0, v0: Tree | None = None, damping: float = 0.0,
       normal: bool = False, negative_curvature: str = "stop", curvature_eps: float = 0.0) -> CGSolution:
    """Conjugate gradient (Hestenes and Stiefel 1952) on (H + damping I) v = b, warm start ``v0``.

    Iterations stop changing v once |r| <= tol |b|. Exact after dim(b) iterations on an SPD
    system in exact arithmetic. The residual reported is CG's recursive one (no extra matvec).

    Nonpositive curvature: at the first direction p with p'Hp <= curvature_eps |p|^2 (H damped),
    ``negative_curvature="stop"`` keeps the last iterate and stops improving it (truncated CG,
    Steihaug 1983; Newton-CG, Nocedal and Wright 2006, Algorithm 7.1), except that a cold start
    (v0 None) stopped at its very first direction returns v = b; ``"skip"`` takes no step along p and
    goes on (the behaviour before this option). On an SPD system with curvature_eps below
    lambda_min neither ever triggers, and both give plain CG bit for bit.

    ``normal=True`` runs CG on the normal equations H^2 v = H b instead (CGLS, Hestenes and Stiefel
    1952; JAXopt's and TorchOpt's ``solve_normal_cg``): positive definite whenever H is nonsingular,
    so it converges on indefinite H, at twice the products: 2 ``iters`` matvecs from a cold start,
    2 ``iters`` + 1 from a warm start. Its residual is that of the original system, |H v - b| / |b|,
    kept by the recursion r <- r - alpha H p, and the tolerance applies to it too; the curvature
    test reads |H p|^2 <= curvature_eps |p|^2 (H singular along p).

    Args:
        matvec: v -> H v on trees with the shapes of b (H symmetric).
        b: the right-hand side (tree).
        iters: iterations; matvecs: ``iters`` (+1 with a warm start), twice that with ``normal``.
        tol: relative residual at which to stop improving v.
        v0: warm start (shapes of b); None = 0.
        damping: lam >= 0 in (H + lam I) v = b.
        normal: CG on the normal equations.
        negative_curvature: one of ``NEGATIVE_CURVATURE``.
        curvature_eps: the curvature (Rayleigh quotient p'Hp / |p|^2) at or below which a
            direction counts as nonpositive.

    Returns:
        ``CGSolution(v, residual, negative_curvature)``.
    """
    matvec = damped(matvec, damping)
    if normal:
        return _cg_normal(matvec, b, iters=iters, tol=tol, v0=v0, stop=negative_curvature == "stop",
                          curvature_eps=curvature_eps)
    stop = negative_curvature == "stop"
    v = tree.zeros_like(b) if v0 is None else v0
    r = tree.sub(b, matvec(v)) if v0 is not None else b
    p = r
    rr = tree.dot(r, r)
    threshold = (tol * tree.norm(b)) ** 2
    stopped = torch.zeros_like(rr, dtype=torch.bool)
    met = torch.zeros_like(rr, dtype=torch.bool)

    def iteration(carry: tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor], first: bool = False,
                  ) -> tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor]:
        v, r, p, rr, stopped, met = carry
        active = (rr > threshold) & ~stopped
        hp = matvec(p)
        php = tree.dot(p, hp)
        # |p|^2 only when the threshold needs it: with curvature_eps = 0 (the default) the test is p'Hp > 0.
        curved = php > (curvature_eps * tree.dot(p, p) if curvature_eps else 0.0)
        hit = active & ~curved
        met = met | hit
        if stop:
            stopped = stopped | hit
            if first and v0 is None:
                # Nocedal and Wright's rule at a cold start: with no iterate yet, the steepest-descent
                # direction of 0.5 v'Hv - b'v at 0, which is b, stands in for the solution.
                v = tree_where(hit, b, v)
                r = tree_where(hit, tree.sub(b, hp), r)
        # Masked step: a converged, stopped or exactly solved (p = 0) system takes a zero step, never NaN.
        alpha = _safe_ratio(rr, php, active & curved)
        v = tree.axpy(alpha, p, v)
        r = tree.axpy(-alpha, hp, r)
        rr_new = tree.dot(r, r)
        beta = _safe_ratio(rr_new, rr, active & (rr > 0))
        p = tree.axpy(beta, p, r)
        return v, r, p, rr_new, stopped, met

    carry = (v, r, p, rr, stopped, met)
    if iters > 0:  # the first iteration apart: it alone has the cold start's rule
        carry = loops.fori_loop(iters - 1, iteration, iteration(carry, first=True), loop=_folds(matvec))
    v, r, _, rr, _, met = carry
    return CGSolution(v, relative_residual(r, b), met.to(rr.dtype))


def _cg_normal(matvec: MatVec, b: Tree, *, iters: int, tol: float, v0: Tree | None, stop: bool,
               curvature_eps: float) -> CGSolution:
    """CGLS for a symmetric H: CG on H^2 v = H b carrying both r = b - H v and s = H r (see ``cg``)."""
    v = tree.zeros_like(b) if v0 is None else v0
    r = tree.sub(b, matvec(v)) if v0 is not None else b
    s = matvec(r)  # H r, the normal equations' residual (H symmetric, so H' r = H r)
    p = s
    ss = tree.dot(s, s)
    rr = tree.dot(r, r)
    threshold = (tol * tree.norm(b)) ** 2
    stopped = torch.zeros_like(ss, dtype=torch.bool)
    met = torch.zeros_like(ss, dtype=torch.bool)

    def half(carry: tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor, Tensor],
             ) -> tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The step along p; the next direction is ``turn``'s (the last iteration needs none)."""
        v, r, p, ss, rr, stopped, met = carry
        # ss = 0 with r != 0: v already minimizes |H v - b| (b outside H's range); nothing left to do.
        active = (rr > threshold) & (ss > 0) & ~stopped
        q = matvec(p)
        qq = tree.dot(q, q)  # p' H^2 p
        curved = qq > (curvature_eps * tree.dot(p, p) if curvature_eps else 0.0)
        hit = active & ~curved
        met = met | hit
        if stop:
            stopped = stopped | hit
        alpha = _safe_ratio(ss, qq, active & curved)
        v = tree.axpy(alpha, p, v)
        r = tree.axpy(-alpha, q, r)
        rr = tree.dot(r, r)
        return v, r, p, ss, rr, stopped, met, active

    def iteration(carry: tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor, Tensor],
                  ) -> tuple[Tree, Tree, Tree, Tensor, Tensor, Tensor, Tensor]:
        v, r, p, ss, rr, stopped, met, active = half(carry)
        s = matvec(r)
        ss_new = tree.dot(s, s)
        beta = _safe_ratio(ss_new, ss, active & (ss > 0))
        p = tree.axpy(beta, p, s)
        return v, r, p, ss_new, rr, stopped, met

    carry = (v, r, p, ss, rr, stopped, met)
    if iters > 0:  # the last iteration apart: its next s would only serve a next direction
        v, r, _, _, _, _, met, _ = half(loops.fori_loop(iters - 1, iteration, carry, loop=_folds(matvec)))
    return CGSolution(v, relative_residual(r, b), met.to(ss.dtype))


def tree_where(condition: Tensor, a: Tree, b: Tree) -> Tree:
    """``a`` where the 0-d bool ``condition`` holds, else ``b``, leaf by leaf (vmappable, no branching)."""
    return {k: torch.where(condition, a[k], b[k]) for k in b}


def neumann(matvec: MatVec, b: Tree, *, terms: int, alpha: float, damping: float = 0.0) -> Solution:
    """Truncated Neumann series v = alpha * sum_{j=0..K} (I - alpha H)^j b (Lorraine et al. 2020): K HVPs.

    With ``damping`` lam, H reads H + lam I throughout. The residual is |(I - alpha H)^K b| / |b|, the
    series' last term over its first: exactly the relative residual |H v' - b| / |b| of the series
    without its last term, v' = alpha sum_{j<K} (I - alpha H)^j b, and free. v's own residual,
    |(I - alpha H)^(K+1) b| / |b|, would cost one more HVP, which hand-written code does not spend;
    it is at most |I - alpha H| times this one, so where the series converges this one bounds it from
    above. Converges as K grows only for 0 < alpha < 2 / lambda_max(H) and H positive definite: a
    negative eigenvalue grows by (1 + alpha |lambda|) per term, which damping above |lambda_min| removes.
    """
    matvec = damped(matvec, damping)

    def term(carry: tuple[Tree, Tree]) -> tuple[Tree, Tree]:
        c, p = carry
        c = tree.axpy(-alpha, matvec(c), c)
        return c, tree.add(p, c)

    c, p = loops.fori_loop(terms, term, (b, b), loop=_folds(matvec))
    return Solution(tree.scale(p, alpha), relative_residual(c, b))


def dense(matvec: MatVec, b: Tree, *, damping: float = 0.0) -> Solution:
    """Form H + damping I column by column (dim(b) matvecs, vmapped) and solve it directly. Small problems only.

    Exact for any nonsingular H + damping I, indefinite included; |v| <= |b| / min_i |lambda_i + damping|
    over the eigenvalues lambda_i of H, which is how damping bounds v near a singular H.
    """
    matvec = damped(matvec, damping)
    flat_b, unravel = tree.ravel(b)
    n = flat_b.shape[-1]
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
    columns = torch.func.vmap(lambda e: tree.ravel(matvec(unravel(e)))[0])(eye)  # row i = H e_i
    h = columns.transpose(-1, -2)  # symmetric in theory; transposing keeps the solve exact for any matvec
    # solve_ex: a singular H gives a non-finite v (the IFT engines' fallback trigger), not an exception,
    # which under vmap would stop the whole population for one member.
    flat_v = torch.linalg.solve_ex(h, flat_b)[0]
    return Solution(unravel(flat_v), relative_residual(unravel(h @ flat_v - flat_b), b))
