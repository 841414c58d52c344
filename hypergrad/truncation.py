"""A lower batch that spans one truncation of a lower run: a minibatch per lower step and the runs' restarts.

Meta-training over a task family (Metz et al. 2022; Vicol, Metz, Sohl-Dickstein 2021) feeds each
outer step K fresh minibatches, one per lower step, and lets the data stream decide which runs start
a new task (``hypergrad.dynamics.begin`` hands ``restart`` to the problem's ``lower_restart``). A
plain batch is a one-step truncation repeated: ``at(batch, k)`` is the batch itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_map


@dataclass
class Truncation:
    """One outer step's batch of a lower run: a minibatch per lower step, and the runs' restarts.

    Lightning moves it to the device like any dataclass of tensors. As an upper batch it gives the
    minibatch of the meta-loss after each step (``restart`` and ``fresh`` unused).
    """

    steps: Sequence[Any]
    """K minibatches, the k-th for the k-th lower step of the truncation (as the problem's g and f take them)."""
    restart: Any = None
    """What the problem's ``lower_restart`` reads before the first step (None: no restart this truncation)."""
    pairs: bool = False
    """Whether every leaf has a leading axis of PES pairs (per-particle data); only PES accepts it."""
    fresh: Tensor | None = None
    """With ``pairs``: bool [pairs], the pairs whose runs ``restart`` starts anew (PES resets their perturbations)."""


def at(batch: Any, k: int) -> Any:
    """The minibatch of lower step ``k`` (from 0): ``batch.steps[k]`` of a Truncation, else ``batch`` itself.

    Raises ValueError when a Truncation has fewer than k + 1 steps (the data and the engine's K disagree).
    """
    if not isinstance(batch, Truncation):
        return batch
    if k >= len(batch.steps):
        raise ValueError(f"the data's Truncation has {len(batch.steps)} minibatches, but the engine takes lower step "
                         f"{k + 1} of the truncation; make the data's truncation length the engine's inner_steps")
    return batch.steps[k]


def check_length(batch: Any, steps: int, owner: str) -> None:
    """Raise ValueError, naming ``owner``, unless ``batch`` is no Truncation or has exactly ``steps`` minibatches:
    with more the engine would skip some and the data's step counts would drift from the runs'."""
    if isinstance(batch, Truncation) and len(batch.steps) != steps:
        raise ValueError(f"{owner}(inner_steps={steps}): the data's Truncation has {len(batch.steps)} minibatches; "
                         "make the data's truncation length the engine's inner_steps")


def last(batch: Any) -> Any:
    """The minibatch of a Truncation's last step (``batch`` itself otherwise): where metrics at y_K are taken."""
    return batch.steps[-1] if isinstance(batch, Truncation) else batch


def pair(batch: Any, i: int) -> Any:
    """Pair ``i``'s Truncation (every leaf indexed at ``i`` on its leading axis) of a per-pair one; others as given."""
    if not (isinstance(batch, Truncation) and batch.pairs):
        return batch
    take = lambda v: v[i] if isinstance(v, Tensor) else v  # noqa: E731
    return Truncation(steps=tree_map(take, list(batch.steps)), restart=tree_map(take, batch.restart))


def sample(batch: Any) -> Any:
    """A minibatch the problem's objectives take as they are: the first step of the first pair of a Truncation."""
    return at(pair(batch, 0), 0)
