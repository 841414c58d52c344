"""Bilevel problems with constrained lower levels, P5 and P6 of shared/REFERENCE_PROBLEMS.md.

Both have lower constraints coupling x and y (``lower_constraints``, feasible where <= 0), so
only engines that honour constraints (``hypergrad.lvhba.LVHBA``) accept them, and closed-form
solutions computed here from the formulas. The objectives ignore the batch: ``data()`` returns
``((), ())``. Every ``__init__`` argument is typed, so a YAML config can build them::

    problem = ActiveConstraintP6()          # x = 0, y = 0
    problem.solution()                       # {'x': 2.5, 'y': 3.5, 'value': 0.25, 'multiplier': 1.5}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import bilevel
from problems.common import float_dtype


class _ConstrainedProblem(bilevel.BilevelProblem):
    """The empty full batch for both levels: the problems hold no data."""

    def data(self) -> tuple[tuple[()], tuple[()]]:
        return (), ()


class CoupledToyP5(_ConstrainedProblem):
    """P5, LV-HBA's coupled-constraint toy, x in R^n, y = (y1, y2) in R^2n, non-singleton lower level.

        upper:  f(x, y) = 1/2 |x - y2|^2 + 1/2 |y1 - 1|^2
        lower:  g(x, y) = 1/2 |y1|^2 - x^T y1 + 1^T y2   s.t.  c(x, y) = -(1^T x + 1^T y1 + 1^T y2) <= 0

    g falls without bound as 1^T y2 falls, so the constraint is active: the lower solution set is
    {y1 = x + 1, 1^T y2 = -2 1^T x - n} with multiplier 1, and the optimistic value function is
    F(x) = (3 1^T x + n)^2 / (2n) + |x|^2 / 2, minimized at x* = -0.3, y1* = 0.7, y2* = -0.4
    (times 1), F* = 0.05 n. c has shape (1,).

    Args:
        n: the dimension of x (y has 2n entries).
        x0: the starting value of every entry of x.
        y0: the starting value of every entry of y1 and y2.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, n: int = 2, x0: float = 0.0, y0: float = 0.0, dtype: str = "float64") -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"CoupledToyP5: n must be an integer >= 1, got {n!r}")
        dt = float_dtype(dtype)
        self.n = n
        self.upper = bilevel.Hyper(x=torch.full((n,), float(x0), dtype=dt))
        self.lower = bilevel.Hyper(y1=torch.full((n,), float(y0), dtype=dt), y2=torch.full((n,), float(y0), dtype=dt))

    def lower_objective(self, batch: Any) -> Tensor:
        y1, y2, x = self.lower.y1, self.lower.y2, self.upper.x
        return 0.5 * torch.sum(y1**2) - x @ y1 + torch.sum(y2)

    def upper_objective(self, batch: Any) -> Tensor:
        y1, y2, x = self.lower.y1, self.lower.y2, self.upper.x
        return 0.5 * torch.sum((x - y2) ** 2) + 0.5 * torch.sum((y1 - 1.0) ** 2)

    def lower_constraints(self, batch: Any) -> Tensor:
        total = torch.sum(self.upper.x) + torch.sum(self.lower.y1) + torch.sum(self.lower.y2)
        return -total.reshape(1)

    @torch.no_grad()
    def lower_solution(self) -> dict[str, Tensor]:
        """The optimistic lower solution at the current x: y1 = x + 1 and y2 the point of
        {1^T y2 = -2 1^T x - n} nearest to x (it minimizes f over the lower solution set)."""
        x = self.upper.x.detach()
        total = -2.0 * torch.sum(x) - self.n
        return {"y1": x + 1.0, "y2": x + (total - torch.sum(x)) / self.n}

    @torch.no_grad()
    def value(self) -> Tensor:
        """The optimistic F(x) = (3 1^T x + n)^2 / (2n) + |x|^2 / 2 at the current x (0-d)."""
        x = self.upper.x.detach()
        return (3.0 * torch.sum(x) + self.n) ** 2 / (2 * self.n) + 0.5 * torch.sum(x**2)

    def solution(self) -> dict[str, Tensor]:
        """x*, y1*, y2* (shape (n,)), the optimal value F* and the lower multiplier (0-d)."""
        dt = self.upper.x.dtype
        ones = torch.ones(self.n, dtype=dt)
        return {"x": -0.3 * ones, "y1": 0.7 * ones, "y2": -0.4 * ones,
                "value": torch.tensor(0.05 * self.n, dtype=dt), "multiplier": torch.tensor(1.0, dtype=dt)}


class ActiveConstraintP6(_ConstrainedProblem):
    """P6, one lower inequality that is active at the solution (x and y of shape (1,)).

        lower:  y*(x) = argmin_y 1/2 (y - 2x)^2  s.t.  c(x, y) = y - x - 1 <= 0   =>  y*(x) = min(2x, x + 1)
        upper:  f(x, y) = 1/2 (x - 3)^2 + 1/2 (y - 3)^2

    The lower multiplier is max(0, x - 1); dF/dx = 5x - 9 for x < 1 and 2x - 5 for x > 1 (an
    engine that ignores the constraint gets dy*/dx = 2 instead of 1 beyond x = 1). Optimum
    x* = 2.5, y* = 3.5, F* = 0.25, multiplier 1.5.

    Args:
        x0: the starting x.
        y0: the starting y.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, x0: float = 0.0, y0: float = 0.0, dtype: str = "float64") -> None:
        super().__init__()
        dt = float_dtype(dtype)
        self.upper = bilevel.Hyper(x=torch.tensor([float(x0)], dtype=dt))
        self.lower = bilevel.Hyper(y=torch.tensor([float(y0)], dtype=dt))

    def lower_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.lower.y - 2.0 * self.upper.x) ** 2)

    def upper_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.upper.x - 3.0) ** 2) + 0.5 * torch.sum((self.lower.y - 3.0) ** 2)

    def lower_constraints(self, batch: Any) -> Tensor:
        return self.lower.y - self.upper.x - 1.0

    @torch.no_grad()
    def lower_solution(self) -> Tensor:
        """y*(x) = min(2x, x + 1), shape (1,)."""
        x = self.upper.x.detach()
        return torch.minimum(2.0 * x, x + 1.0)

    @torch.no_grad()
    def lower_multiplier(self) -> Tensor:
        """The multiplier of y <= x + 1 at y*(x): max(0, x - 1), shape (1,)."""
        return torch.clamp(self.upper.x.detach() - 1.0, min=0.0)

    @torch.no_grad()
    def value(self) -> Tensor:
        """F(x) = f(x, y*(x)) at the current x (0-d)."""
        x = self.upper.x.detach()
        return torch.sum(0.5 * (x - 3.0) ** 2 + 0.5 * (self.lower_solution() - 3.0) ** 2)

    @torch.no_grad()
    def hypergradient(self) -> Tensor:
        """dF/dx = 5x - 9 for x < 1 and 2x - 5 for x > 1 (the right derivative at the kink x = 1), shape (1,)."""
        x = self.upper.x.detach()
        return torch.where(x < 1.0, 5.0 * x - 9.0, 2.0 * x - 5.0)

    def solution(self) -> dict[str, Tensor]:
        """x*, y*, the lower multiplier (shape (1,)) and F* (0-d)."""
        dt = self.upper.x.dtype
        return {"x": torch.tensor([2.5], dtype=dt), "y": torch.tensor([3.5], dtype=dt),
                "value": torch.tensor(0.25, dtype=dt), "multiplier": torch.tensor([1.5], dtype=dt)}
