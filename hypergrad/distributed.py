"""Data parallelism: the mean over ranks of every batch-dependent quantity (ALGORITHMS.md section 10).

With R ranks each holding an equal shard of every batch and objectives that are means over the
batch, the mean over ranks of a rank's gradient, Hessian-vector product, mixed product, objective or
constraint value is that quantity on the union of the shards. ``mean_over_ranks`` takes that mean;
the engines call it on the outputs of the kernels (``hypergrad.kernels``) and on the values they
compute themselves, so every rank then holds the same x, y and state as one process fed the union.

- Without an initialized process group (or with one rank) ``mean_over_ranks`` returns its argument
  itself: no copy, no collective, the same numbers bit for bit.
- One call is one all-reduce per floating dtype (one in practice): the floating leaves of the tree
  are flattened into one buffer, summed over ranks (``ReduceOp.SUM``), divided by R and split back.
  Integer and boolean leaves and non-tensors pass through unchanged (they are not averaged).
- It is differentiable (``MeanOverRanks``, a ``torch.autograd.Function`` usable under ``torch.func``):
  forward and backward are the mean over ranks, so an unrolled lower run whose steps use the global
  mean gradient can be differentiated (``hypergrad.unrolled``); each rank's local hypergradient then
  has the true one as its mean over ranks (see ``MeanOverRanks``).
- Under ``torch.func.vmap`` the batched tensor is reduced as a whole (the mean over ranks acts entry
  by entry, so the batch dimension passes through): one all-reduce for all the vmapped entries (a
  dense solve's columns, PES's particles, a population's members).
- Under ``torch.compile`` the collective is the functional one
  (``torch.distributed._functional_collectives.all_reduce``), which dynamo captures in the graph: no
  graph break. In eager mode it is ``torch.distributed.all_reduce`` on the flat buffer (the functional
  collectives do not compose with ``torch.func`` in eager mode in torch 2.13).

The counter (``counting``) records the all-reduces and bytes issued in eager mode (a compiled graph
runs its collectives without Python, so they are not counted there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

A = TypeVar("A")


@dataclass
class Counter:
    """All-reduces and bytes issued by ``mean_over_ranks`` since the counter was created (eager mode)."""

    all_reduces: int = 0
    bytes: int = 0


_COUNTERS: list[Counter] = []


@contextmanager
def counting() -> Iterator[Counter]:
    """``with counting() as c: ...``: ``c.all_reduces`` and ``c.bytes`` issued inside the block (nestable)."""
    counter = Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def available() -> bool:
    """Whether a default process group is initialized (False when torch lacks distributed support)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """R, the number of ranks of the default process group; 1 without one."""
    return dist.get_world_size() if available() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if available() else 0


def mean_over_ranks(tree: A) -> A:
    """(1/R) sum_r tree_r for every floating tensor leaf of ``tree`` (a tensor, dict, tuple, list or nest of them).

    Shapes and structure are kept: every leaf of the result has its input's shape and dtype. With
    R = 1 (no process group) it returns ``tree`` itself, the same objects. One all-reduce per
    floating dtype present (the leaves flattened into one buffer); differentiable, vmappable and
    compilable (see the module docstring).
    """
    if world_size() == 1:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    if not where:
        return tree
    tensors = tuple(leaves[i] for i in where)
    # Under torch.compile the functional collective is called directly: dynamo captures it (and its registered
    # autograd, the all-reduce of the cotangent) but not this autograd.Function's ctx-less forward.
    reduced = _all_reduce_mean(tensors) if torch.compiler.is_compiling() else MeanOverRanks.apply(*tensors)
    for i, leaf in zip(where, reduced, strict=True):
        leaves[i] = leaf
    return pytree.tree_unflatten(leaves, spec)


def _all_reduce_mean(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The mean over ranks of each tensor: one flat buffer and one all-reduce (SUM, then / R) per dtype."""
    size = world_size()
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])  # a new buffer: the inputs are never written
        if torch.compiler.is_compiling():
            import torch.distributed._functional_collectives as funcol

            # world_size() > 1, so the default group exists (torch types WORLD as optional).
            world = cast(dist.ProcessGroup, dist.group.WORLD)
            flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", world))
        else:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for counter in _COUNTERS:
                counter.all_reduces += 1
                counter.bytes += flat.numel() * flat.element_size()
        flat = flat / size
        parts = torch.split(flat, [tensors[i].numel() for i in indices])
        for i, part in zip(indices, parts, strict=True):
            out[i] = part.reshape(tensors[i].shape)
    return tuple(out)  # type: ignore[arg-type]


class MeanOverRanks(torch.autograd.Function):
    """y_i = (1/R) sum_r x_i^(r) for each input tensor x_i; its backward and its JVP are the same mean.

    Why the backward is the mean of the cotangents: rank r computes y = (1/R) sum_s x^(s) and then a
    local loss L_r(y); the global loss is L = (1/R) sum_r L_r, whose derivative in y is the mean of the
    ranks' local adjoints dL_r/dy. So each rank hands that mean back to its own x^(r). Through an
    unrolled run y_{t+1} = y_t - a (1/R) sum_r grad g_r(x, y_t), by induction from t = T down, the
    ranks' local adjoints of y_t have the global adjoint dL/dy_t as their mean over ranks, and so the
    ranks' local dL/dx have the true hypergradient as theirs (``hypergrad.unrolled`` takes that mean
    once at the end; the tests check it against one process fed the union of the shards).

    Under ``torch.func.vmap`` the physical (batched) tensors are reduced as a whole and keep their
    batch dimensions: the mean over ranks is entrywise.
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(*tensors: Tensor) -> tuple[Tensor, ...]:
        return _all_reduce_mean(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
        pass  # nothing to save: the map is linear and the same on every input

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Tensor, ...]:
        # Every rank runs the same graph, so the backward collectives match in order and size.
        return MeanOverRanks.apply(*cotangents)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor) -> tuple[Tensor, ...]:
        return MeanOverRanks.apply(*tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *tensors: Tensor) -> tuple[tuple[Tensor, ...], tuple]:
        return MeanOverRanks.apply(*tensors), tuple(in_dims)
