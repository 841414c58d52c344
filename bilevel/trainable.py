"""What the Lightning loop trains: one problem or a population, behind one interface.

``BilevelModule`` holds a ``Trainable`` and calls the same methods for a single ``BilevelProblem``
(``SingleProblem`` below) and a ``bilevel.Population`` (which implements them itself), so its
step has no branch on the kind of problem: a population differs only in the engine it hands back
(``engine_for``: the engine vmapped over the members) and in how it names its metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bilevel.functional import VariableWriter, level_buffers
from bilevel.one_problem import OneProblem
from bilevel.population import Population
from bilevel.problem import BilevelProblem
from bilevel.tasks import TaskData, Tasks
from hypergrad import Engine, Functions
from hypergrad.tree import Tree


class Trainable(Protocol):
    """The loop's view of a problem or a population."""

    @property
    def title(self) -> str:
        """The problem's class name, or ``Population of <class>`` (for messages)."""
        ...

    @property
    def is_population(self) -> bool:
        """Whether members are vmapped (precision and process checks refuse what populations cannot run)."""
        ...

    def data(self) -> tuple[Any, Any] | TaskData | None:
        """Default (lower_data, upper_data), a stream of task batches (``TaskData``), or None."""
        ...

    @property
    def init_arguments(self) -> dict[str, Any]:
        """The arguments the problem was built with (``BilevelProblem.init_arguments``), for the run's record."""
        ...

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]:
        """(Functions, x, y), checked on ``batches`` when given; a population's x, y are stacked [P, ...]."""
        ...

    def engine_for(self, engine: Engine) -> Engine:
        """The engine that steps this: ``engine`` itself, or ``engine`` vmapped over the members."""
        ...

    def assign(self, x: Tree, y: Tree) -> None:
        """Write the engine's x and y into the parameters (in place)."""
        ...

    def refresh_statistics(self, lower_batch: Any) -> None:
        """One forward of g at the new parameters, when the levels hold running statistics (BatchNorm)."""
        ...

    def named_metrics(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step's metrics as logged: as they are, or a population's mean and one entry per member."""
        ...

    def finish(self) -> dict[str, float]:
        """``evaluate()`` after training: the final metrics, printed as a table on rank zero."""
        ...

    @property
    def can_validate_batches(self) -> bool:
        """Whether the problem defines ``validation_step(batch)``."""
        ...

    def validation_data(self) -> Any:
        """The problem's ``validation_data()``, or None."""
        ...

    def validate(self, batch: Any) -> dict[str, Any]:
        """The problem's ``validation_step(batch)``, or ``evaluate()`` for the batch None (a population: the means
        and each member's, as ``named_metrics``)."""
        ...

    def step_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters for the optimizer that only counts steps (Lightning's ``max_steps``)."""
        ...

    def parameter_views(self, x: Tree, y: Tree) -> dict[str, Tensor]:
        """The level parameters' ``state_dict`` entries (names relative to the problem) as x's and y's tensors."""
        ...


class SingleProblem(OneProblem):
    """A ``BilevelProblem`` as a ``Trainable``: its parameters and level buffers looked up once."""

    is_population = False

    def __init__(self, problem: BilevelProblem) -> None:
        self.problem = problem
        self._writer = VariableWriter(problem)
        # Running statistics need one refresh per step; decided once, not in every step.
        self._has_statistics = bool(level_buffers(problem))

    def data(self) -> tuple[Any, Any] | None:
        return self.problem.data()

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]:
        return self.problem.to_functions(batches)

    def engine_for(self, engine: Engine) -> Engine:
        return engine

    def assign(self, x: Tree, y: Tree) -> None:
        self._writer(x, y)

    @torch.no_grad()
    def refresh_statistics(self, lower_batch: Any) -> None:
        # Engines see buffers as constants (cloned per call), so running statistics such as
        # BatchNorm's are updated here by one forward of g at the new parameters.
        if self._has_statistics and self.problem.training:
            self.problem.lower_objective(lower_batch)

    def parameter_views(self, x: Tree, y: Tree) -> dict[str, Tensor]:
        return {**{f"upper.{k}": v for k, v in x.items()}, **{f"lower.{k}": v for k, v in y.items()}}


def as_trainable(problem: Any) -> Trainable:
    """``problem`` itself when it is a ``Trainable`` (a population, a batch of tasks); ``Tasks(problem)`` when it
    defines ``task_data()``; else a ``SingleProblem``."""
    if isinstance(problem, (Population, Tasks)):
        return problem
    if not isinstance(problem, BilevelProblem):
        raise TypeError(
            f"problem must be a bilevel.BilevelProblem, a bilevel.Population or a bilevel.Tasks, got "
            f"{type(problem).__name__}"
        )
    if callable(getattr(problem, "task_data", None)):
        return Tasks(problem)  # a problem of one task whose default data is a stream of task batches (the CLI)
    return SingleProblem(problem)
