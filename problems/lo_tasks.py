"""A task family for meta-training learned optimizers: sampled task runs and their data, engine-agnostic.

A *run* trains one network per architecture slot with the learned optimizer (LO) from a fresh init
until its horizon, then restarts on a newly sampled task. ``TaskRuns(family, runs)`` describes R
such runs as a deterministic function of the truncation index i (K = ``family.truncation`` lower
steps per outer step), so an engine (truncated backprop, PES) can ask for any i in any order and a
resumed meta-training run sees exactly the tasks and minibatches it would have seen.

Datasets (each: inputs [N, 64] float32 standardized per feature, labels int64 [N], 10 classes):

- "digits": scikit-learn's 8x8 digits (fixed; the seed is ignored; loaded once and cached).
- "images": generated 8x8 images around seeded class templates (``problems.mulo.load_task_data``).
- "teacher": x ~ N(0, I_64), labels the argmax of a random ReLU teacher 64 -> 32 -> 10 drawn from
  the seed, its logits standardized per class over the sample so the classes are roughly balanced.
- "mnist1d": Greydanus's MNIST-1D generator (package ``mnist1d``, imported lazily) with its default
  arguments except ``final_seq_length=64``: its last step resamples the padded, sheared 72-point
  signal by linear interpolation, and asking it for 64 points instead of 40 keeps every input
  feature informative and the signal's 1-D order (zero-padding would add 24 dead features, a random
  projection would hide the order). Train and test splits are pooled (5000 samples).

Schedule, per run r (each draw from a generator keyed by (family seed, r, restart count n)):

- horizon H_n log-uniform in [lo, hi], rounded up to a multiple of K (and down to the largest
  multiple of K <= hi if rounding passed it); restarts happen only between truncations.
- per slot, a dataset uniformly from ``family.datasets``: slots draw independently, but share the
  task's data seed, so two slots that draw the same dataset train on the same task (the same
  teacher, the same image templates: one task at two architectures).
- staggering: the first task starts part-way, at t_0 uniform among {0, K, ..., H_0 - K}, with a
  fresh init (learned_optimization's random initial iteration offset), so runs do not restart in
  lockstep. Later tasks start at t = 0.
- MNIST-1D's seed only redraws samples from fixed templates (it does not change the task, unlike
  the images' templates or the teacher), and its generator takes seconds per 5000 samples, so
  training tasks use one of ``MNIST1D_SEEDS`` seeds, each generated once; evaluation tasks use others.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.learned import MuMLP, Parametrization, mlp
from problems.mulo import CLASSES, INPUTS, load_task_data

MNIST1D_SEEDS = 8
TEACHER_SAMPLES, TEACHER_HIDDEN = 4096, 32
# Domain tags keep the generators of different uses independent even when the other key parts coincide.
_SCHEDULE, _INIT, _DATA, _BATCH, _EVAL = range(5)
_LEVELS = ("lower", "upper")


def _key_seed(*key: int) -> int:
    """A 64-bit seed that is a hash of the integer tuple ``key`` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([k % 2**64 for k in key]).generate_state(1, np.uint64)[0])


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(_key_seed(*key))


def _standardize(inputs: Tensor) -> Tensor:
    return (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-6)


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    return load_task_data("digits")


def teacher(seed: int) -> tuple[Tensor, Tensor]:
    """Teacher-student data: (inputs [4096, 64] ~ N(0, I) standardized, labels [4096] of a random ReLU teacher)."""
    gen = _generator(_DATA, seed)
    inputs = _standardize(torch.randn(TEACHER_SAMPLES, INPUTS, generator=gen))
    w1 = torch.randn(INPUTS, TEACHER_HIDDEN, generator=gen) * INPUTS ** -0.5
    w2 = torch.randn(TEACHER_HIDDEN, CLASSES, generator=gen) * TEACHER_HIDDEN ** -0.5
    logits = F.relu(inputs @ w1) @ w2
    # Raw ReLU features have a positive mean, which would favour a few classes; centring balances them.
    logits = (logits - logits.mean(0)) / logits.std(0)
    return inputs, logits.argmax(1)


