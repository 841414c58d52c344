"""``TaskBatchEngine``: one outer step over a batch of T tasks that share x, each with its own y (meta-learning).

ALGORITHMS.md section 9 (Finn, Abbeel, Levine 2017; Rajeswaran et al. 2019; Raghu et al. 2020):
per outer step, T tasks each adapt their own lower variables y_i on their support data (g) and
are scored on their query data (f); the hypergradient is the mean over tasks of dF_i/dx, and the
outer update of the one shared x happens once. Like ``VmappedEngine`` it wraps an engine behind
the same protocol, so the Lightning loop steps a task batch as it steps anything else; unlike it
x is shared (``in_dims=None``) and only y, the batches and the engine's per-task entries carry
the task dimension.

Batches: the lower batch is the tasks' support sets and the upper batch their query sets, every
tensor with a leading task dimension T (task i is index i of both).

State: the shared entries (``x``, ``step``, the outer transform's state) and, per task, the
rest of the wrapped engine's state with a leading dimension T (``y``, CG's ``v``, lower dynamics'
entries). Two regimes, set by the problem:

- restarted lower level (``Functions.lower_start``, MAML, iMAML, ANIL): every outer step each task
  starts from the wrapped engine's ``init`` at x, i.e. y0 = lower_start(x), v = 0, fresh dynamics,
  so nothing carries over between steps but x, and T may change from step to step. Between steps
  the state holds the shared entries and ``y`` = lower_start(x) (no task dimension: where every
  task starts, what the loop writes into the problem's lower variables); within a step ``inner``
  adds the per-task entries [T, ...] and ``outer`` drops them.
- warm-started lower level (no ``lower_start``): each task keeps its entries [T, ...] from step to
  step, which is meaningful only when index i is the same task at every step (a fixed set of
  tasks served whole, e.g. per-task heads on a shared representation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from hypergrad.compile import CompiledEngine
from hypergrad.engine import Batches, Engine, Functions, Metrics, State, restart_lower
from hypergrad.tree import Tree

RANDOMNESS = ("error", "different", "same")


class TaskBatchEngine(Engine):
    """``engine`` run on T tasks at once, x shared: ``inner`` and ``estimate`` are one ``torch.func.vmap`` over tasks.

    ``init(fns, x, y, lower_batch)`` takes a single problem's x and y and the first support batch
    (leading dimension T); ``estimate`` returns the mean over tasks of the per-task hypergradients
    (shapes of x) and of the per-task metrics (0-d); ``outer`` is the wrapped engine's, once, on
    the shared entries. Hyperparameters and capability flags read through to the wrapped engine.

    Args:
        engine: the engine each task runs (e.g. ``hypergrad.Unrolled`` for MAML, ``hypergrad.CG`` for
            iMAML). Its ``inner`` and ``estimate`` must leave x, step and the outer state alone and its
            ``outer`` must need nothing per task (LV-HBA's joint projection of (x, y) does: refused).
        randomness: ``torch.func.vmap``'s randomness mode for random operations in the objectives
            (dropout): "error", "different" (independent per task) or "same".
    """

    def __init__(self, engine: Engine, randomness: str = "error") -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a hypergrad.Engine (e.g. hypergrad.Unrolled()), got "
                            f"{type(engine).__name__}")
        if isinstance(engine, TaskBatchEngine):
            raise TypeError("TaskBatchEngine: the engine is already a task-batch engine")
        if randomness not in RANDOMNESS:
            raise ValueError(f"TaskBatchEngine: randomness must be one of {RANDOMNESS}, got {randomness!r}")
        base = engine.engine if isinstance(engine, CompiledEngine) else engine
        if type(base).outer is not Engine.outer:
            raise ValueError(
                f"TaskBatchEngine: {type(base).__name__} overrides the outer step with one that reads the lower "
                "variables, which differ per task while x is shared; it cannot run on a batch of tasks. Use an "
                "engine whose outer step moves x alone (Unrolled, CG, Neumann, Exact)"
            )
        self.engine = engine
        self.randomness = randomness
        self.shared = ("x", "step", base.outer_state_key)  # the engine's own key (a compiled wrapper has the default)
        # Instance attributes, as the compiled and vmapped wrappers copy them (the class's stay False).
        for flag in ("supports_constraints", "supports_lower_set", "supports_lower_step", "supports_lower_start"):
            setattr(self, flag, getattr(engine, flag))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the wrapped engine's hyperparameters.
        if name in ("engine", "randomness", "shared"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __repr__(self) -> str:
        return f"TaskBatchEngine({self.engine!r})"

    # -- the protocol ----------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> State:
        """The shared entries from x, y; with a warm-started lower level also every task's entries [T, ...].

        ``lower_batch`` (the support sets, leading dimension T) is required without ``lower_start``:
        it sizes the per-task entries.
        """
        state = self.engine.init(fns, x, y, lower_batch=_task(lower_batch, 0) if lower_batch is not None else None)
        shared = self._shared(state)
        if fns.lower_start is not None:
            return {**shared, "y": state["y"]}
        if lower_batch is None:
            raise ValueError(
                f"TaskBatchEngine: {fns.name} has no lower_start, so each task keeps its own lower variables from "
                "step to step; pass the first support batch (init(fns, x, y, lower_batch)) to size them"
            )
        task_count(lower_batch, "support")

        def per_task(batch: Any) -> State:
            return self._per_task(self.engine.init(fns, x, y, lower_batch=batch))

        # Entries equal for every task come back from vmap expanded (stride 0): each task gets its own copy.
        entries = tree_map(lambda t: t.contiguous(), self._vmap("init", per_task, (lower_batch,), (0,)))
        return {**shared, **entries}

    def inner(self, fns: Functions, state: State, lower_batch: Any) -> State:
        """Each task's ``inner`` on its support set (from the wrapped engine's ``init`` at x when restarted)."""
        task_count(lower_batch, "support")
        shared = self._shared(state)
        restart = fns.lower_start is not None
        y_like = restart_lower(fns, shared["x"]) if restart else state["y"]  # what the wrapped init checks y0 against

        def task(entries: State, batch: Any) -> State:
            if restart:
                entries = self._per_task(self.engine.init(fns, shared["x"], y_like, lower_batch=batch))
            full = {**entries, **shared}
            return self._per_task(self._unchanged("inner", full, self.engine.inner(fns, full, batch)))

        entries = {} if restart else self._per_task(state)
        return {**shared, **self._vmap("inner", task, (entries, lower_batch), (0, 0))}

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        """Each task's ``estimate`` on (support, query); the hypergradient and metrics are means over the tasks."""
        count = task_count(batches[0], "support")
        if task_count(batches[1], "query") != count:
            raise ValueError(f"TaskBatchEngine: the support batch has {count} tasks and the query batch "
                             f"{task_count(batches[1], 'query')}; task i is index i of both, so they must be equal")
        shared = self._shared(state)

        def task(entries: State, batches: Batches) -> tuple[State, Tree, Metrics]:
            full = {**entries, **shared}
            new, hypergrad, metrics = self.engine.estimate(fns, full, batches)
            return self._per_task(self._unchanged("estimate", full, new)), hypergrad, metrics

        entries, hypergrads, metrics = self._vmap("estimate", task, (self._per_task(state), batches), (0, 0))
        hypergrad = {k: v.mean(0) for k, v in hypergrads.items()}
        return {**shared, **entries}, hypergrad, {k: _mean(v) for k, v in metrics.items()}

    def outer(self, fns: Functions, state: State, hypergrad: Tree) -> State:
        """The wrapped engine's ``outer`` on the shared entries; a restarted level's y becomes lower_start(x)."""
        if fns.lower_start is None:
            return self.engine.outer(fns, state, hypergrad)
        shared = self.engine.outer(fns, self._shared(state), hypergrad)
        return {**shared, "y": restart_lower(fns, shared["x"])}

    def lower_solution(self, state: State) -> Tree:
        """Restarted: lower_start(x), where every task starts; warm-started: the tasks' lower solutions [T, ...]."""
        return self.engine.lower_solution(state)

    def check_functions(self, fns: Functions) -> None:
        self.engine.check_functions(fns)

    # -- internals -------------------------------------------------------------------------------

    def _shared(self, state: State) -> State:
        return {k: state[k] for k in self.shared if k in state}

    def _per_task(self, state: State) -> State:
        return {k: v for k, v in state.items() if k not in self.shared}

    def _unchanged(self, phase: str, before: State, after: State) -> State:
        """``after``, refused when the wrapped phase replaced a shared entry (it would be lost: x is not per task)."""
        for key in self.shared:
            if key in before and not _same_leaves(before[key], after.get(key)):
                raise ValueError(
                    f"TaskBatchEngine: {type(self.engine).__name__}.{phase} changed the shared state entry {key!r}, "
                    "which a batch of tasks cannot hold per task; only engines whose inner and estimate phases "
                    "leave x, step and the outer state alone run on task batches"
                )
        return after

    def _vmap(self, phase: str, fn: Callable[..., Any], args: tuple, dims: tuple) -> Any:
        try:
            return vmap(fn, in_dims=dims, randomness=self.randomness)(*args)
        except (RuntimeError, ValueError, TypeError) as err:
            if "vmap" not in str(err).lower():
                raise
            raise RuntimeError(
                f"TaskBatchEngine: {type(self.engine).__name__}.{phase} cannot run under torch.func.vmap over the "
                f"tasks: {err}\nEvery phase must be pure (no .item(), no Python branching on tensor values) and "
                "return tensors only, metrics included"
            ) from err


def task_count(batch: Any, what: str) -> int:
    """T, the leading dimension every tensor of a task batch shares; refused, naming the shapes, otherwise."""
    leaves, _ = tree_flatten(batch)
    sizes = {leaf.shape[0] if isinstance(leaf, Tensor) and leaf.dim() > 0 else -1 for leaf in leaves}
    if not leaves or -1 in sizes or len(sizes) != 1:
        shapes = ", ".join(str(tuple(leaf.shape)) if isinstance(leaf, Tensor) else type(leaf).__name__
                           for leaf in leaves)
        raise ValueError(f"a {what} batch of tasks must hold tensors with one leading task dimension T, got shapes "
                         f"{shapes or 'none'}")
    return sizes.pop()


def _task(batch: Any, index: int) -> Any:
    """Task ``index`` of a batch of tasks (every tensor indexed along its leading dimension)."""
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, batch)


def _same_leaves(a: Any, b: Any) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(u is v for u, v in zip(leaves_a, leaves_b, strict=True))


def _mean(value: Tensor) -> Tensor:
    """The mean over the task dimension; integer and boolean metrics (counts, flags) as a float64 fraction."""
    return (value if value.is_floating_point() else value.to(torch.float64)).mean(0)
