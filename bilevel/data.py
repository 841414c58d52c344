"""What ``fit`` accepts as data for each level, turned into one stateful stream Lightning cycles and resumes.

Each level's data is a DataLoader, a re-iterable of batches (cycled) or a tuple of tensors (the
full batch every step). ``combined`` joins the two levels into a ``BilevelStream``: one
``{"lower": batch, "upper": batch}`` per step, the shorter level cycled (Lightning's
``max_size_cycle``: an epoch is as long as the longer level; ``FULL_BATCH_EPOCH`` steps when both
are full batches). The stream implements
``state_dict``/``load_state_dict``, so Lightning's ``CombinedLoader`` writes its position into every
checkpoint and hands it back on resume; a run resumed from a checkpoint written at any step then
sees exactly the batches the uninterrupted run would have seen.

A batch of tasks (``bilevel.Tasks``) has one stream instead: ``combined_tasks`` turns a loader whose
every item is a task batch ``(support, query)`` into a ``TaskStream``, which splits each item into
the step's lower batch (support) and upper batch (query). Both halves of a step come from one item,
so however the loader shuffles, the support and query sets of a step are those of the same tasks.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

# A level's stream state: what a checkpoint holds per level (see ``_Level.snapshot``).
LevelState = dict[str, Any]


class Reiterable:
    """A user's re-iterable of batches, wrapped so Lightning's CombinedLoader does not mistake a
    list of batches for a collection of loaders (it flattens lists and tuples as pytrees)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


FULL_BATCH_EPOCH = 1_000_000
"""Outer steps per epoch when every level is a full batch (an epoch is no unit of a full-batch run)."""


class FullBatch:
    """A tuple of tensors served as the whole batch on every step (one batch per pass over it)."""

    def __init__(self, batch: tuple) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[tuple]:
        yield self.batch

    def __len__(self) -> int:
        return 1


def as_reiterable(data: Any, level: str) -> Iterable:
    """A DataLoader as it is; a tuple (of tensors) as a ``FullBatch``; other re-iterables wrapped."""
    if isinstance(data, tuple):
        return FullBatch(data)
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{level}_data must be a DataLoader, a re-iterable of batches, or a tuple of tensors (the full batch "
            f"every step), got {type(data).__name__}"
        )
    if iter(data) is data:
        raise TypeError(
            f"{level}_data is a one-shot iterator ({type(data).__name__}); it must be re-iterable so that it can "
            "be cycled: pass a list of batches or a DataLoader"
        )
    _refuse_list_of_columns(data, level)
    return data if isinstance(data, DataLoader) else Reiterable(data)


def _refuse_list_of_columns(data: Any, level: str) -> None:
    """``[X, Y]`` is a list of two batches to ``fit``, not one batch of two tensors: refuse it, showing the fix.

    Batches of one list differ at most in their leading (batch) dimension, so tensors whose other
    dimensions differ (inputs [n, d] next to targets [n]) are columns of one batch, never batches.
    """
    if not isinstance(data, list) or len(data) < 2 or not all(isinstance(item, Tensor) for item in data):
        return
    if len({(item.dim(), tuple(item.shape[1:])) for item in data}) == 1:
        return  # equal shapes but the leading dimension: a list of single-tensor batches
    shapes = ", ".join(str(tuple(item.shape)) for item in data)
    names = ", ".join("XYZW"[i] if i < 4 else f"T{i}" for i in range(len(data)))
    raise TypeError(
        f"{level}_data is a list of {len(data)} tensors with shapes {shapes}; a list is read as a list of batches "
        f"(here {len(data)} batches of one tensor each), not as one batch. For the full batch every step pass a "
        f"tuple: {level}_data=({names}); for minibatches pass a list of ({names}) batches or "
        f"DataLoader(TensorDataset({names}), batch_size=..., shuffle=True, generator=torch.Generator().manual_seed(0))"
    )


def first_batch(data: Iterable, level: str) -> Any:
    """The first batch of a level's data, for the checks that run before training."""
    for batch in data:
        return batch
    raise ValueError(f"{level}_data yields no batch")


