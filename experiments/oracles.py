"""Count oracle calls (gradients, HVPs, mixed VJPs) made through ``hypergrad.kernels``.

For benchmarks only: the counters wrap the kernels module's functions for the duration of a
``with count_oracles() as calls:`` block, so engines stay free of bookkeeping. What counts:

- each call an engine makes, once: a kernel that calls another kernel (``mixed_vjp`` runs
  ``grad_y`` as its forward pass, ``hvp_operator`` calls ``hvp``) counts as one call of the outer
  kind only, so ``mixed_vjp`` is one mixed VJP and not also a gradient;
- a kernel called under ``torch.func.vmap`` on a batch of B vectors counts B times (``Exact``'s
  dense Hessian: one vmapped ``hvp`` over the dim(y) unit vectors is dim(y) HVPs);
- a gradient taken inside a differentiated unroll (``Unrolled``) counts once, like any other
  gradient (its reverse pass is not an oracle call of its own).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor
from torch._C import _functorch

from hypergrad import kernels

KINDS = {"grad_y": "gradients", "grad_xy": "gradients", "hvp": "hvps", "mixed_vjp": "mixed_vjps"}


def _batch_size(tree: Any) -> int:
    """The vmap batch size of the first tensor leaf of ``tree`` (1 outside vmap)."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor) and _functorch.is_batchedtensor(leaf):
            return int(_functorch.get_unwrapped(leaf).shape[_functorch.maybe_get_bdim(leaf)])
        if isinstance(leaf, Tensor):
            return 1
    return 1


@contextmanager
def count_oracles() -> Iterator[Counter]:
    """Yield a Counter of 'gradients', 'hvps' and 'mixed_vjps' filled while the block runs."""
    calls: Counter = Counter()
    originals = {name: getattr(kernels, name) for name in KINDS}
    depth = [0]  # > 0 while a counted kernel runs: the kernels it calls are part of it

    def counted(name: str):
        original = originals[name]

        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                # The direction vector (hvp's and mixed_vjp's last argument) carries the vmap batch.
                calls[KINDS[name]] += _batch_size(args[-1]) if name in ("hvp", "mixed_vjp") else 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    try:
        for name in KINDS:
            setattr(kernels, name, counted(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)
