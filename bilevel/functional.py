"""Turn a BilevelProblem into pure functions f(x, y, batch), g(x, y, batch) with functional_call."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.validate import check_objectives
from hypergrad import Functions
from hypergrad.sets import tree_projection
from hypergrad.tree import Tree

if TYPE_CHECKING:
    from bilevel.problem import BilevelProblem


class MethodModule(nn.Module):
    """Calls one method of the problem as ``forward`` so ``functional_call`` can swap its parameters."""

    def __init__(self, problem: nn.Module, method: str) -> None:
        super().__init__()
        self.problem = problem
        self.method = method

    def forward(self, batch: Any) -> Tensor:
        return getattr(self.problem, self.method)(batch)


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


def problem_functions(
    problem: BilevelProblem, batches: tuple[Any, Any] | None = None
) -> tuple[Functions, Tree, Tree]:
    """Pure (f, g, c) of the problem, and detached copies of its current x and y.

    x and y are keyed as in ``problem.upper.named_parameters()`` / ``problem.lower.named_parameters()``.
    Buffers under ``lower``/``upper`` are passed as fresh clones on each call, so in-place updates
    (BatchNorm running stats) act on tensors created inside the transform instead of failing.
    """
    lower, upper = levels(problem)
    x = {k: p.detach().clone() for k, p in upper.named_parameters()}
    y = {k: p.detach().clone() for k, p in lower.named_parameters()}
    # Buffers of the two levels (BatchNorm statistics) may be updated in place by a forward pass:
    # they are passed as clones made inside the transform, which may be mutated, where a captured
    # tensor may not. Other buffers (data the problem holds) are read-only constants, not copied.
    level_buffers = {
        f"{level}.{k}": b for level, module in (("lower", lower), ("upper", upper)) for k, b in module.named_buffers()
    }

    def bind(method: str):
        call = MethodModule(problem, method)

        def fn(x: Tree, y: Tree, batch: Any) -> Tensor:
            params = {f"problem.upper.{k}": v for k, v in x.items()}
            params.update({f"problem.lower.{k}": v for k, v in y.items()})
            params.update({f"problem.{k}": b.clone() for k, b in level_buffers.items()})
            return functional_call(call, params, (batch,), strict=False, tie_weights=False)

        fn.__qualname__ = f"{type(problem).__name__}.{method}"
        return fn

    fns = Functions(
        f=bind("upper_objective"),
        g=bind("lower_objective"),
        c=bind("lower_constraints") if problem.has_constraints else None,
        project_x=level_projection(problem, "upper", list(x)),
        project_y=level_projection(problem, "lower", list(y)),
        name=type(problem).__name__,
        **_lower_dynamics(problem, bind),
    )
    if batches is not None:
        check_objectives(fns, x, y, *batches)
    return fns, x, y


def _lower_dynamics(problem: BilevelProblem, bind: Callable) -> dict[str, Callable]:
    """The optional hooks ``lower_step(x, y, grad_y, lower_state, t)``, ``init_lower_state(y)`` (pure
    methods of explicit trees, passed as they are) and ``upper_metrics(batch)`` (bound like the
    objectives), as ``Functions`` fields; see ``hypergrad.dynamics``."""
    hooks = {}
    for name in ("lower_step", "init_lower_state"):
        method = getattr(problem, name, None)
        if callable(method):
            hooks[name] = method
    if callable(getattr(problem, "upper_metrics", None)):
        hooks["upper_metrics"] = bind("upper_metrics")
    return hooks


def level_projection(problem: BilevelProblem, level: str, names: list[str]) -> Callable[[Tree], Tree] | None:
    """The projection onto a level's set: the ``project_<level>`` method, else ``<level>_sets``, else None."""
    method = getattr(problem, f"project_{level}", None)
    sets = getattr(problem, f"{level}_sets", None)
    owner = type(problem).__name__
    if callable(method):
        if sets:
            raise ValueError(f"{owner} defines both project_{level} and {level}_sets; keep one")
        return method
    if sets:
        return tree_projection(sets, names, f"{owner}.{level}_sets")
    return None


@torch.no_grad()
def write_back(problem: BilevelProblem, x: Tree, y: Tree) -> None:
    """Copy engine variables into the problem's parameters (in place, no autograd)."""
    lower, upper = levels(problem)
    for tree, module in ((x, upper), (y, lower)):
        for k, p in module.named_parameters():
            p.copy_(tree[k])