def combined(lower: Iterable, upper: Iterable) -> CombinedLoader:
    """One stream for both levels; the shorter one cycles so every step has a batch of each."""
    return CombinedLoader(BilevelStream(lower, upper), mode="max_size_cycle")


def _generators(data: Iterable) -> list[torch.Generator]:
    """The random generators that decide a DataLoader's order and worker seeds (its own, its samplers')."""
    if not isinstance(data, DataLoader):
        return []
    candidates = [data.generator, getattr(data.sampler, "generator", None),
                  getattr(getattr(data.batch_sampler, "sampler", None), "generator", None)]
    found: list[torch.Generator] = []
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not other for other in found):
            found.append(gen)
    return found


def _epoch_samplers(data: Iterable) -> list[Any]:
    """What takes the pass number by ``set_epoch``: a DataLoader's samplers whose order depends on an epoch
    (DistributedSampler and its wrappers), or a user's re-iterable that has ``set_epoch`` itself (a stream whose
    pass p serves items p * len, ..., as ``problems.mulo``'s truncations)."""
    if isinstance(data, Reiterable):
        return [data.batches] if callable(getattr(data.batches, "set_epoch", None)) else []
    if not isinstance(data, DataLoader):
        return []
    samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
    found: list[Any] = []
    for sampler in samplers:
        if callable(getattr(sampler, "set_epoch", None)) and all(sampler is not other for other in found):
            found.append(sampler)
    return found


def _shuffles_from_global_rng(data: Iterable) -> bool:
    """A DataLoader whose RandomSampler has no generator draws its order from torch's global random state."""
    if not isinstance(data, DataLoader):
        return False
    samplers = (data.sampler, getattr(data.batch_sampler, "sampler", None))
    return any(isinstance(s, RandomSampler) and s.generator is None for s in samplers)


def _skip(data: Iterable, iterator: Iterator, count: int, level: str) -> None:
    """Advance a fresh iterator of ``data`` by ``count`` batches.

    A single-process DataLoader over a map-style dataset is advanced in its sampler only, so no
    batch is loaded (``_next_index`` is the index step of torch's own ``__next__``); any other
    iterable is advanced by drawing its batches (a multi-process DataLoader has already queued
    indices to its workers when its iterator is created, so its sampler cannot be skipped alone).
    """
    sampler_only = (isinstance(data, DataLoader) and data.num_workers == 0
                    and not isinstance(data.dataset, IterableDataset) and hasattr(iterator, "_next_index"))
    try:
        for _ in range(count):
            if sampler_only:
                iterator._next_index()  # type: ignore[attr-defined]
            else:
                next(iterator)
    except StopIteration:
        raise ValueError(
            f"{level}_data ends before position {count} of the checkpoint's current pass: the data is not the "
            "data the checkpoint was written with; resume with the same data"
        ) from None
    if sampler_only:
        iterator._num_yielded += count  # type: ignore[attr-defined]  # keeps torch's length warning consistent


