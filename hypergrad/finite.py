"""Finiteness of a step's outputs: the check every outer step runs.

``leaf_norms`` is pure (no ``.item()``, no branching on values) and costs one fused reduction over
all leaves; the loop's guard (``bilevel/guard.py``) reads its vector back in one transfer together
with the scalars it watches, and only when a norm is non-finite asks ``finite_flags`` (exact, one
check per leaf) which quantities really are. ``all_finite`` is that exact check for one tree, pure too:
the IFT safeguard (``hypergrad/implicit.py``) uses it inside the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def floating_leaves(value: Any) -> list[Tensor]:
    """The floating-point tensors in a nested dict/list/tuple (integer counters are always finite)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in floating_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in floating_leaves(v)]
    return []


def leaf_norms(quantities: dict[str, Any]) -> list[Tensor]:
    """The Euclidean norm (0-d) of each floating leaf of every quantity, in order.

    ``quantities`` maps names to trees (dicts of tensors, possibly nested) or tensors, all on one
    device. A leaf holding a NaN or an inf has a non-finite norm, so ``isfinite`` of these norms
    checks the whole step with one fused reduction (``torch._foreach_norm``, as ``clip_grad_norm_``
    uses; on CPU the 2-norm is the fastest order, 10x the max-norm). The converse can fail: the
    norm of a finite leaf with entries past ~1e19 overflows in float32, so a non-finite norm is
    confirmed with ``finite_flags`` before anything is called non-finite.
    """
    leaves = [t for value in quantities.values() for t in floating_leaves(value)]
    return list(torch._foreach_norm(leaves, 2)) if leaves else []


def all_finite(value: Any) -> Tensor:
    """0-d bool, exact and pure: every floating entry of ``value`` (a tensor or a nested tree) is finite."""
    leaves = floating_leaves(value)
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in leaves]).all()


def finite_flags(quantities: dict[str, Any]) -> Tensor:
    """[len(quantities)] bool, exact: entry i is True when every floating entry of quantity i is finite."""
    return torch.stack([all_finite(value).cpu() for value in quantities.values()])
