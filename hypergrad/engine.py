"""The engine protocol: an engine is a pure step on a state (DESIGN.md, "The engine protocol").

    state = engine.init(fns, x, y)
    state, metrics = engine.step(fns, state, (lower_batch, upper_batch))

``step`` is the composition of three phases that callers may also run one by one (the Lightning
loop times them): ``inner`` (advance y on g), ``estimate`` (the hypergradient at the current x, y)
and ``outer`` (the update of x), each taking ``fns`` first. All are pure: no ``.item()``, no Python
branching on tensor values, no autograd graph kept between calls, so a step runs under ``torch.func.vmap``.

An engine is data plus one step: a frozen dataclass of hyperparameters (``hypergrad.checks`` declares
and checks them, in ``Engine.__post_init__``) and the phases. The state is a plain dict (a pytree,
typed per engine by a ``TypedDict``) holding every tensor needed to resume exactly: ``x``, ``y``
(trees), ``step`` (0-d int64) and whatever the engine adds. This base knows no recipe: the lower
gradient descent and the outer optimizer of most engines are mixins (``hypergrad.recipe``); the outer
update is an ``hypergrad.outer`` transform the engine chooses, which ``outer`` applies and projects onto X.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, is_dataclass
from typing import Any, ClassVar, Generic, Protocol, TypedDict, TypeVar, cast

import torch
from torch import Tensor

from hypergrad import checks
from hypergrad import tree as T
from hypergrad.outer import Transform
from hypergrad.tree import Tree

State = dict[str, Any]
"""Any engine's state, for code that runs every engine (the loop, wrappers); engines type theirs."""
Metrics = dict[str, Tensor]
Batches = tuple[Any, Any]


class EngineState(TypedDict):
    """The entries every engine state has."""

    x: Tree
    """The upper variables."""
    y: Tree
    """The lower variables."""
    step: Tensor
    """The number of outer steps taken (0-d int64)."""


S = TypeVar("S", bound=Mapping[str, Any])
"""An engine's state type (a ``TypedDict``)."""

RECIPE = ("inner_steps", "inner_lr", "outer_lr", "outer_optimizer")
"""The hyperparameters of the common recipe (``hypergrad.recipe``), first in an engine's record."""


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

    A restarted lower level (optional): ``lower_start(x) -> y0``, pure, a tree keyed and shaped as y.
    Engines that honour it (``supports_lower_start``) begin every outer step's lower run at
    y0 = lower_start(x) instead of warm starting from the last y: y0 = x for MAML, the head part of
    x for ANIL, x for iMAML's proximal lower level (``hypergrad.tasks``, ALGORITHMS.md section 9).
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
    lower_start: Callable[[Tree], Tree] | None = None
    lower_restart: Callable[[Tree, Tree, Any], tuple[Tree, Tree]] | None = None


class SupportsFunctions(Protocol):
    """What ``Engine.hypergradient`` needs from a problem object (``bilevel.BilevelProblem`` has it)."""

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]: ...


