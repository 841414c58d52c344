"""The loop's interface where one ``BilevelProblem`` holds the code: a single problem and a batch of its tasks.

``OneProblem`` is what ``bilevel.trainable.SingleProblem`` and ``bilevel.Tasks`` share (both keep the
problem as ``self.problem`` and a ``title``): the final ``evaluate()`` table, validation through the
problem's own hooks, metrics as they come, and the parameters Lightning counts steps with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from bilevel.problem import BilevelProblem


class OneProblem:
    """``Trainable`` methods for a wrapper of one problem ``self.problem`` titled ``self.title``."""

    problem: BilevelProblem

    @property
    def title(self) -> str:
        """Names the run in messages and tables."""
        return type(self.problem).__name__

    @property
    def init_arguments(self) -> dict[str, Any]:
        """The problem's arguments (``BilevelProblem.init_arguments``)."""
        return self.problem.init_arguments

    def named_metrics(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        return metrics

    def finish(self) -> dict[str, float]:
        """The problem's ``evaluate()``, printed as a table on rank zero."""
        final = {k: float(v) for k, v in self.problem.evaluate().items()}
        if final:
            print_table(self.title, final)
        return final

    def step_parameters(self) -> Iterator[nn.Parameter]:
        return self.problem.upper.parameters()

    @property
    def can_validate_batches(self) -> bool:
        return callable(getattr(self.problem, "validation_step", None))

    def validation_data(self) -> Any:
        hook = getattr(self.problem, "validation_data", None)
        return hook() if callable(hook) else None

    def validate(self, batch: Any) -> dict[str, Any]:
        if batch is None:
            return self.problem.evaluate()
        return self.problem.validation_step(batch)  # type: ignore[operator]  # checked by can_validate_batches


@rank_zero_only
def print_table(title: str, metrics: dict[str, float]) -> None:
    width = max(map(len, metrics))
    print(f"\n{title}: final metrics")
    for name, value in metrics.items():
        print(f"  {name:<{width}}  {value:.4g}")
