"""Arithmetic on trees: dicts mapping names to tensors (the variables x, y, v of every engine).

Engines keep variables as ``dict[str, Tensor]`` so that names survive from the user's module to
the hypergradient. These helpers are pure and work unchanged under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hypergrad.plain import plain_call

Tree = dict[str, Tensor]


def tree_map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf by leaf to trees with the same keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


# On plain calls (``hypergrad.plain``) the arithmetic below is multi-tensor (one ``torch._foreach_*`` dispatch for
# all leaves: 15-30 % less time on a 4-6 leaf tree, experiments/results/speed/overhead.md); torch.func's vmap has
# no batching rule for them, so transformed calls go leaf by leaf, and so do calls autograd records (an unroll on
# its tape): it saves both inputs of a multi-tensor op, about 2 more copies of y per unrolled step. The same
# operations in the same order either way: the same numbers, bit for bit (``norm`` aside: its fused form differs
# from the leaf-by-leaf one by rounding).


def _multi(*trees: Tree) -> bool:
    """Whether to take the multi-tensor route for these operands (see above)."""
    if not plain_call():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for tree in trees for t in tree.values()))


def add(a: Tree, b: Tree) -> Tree:
    if _multi(a, b):
        return dict(zip(a, torch._foreach_add(list(a.values()), [b[k] for k in a]), strict=True))
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    if _multi(a, b):
        return dict(zip(a, torch._foreach_sub(list(a.values()), [b[k] for k in a]), strict=True))
    return {k: a[k] - b[k] for k in a}


def scale(a: Tree, s: Tensor | float) -> Tree:
    if _multi(a) and _fits(s, a):
        return dict(zip(a, torch._foreach_mul(list(a.values()), s), strict=True))
    return {k: s * v for k, v in a.items()}


def axpy(alpha: Tensor | float, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leaf by leaf."""
    if _multi(x, y) and _fits(alpha, x):
        # y added in place onto the fresh product: one allocation per leaf, not two (a large leaf's fresh memory
        # costs page faults on CPU); (alpha x) + y is the same rounding either way.
        out = torch._foreach_mul(list(x.values()), alpha)
        torch._foreach_add_(out, [y[k] for k in x])
        return dict(zip(x, out, strict=True))
    return {k: alpha * x[k] + y[k] for k in x}


def dot(a: Tree, b: Tree) -> Tensor:
    """Inner product summed over all leaves: a 0-d tensor."""
    products = torch._foreach_mul(list(a.values()), [b[k] for k in a]) if _multi(a, b) else [a[k] * b[k] for k in a]
    if not products:
        return torch.zeros((), dtype=_dtype(a), device=_device(a))
    total = torch.sum(products[0])  # not 0 + ...: one op less per dot, the same value (up to the sign of a zero)
    for p in products[1:]:
        total = total + torch.sum(p)
    return total


def _fits(s: Tensor | float, a: Tree) -> bool:
    """Whether ``_foreach_mul`` takes the scalar s for a's leaves as ``s * leaf`` would (same device and dtype)."""
    if not isinstance(s, Tensor):
        return True
    first = next(iter(a.values()), None)
    return first is not None and s.device == first.device and s.dtype == first.dtype


def norm(a: Tree) -> Tensor:
    """Euclidean norm of all leaves stacked: a 0-d tensor.

    Multi-tensor: one fused norm per leaf (``torch._foreach_norm``, as ``clip_grad_norm_``) and the norm of
    those, with no squared copy of a leaf; it differs from sqrt(dot(a, a)) by rounding only.
    """
    leaves = list(a.values())
    if leaves and _multi(a) and len({(t.dtype, t.device) for t in leaves}) == 1:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(leaves, 2)))
    return torch.sqrt(dot(a, a))


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def ravel(a: Tree) -> tuple[Tensor, Callable[[Tensor], Tree]]:
    """Flatten a tree to one vector of shape (n,) and return the inverse map."""
    keys = list(a)
    shapes = [a[k].shape for k in keys]
    sizes = [a[k].numel() for k in keys]
    flat = torch.cat([a[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)

    def unravel(vec: Tensor) -> Tree:
        parts = torch.split(vec, sizes, dim=-1)
        return {k: p.reshape((*vec.shape[:-1], *s)) for k, p, s in zip(keys, parts, shapes, strict=True)}

    return flat, unravel


def _dtype(a: Tree) -> torch.dtype:
    return next(iter(a.values())).dtype


def _device(a: Tree) -> torch.device:
    return next(iter(a.values())).device
