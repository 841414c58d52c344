"""Data-parallel training under Lightning's DDP: which strategies run, and how each level's data is sharded.

The engines average every batch-dependent quantity over ranks (``hypergrad.distributed``), so R ranks
that each see a shard of every batch equal one process fed the union of the shards, provided the
objectives are means over their batch and the shards of a step have equal sizes. This module makes
the shards, the Lightning way, when the Trainer runs on R > 1 processes:

- a DataLoader over a map-style dataset gets Lightning's ``DistributedSampler`` (its
  ``_prepare_dataloader``, with the strategy's ``distributed_sampler_kwargs``): rank r takes every
  R-th index of the (shuffled) order, padded by repetition so every rank has ceil(N / R) examples;
  ``batch_size`` is per rank, so a step sees R x batch_size examples. A shuffled order comes from
  the sampler's seed (``seed_everything``'s, else 0) and epoch; the epoch is the level's pass number
  (``BilevelStream`` sets it), so passes differ and a resume replays the same order.
- a DataLoader over an ``IterableDataset`` is left as it is (as Lightning does): the dataset shards
  itself by rank, or every rank sees the same batches (the same result, no speed-up).
- a tuple of tensors (the full batch) and every batch of a list or other re-iterable is split along
  dim 0: rank r takes the contiguous rows [r n/R, (r+1) n/R) of every tensor, so concatenating the
  ranks' shards in rank order gives the user's batch. Every tensor of the batch must have the same
  leading size n, divisible by R; other batches are refused, naming the shapes.
- ``Trainer(use_distributed_sampler=False)`` shards nothing: every rank trains on the data it is
  given (sharding it is then the user's business, as in Lightning).

Strategies: one process (``"auto"``, ``"single_device"``) and Lightning's DDP family (``"ddp"``,
``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"`` and their ``find_unused_parameters`` variants).
FSDP, DeepSpeed and model parallelism shard the parameters, which the engines move whole (x and y
live in the engine state as full tensors), so they are refused before any work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    StrategyRegistry,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader

from bilevel.data import FullBatch, Reiterable

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
# DeepSpeed and XLA derive from Lightning's DDPStrategy / SingleDeviceStrategy but shard or move what the
# engines hold whole, so they are refused by name before the DDP family is accepted.
_REFUSED = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy, SingleDeviceXLAStrategy)


class UnsupportedStrategy(ValueError):
    """A Trainer strategy (or a parallel setting) the engines cannot honour; the message names what works."""


def _strategy_class(strategy: str | Strategy | type | None) -> type | None:
    """The Strategy class a Trainer's ``strategy`` argument names (None: "auto" or a name Lightning resolves later)."""
    if strategy is None or isinstance(strategy, str) and strategy == "auto":
        return None
    if isinstance(strategy, str):
        return StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    return strategy if isinstance(strategy, type) else type(strategy)


def check_strategy(strategy: str | Strategy | type | None) -> None:
    """Refuse a strategy that shards parameters or otherwise breaks the engines' whole-tensor x and y.

    Accepts a Trainer's ``strategy`` argument (a registered name, a Strategy instance or class) or
    ``trainer.strategy``. Unknown names are left to Lightning, which lists its own.
    """
    cls = _strategy_class(strategy)
    if cls is None or issubclass(cls, (DDPStrategy, SingleDeviceStrategy)) and not issubclass(cls, _REFUSED):
        return
    name = strategy if isinstance(strategy, str) else cls.__name__
    raise UnsupportedStrategy(
        f"strategy {name!r} is not supported: the engines update x and y as whole tensors in their own state, "
        "so strategies that shard parameters or optimizer state (FSDP, DeepSpeed, model parallel, XLA) cannot "
        f"run them. Use one of {', '.join(repr(s) for s in SUPPORTED_STRATEGIES)} (or a DDPStrategy instance): "
        "data parallelism, each rank on a shard of every batch, the engines averaging over ranks"
    )