class Engine(Generic[S]):
    """Base of every hypergradient engine: the protocol, the capabilities and the one hyperparameter check.

    A concrete engine is a ``@dataclass(frozen=True, kw_only=True, repr=False)`` whose fields are its
    hyperparameters (``hypergrad.checks.hyperparameter``); the dataclass's ``__init__`` ends in
    ``__post_init__`` here, which checks them all. Engines compare and hash by their hyperparameters.
    """

    # Capabilities, read on the class by ``check_functions``; plain attributes (not ClassVar) because the
    # wrappers (compiled, vmapped) copy their engine's onto themselves.
    supports_constraints: bool = False
    """Whether the engine honours ``lower_constraints`` c(x, y) <= 0."""
    supports_lower_set: bool = False
    """Whether the engine keeps y in a lower set Y (projected lower steps). Upper sets X are
    honoured by every engine: the outer step is projected onto X."""
    supports_lower_step: bool = False
    """Whether the engine runs the problem's lower dynamics ``Functions.lower_step`` (a learned
    optimizer, say) in place of gradient descent on g."""
    supports_lower_start: bool = False
    """Whether the engine restarts the lower level at y0 = ``Functions.lower_start(x)`` at every outer step
    instead of warm starting it from the last y."""
    outer_state_key: ClassVar[str] = "outer"
    """The state entry holding the outer transform's state (BO-REP keeps its momentum under "m")."""

    def __post_init__(self) -> None:
        # vars(engine), which checkpoints record and repr shows, lists the recipe's hyperparameters first and then
        # the engine's own, as engines did before they were dataclasses; the signature keeps each engine's order.
        checks.check(self, first=RECIPE)
        self.validate()

    def validate(self) -> None:
        """Rules the field declarations cannot state (override; raise a ``checks.HyperparameterError``)."""

    def __repr__(self) -> str:
        """``CG(inner_steps=10, inner_lr=0.1, ..., iters=10, ...)``: every hyperparameter, as ``vars`` lists them."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    # -- the protocol ------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> S:
        """Initial state from the upper variables x and lower variables y (trees, copied).

        ``lower_batch`` (optional) lets an engine size state from the data, e.g. LV-HBA's
        multipliers take the shape of c(x, y, lower_batch).
        """
        raise NotImplementedError

    def step(self, fns: Functions, state: S, batches: Batches) -> tuple[S, Metrics]:
        """One outer iteration: inner, estimate, outer. ``batches`` = (lower_batch, upper_batch)."""
        state = self.inner(fns, state, batches[0])
        state, hypergrad, metrics = self.estimate(fns, state, batches)
        return self.outer(fns, state, hypergrad), metrics

    def inner(self, fns: Functions, state: S, lower_batch: Any) -> S:
        """Advance the lower variables on g(x, .)."""
        raise NotImplementedError

    def estimate(self, fns: Functions, state: S, batches: Batches) -> tuple[S, Tree, Metrics]:
        """The hypergradient dF/dx at the state's (x, y): (new state, hypergradient, metrics)."""
        raise NotImplementedError

    def outer(self, fns: Functions, state: S, hypergrad: Tree) -> S:
        """Update x with the engine's outer transform, project onto X (when the problem has a set), count the step."""
        t = state["step"] + 1
        x, opt = self.outer_transform().update(state["x"], hypergrad, state[self.outer_state_key], t)
        if fns.project_x is not None:
            x = fns.project_x(x)
        return updated(state, {"x": x, self.outer_state_key: opt, "step": t})

    def outer_transform(self) -> Transform:
        """The update of x from the hypergradient (``hypergrad.outer``), before the projection onto X."""
        raise NotImplementedError

    def lower_solution(self, state: S) -> Tree:
        """The state's approximation of y*(x), written back into the problem's lower variables.

        ``y`` by default; first-order engines that track y*(x) in another copy override this.
        """
        return state["y"]

    def check_functions(self, fns: Functions) -> None:
        """Refuse a problem this engine cannot solve faithfully (lower constraints, a lower set, lower dynamics,
        a restarted lower level).

        The capabilities are the class attributes ``supports_constraints``, ``supports_lower_set``,
        ``supports_lower_step`` and ``supports_lower_start``; this is the one place that enforces them.
        """
        for present, flag, what, fix in (
            (fns.c is not None, "supports_constraints", "lower_constraints", "lower-level constraints"),
            (fns.project_y is not None, "supports_lower_set", "a set for the lower variables", "a lower set Y"),
            (fns.lower_step is not None, "supports_lower_step", "lower dynamics (lower_step)",
             "lower dynamics other than gradient descent on g"),
            (fns.lower_start is not None, "supports_lower_start",
             "lower_start (y restarted from x at every outer step)", "a lower level restarted from a function of x"),
        ):
            if present and not getattr(self, flag):
                # Concrete engines only: they are dataclasses (ImplicitEngine, a base, carries flags for its engines).
                able = sorted(cls.__name__ for cls in _all_engines() if getattr(cls, flag) and is_dataclass(cls))
                raise ValueError(
                    f"{fns.name} defines {what}, but {type(self).__name__} cannot honour {fix}; engines that can: "
                    f"{', '.join(able) if able else 'none yet in this version'}. Remove it or pick such an engine."
                )

    # -- helpers for engines ---------------------------------------------------------------------

    def start(self, fns: Functions, x: Tree, y: Tree) -> EngineState:
        """x, y (detached copies, projected onto X and Y) and step 0, after ``check_functions``.

        With ``fns.lower_start`` y is lower_start(x) (checked to be keyed and shaped as the given y).
        """
        self.check_functions(fns)
        x = T.detach(x)
        y = checked_lower_start(fns, x, y) if fns.lower_start is not None else T.detach(y)
        # Start feasible: projected methods assume their iterates lie in X and Y.
        if fns.project_x is not None:
            x = fns.project_x(x)
        if fns.project_y is not None:
            y = fns.project_y(y)
        device = next(iter(x.values())).device
        return {"x": x, "y": y, "step": torch.zeros((), dtype=torch.int64, device=device)}

    # -- convenience ---------------------------------------------------------------------------

    def hypergradient(self, problem: SupportsFunctions, lower_batch: Any, upper_batch: Any) -> Tree:
        """dF/dx for ``problem`` at its current parameters, after this engine's inner phase.

        Returns ``{name: tensor}`` keyed as in ``problem.upper.named_parameters()``; the problem's
        parameters are left unchanged.
        """
        fns, x, y = problem.to_functions((lower_batch, upper_batch))
        state = self.inner(fns, self.init(fns, x, y, lower_batch=lower_batch), lower_batch)
        _, hypergrad, _ = self.estimate(fns, state, (lower_batch, upper_batch))
        # x's entries only: LV-HBA's direction also carries what its outer step needs (``LVHBA.estimate``).
        return {k: hypergrad[k] for k in x}


