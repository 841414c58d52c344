"""Closed convex sets for upper and lower variables, as Euclidean projections on tensors.

A set is any callable ``project(t: Tensor) -> Tensor`` returning the nearest point of the set
(same shape). ``Box`` and ``NonNegative`` are provided; ``tree_projection`` lifts a map from
variable names to sets to a projection of a whole tree (names without a set are left free).
All projections are elementwise or closed-form, so they run under ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hypergrad.tree import Tree

Projection = Callable[[Tensor], Tensor]


class Box:
    """{t : low <= t <= high} elementwise; either bound may be None (unbounded)."""

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        for name, bound in (("low", low), ("high", high)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                      or math.isnan(bound)):
                raise ValueError(f"Box: {name} must be a number or None, got {bound!r}")
        if low is not None and high is not None and low > high:
            raise ValueError(f"Box: low must be <= high, got low={low}, high={high}")
        self.low, self.high = low, high

    def __call__(self, t: Tensor) -> Tensor:
        return torch.clamp(t, min=self.low, max=self.high)

    def __repr__(self) -> str:
        return f"Box(low={self.low}, high={self.high})"


class NonNegative(Box):
    """{t : t >= 0} elementwise."""

    def __init__(self) -> None:
        super().__init__(low=0.0)

    def __repr__(self) -> str:
        return "NonNegative()"


class Ball:
    """{t : |t - center| <= radius} in the Euclidean norm of the whole tensor (center 0 by default)."""

    def __init__(self, radius: float, center: Tensor | float = 0.0) -> None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
            raise ValueError(f"Ball: radius must be a number > 0, got {radius!r}")
        self.radius, self.center = float(radius), center

    def __call__(self, t: Tensor) -> Tensor:
        d = t - self.center
        scale = torch.clamp(self.radius / torch.linalg.vector_norm(d).clamp_min(1e-30), max=1.0)
        return self.center + scale * d


def tree_projection(sets: Mapping[str, Projection], names: list[str], owner: str) -> Callable[[Tree], Tree]:
    """Projection of a tree whose leaves are named ``names``, applying ``sets[name]`` where given."""
    unknown = sorted(set(sets) - set(names))
    if unknown:
        raise ValueError(f"{owner} names sets for {unknown}, which are not among its variables {names}")
    for name, each in sets.items():
        if not callable(each):
            raise TypeError(f"{owner}: the set of '{name}' must be callable (e.g. hypergrad.sets.Box(0, 1)), "
                            f"got {type(each).__name__}")

    def project(tree: Tree) -> Tree:
        return {k: sets[k](v) if k in sets else v for k, v in tree.items()}

    return project
