"""Outer updates as pure ``(init, update)`` transforms on trees, in the manner of optax.

    opt_state = transform.init(x)
    x, opt_state = transform.update(x, h, opt_state, t)      # h: the hypergradient (shapes of x)

``t`` is the 0-d int64 number of the update, 1-based (``state["step"] + 1`` of the engine taking it).
Kept functional (state in, state out) so that an engine step stays a pure function that
``torch.func.vmap`` and checkpoints can hold; ``torch.optim`` keeps its state inside the object.
Engines choose a transform (``Engine.outer_transform``); ``Engine.outer`` applies it, then projects
onto X. ``chain`` composes transforms, each updating the x the previous one returned.

Each transform computes exactly what the engine it came from computed, operation for operation,
so states and checkpoints are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from hypergrad import tree
from hypergrad.tree import Tree

OuterState = Any
"""A transform's state: a pytree of tensors ({} when it keeps none)."""

OPTIMIZERS = ("sgd", "adam")
"""The names of ``optimizer``: an engine's ``outer_optimizer``."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Transform(Protocol):
    """A pure outer update: its state for x, and one step of x along the hypergradient h."""

    def init(self, x: Tree) -> OuterState: ...

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]: ...


@dataclass(frozen=True)
class SGD:
    """x <- x - lr h. No state."""

    lr: float

    def init(self, x: Tree) -> OuterState:
        return {}

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        return tree.axpy(-self.lr, h, x), state


@dataclass(frozen=True)
class Adam:
    """Kingma and Ba (2015) with ``torch.optim.Adam``'s placement of eps. State: moments ``m``, ``s`` (shapes of x)."""

    lr: float
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    def init(self, x: Tree) -> OuterState:
        return {"m": tree.zeros_like(x), "s": tree.zeros_like(x)}

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        b1, b2 = self.betas
        m = tree.tree_map(lambda m_, h_: b1 * m_ + (1 - b1) * h_, state["m"], h)
        s = tree.tree_map(lambda s_, h_: b2 * s_ + (1 - b2) * h_ * h_, state["s"], h)
        # Written with tensor powers of the step so that t may be batched under vmap.
        t = t.to(next(iter(x.values())).dtype)
        c1, c2 = 1 - b1**t, torch.sqrt(1 - b2**t)
        lr, eps = self.lr, self.eps
        new_x = tree.tree_map(lambda x_, m_, s_: x_ - (lr / c1) * m_ / (torch.sqrt(s_) / c2 + eps), x, m, s)
        return new_x, {"m": m, "s": s}


@dataclass(frozen=True)
class NormalizedMomentum:
    """m <- beta m + (1 - beta) h;  x <- x - lr m / |m| (|m| over the whole tree; no step at m = 0).

    BO-REP's update (Hao, Gong, Liu, ICLR 2024): every step has length lr exactly, whatever |m| is.
    The state is m itself (shapes of x).
    """

    lr: float
    beta: float

    def init(self, x: Tree) -> OuterState:
        return tree.zeros_like(x)

    def momentum(self, m: Tree, h: Tree) -> Tree:
        """beta m + (1 - beta) h, leaf by leaf."""
        beta = self.beta
        return tree.tree_map(lambda m_, h_: beta * m_ + (1 - beta) * h_, m, h)

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        m = self.momentum(state, h)
        # m / |m| exactly as in the paper (|dx| = lr to rounding, however small |m| is), and no step at m = 0;
        # the "+ 1e-12" of ALGORITHMS.md would shorten steps by 1e-12 / |m| relative.
        m_norm = tree.norm(m)
        return tree.axpy(-self.lr / torch.where(m_norm > 0, m_norm, torch.ones_like(m_norm)), m, x), m


@dataclass(frozen=True)
class ScheduledSGD:
    """x <- x - lr(t, dtype) h with a step size that follows a schedule of the update's number t. No state.

    ``lr`` maps the 0-d int64 t (1-based) and x's dtype to a 0-d tensor: F2SA's xi alpha_k, k = t - 1.
    """

    lr: Callable[[Tensor, torch.dtype], Tensor]

    def init(self, x: Tree) -> OuterState:
        return {}

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        return tree.axpy(-self.lr(t, next(iter(x.values())).dtype), h, x), state


@dataclass(frozen=True)
class Project:
    """x <- P(x): a projection (onto a set X) as a transform, for ``chain``. No state."""

    project: Callable[[Tree], Tree]

    def init(self, x: Tree) -> OuterState:
        return {}

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        return self.project(x), state


@dataclass(frozen=True)
class Clipped:
    """``inner``'s step along h scaled to global norm at most ``max_norm``: h * max_norm / max(max_norm, |h|).

    Meta-gradient clipping: one heavy-tailed meta-gradient (a truncation that blew up) must not throw a
    learned optimizer's parameters far away. The state is ``inner``'s.
    """

    inner: Transform
    max_norm: float

    def init(self, x: Tree) -> OuterState:
        return self.inner.init(x)

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        norm = tree.norm(h)
        scale = self.max_norm / torch.clamp(norm, min=self.max_norm)  # a tensor: batched norms stay batched
        return self.inner.update(x, tree.tree_map(lambda v: v * scale.to(v.dtype), h), state, t)


@dataclass(frozen=True)
class Chain:
    """The transforms in turn, each updating the x the previous one returned; the state is a tuple of theirs."""

    transforms: tuple[Transform, ...]

    def init(self, x: Tree) -> OuterState:
        return tuple(transform.init(x) for transform in self.transforms)

    def update(self, x: Tree, h: Tree, state: OuterState, t: Tensor) -> tuple[Tree, OuterState]:
        states = []
        for transform, own in zip(self.transforms, state, strict=True):
            x, own = transform.update(x, h, own, t)
            states.append(own)
        return x, tuple(states)


def sgd(lr: float) -> SGD:
    return SGD(lr)


def adam(lr: float) -> Adam:
    return Adam(lr)


def normalized_momentum(lr: float, beta: float) -> NormalizedMomentum:
    return NormalizedMomentum(lr, beta)


def scheduled_sgd(lr: Callable[[Tensor, torch.dtype], Tensor]) -> ScheduledSGD:
    return ScheduledSGD(lr)


def project(projection: Callable[[Tree], Tree]) -> Project:
    return Project(projection)


def chain(*transforms: Transform) -> Chain:
    """``chain(adam(0.01), project(P))``: Adam's step, then P (what ``Engine.outer`` does with a set X)."""
    return Chain(tuple(transforms))


def optimizer(name: str, lr: float, clip: float | None = None) -> Transform:
    """The transform of an engine's ``outer_optimizer`` (one of ``OPTIMIZERS``) with step size ``lr``, its steps
    taken along the hypergradient clipped to global norm ``clip`` when given (``Clipped``)."""
    base: Transform = SGD(lr) if name == "sgd" else Adam(lr)
    return base if clip is None else Clipped(base, clip)


# -- by name (the functional form the benchmarks and tests use) ------------------------------------


def init(kind: str, x: Tree) -> OuterState:
    """Optimizer state for x: nothing for SGD; first and second moments for Adam."""
    return optimizer(kind, 1.0).init(x)  # the state does not depend on the step size


def update(kind: str, x: Tree, h: Tree, state: OuterState, lr: float, t: Tensor) -> tuple[Tree, OuterState]:
    """One descent step on x along the hypergradient h. ``t`` is the 1-based step count (0-d)."""
    return optimizer(kind, lr).update(x, h, state, t)
