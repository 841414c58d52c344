"""The math of the two-copy engine (``hypergrad.two_copy``, F2SA and Penalty): the descents of both copies,
the direction d = grad_x f(x, y) + lam (grad_x g(x, y) - grad_x g(x, z)), STORM, and the metrics.

STORM (Cutkosky and Orabona 2019), optional in both: every stochastic gradient d(p_k; s) of one
oracle is replaced by  h_k = d(p_k; s) + (1 - eta)(h_{k-1} - d(p_{k-1}; s)),  where p_{k-1} is the
point of that oracle's previous evaluation and both gradients see the same batch s. The first
evaluation of a run has nothing to correct (h = d). With deterministic oracles h_{k-1} = d(p_{k-1})
by induction, so the correction vanishes and the method equals the plain one. The memory of each
chain is kept in the state under ``"storm"`` (points and estimates), so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hypergrad import kernels
from hypergrad import tree as T
from hypergrad.distributed import mean_over_ranks
from hypergrad.engine import Batches, Functions, Metrics
from hypergrad.tree import Tree

Projection = Callable[[Tree], Tree] | None
Chain = dict[str, Tree]
"""One STORM chain: the point of its oracle's previous evaluation and the estimate there (trees)."""
Storm = dict[str, Chain]
"""The STORM memory of a state: the chains "z", "y" and "d"."""


def storm(fresh: Tree, stale: Tree, previous: Tree, keep: Tensor) -> Tree:
    """fresh + keep (previous - stale): the STORM estimate; ``keep`` = 1 - eta (0-d)."""
    return T.axpy(keep, T.sub(previous, stale), fresh)


def storm_keep(eta: Tensor, step: Tensor, first_of_step: bool) -> Tensor:
    """1 - eta (0-d), but 0 for the first evaluation of a run (step 0, first of the step): then h = d."""
    keep = 1 - eta
    if not first_of_step:
        return keep
    return torch.where(step == 0, torch.zeros_like(keep), keep)


def storm_memory(x: Tree, y: Tree) -> Storm:
    """The STORM chains at the start: points at (x, y), estimates 0 (unused: the first keep is 0)."""
    zy, zx = T.zeros_like(y), T.zeros_like(x)
    return {
        "z": {"x": x, "at": y, "g": zy},  # grad_y g at the lower copy
        "y": {"x": x, "at": y, "f": zy, "g": zy},  # grad_y f and grad_y g at the penalized copy
        "d": {"x": x, "y": y, "z": y, "f": zx, "gy": zx, "gz": zx},  # the three x-gradients of the direction
    }


def dtype_of(state: Mapping[str, Any]) -> torch.dtype:
    """The floating dtype of the state's x (schedules are computed in it)."""
    return next(iter(state["x"].values())).dtype


def chain(storm: Storm | None, name: str) -> Chain | None:
    """One STORM chain of the state's memory, or None without momentum."""
    return None if storm is None else storm[name]


def _project(tree: Tree, project: Projection) -> Tree:
    return tree if project is None else project(tree)


def descend_lower(g: Callable[[Tree, Tree, Any], Tensor], x: Tree, z: Tree, batch: Any, lr: Tensor | float,
                  steps: int, project: Projection, memory: Chain | None = None,
                  keeps: tuple[Tensor, Tensor] | None = None) -> tuple[Tree, Chain | None]:
    """``steps`` projected gradient steps z <- P_Y(z - lr grad_y g(x, z)); with ``memory``, STORM gradients.

    ``keeps`` = (keep of the first step, keep of the others). Cost: ``steps`` gradients (twice that with STORM).
    """
    for t in range(steps):
        d, _ = kernels.grad_y(g, x, z, batch)
        if memory is not None and keeps is not None:
            stale, _ = kernels.grad_y(g, memory["x"], memory["at"], batch)
            d = storm(d, stale, memory["g"], keeps[0] if t == 0 else keeps[1])
            memory = {"x": x, "at": z, "g": d}
        z = _project(T.axpy(-lr, d, z), project)
    return z, memory