@lru_cache(maxsize=2 * MNIST1D_SEEDS)
def mnist1d(seed: int) -> tuple[Tensor, Tensor]:
    """MNIST-1D from its generator at ``seed`` (inputs [5000, 64], labels [5000]); never downloads.

    The generator reseeds numpy's and Python's global generators; their states are restored after.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("dataset 'mnist1d' needs the mnist1d package, which is not installed: "
                          "pip install mnist1d==0.0.2.post1") from error
    args = get_dataset_args()
    args.seed, args.final_seq_length = seed % 2**32, INPUTS
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    inputs = torch.as_tensor(np.concatenate([data["x"], data["x_test"]]), dtype=torch.float32)
    labels = torch.as_tensor(np.concatenate([data["y"], data["y_test"]]), dtype=torch.int64)
    return _standardize(inputs), labels


DATASETS: dict[str, Callable[[int], tuple[Tensor, Tensor]]] = {
    "digits": lambda seed: _digits(),
    "images": lambda seed: load_task_data("images", seed),
    "teacher": teacher,
    "mnist1d": mnist1d,
}


def load(name: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(inputs [N, 64] float32, labels int64 [N]) of dataset ``name`` at ``seed``.

    "digits" and "mnist1d" come from a cache: treat the tensors as read-only.
    """
    if name not in DATASETS:
        raise ValueError(f"load: unknown dataset {name!r}; choose one of {sorted(DATASETS)} "
                         "(problems.lo_tasks.DATASETS)")
    return DATASETS[name](seed)


def slot_name(depth: int, width: int) -> str:
    return f"d{depth}w{width}"


