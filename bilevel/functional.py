"""Turn a BilevelProblem into pure functions f(x, y, batch), g(x, y, batch) with functional_call.

One binding serves a single problem and every member of a ``bilevel.Population``: the problem's
methods run with the levels' parameters taken from the trees x and y and its other tensors taken
from ``constants`` (a population passes each member's, batched under ``torch.func.vmap``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from bilevel.structure import describe
from bilevel.validate import check_objectives
from hypergrad import Functions, dynamics
from hypergrad.sets import tree_projection
from hypergrad.tree import Tree

if TYPE_CHECKING:
    from bilevel.problem import BilevelProblem

LOWER_DYNAMICS = ("lower_step", "init_lower_state", "lower_start", "lower_restart")
"""Optional pure methods of explicit trees, bound without a batch: the lower dynamics (``hypergrad.dynamics``,
with ``lower_restart`` applying a data-driven restart) and the restart of the lower level from x
(``lower_start(x) -> y0``, ``hypergrad.tasks``)."""


class MethodModule(nn.Module):
    """Calls one method of the problem as ``forward`` so ``functional_call`` can swap its parameters."""

    def __init__(self, problem: nn.Module, method: str) -> None:
        super().__init__()
        self.problem = problem
        self.method = method

        # Resolved once: functional_call would build a fresh accessor (and look every submodule up again) per call.
        self._members = NamedMemberAccessor(self)

    def forward(self, *args: Any) -> Any:
        return getattr(self.problem, self.method)(*args)

    def call(self, tensors: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
        """``functional_call(self, tensors, args, strict=False, tie_weights=False)`` with the lookups prepared once.

        The same swap as torch's ``_reparametrize_module``: the tensors in for the call, the originals back
        after it, and a tensor the forward reassigned (rather than updated in place) written back to ``tensors``.
        """
        if torch.compiler.is_compiling():
            # Dynamo knows functional_call (no side effect it must refuse, e.g. inside a folded while_loop body).
            return functional_call(self, tensors, args, strict=False, tie_weights=False)
        originals: dict[str, Tensor] = {}
        try:
            originals, _ = self._members.swap_tensors_dict(tensors, allow_missing=True)
            return self(*args)
        finally:
            swapped, _ = self._members.swap_tensors_dict(originals, allow_missing=True)
            tensors.update({k: swapped[k] for k in tensors if k in swapped})


def levels(problem: BilevelProblem) -> tuple[nn.Module, nn.Module]:
    """The problem's (lower, upper) modules, or a clear error when either is missing or empty."""
    name = type(problem).__name__
    found = []
    for level, var in (("lower", "y"), ("upper", "x")):
        module = getattr(problem, level, None)
        if module is None:
            raise ValueError(
                f"{name}.__init__ must set self.{level} to an nn.Module holding the {level}-level variables {var} "
                f"(for plain tensors: self.{level} = bilevel.Hyper(name=tensor))"
            )
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}.{level} must be an nn.Module (e.g. bilevel.Hyper), got {type(module).__name__}")
        if not any(True for _ in module.parameters()):
            raise ValueError(f"{name}.{level} has no parameters: the {level} level needs at least one variable {var}")
        found.append(module)
    shared = {id(p) for p in found[0].parameters()} & {id(p) for p in found[1].parameters()}
    if shared:
        raise ValueError(
            f"{name}: a parameter is both under self.lower and self.upper; each variable belongs to one level"
        )
    return found[0], found[1]


def level_buffers(problem: BilevelProblem) -> dict[str, Tensor]:
    """Buffers under ``lower`` and ``upper`` (BatchNorm statistics) by dotted name, e.g. ``lower.0.running_mean``."""
    lower, upper = levels(problem)
    return {f"{level}.{k}": b for level, module in (("lower", lower), ("upper", upper))
            for k, b in module.named_buffers()}