def descend_penalized(fns: Functions, x: Tree, y: Tree, batches: Batches, lr: Tensor | float, w_f: Tensor | float,
                      w_g: Tensor | float, steps: int, memory: Chain | None = None,
                      keeps: tuple[Tensor, Tensor] | None = None) -> tuple[Tree, Chain | None]:
    """``steps`` steps y <- P_Y(y - lr (w_f grad_y f(x, y) + w_g grad_y g(x, y))).

    f sees the upper batch, g the lower one. Cost: 2 ``steps`` gradients (twice that with STORM).
    """
    lower_batch, upper_batch = batches
    for t in range(steps):
        df, _ = kernels.grad_y(fns.f, x, y, upper_batch)
        dg, _ = kernels.grad_y(fns.g, x, y, lower_batch)
        if memory is not None and keeps is not None:
            keep = keeps[0] if t == 0 else keeps[1]
            df = storm(df, kernels.grad_y(fns.f, memory["x"], memory["at"], upper_batch)[0], memory["f"], keep)
            dg = storm(dg, kernels.grad_y(fns.g, memory["x"], memory["at"], lower_batch)[0], memory["g"], keep)
            memory = {"x": x, "at": y, "f": df, "g": dg}
        y = _project(T.axpy(-lr, T.axpy(w_f, df, T.scale(dg, w_g)), y), fns.project_y)
    return y, memory


def direction(fns: Functions, x: Tree, y: Tree, z: Tree, batches: Batches, lam: Tensor | float,
              memory: Chain | None = None, keep: Tensor | None = None) -> tuple[Tree, dict[str, Any], Chain | None]:
    """d = grad_x f(x, y) + lam (grad_x g(x, y) - grad_x g(x, z)) (shapes of x), 3 gradients (6 with STORM).

    Also returns the fresh by-products the metrics need: values f(x, y), g(x, y), g(x, z) and the
    y-gradients grad_y f(x, y), grad_y g(x, y), grad_y g(x, z).
    """
    lower_batch, upper_batch = batches
    fx, fy, f_y = kernels.grad_xy(fns.f, x, y, upper_batch)
    gxy, gyy, g_y = kernels.grad_xy(fns.g, x, y, lower_batch)
    gxz, gyz, g_z = kernels.grad_xy(fns.g, x, z, lower_batch)
    if memory is not None and keep is not None:
        fx = storm(fx, kernels.grad_xy(fns.f, memory["x"], memory["y"], upper_batch)[0], memory["f"], keep)
        gxy = storm(gxy, kernels.grad_xy(fns.g, memory["x"], memory["y"], lower_batch)[0], memory["gy"], keep)
        gxz = storm(gxz, kernels.grad_xy(fns.g, memory["x"], memory["z"], lower_batch)[0], memory["gz"], keep)
        memory = {"x": x, "y": y, "z": z, "f": fx, "gy": gxy, "gz": gxz}
    d = T.axpy(lam, T.sub(gxy, gxz), fx)
    pieces = {"f_y": f_y, "g_y": g_y, "g_z": g_z, "grad_f_y": fy, "grad_g_y": gyy, "grad_g_z": gyz}
    return d, pieces, memory


def gradient_mapping_norm(point: Tree, grad: Tree, lr: Tensor | float, project: Projection) -> Tensor:
    """|point - P(point - lr grad)| / lr: the stationarity of a projected step (|grad| without a set)."""
    if project is None:
        return T.norm(grad)
    return T.norm(T.sub(point, project(T.axpy(-lr, grad, point)))) / lr


def metrics(fns: Functions, state: Mapping[str, Any], d: Tree, pieces: dict[str, Any], lam: Tensor, w_f: Tensor | float,
            w_g: Tensor | float, lr: Tensor | float, upper_batch: Any) -> Metrics:
    """The standard metrics plus what both engines track.

    upper_objective is f(x, z) (z ~ y*(x), so it estimates F(x); one forward pass), lower_objective
    g(x, z), lower_stationarity the (projected) gradient of g at z; penalty_gap g(x, y) - g(x, z) >= 0
    at the minimizers; penalty_value f(x, y) + lam * gap, the penalty function L_lam(x) (psi_sigma of
    the ICLR paper) at the solved copies; penalized_stationarity that of w_f f + w_g g at y.
    Every piece comes from ``kernels`` (averaged over ranks under a process group); f(x, z) is
    averaged here (one all-reduce).
    """
    x, y, z = state["x"], state["y"], state["z"]
    gap = pieces["g_y"] - pieces["g_z"]
    penalized = T.axpy(w_f, pieces["grad_f_y"], T.scale(pieces["grad_g_y"], w_g))
    return {
        "upper_objective": mean_over_ranks(fns.f(x, z, upper_batch).detach()),
        "lower_objective": pieces["g_z"],
        "hypergradient_norm": T.norm(d),
        "lower_stationarity": gradient_mapping_norm(z, pieces["grad_g_z"], lr, fns.project_y),
        "penalized_stationarity": gradient_mapping_norm(y, penalized, lr, fns.project_y),
        "y_z_distance": T.norm(T.sub(y, z)),
        "penalty_gap": gap,
        "penalty_value": pieces["f_y"] + lam * gap,
    }
