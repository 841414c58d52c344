"""Implicit differentiation (IFT): the part shared by Exact, Neumann and CG.

    dF/dx = grad_x f - J v,   H v = grad_y f,   H = d_yy g,   J v = grad_x <grad_y g, v>

(Lorraine, Vicol, Duvenaud 2020; Grazzi, Franceschi, Pontil, Salzo 2020). The engines differ only
in ``solve``: how they approximate v.
"""

from __future__ import annotations

from collections.abc import Callable

from hypergrad import checks, kernels
from hypergrad import tree as T
from hypergrad.engine import Batches, Engine, Functions, Metrics, State
from hypergrad.solvers import Solution
from hypergrad.tree import Tree


def implicit_estimate(fns: Functions, x: Tree, y: Tree, batches: Batches,
                      solve: Callable[[Callable[[Tree], Tree], Tree], Solution],
                      hvp_mode: str | None = None) -> tuple[Tree, Tree, Metrics]:
    """(v, grad_x f - J v, metrics) at (x, y), with v = solve(H, grad_y f) by the caller's solver.

    Shared by every engine built on the IFT formula (Exact, Neumann, CG, BO-REP): one gradient of f,
    the solver's HVPs, one mixed VJP that also yields |grad_y g| and g. ``hvp_mode`` (one of
    ``kernels.HVP_MODES``; None: the device's default) picks how H v is taken; in reverse-over-reverse
    mode the products share one recorded gradient of g (about one gradient more, each product then
    costs a single reverse pass; see experiments/results/speed/kernels.md).
    """
    lower_batch, upper_batch = batches
    fx, fy, f_value = kernels.grad_xy(fns.f, x, y, upper_batch)
    v, residual = solve(kernels.hvp_operator(fns.g, x, y, lower_batch, hvp_mode), fy)
    jv, gy, g_value = kernels.mixed_vjp(fns.g, x, y, lower_batch, v)
    hypergrad = T.sub(fx, jv)
    metrics = {
        "upper_objective": f_value,
        "lower_objective": g_value,
        "hypergradient_norm": T.norm(hypergrad),
        "lower_stationarity": T.norm(gy),
        "solve_residual": residual,
    }
    return v, hypergrad, metrics


class ImplicitEngine(Engine):
    """An IFT engine; subclasses implement ``solve(matvec, b, state)``."""

    hvp_mode: str | None = None
    """How the solver's HVPs are taken (``kernels.HVP_MODES``); None: ``kernels.DEFAULT_HVP_MODES`` by device."""

    def solve(self, matvec: Callable[[Tree], Tree], b: Tree, state: State) -> Solution:
        raise NotImplementedError

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        solve = lambda matvec, b: self.solve(matvec, b, state)  # noqa: E731
        v, hypergrad, metrics = implicit_estimate(fns, state["x"], state["y"], batches, solve, self.hvp_mode)
        return {**state, "v": v}, hypergrad, metrics

    def set_hvp_mode(self, hvp_mode: str | None) -> None:
        """Check and keep the constructor's ``hvp_mode`` (None: the device's default)."""
        if hvp_mode is not None:
            self.hvp_mode = checks.one_of(type(self).__name__, "hvp_mode", hvp_mode, kernels.HVP_MODES)

    def init_extra(self, x: Tree, y: Tree) -> State:
        # The last adjoint: CG warm-starts from it; kept for every IFT engine so states look alike.
        return {"v": T.zeros_like(y)}
