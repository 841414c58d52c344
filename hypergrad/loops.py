"""A counted loop that stays a loop under ``torch.compile``: ``fori_loop(n, body, carry)``.

Dynamo unrolls a Python ``for`` loop into the graph, so the compile time of a solver grows with its
iterations (``experiments/results/speed/compile_k.md``). ``fori_loop`` runs ``carry = body(carry)``
``n`` times:

- eagerly (not compiling) as that plain Python loop, so eager numbers are those of the loop written
  out, bit for bit;
- under ``torch.compile`` as torch's ``while_loop`` higher-order op, one traced body whatever ``n``.

The body must be a pure function of its carry (a tree of tensors: dicts, tuples, lists) and of
tensors it closes over. What it may not close over, in torch 2.13: a ``torch.func`` closure built
outside the loop, such as the pullback of ``torch.func.vjp`` (dynamo fails with "Expected FakeTensor,
got Tensor"). A transform applied inside the body (``torch.func.vjp(grad(g))`` recomputed per call)
compiles. ``hypergrad.solvers`` therefore takes the loop only for a ``matvec`` marked ``loop_safe``
(``mark_loop_safe``) and unrolls otherwise.

Under compile the carried tensors are copied once before the loop, and a body output that is one of
its inputs (a carry the body leaves unchanged) is copied too: the op forbids aliasing between inputs
and outputs. Shapes, dtypes and strides must not change across iterations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils import _pytree as pytree

Carry = TypeVar("Carry")

LOOP_SAFE = "loop_safe"
"""The attribute that marks a function as callable inside ``fori_loop``'s compiled body."""


def mark_loop_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, marked as closing over nothing a compiled loop body cannot hold (see the module docstring)."""
    setattr(fn, LOOP_SAFE, True)
    return fn


def is_loop_safe(fn: Any) -> bool:
    """Whether ``fn`` was marked with ``mark_loop_safe``."""
    return bool(getattr(fn, LOOP_SAFE, False))


_FOLD = [False]
"""Whether ``folding()`` may answer True: only inside ``fold_loops(True)`` (``compile_engine(fold_loops=True)``)."""


def compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compile``)."""
    return bool(torch.compiler.is_compiling())


def folding() -> bool:
    """Whether loops marked foldable run as the ``while_loop`` op here: compiling, and folding not turned off."""
    return compiling() and _FOLD[0]


@contextlib.contextmanager
def fold_loops(enabled: bool) -> Iterator[None]:
    """Within this block, ``folding()`` answers whether compiling and ``enabled`` (False: every loop unrolls).

    Off by default because of objectives with Python side effects (an ``nn.Module`` call that swaps or
    updates its tensors in place, BatchNorm's running statistics), which torch 2.13 refuses inside a
    loop body ("HOP: Unsafe side effect"); dynamo guards on the flag, so a change recompiles.
    """
    before = _FOLD[0]
    _FOLD[0] = enabled
    try:
        yield
    finally:
        _FOLD[0] = before


def fori_loop(n: int, body: Callable[[Carry], Carry], carry: Carry, *, loop: bool | None = None) -> Carry:
    """``body`` applied ``n`` times to ``carry``: a Python loop eagerly, torch's ``while_loop`` under compile.

    Args:
        n: the number of iterations (a Python int >= 0).
        body: carry -> carry, with the carry's tree structure, shapes and dtypes.
        carry: a tree of tensors.
        loop: force the ``while_loop`` op (True) or the Python loop (False); None: the op exactly when
            ``folding()``.
    """
    if loop is None:
        loop = folding()
    if not loop or n <= 1:  # one iteration or none: nothing to fold
        for _ in range(n):
            carry = body(carry)
        return carry
    from torch._higher_order_ops import while_loop

    leaves, spec = pytree.tree_flatten(carry)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError("fori_loop: every leaf of the carry must be a tensor")

    def cond(i: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return i < n

    def step(i: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = pytree.tree_leaves(body(pytree.tree_unflatten(list(flat), spec)))
        seen: list[torch.Tensor] = []
        fresh = []
        for t in out:
            if any(t is s for s in flat) or any(t is s for s in seen):
                t = t.clone()
            seen.append(t)
            fresh.append(t)
        return (i + 1, *fresh)

    start = torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)
    result = while_loop(cond, step, (start, *(t.clone() for t in leaves)))
    return pytree.tree_unflatten(list(result[1:]), spec)