class _Level:
    """One level's side of the stream: passes over its data, the position in the current pass, its generators.

    A pass is one iteration over the level's data. The generators' states are recorded when a
    pass starts: restoring them and creating a fresh iterator reproduces the pass's order (and a
    DataLoader's worker seeds), and skipping ``position`` batches puts it where the checkpoint was.
    """

    def __init__(self, data: Iterable, level: str) -> None:
        self.data = data
        self.level = level
        self.length = sized_len(data)
        self.generators = _generators(data)
        # A distributed sampler's order is a function of (seed, epoch): its epoch is the pass number,
        # set before each pass, so passes differ and a resumed pass replays the same order.
        self.samplers = _epoch_samplers(data)
        self.passes = 0
        self.position = 0
        self.start: list[Tensor] = []
        self.iterator: Iterator | None = None

    def begin(self) -> None:
        """Start a new pass over the data."""
        self.start = [gen.get_state() for gen in self.generators]
        self._set_epoch(self.passes)
        self.iterator = iter(self.data)
        self.passes += 1
        self.position = 0

    def _set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    @property
    def exhausted(self) -> bool:
        """Whether a sized level has served its whole pass (counted, so the iterator is never asked past its end)."""
        return self.length is not None and self.position >= self.length

    def next(self) -> Any:
        assert self.iterator is not None
        batch = next(self.iterator)
        self.position += 1
        return batch

    def snapshot(self) -> LevelState:
        return {"passes": self.passes, "position": self.position, "length": self.length, "start": self.start,
                "now": [gen.get_state() for gen in self.generators]}

    def check(self, state: LevelState) -> None:
        """Refuse a checkpoint's state that this level's data cannot continue, naming the difference."""
        if state["length"] != self.length or len(state["start"]) != len(self.generators):
            raise ValueError(
                f"the checkpoint's {self.level} data had {state['length']} batches per pass and "
                f"{len(state['start'])} random generator(s); this run's {self.level}_data has {self.length} and "
                f"{len(self.generators)}: resume with the data the checkpoint was written with"
            )

    def restart(self, state: LevelState) -> None:
        """Continue a checkpoint's count of passes with a new pass (its position cannot be carried over)."""
        self.passes = state["passes"]
        if len(state["now"]) == len(self.generators):
            _set_states(self.generators, state["now"])
        self.begin()

    def restore(self, state: LevelState, new_pass: bool) -> None:
        """Continue from a checkpoint: in the middle of its pass, or (``new_pass``) with a fresh pass."""
        self.passes = state["passes"]
        if new_pass:
            # The checkpoint ended an epoch: the uninterrupted run starts every level afresh here, with
            # the generators as they were at the checkpoint.
            _set_states(self.generators, state["now"])
            self.begin()
            return
        _set_states(self.generators, state["start"])
        self._set_epoch(state["passes"] - 1)  # the pass in progress began as pass number passes - 1
        self.iterator = iter(self.data)
        _skip(self.data, self.iterator, state["position"], self.level)
        self.position = state["position"]
        now = [gen.get_state() for gen in self.generators]
        if not all(torch.equal(a, b) for a, b in zip(now, state["now"], strict=True)):
            warnings.warn(
                f"{self.level}_data: replaying the checkpoint's pass left its random generator in another state than "
                "the checkpoint recorded (its sampler draws from something other than its generator), so later "
                "passes are resumed from the recorded state but this pass's order may differ",
                stacklevel=2,
            )
            _set_states(self.generators, state["now"])


def _set_states(generators: list[torch.Generator], states: list[Tensor]) -> None:
    for gen, state in zip(generators, states, strict=True):
        gen.set_state(state)