class Binding:
    """The problem's methods as pure functions of trees; what does not depend on the tensors is prepared once.

    ``functions(constants)`` is called per problem (a single problem) or per vmapped phase (a
    population rebinds member 0's code to each member's constants, batched under the vmap), so it
    only makes closures.

    Args:
        problem: the code to run (a population's member 0 for every member).
        mutable: the names of constants a forward pass may update in place (the levels' buffers):
            passed as clones made inside the transform, which may be mutated where a captured
            tensor may not.
        name: names the problem in error messages.
    """

    def __init__(self, problem: BilevelProblem, mutable: Collection[str], name: str) -> None:
        lower, upper = levels(problem)
        self.problem = problem
        self.mutable = frozenset(mutable)
        self.name = name
        self.names = {"upper": [k for k, _ in upper.named_parameters()],
                      "lower": [k for k, _ in lower.named_parameters()]}
        methods = ["upper_objective", "lower_objective", "lower_constraints", "upper_metrics",
                   "project_upper", "project_lower", *LOWER_DYNAMICS]
        self.calls = {m: MethodModule(problem, m) for m in methods if callable(getattr(problem, m, None))}

    def functions(self, constants: dict[str, Tensor]) -> Functions:
        """f(x, y, batch), g, c, the projections and the lower dynamics, reading ``constants`` (tensors of the
        problem outside x and y by dotted name, e.g. ``inputs``, ``lower.0.running_mean``) on every call."""
        fixed = {f"problem.{k}": v for k, v in constants.items() if k not in self.mutable}
        cloned = {f"problem.{k}": v for k, v in constants.items() if k in self.mutable}
        problem, calls = self.problem, self.calls

        def bind(method: str) -> Callable[[Tree, Tree, Any], Any] | None:
            if method not in calls:
                return None
            call = calls[method]

            def fn(x: Tree, y: Tree, batch: Any) -> Any:
                params = {f"problem.upper.{k}": v for k, v in x.items()}
                params.update({f"problem.lower.{k}": v for k, v in y.items()})
                params.update(fixed)
                params.update({k: b.clone() for k, b in cloned.items()})
                return call.call(params, (batch,))

            fn.__qualname__ = f"{type(problem).__name__}.{method}"
            return fn

        def pure(method: str) -> Callable | None:
            """A method of explicit trees; called functionally only when it has constants to read."""
            if method not in calls:
                return None
            if not fixed:
                return getattr(problem, method)
            call = calls[method]
            return lambda *args: call.call(dict(fixed), args)

        f, g = bind("upper_objective"), bind("lower_objective")
        assert f is not None and g is not None  # BilevelProblem defines both
        dynamics = {method: pure(method) for method in LOWER_DYNAMICS}
        return Functions(
            f=f,
            g=g,
            c=bind("lower_constraints") if problem.has_constraints else None,
            project_x=level_projection(problem, "upper", self.names["upper"], pure),
            project_y=level_projection(problem, "lower", self.names["lower"], pure),
            name=self.name,
            upper_metrics=bind("upper_metrics"),
            **{k: v for k, v in dynamics.items() if v is not None},
        )


def bind_functions(problem: BilevelProblem, constants: dict[str, Tensor], mutable: Collection[str],
                   name: str) -> Functions:
    """``Binding(problem, mutable, name).functions(constants)``: one problem's functions, bound once."""
    return Binding(problem, mutable, name).functions(constants)


def problem_functions(
    problem: BilevelProblem, batches: tuple[Any, Any] | None = None
) -> tuple[Functions, Tree, Tree]:
    """Pure (f, g, c) of the problem, and detached copies of its current x and y.

    x and y are keyed as in ``problem.upper.named_parameters()`` / ``problem.lower.named_parameters()``.
    Buffers under ``lower``/``upper`` are passed as fresh clones on each call, so in-place updates
    (BatchNorm running stats) act on tensors created inside the transform instead of failing; other
    buffers (data the problem holds) are read as they are. With ``batches`` the objectives are
    checked on them first (``bilevel.validate``), once per problem instance, batch structure
    (``bilevel.structure.describe``) and variable shapes.
    """
    lower, upper = levels(problem)
    x = {k: p.detach().clone() for k, p in upper.named_parameters()}
    y = {k: p.detach().clone() for k, p in lower.named_parameters()}
    buffers = level_buffers(problem)
    fns = bind_functions(problem, buffers, buffers.keys(), type(problem).__name__)
    if batches is not None:
        # Once per problem and structure: a forward and backward of f and g per call would cost the one-shot
        # ``engine.hypergradient(problem, ...)`` more than the hypergradient itself on a small problem.
        checked = _CHECKED.setdefault(problem, set())
        structure = (describe(batches), *((k, t.shape, t.dtype, t.device) for k, t in (*x.items(), *y.items())))
        if structure not in checked:
            check_objectives(fns, x, y, *(dynamics.sample(b) for b in batches))
            checked.add(structure)
    return fns, x, y


_CHECKED: weakref.WeakKeyDictionary[BilevelProblem, set[Any]] = weakref.WeakKeyDictionary()
"""Problem -> the batch structures and variable shapes its objectives were checked on (``problem_functions``)."""


def level_projection(problem: BilevelProblem, level: str, names: list[str],
                     bind: Callable[[str], Callable | None] | None = None) -> Callable[[Tree], Tree] | None:
    """The projection onto a level's set: the ``project_<level>`` method (through ``bind``), else
    ``<level>_sets``, else None."""
    method = f"project_{level}"
    sets = getattr(problem, f"{level}_sets", None)
    owner = type(problem).__name__
    if callable(getattr(problem, method, None)):
        if sets:
            raise ValueError(f"{owner} defines both {method} and {level}_sets; keep one")
        return bind(method) if bind is not None else getattr(problem, method)
    if sets:
        return tree_projection(sets, names, f"{owner}.{level}_sets")
    return None


class VariableWriter:
    """Copies engine variables into a problem's parameters; the parameters are looked up once."""

    def __init__(self, problem: BilevelProblem) -> None:
        lower, upper = levels(problem)
        self.upper = list(upper.named_parameters())
        self.lower = list(lower.named_parameters())

    @torch.no_grad()
    def __call__(self, x: Tree, y: Tree, index: int | None = None) -> None:
        """Write x and y (member ``index`` of stacked trees when given) in place, without autograd."""
        for tree, params in ((x, self.upper), (y, self.lower)):
            for k, p in params:
                p.copy_(tree[k] if index is None else tree[k][index])


def write_back(problem: BilevelProblem, x: Tree, y: Tree) -> None:
    """Copy engine variables into the problem's parameters (in place, no autograd)."""
    VariableWriter(problem)(x, y)
