"""``Tasks``: one ``BilevelProblem`` run on batches of tasks that share its upper variables (meta-learning).

Each outer step takes a batch of T tasks, the support sets feeding g and the query sets feeding f
(every tensor with a leading task dimension T, delivered together by one stream:
``bilevel.fit(problem, engine, tasks=loader)``, ``bilevel.data.TaskStream``). Every task adapts its
own copy of the lower variables, all share x, and the hypergradient is the mean over the tasks
(``hypergrad.TaskBatchEngine``: one ``torch.func.vmap`` over the tasks). The problem is written
for ONE task: its objectives see one task's support or query set, and a restarted lower level is
declared as a method ``lower_start(self, x) -> y0`` (y0 = x for MAML; ``problems.fewshot``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from bilevel.functional import VariableWriter, level_buffers
from bilevel.one_problem import OneProblem
from bilevel.problem import BilevelProblem
from hypergrad import Engine, Functions, State
from hypergrad.tasks import RANDOMNESS, TaskBatchEngine, task_count
from hypergrad.tree import Tree


@dataclass(frozen=True)
class TaskData:
    """A problem's default data when it is a stream of task batches (``task_data()``), not two levels' data."""

    tasks: Any


class Tasks(OneProblem, nn.Module):
    """A ``BilevelProblem`` over batches of tasks: per task its own y, one shared x, the mean hypergradient.

    Args:
        problem: the problem of one task (``lower_objective`` on a support set, ``upper_objective``
            on a query set); optionally ``lower_start(self, x) -> y0``, the lower variables every
            task starts from at every outer step (a dict keyed and shaped as the lower parameters,
            a pure function of the dict x keyed as the upper ones).
        randomness: ``torch.func.vmap``'s randomness over the tasks ("error", "different", "same").

    ``bilevel.fit(problem, engine, tasks=loader)`` wraps the problem in ``Tasks`` itself. What is
    written back after each step: x into ``problem.upper``, and, with ``lower_start``, y0 =
    lower_start(x) into ``problem.lower`` (where every task starts; MAML: the meta-learned
    initialization). The tasks' adapted lower variables belong to the step's task batch and are
    not kept. Without ``lower_start`` each task keeps its lower variables from step to step in the
    engine state ([T, ...]; task i must then be the same task at every step) and ``problem.lower``
    is left as it was. Outside ``fit``::

        tasks = bilevel.Tasks(problem)
        state = tasks.init(engine, support)                      # support: tensors [T, ...]
        state, metrics = tasks.step(engine, state, (support, query))
        tasks.write_back(engine, state)
    """

    is_population = False

    def __init__(self, problem: BilevelProblem, randomness: str = "error") -> None:
        super().__init__()
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"Tasks takes one bilevel.BilevelProblem (the problem of one task), got "
                            f"{type(problem).__name__}")
        if randomness not in RANDOMNESS:
            raise ValueError(f"Tasks: randomness must be one of {RANDOMNESS}, got {randomness!r}")
        self.problem = problem
        self.randomness = randomness
        self.restarts = callable(getattr(problem, "lower_start", None))
        self._writer = VariableWriter(problem)
        self._has_statistics = bool(level_buffers(problem))

    @property
    def title(self) -> str:
        """``Tasks of MAML`` (for messages and tables)."""
        return f"Tasks of {type(self.problem).__name__}"


    def data(self) -> TaskData:
        """The problem's ``task_data()``: one stream of (support, query) task batches (what the CLI trains on)."""
        hook = getattr(self.problem, "task_data", None)
        if not callable(hook):
            raise ValueError(
                f"{self.title}: a batch of tasks takes its data from one stream of (support, query) task batches: "
                "pass it as bilevel.fit(problem, engine, tasks=loader, ...), or define task_data() returning it"
            )
        return TaskData(hook())

    # -- the engine protocol on task batches (hypergrad.TaskBatchEngine) ---------------------------

    def engine_for(self, engine: Engine) -> TaskBatchEngine:
        """``engine`` run on every task of a batch at once (one ``torch.func.vmap``), x shared."""
        return TaskBatchEngine(engine, randomness=self.randomness)

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]:
        """The problem's functions and its x, y (no task dimension); with ``batches`` checked on task 0 of each."""
        if batches is None:
            return self.problem.to_functions()
        count = task_count(batches[0], "support")
        if task_count(batches[1], "query") != count:
            raise ValueError(f"{self.title}: the support batch has {count} tasks and the query batch "
                             f"{task_count(batches[1], 'query')}; they must come from the same tasks")
        first = tuple(tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, batch) for batch in batches)
        return self.problem.to_functions((first[0], first[1]))

    def init(self, engine: Engine, lower_batch: Any = None) -> State:
        """The task engine's initial state from the problem's parameters (``lower_batch``: support sets [T, ...])."""
        fns, x, y = self.to_functions()
        return self.engine_for(engine).init(fns, x, y, lower_batch=lower_batch)

    def step(self, engine: Engine, state: State, batches: tuple[Any, Any]) -> tuple[State, dict[str, Tensor]]:
        """One outer step on a task batch (support, query): (state, metrics averaged over the tasks)."""
        fns, _, _ = self.to_functions()
        return self.engine_for(engine).step(fns, state, batches)

    @torch.no_grad()
    def write_back(self, engine: Engine, state: State) -> None:
        """Write the state's x (and, restarted, lower_start(x)) into the problem (``assign``)."""
        self.assign(state["x"], self.engine_for(engine).lower_solution(state))

    def assign(self, x: Tree, y: Tree) -> None:
        """x into ``problem.upper``; y = lower_start(x) into ``problem.lower`` when the level restarts.

        Without ``lower_start`` y holds one entry per task of the last batch ([T, ...]), which no
        single set of lower parameters can hold: ``problem.lower`` is left alone.
        """
        with torch.no_grad():
            for k, p in self._writer.upper:
                p.copy_(x[k])
            if self.restarts:
                for k, p in self._writer.lower:
                    p.copy_(y[k])

    # -- the rest of the loop's interface (bilevel.trainable) -----------------------------------

    @torch.no_grad()
    def refresh_statistics(self, lower_batch: Any) -> None:
        """One forward of g per task at the written-back parameters, when the levels hold running statistics."""
        if self._has_statistics and self.training:
            for i in range(task_count(lower_batch, "support")):
                self.problem.lower_objective(tree_map(lambda t, i=i: t[i], lower_batch))

    # named_metrics (already means over the step's tasks), finish, validation: OneProblem's.

    def parameter_views(self, x: Tree, y: Tree) -> dict[str, Tensor]:
        """The level parameters' entries as views of x and, restarted, of y = lower_start(x) (MAML: x's tensors)."""
        views = {f"problem.upper.{k}": v for k, v in x.items()}
        if self.restarts:
            views.update({f"problem.lower.{k}": v for k, v in y.items()})
        return views
