"""A level's batch structure, fixed by its first batch and checked on every later one.

The problem and engine are checked (and a compiled engine traced) on the first batch of each level;
a later batch with other containers, keys, tensor dtypes or numbers of dimensions would fail deep
inside an engine. ``BatchStructure`` names the level, the step and what changed instead. Sizes
may change (a last, smaller minibatch is fine).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def describe(batch: Any) -> Any:
    """A hashable summary of ``batch``: containers, keys, and for each tensor its dtype and number of dims."""
    if isinstance(batch, Tensor):
        return ("tensor", str(batch.dtype).removeprefix("torch."), batch.dim())
    if isinstance(batch, dict):
        return ("dict", tuple((k, describe(v)) for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, tuple(describe(v) for v in batch))
    return (type(batch).__name__,)


def render(summary: Any) -> str:
    """``describe``'s summary in words: ``tuple(float32 2-d, int64 1-d)``."""
    kind, *rest = summary
    if kind == "tensor":
        return f"{rest[0]} {rest[1]}-d"
    if kind == "dict":
        return "dict(" + ", ".join(f"{k!r}: {render(v)}" for k, v in rest[0]) + ")"
    if kind in ("list", "tuple"):
        return f"{kind}(" + ", ".join(render(v) for v in rest[0]) + ")"
    return kind


class BatchStructure:
    """Remembers each level's first batch structure; ``check`` raises naming the level, step and difference."""

    def __init__(self) -> None:
        self.first: dict[str, Any] = {}

    def check(self, level: str, batch: Any, step: int) -> None:
        """Record the first ``level`` batch's structure, or raise ValueError if this one (at ``step``) differs."""
        summary = describe(batch)
        expected = self.first.setdefault(level, summary)
        if summary != expected:
            raise ValueError(
                f"the {level} batch of outer step {step} is a {render(summary)}, but the first {level} batch was a "
                f"{render(expected)}. Every batch of a level must have the structure of the first (containers, keys, "
                f"tensor dtypes and dims; sizes may change): check the {level} data's collate function or dataset."
            )
