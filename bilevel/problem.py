"""The problem-definition DSL: ``BilevelProblem`` (an nn.Module) and ``Hyper`` (named upper tensors)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.functional import problem_functions
from hypergrad import Functions
from hypergrad.tree import Tree


class Hyper(nn.Module):
    """Named tensors held as parameters: ``self.upper = bilevel.Hyper(logits=torch.zeros(n))``.

    Each keyword becomes an ``nn.Parameter`` reachable as an attribute (``self.upper.logits``).
    """

    def __init__(self, **tensors: Tensor) -> None:
        super().__init__()
        if not tensors:
            raise ValueError("Hyper needs at least one named tensor, e.g. Hyper(weight_decay=torch.zeros(3))")
        for name, value in tensors.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"Hyper: {name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"Hyper: {name} must be a floating-point tensor, got dtype {value.dtype}")
            self.register_parameter(name, nn.Parameter(value.detach().clone()))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(p.shape)}" for n, p in self.named_parameters())


class BilevelProblem(nn.Module):
    """A bilevel problem  min_x f(x, y*(x)),  y*(x) = argmin_y g(x, y).

    Subclass it like a LightningModule:

    - in ``__init__`` set ``self.lower`` (y: every parameter under it) and ``self.upper``
      (x: every parameter under it); either may be any nn.Module, ``Hyper`` for plain tensors;
    - ``lower_objective(batch)`` returns g(x, y) and ``upper_objective(batch)`` returns f(x, y),
      both 0-d tensors computed from ``self.lower`` and ``self.upper``;
    - optionally ``lower_constraints(batch)`` returns c(x, y), feasible where every entry <= 0
      (only engines that honour constraints accept such a problem);
    - optionally ``self.upper_sets`` / ``self.lower_sets``: maps from variable names (as in
      ``self.upper.named_parameters()``) to closed convex sets, e.g. ``{"x": bilevel.Box(0, 1)}``
      or ``bilevel.NonNegative()`` or any projection ``Tensor -> Tensor``; or, for sets that do
      not split by variable, a method ``project_upper(x)`` / ``project_lower(y)`` mapping a dict
      of tensors to its Euclidean projection. Every engine keeps x in its set; a lower set needs
      an engine that supports it;
    - optionally lower dynamics other than gradient descent on g (a learned optimizer):
      ``lower_step(x, y, grad_y, lower_state, t) -> (y, lower_state)`` and
      ``init_lower_state(y) -> lower_state``, pure functions of the trees they get (x, y keyed as
      the levels' parameters); ``upper_metrics(batch) -> {name: 0-d tensor}`` adds metrics. Only
      engines with ``supports_lower_step`` (Unrolled, PES) accept them (``hypergrad.dynamics``);
    - optionally ``lower_start(x) -> y0``: the lower variables restart from this pure function of x
      at every outer step instead of warm starting (MAML: y0 = x; iMAML, ANIL: a learned init), for
      meta-learning over batches of tasks (``bilevel.Tasks``, ``bilevel.fit(..., tasks=...)``);
      Unrolled (through y0), Exact, Neumann and CG accept it;
    - optionally ``validation_step(batch) -> {name: value}`` and ``validation_data()``, run by
      Lightning's validation loop every ``val_check_interval`` outer steps (``bilevel.fit``);
    - optionally ``data()`` returns default ``(lower_data, upper_data)`` for ``fit`` and the CLI,
      and ``evaluate()`` returns final metrics (floats) printed and logged at the end of ``fit``.

    Parameters outside ``lower`` and ``upper`` are constants to the engines.
    """

    lower: nn.Module
    upper: nn.Module
    _init_arguments: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the arguments each problem was built with (TensorBoard's HPARAMS, the run record),
        # as Lightning's save_hyperparameters does for a LightningModule: the outermost __init__ wins.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording(self: BilevelProblem, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            try:
                bound = signature.bind(self, *args, **kw)
            except TypeError:
                return
            bound.apply_defaults()
            object.__setattr__(self, "_init_arguments", {k: v for k, v in list(bound.arguments.items())[1:]
                                                          if isinstance(v, (bool, int, float, str, type(None)))})

        cls.__init__ = recording  # type: ignore[method-assign, assignment]  # the same signature, wrapped

    @property
    def init_arguments(self) -> dict[str, Any]:
        """The plain (number, string, bool, None) arguments this problem's ``__init__`` was called with."""
        return dict(self._init_arguments)

    upper_sets: Mapping[str, Callable[[Tensor], Tensor]] | None = None
    lower_sets: Mapping[str, Callable[[Tensor], Tensor]] | None = None

    def lower_objective(self, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define lower_objective(self, batch) -> 0-d tensor")

    def upper_objective(self, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define upper_objective(self, batch) -> 0-d tensor")

    def data(self) -> tuple[Any, Any] | None:
        """Default (lower_data, upper_data); None when the user must pass them to ``fit``."""
        return None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics of the trained problem (e.g. test accuracy), reported when ``fit`` ends."""
        return {}

    @property
    def has_constraints(self) -> bool:
        return callable(getattr(self, "lower_constraints", None))

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]:
        """(Functions, x, y): pure f, g (and c) of trees, and copies of the current x and y.

        With ``batches = (lower_batch, upper_batch)`` given, the objectives are first checked on
        them (``bilevel.validate``), so a faulty problem fails here with a clear message.
        """
        return problem_functions(self, batches)