class BilevelStream:
    """Both levels' batches, ``{"lower": ..., "upper": ...}`` per step, the shorter level cycled; resumable.

    An epoch lasts as long as the longer level (Lightning's ``max_size_cycle``); every level starts a
    new pass when an epoch starts and the shorter one also whenever its pass ends. ``state_dict``
    (called by Lightning's ``CombinedLoader`` when a checkpoint is written) is the position after
    the last batch the training step received; ``load_state_dict`` makes the next iteration
    continue from there: each level's generators are reset to their state at the start of its
    current pass, a fresh iterator is created and advanced in its sampler, not its dataset.
    """

    def __init__(self, lower: Iterable, upper: Iterable) -> None:
        self._setup({"lower": _Level(lower, "lower"), "upper": _Level(upper, "upper")})

    def _setup(self, levels: dict[str, _Level]) -> None:
        self.levels = levels
        for level in self.levels.values():
            if _shuffles_from_global_rng(level.data):
                warnings.warn(
                    f"{level.level}_data is a shuffled DataLoader without its own generator: its order comes from "
                    "torch's global random state, which checkpoints do not hold, so a run resumed from a checkpoint "
                    "sees other batches than the uninterrupted run. Pass DataLoader(..., shuffle=True, "
                    "generator=torch.Generator().manual_seed(0)) for exact resumes",
                    stacklevel=4,
                )
        lengths = [level.length for level in self.levels.values()]
        self.length = None if None in lengths else max(lengths)  # type: ignore[type-var]
        self.full_batches = all(isinstance(level.data, FullBatch) for level in self.levels.values())
        if self.full_batches:
            # Full batches only: an epoch of one step would run Lightning's epoch-end and epoch-start machinery
            # at every outer step (~0.4 ms, experiments/results/speed/fit_loop.md) for nothing; each level
            # still starts a new pass (its one batch) at every step.
            self.length = FULL_BATCH_EPOCH
        # Processes whose shards of the data this stream serves one of (``sharded``); 1: the whole data.
        self.world_size = 1
        self.position = 0
        self.consumed = dict.fromkeys(self.levels, False)
        # Snapshots after each batch served, oldest first, until the training step has received it.
        # Lightning reads one batch ahead when the stream has no length; ``delivered`` (called by
        # BilevelModule.on_train_batch_start) keeps the checkpointed state at the batch actually trained on.
        self._served: deque[dict[str, Any]] = deque(maxlen=8)
        self._received: dict[str, Any] | None = None
        self._tracking = False
        self._pending: dict[str, Any] | None = None

    def __len__(self) -> int:
        if self.length is None:
            unsized = [name for name, level in self.levels.items() if level.length is None]
            raise TypeError(f"the {' and '.join(unsized)} data has no length, so an epoch has none")
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: nothing happens until the first batch is asked for, because Lightning calls
        # iter() once just to check that the stream is iterable.
        return self._epoch()

    def peek(self) -> tuple[Any, Any]:
        """The first (lower, upper) batches, leaving every level's random generators as they were."""
        batches = []
        for level in self.levels.values():
            saved = [gen.get_state() for gen in level.generators]
            batches.append(first_batch(level.data, level.level))
            _set_states(level.generators, saved)
        return batches[0], batches[1]

    def sharded(self, shard: Callable[[Iterable, str], Iterable], world_size: int) -> BilevelStream:
        """A new stream over ``shard(data, level)`` of each level's data: this rank's share on ``world_size`` ranks.

        The new stream starts afresh; this one (the whole data, kept by the module) is left as it is.
        """
        stream = BilevelStream(*(shard(level.data, name) for name, level in self.levels.items()))
        stream.world_size = world_size
        return stream

    def _epoch(self) -> Iterator[dict[str, Any]]:
        pending, self._pending = self._pending, None
        if pending is not None and pending.get("reshard"):
            # Written on another number of processes: each level starts a new pass at the
            # checkpoint's position in the epoch, so the epoch ends where Lightning's count says.
            for name, level in self.levels.items():
                level.restart(pending["levels"][name])
            self.position = pending["position"] if self.length is None else min(pending["position"], self.length)
            self.consumed = dict.fromkeys(self.levels, False)
        elif pending is not None and (self.length is None or pending["position"] < self.length):
            self._resume(pending)
        else:
            for name, level in self.levels.items():
                if pending is not None:
                    level.restore(pending["levels"][name], new_pass=True)
                else:
                    level.begin()
            self.position = 0
            self.consumed = dict.fromkeys(self.levels, False)
        while self.length is None or self.position < self.length:
            batch = {}
            for name, level in self.levels.items():
                if level.exhausted:
                    if self._end_of_pass(name):
                        return
                try:
                    batch[name] = level.next()
                except StopIteration:  # a level without length ends its pass here
                    if self._end_of_pass(name):
                        return
                    batch[name] = level.next()
            self.position += 1
            self._served.append(self._snapshot())
            yield self._step_batches(batch)

    def _step_batches(self, batch: dict[str, Any]) -> dict[str, Any]:
        """What a training step receives from one item of each level: ``{"lower": ..., "upper": ...}``."""
        return batch

    def _end_of_pass(self, name: str) -> bool:
        """Mark a level's pass as done; True when every level has done one (the epoch ends), else restart it.

        A stream of full batches only ends its epoch by its length (``FULL_BATCH_EPOCH``), never here.
        """
        self.consumed[name] = True
        if all(self.consumed.values()) and not self.full_batches:
            return True
        self.levels[name].begin()
        return False

    def _resume(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.consumed = dict(state["consumed"])
        for name, level in self.levels.items():
            level.restore(state["levels"][name], new_pass=False)

    def _snapshot(self) -> dict[str, Any]:
        return {"position": self.position, "consumed": dict(self.consumed),
                "levels": {name: level.snapshot() for name, level in self.levels.items()}}

    def delivered(self) -> None:
        """The training step received the oldest batch served and not yet received."""
        self._tracking = True
        if self._served:
            self._received = self._served.popleft()

    def state_dict(self) -> dict[str, Any]:
        """The stream's position after the last batch trained on (the latest served when nobody reports)."""
        if self._tracking:
            state = self._received
        else:
            state = self._served[-1] if self._served else None
        return {"version": 2, "state": state, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's position at the next iteration; refuse data the state does not fit."""
        state = state_dict.get("state")
        if state is None:
            return
        written_on = state_dict.get("world_size", 1)  # version 1 states were all written by one process
        if written_on != self.world_size:
            passes = ", ".join(f"{name} {s['passes']}" for name, s in state["levels"].items())
            rank_zero_warn(
                f"the checkpoint's data position was written on {written_on} process(es) and this run has "
                f"{self.world_size}: each process's share of the data differs, so the position cannot be carried "
                f"over. Every level starts a new pass here (passes so far: {passes}), so the batches differ from "
                "those of the uninterrupted run; x, y, the engine state and the step count continue exactly",
            )
            self._pending = {**state, "reshard": True}
            return
        for name, level in self.levels.items():
            level.check(state["levels"][name])
        self._pending = state


def split_task_batch(item: Any) -> tuple[Any, Any]:
    """(support, query) of one item of a task stream: a pair, each part a batch of tasks (leading dimension T)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else (
            type(item).__name__)
        raise TypeError(
            f"every item of tasks must be a pair (support, query) of task batches, each a tuple of tensors with a "
            f"leading task dimension T (a DataLoader over a dataset of (support, query) tasks yields them); got {what}"
        )
    return item[0], item[1]


class TaskStream(BilevelStream):
    """One stream of task batches: each item ``(support, query)`` is one step's lower and upper batch; resumable.

    Pairing happens here, on one item, never across two streams: a shuffled loader of tasks keeps
    every step's support and query sets those of the same tasks. The stream's position (passes,
    position in the pass, the loader's generators) is checkpointed and resumed as a
    ``BilevelStream``'s, with the one level named "tasks".
    """

    def __init__(self, tasks: Iterable) -> None:
        self._setup({"tasks": _Level(tasks, "tasks")})

    def _step_batches(self, batch: dict[str, Any]) -> dict[str, Any]:
        support, query = split_task_batch(batch["tasks"])
        return {"lower": support, "upper": query}

    def peek(self) -> tuple[Any, Any]:
        """The first (support, query) task batches, leaving the loader's random generators as they were."""
        level = self.levels["tasks"]
        saved = [gen.get_state() for gen in level.generators]
        item = first_batch(level.data, "tasks")
        _set_states(level.generators, saved)
        return split_task_batch(item)

    def sharded(self, shard: Callable[[Iterable, str], Iterable], world_size: int) -> BilevelStream:
        """Refused: the engines average over ranks inside each task's computation, which would mix the ranks' tasks."""
        from bilevel.distributed import UnsupportedStrategy  # here: bilevel.distributed imports this module

        raise UnsupportedStrategy(
            f"a batch of tasks cannot be split over {world_size} processes: the engines average every quantity "
            "over ranks inside each task's lower problem, which would mix different tasks; train it on one process"
        )


def as_task_reiterable(tasks: Any) -> Iterable:
    """A DataLoader as it is; other re-iterables of task batches wrapped (a one-shot iterator is refused)."""
    if isinstance(tasks, tuple):
        return FullBatch(tasks)  # one task batch (support, query) served at every step
    return as_reiterable(tasks, "tasks")


def combined_tasks(tasks: Any) -> CombinedLoader:
    """One resumable stream of task batches, each item split into (support, query) for the two levels."""
    return CombinedLoader(TaskStream(as_task_reiterable(tasks)), mode="max_size_cycle")