def restart_lower(fns: Functions, x: Tree) -> Tree:
    """y0 = lower_start(x), detached: where a restarted lower level begins this outer step (shapes of y)."""
    if fns.lower_start is None:
        raise ValueError(f"{fns.name} defines no lower_start(x) to restart the lower level from")
    return T.detach(fns.lower_start(x))


def checked_lower_start(fns: Functions, x: Tree, y: Tree) -> Tree:
    """``restart_lower(fns, x)``, refused with a message naming the problem unless keyed, shaped and typed as y."""
    y0 = fns.lower_start(x) if fns.lower_start is not None else None
    where = f"{fns.name}.lower_start(x)"
    if not isinstance(y0, Mapping):
        raise TypeError(f"{where} must return a dict of tensors keyed as the lower variables, got {type(y0).__name__}")
    if set(y0) != set(y):
        raise ValueError(f"{where} must return the lower variables' keys {sorted(y)}, got {sorted(y0)}")
    for k, v in y.items():
        got = y0[k]
        if not isinstance(got, Tensor) or got.shape != v.shape or got.dtype != v.dtype:
            what = f"shape {tuple(got.shape)}, {got.dtype}" if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"{where}['{k}'] must have the shape {tuple(v.shape)} and dtype {v.dtype} of the lower "
                             f"variable '{k}', got {what}")
    return T.detach({k: y0[k] for k in y})


def updated(state: S, entries: Mapping[str, Any]) -> S:
    """``state`` with ``entries`` set, a new dict of the same type (for code generic in the state type)."""
    # mypy cannot type a merge into a TypedDict known only as a type variable; the keys are the state's own.
    return cast(S, {**state, **entries})


def _all_engines() -> list[type[Engine]]:
    found: list[type[Engine]] = []
    stack: list[type[Engine]] = list(Engine.__subclasses__())
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