@dataclass(frozen=True)
class TaskFamily:
    """What ``TaskRuns`` samples from (see the module docstring). Lists are accepted and stored as tuples."""

    datasets: tuple[str, ...]
    architectures: tuple[tuple[int, int], ...]
    base_width: int = 32
    parametrization: str = "mup"
    horizons: tuple[int, int] = (50, 500)
    truncation: int = 10
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "architectures", tuple(tuple(a) for a in self.architectures))
        object.__setattr__(self, "horizons", tuple(self.horizons))
        unknown = sorted(set(self.datasets) - set(DATASETS))
        if not self.datasets or unknown:
            raise ValueError(f"TaskFamily: datasets must be a non-empty tuple of {sorted(DATASETS)}, "
                             f"got {self.datasets!r}")
        for name in ("base_width", "truncation", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TaskFamily: {name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TaskFamily: seed must be a non-negative int, got {self.seed!r}")
        if not self.architectures or any(len(a) != 2 or not all(isinstance(v, int) and v >= 1 for v in a)
                                         for a in self.architectures):
            raise ValueError(f"TaskFamily: architectures must be (depth, width) pairs of positive ints, "
                             f"got {self.architectures!r}")
        if len(set(self.architectures)) != len(self.architectures):
            raise ValueError(f"TaskFamily: architectures has duplicates {self.architectures!r}; list each slot once")
        if self.parametrization not in ("mup", "sp"):
            raise ValueError(f"TaskFamily: parametrization must be 'mup' or 'sp', got {self.parametrization!r}")
        lo, hi = self.horizons if len(self.horizons) == 2 else (0, -1)
        k = self.truncation
        if not 1 <= lo <= hi or k * math.ceil(lo / k) > hi:
            raise ValueError(f"TaskFamily: horizons must be (lo, hi) with 1 <= lo <= hi and a multiple of "
                             f"truncation={k} in [lo, hi], got {self.horizons!r}")

    @property
    def slots(self) -> list[str]:
        return [slot_name(depth, width) for depth, width in self.architectures]


@dataclass(frozen=True)
class Task:
    """One task of a run: its horizon, the step t_0 it starts at (0 but for a run's first task), the
    dataset of each slot, and the seed of seed-dependent data (teacher, images, mnist1d)."""

    horizon: int
    t0: int
    datasets: tuple[str, ...]
    data_seed: int


class TaskRuns:
    """R staggered runs of the task family, addressed by truncation index (see ``truncation``).

    Keeps small caches (the schedule, and the data and inits of recently used tasks); every value
    returned is a function of (family, runs, i) only.
    """

    def __init__(self, family: TaskFamily, runs: int) -> None:
        if not isinstance(runs, int) or runs < 1:
            raise ValueError(f"TaskRuns: runs must be a positive int, got {runs!r}")
        if "mnist1d" in family.datasets:
            try:
                import mnist1d  # noqa: F401
            except ImportError as error:
                raise ImportError("TaskFamily.datasets includes 'mnist1d', which needs the mnist1d package: "
                                  "pip install mnist1d==0.0.2.post1") from error
        self.family, self.runs = family, runs
        self.slots = family.slots
        self._starts: list[list[int]] = [[0] for _ in range(runs)]  # truncation index where task n of run r starts
        self._capacity = 2 * runs * len(self.slots)
        self._data: OrderedDict[tuple[str, int], tuple[Tensor, Tensor]] = OrderedDict()
        self._inits: OrderedDict[tuple[int, int, int], MuMLP] = OrderedDict()

    # -- the schedule ------------------------------------------------------------------------------

    def task(self, r: int, n: int) -> Task:
        """Run r's n-th task: horizon, starting step, dataset per slot and data seed (cheap, not cached)."""
        fam, k = self.family, self.family.truncation
        rng = np.random.default_rng([_SCHEDULE, fam.seed, r, n])
        lo, hi = fam.horizons
        horizon = min(k * math.ceil(math.exp(rng.uniform(math.log(lo), math.log(hi))) / k), k * (hi // k))
        t0 = k * int(rng.integers(horizon // k)) if n == 0 else 0
        datasets = tuple(fam.datasets[int(j)] for j in rng.integers(len(fam.datasets), size=len(self.slots)))
        return Task(horizon, t0, datasets, _key_seed(_DATA, fam.seed, r, n) % 2**31)

    def _current(self, r: int, i: int) -> int:
        """The restart count n of run r's task at truncation i."""
        starts, k = self._starts[r], self.family.truncation
        while starts[-1] <= i:
            n = len(starts) - 1
            task = self.task(r, n)
            starts.append(starts[-1] + (task.horizon - task.t0) // k)
        return bisect.bisect_right(starts, i) - 1

    def schedule(self, i: int) -> dict[str, Any]:
        """The schedule at truncation i, without data: "restart" bool [R], "t", "horizon", "task" int64 [R]
        (restart count), "datasets" (R lists of dataset names per slot). Cheap."""
        return self._schedule(i)[0]

    def _schedule(self, i: int) -> tuple[dict[str, Any], list[Task]]:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"TaskRuns: truncation index must be a non-negative int, got {i!r}")
        ns = [self._current(r, i) for r in range(self.runs)]
        tasks = [self.task(r, n) for r, n in enumerate(ns)]
        starts = [self._starts[r][n] for r, n in enumerate(ns)]
        k = self.family.truncation
        return {
            "restart": torch.tensor([s == i for s in starts]),
            "t": torch.tensor([t.t0 + k * (i - s) for t, s in zip(tasks, starts, strict=True)], dtype=torch.int64),
            "horizon": torch.tensor([task.horizon for task in tasks], dtype=torch.int64),
            "task": torch.tensor(ns, dtype=torch.int64),
            "datasets": [list(task.datasets) for task in tasks],
        }, tasks

    # -- data and networks ---------------------------------------------------------------------------

    def _task_data(self, dataset: str, data_seed: int) -> tuple[Tensor, Tensor]:
        seed = data_seed % MNIST1D_SEEDS if dataset == "mnist1d" else 0 if dataset == "digits" else data_seed
        key = (dataset, seed)
        if key not in self._data:
            self._data[key] = load(dataset, seed)
            if len(self._data) > self._capacity:
                self._data.popitem(last=False)
        self._data.move_to_end(key)
        return self._data[key]

    def _network(self, r: int, n: int, s: int) -> MuMLP:
        key = (r, n, s)
        if key not in self._inits:
            depth, width = self.family.architectures[s]
            gen = _generator(_INIT, self.family.seed, r, n, s)
            self._inits[key] = _build(self.family.base_width, self.family.parametrization, depth, width, gen)
            if len(self._inits) > self._capacity:
                self._inits.popitem(last=False)
        self._inits.move_to_end(key)
        return self._inits[key]

    def networks(self, i: int, r: int) -> dict[str, MuMLP]:
        """{slot: a fresh MuMLP holding run r's init of its current task at truncation i} (for tests, evaluation)."""
        if not 0 <= r < self.runs:
            raise ValueError(f"TaskRuns.networks: run must be in [0, {self.runs}), got {r!r}")
        n = int(self._schedule(i)[0]["task"][r])
        nets = {}
        for s, slot in enumerate(self.slots):
            depth, width = self.family.architectures[s]
            net = _build(self.family.base_width, self.family.parametrization, depth, width, None)
            net.load_state_dict(self._network(r, n, s).state_dict())
            nets[slot] = net
        return nets

    def _batches(self, i: int, level: int, tasks: list[Task]) -> list[dict[str, tuple[Tensor, Tensor]]]:
        k, b = self.family.truncation, self.family.batch_size
        xs = {slot: torch.empty(k, self.runs, b, INPUTS) for slot in self.slots}
        ys = {slot: torch.empty(k, self.runs, b, dtype=torch.int64) for slot in self.slots}
        for r, task in enumerate(tasks):
            gen = _generator(_BATCH, self.family.seed, i, r, level)
            for slot, dataset in zip(self.slots, task.datasets, strict=True):
                inputs, labels = self._task_data(dataset, task.data_seed)
                index = torch.randint(0, labels.shape[0], (k, b), generator=gen)
                # index_select into preallocated contiguous [K, R, ...] slices: advanced indexing plus
                # stacking was ~50x slower on a busy 2-core machine with two torch threads.
                for j in range(k):
                    torch.index_select(inputs, 0, index[j], out=xs[slot][j, r])
                    torch.index_select(labels, 0, index[j], out=ys[slot][j, r])
        return [{slot: (xs[slot][j], ys[slot][j]) for slot in self.slots} for j in range(k)]

    def truncation(self, i: int, levels: tuple[str, ...] = _LEVELS) -> dict[str, Any]:
        """Everything an engine needs for outer step i (R = runs, K = truncation, B = batch size):

        - "restart": bool [R], True where run r starts a new task now (all True at i = 0).
        - "t": int64 [R], LO steps taken in the current task (0 at a restart; t_0 at i = 0, staggered).
        - "horizon": int64 [R]; "task": int64 [R], the restart count.
        - "init": {f"{slot}.{param}": [R, *shape]}, the current tasks' initial weights (params as in
          ``MuMLP.named_parameters()``, slot ``f"d{depth}w{width}"``).
        - "lower", "upper": lists of K minibatches {slot: (inputs [R, B, 64], labels int64 [R, B])},
          fresh at every step, independent between the levels; only the levels named in ``levels``.
        - "datasets": R lists of dataset names, one per slot.
        """
        unknown = sorted(set(levels) - set(_LEVELS))
        if unknown:
            raise ValueError(f"TaskRuns.truncation: levels must be among {_LEVELS}, got {levels!r}")
        out, tasks = self._schedule(i)
        init: dict[str, list[Tensor]] = {}
        for r, n in enumerate(out["task"].tolist()):
            for s, slot in enumerate(self.slots):
                for name, p in self._network(r, n, s).named_parameters():
                    init.setdefault(f"{slot}.{name}", []).append(p.detach())
        out["init"] = {name: torch.stack(ps) for name, ps in init.items()}
        for level in levels:
            out[level] = self._batches(i, _LEVELS.index(level), tasks)
        return out


def _build(base_width: int, parametrization: str, depth: int, width: int,
           generator: torch.Generator | None) -> MuMLP:
    # nn.Linear's own init draws from the global generator before MuMLP overwrites it; fork so that
    # sampling tasks does not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        net = mlp(INPUTS, CLASSES, base_width, width / base_width, depth, cast(Parametrization, parametrization),
                  generator)
    if net.width != width:
        raise ValueError(f"width {width} is not realizable from base_width {base_width}; pick integers")
    return net


def evaluation_task(dataset: str, depth: int, width: int, seed: int, base_width: int = 32,
                    parametrization: str = "mup") -> tuple[MuMLP, tuple[Tensor, Tensor]]:
    """A held-out task: (a fresh MuMLP, (inputs [N, 64], labels [N])) with data seeds no training task uses
    (for "digits" the data is the same fixed set)."""
    if dataset not in DATASETS:
        raise ValueError(f"evaluation_task: unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"evaluation_task: seed must be a non-negative int, got {seed!r}")
    if parametrization not in ("mup", "sp"):
        raise ValueError(f"evaluation_task: parametrization must be 'mup' or 'sp', got {parametrization!r}")
    data_seed = MNIST1D_SEEDS + seed if dataset == "mnist1d" else _key_seed(_EVAL, seed) % 2**31
    net = _build(base_width, parametrization, depth, width, _generator(_EVAL, seed, depth, width))
    return net, load(dataset, data_seed)