def check_parallel(trainer: Trainer, population: bool, name: str) -> None:
    """Refuse, before any work, what the Trainer's processes cannot run: its strategy, or a population on R > 1."""
    check_strategy(trainer.strategy)
    processes = trainer.num_devices * trainer.num_nodes
    if processes > 1:
        _carry_generators_by_value()
    if population and processes > 1:
        raise UnsupportedStrategy(
            f"a Population ({name}) cannot be trained on {processes} processes (devices={trainer.num_devices}, "
            f"num_nodes={trainer.num_nodes}): its per-member batches would be split across members. Train the "
            "population on one device (devices=1), or train its members one at a time with bilevel.fit on "
            "several devices"
        )


def _rebuild_generator(device: str, state: bytes) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


def _reduce_generator(generator: torch.Generator) -> tuple[Any, tuple[str, bytes]]:
    return _rebuild_generator, (str(generator.device), generator.get_state().numpy().tobytes())


def _carry_generators_by_value() -> None:
    """Send ``torch.Generator``s (a shuffled DataLoader's) to ddp_spawn's processes as bytes.

    torch's own pickling of a Generator goes through a temporary state tensor, which
    ``torch.multiprocessing`` shares by a file descriptor that is closed (the tensor freed) before the
    process starts: "bad value(s) in fds_to_keep", or "unable to resize file" in the child. In torch
    2.13 any ddp_spawn run whose module or data holds a Generator fails so; the state as bytes does not.
    """
    ForkingPickler.register(torch.Generator, _reduce_generator)


def shards_data(trainer: Trainer) -> bool:
    """Whether this run shards each level's data over ranks: R > 1 and Lightning's sampler injection not disabled."""
    return trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler


def shard_level(data: Iterable, level: str, trainer: Trainer) -> Iterable:
    """This rank's share of one level's data (``as_reiterable``'s output), by the rules of the module docstring."""
    rank, world = trainer.global_rank, trainer.world_size
    if isinstance(data, DataLoader):
        # Lightning's own injection: DistributedSampler (or its wrapper for custom samplers), with
        # the strategy's num_replicas and rank; a DistributedSampler of the user's, or an
        # IterableDataset, is kept as it is.
        return trainer._data_connector._prepare_dataloader(  # type: ignore[return-value]
            data, shuffle=_is_dataloader_shuffled(data), mode=RunningStage.TRAINING)
    if isinstance(data, FullBatch):
        return FullBatch(split_batch(data.batch, rank, world, f"{level}_data (the full batch)"))
    if isinstance(data, Reiterable) and isinstance(data.batches, (list, tuple)):
        # Checked whole before any step: a list of batches is already in memory, and slices are views.
        return Reiterable([split_batch(b, rank, world, f"{level}_data batch {i}") for i, b in enumerate(data.batches)])
    return ShardedBatches(data, rank, world, level)


def split_batch(batch: Any, rank: int, world: int, where: str) -> Any:
    """Rank ``rank``'s contiguous rows of every tensor of ``batch`` along dim 0 (equal shards, else refused)."""
    shapes: list[tuple[int, ...]] = []
    apply_to_collection(batch, Tensor, lambda t: shapes.append(tuple(t.shape)))
    sizes = {shape[0] if shape else None for shape in shapes}
    if not shapes or None in sizes or len(sizes) != 1 or next(iter(sizes)) % world:  # type: ignore[operator]
        found = ", ".join(str(s) for s in shapes) or "no tensor"
        raise ValueError(
            f"{where} cannot be split over {world} ranks: every tensor of a batch is split along dim 0 (rank r takes "
            f"its contiguous 1/{world} of the rows), so all tensors need one leading size divisible by {world}; "
            f"found shapes {found}. Pass batches of a size divisible by {world} (a DataLoader is sharded by "
            "Lightning's DistributedSampler instead), keep constants on the problem rather than in the batch, or "
            "shard the data yourself with Trainer(use_distributed_sampler=False)"
        )
    size = next(iter(sizes)) // world  # type: ignore[operator]
    return apply_to_collection(batch, Tensor, lambda t: t[rank * size:(rank + 1) * size])


class ShardedBatches:
    """A re-iterable of batches, each split along dim 0 as it is served (``split_batch``), checked per batch."""

    def __init__(self, data: Iterable, rank: int, world: int, level: str) -> None:
        self.data, self.rank, self.world, self.level = data, rank, world, level

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            yield split_batch(batch, self.rank, self.world, f"{self.level}_data batch {i}")

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]
