"""The engine protocol: an engine is a pure step on a state (DESIGN.md, "The engine protocol").

    state = engine.init(fns, x, y)
    state, metrics = engine.step(fns, state, (lower_batch, upper_batch))

``step`` is the composition of three phases that callers may also run one by one (the Lightning
loop times them): ``inner`` (advance y on g), ``estimate`` (the hypergradient at the current x, y)
and ``outer`` (the update of x), each taking ``fns`` first. All are pure: no ``.item()``, no Python branching on tensor
values, no autograd graph kept between calls, so a step runs under ``torch.func.vmap``.

The state is a plain dict (a pytree) holding every tensor needed to resume exactly:
``x``, ``y`` (trees), ``outer`` (optimizer moments), ``step`` (0-d int64) and whatever the engine
adds (CG's warm start ``v``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from hypergrad import checks, kernels, outer
from hypergrad import tree as T
from hypergrad.tree import Tree

State = dict[str, Any]
Metrics = dict[str, Tensor]
Batches = tuple[Any, Any]


@dataclass(frozen=True)
class Functions:
    """A bilevel problem as pure functions of trees: f(x, y, batch), g(x, y, batch), c(x, y, batch).

    ``f`` and ``g`` return 0-d tensors; ``c`` (optional) returns the lower constraints, feasible
    where every entry is <= 0. ``project_x`` / ``project_y`` (optional) are the Euclidean
    projections onto closed convex sets X and Y of the upper and lower variables (None: the
    whole space). ``name`` names the problem in error messages.

    Lower dynamics (optional, ``hypergrad.dynamics``): ``lower_step(x, y, grad_y, lower_state, t)
    -> (y, lower_state)`` replaces the gradient step on g (e.g. a learned optimizer's update, the
    gradient grad_y g(x, y, lower_batch) given), with ``init_lower_state(y) -> lower_state`` its
    initial state (a tree) and ``t`` the 0-d int64 count of lower steps since the last reset.
    Both must be pure. ``upper_metrics(x, y, upper_batch) -> {name: 0-d tensor}`` (optional) adds
    the problem's own metrics to those of engines that run lower dynamics.
    """

    f: Callable[[Tree, Tree, Any], Tensor]
    g: Callable[[Tree, Tree, Any], Tensor]
    c: Callable[[Tree, Tree, Any], Tensor] | None = None
    project_x: Callable[[Tree], Tree] | None = None
    project_y: Callable[[Tree], Tree] | None = None
    name: str = "problem"
    lower_step: Callable[[Tree, Tree, Tree, Tree, Tensor], tuple[Tree, Tree]] | None = None
    init_lower_state: Callable[[Tree], Tree] | None = None
    upper_metrics: Callable[[Tree, Tree, Any], dict[str, Tensor]] | None = None


class SupportsFunctions(Protocol):
    """What ``Engine.hypergradient`` needs from a problem object (``bilevel.BilevelProblem`` has it)."""

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]: ...


class Engine:
    """Base of every hypergradient engine.

    Args:
        inner_steps: gradient steps on g(x, .) per outer step, warm-started from the last y.
        inner_lr: step size of those gradient steps.
        outer_lr: step size of the outer optimizer on x.
        outer_optimizer: "sgd" or "adam" (Kingma and Ba 2015).
    """

    supports_constraints: ClassVar[bool] = False
    """Whether the engine honours ``lower_constraints`` c(x, y) <= 0."""
    supports_lower_set: ClassVar[bool] = False
    """Whether the engine keeps y in a lower set Y (projected lower steps). Upper sets X are
    honoured by every engine: the outer step is projected onto X."""
    supports_lower_step: ClassVar[bool] = False
    """Whether the engine runs the problem's lower dynamics ``Functions.lower_step`` (a learned
    optimizer, say) in place of gradient descent on g."""

    def __init__(
        self, *, inner_steps: int = 10, inner_lr: float = 0.1, outer_lr: float = 0.01, outer_optimizer: str = "adam"
    ) -> None:
        name = type(self).__name__
        self.inner_steps = checks.nonnegative_int(name, "inner_steps", inner_steps)
        self.inner_lr = checks.positive(name, "inner_lr", inner_lr)
        self.outer_lr = checks.positive(name, "outer_lr", outer_lr)
        self.outer_optimizer = checks.one_of(name, "outer_optimizer", outer_optimizer, outer.OUTER_OPTIMIZERS)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    # -- the protocol ------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> State:
        """Initial state from the upper variables x and lower variables y (trees, copied).

        ``lower_batch`` (optional) lets an engine size state from the data, e.g. LV-HBA's
        multipliers take the shape of c(x, y, lower_batch); the base ignores it.
        """
        self.check_functions(fns)
        x, y = T.detach(x), T.detach(y)
        # Start feasible: projected methods assume their iterates lie in X and Y.
        if fns.project_x is not None:
            x = fns.project_x(x)
        if fns.project_y is not None:
            y = fns.project_y(y)
        device = next(iter(x.values())).device
        return {
            "x": x,
            "y": y,
            "outer": outer.init(self.outer_optimizer, x),
            "step": torch.zeros((), dtype=torch.int64, device=device),
            **self.init_extra(x, y),
        }

    def step(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Metrics]:
        """One outer iteration: inner, estimate, outer. ``batches`` = (lower_batch, upper_batch)."""
        state = self.inner(fns, state, batches[0])
        state, hypergrad, metrics = self.estimate(fns, state, batches)
        return self.outer(fns, state, hypergrad), metrics

    def inner(self, fns: Functions, state: State, lower_batch: Any) -> State:
        """Advance y by ``inner_steps`` gradient steps on g(x, .)."""
        return {**state, "y": self.descend(fns.g, state["x"], state["y"], lower_batch, self.inner_steps)}

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        """The hypergradient dF/dx at the state's (x, y): (new state, hypergradient, metrics)."""
        raise NotImplementedError

    def outer(self, fns: Functions, state: State, hypergrad: Tree) -> State:
        """Update x with the outer optimizer (projected onto X when the problem has a set) and count the step."""
        t = state["step"] + 1
        x, opt = outer.update(self.outer_optimizer, state["x"], hypergrad, state["outer"], self.outer_lr, t)
        if fns.project_x is not None:
            x = fns.project_x(x)
        return {**state, "x": x, "outer": opt, "step": t}

    def lower_solution(self, state: State) -> Tree:
        """The state's approximation of y*(x), written back into the problem's lower variables.

        ``y`` by default; first-order engines that track y*(x) in another copy override this.
        """
        return state["y"]

    # -- helpers for subclasses ----------------------------------------------------------------

    def init_extra(self, x: Tree, y: Tree) -> State:
        """Engine-specific state entries (override)."""
        return {}

    def descend(self, g: Callable, x: Tree, y: Tree, batch: Any, steps: int) -> Tree:
        """``steps`` gradient-descent steps of size ``inner_lr`` on g(x, .) from y."""
        for _ in range(steps):
            gy, _ = kernels.grad_y(g, x, y, batch)
            y = T.axpy(-self.inner_lr, gy, y)
        return y

    def check_functions(self, fns: Functions) -> None:
        """Refuse a problem this engine cannot solve faithfully (lower constraints, a lower set, lower dynamics).

        The capabilities are the class attributes ``supports_constraints``, ``supports_lower_set``
        and ``supports_lower_step``; this is the one place that enforces them.
        """
        for present, flag, what, fix in (
            (fns.c is not None, "supports_constraints", "lower_constraints", "lower-level constraints"),
            (fns.project_y is not None, "supports_lower_set", "a set for the lower variables", "a lower set Y"),
            (fns.lower_step is not None, "supports_lower_step", "lower dynamics (lower_step)",
             "lower dynamics other than gradient descent on g"),
        ):
            if present and not getattr(self, flag):
                able = sorted(cls.__name__ for cls in _all_engines() if getattr(cls, flag))
                raise ValueError(
                    f"{fns.name} defines {what}, but {type(self).__name__} cannot honour {fix}; engines that can: "
                    f"{', '.join(able) if able else 'none yet in this version'}. Remove it or pick such an engine."
                )

    # -- convenience ---------------------------------------------------------------------------

    def hypergradient(self, problem: SupportsFunctions, lower_batch: Any, upper_batch: Any) -> Tree:
        """dF/dx for ``problem`` at its current parameters, after this engine's inner phase.

        Returns ``{name: tensor}`` keyed as in ``problem.upper.named_parameters()``; the problem's
        parameters are left unchanged.
        """
        fns, x, y = problem.to_functions((lower_batch, upper_batch))
        state = self.inner(fns, self.init(fns, x, y, lower_batch=lower_batch), lower_batch)
        _, hypergrad, _ = self.estimate(fns, state, (lower_batch, upper_batch))
        return hypergrad


def _all_engines() -> list[type[Engine]]:
    found, stack = [], list(Engine.__subclasses__())
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
