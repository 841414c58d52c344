"""``Population``: P structurally identical problems run as one, every engine phase under ``torch.func.vmap``.

A population stacks its members' upper and lower parameters (``torch.func.stack_module_state``)
into one engine state whose every tensor has a leading dimension P, and evaluates all members
with the first member's code (``functional_call``) on each member's tensors. Constants of the
members (buffers and parameters outside ``lower``/``upper``, e.g. a task's data) that are equal
across the population are passed once; those that differ are stacked and vmapped too, so
members may be different tasks. Batches are either shared by all members or per member, with a
leading dimension P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_flatten, tree_map

from bilevel.functional import MethodModule, level_projection, levels, write_back
from bilevel.problem import BilevelProblem
from bilevel.validate import check_engine
from hypergrad import Engine, Functions, State
from hypergrad.tree import Tree

BATCH_MODES = ("shared", "per_member")
RANDOMNESS = ("error", "different", "same")
_SIMPLE = (bool, int, float, str, type(None))


class Population(nn.Module):
    """P structurally identical ``BilevelProblem`` instances (different starts, seeds or tasks) run as one.

    Args:
        problems: the members, instances of one class with the same parameter and buffer names,
            shapes and dtypes and the same plain Python attributes (every member is evaluated with
            member 0's code); their tensors may differ.
        batches: "shared" (every member sees the same lower and upper batch) or "per_member"
            (every tensor of a batch has a leading dimension P; member i sees index i).
        randomness: ``torch.func.vmap``'s randomness mode for random ops inside the objectives
            ("error", "different", "same").

    ``bilevel.fit(population, engine, ...)`` trains every member in place and logs each member's
    metrics (``upper_objective/member_07``) next to the population mean. Outside ``fit``::

        state = population.init(engine)                   # every tensor [P, ...]
        state, metrics = population.step(engine, state, (lower_batch, upper_batch))
        population.write_back(engine, state)              # member i's parameters <- state[..][i]
    """

    def __init__(self, problems: Sequence[BilevelProblem], batches: str = "shared", randomness: str = "error") -> None:
        super().__init__()
        if isinstance(problems, BilevelProblem) or not isinstance(problems, Sequence):
            raise TypeError(f"Population takes a list of bilevel.BilevelProblem, got {type(problems).__name__}")
        problems = list(problems)
        if not problems:
            raise ValueError("Population needs at least one problem, got an empty list")
        if batches not in BATCH_MODES:
            raise ValueError(f"Population: batches must be one of {BATCH_MODES}, got {batches!r}")
        if randomness not in RANDOMNESS:
            raise ValueError(f"Population: randomness must be one of {RANDOMNESS}, got {randomness!r}")
        _check_members(problems)
        self.members = nn.ModuleList(problems)
        self.batches = batches
        self.randomness = randomness
        template = problems[0]
        self.name = type(template).__name__
        # Constants are every buffer and every parameter outside the two levels. Buffers under the
        # levels (BatchNorm statistics) change during training and are cloned inside the transform.
        self._level_buffers = {n for n, _ in template.named_buffers() if n.split(".", 1)[0] in ("lower", "upper")}
        names = [n for n, _ in template.named_buffers()]
        names += [n for n, _ in template.named_parameters() if n.split(".", 1)[0] not in ("lower", "upper")]
        self._varying = {n for n in names if n in self._level_buffers or not _equal_across(problems, n)}
        self._shared = [n for n in names if n not in self._varying]
        self._stacked_cache: tuple[Any, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"{len(self)} x {self.name}, batches={self.batches!r}"

    # -- the engine protocol, vmapped ----------------------------------------------------------

    def init(self, engine: Engine, lower_batch: Any = None) -> State:
        """The stacked engine state from the members' current parameters: every tensor [P, ...]."""
        x, _ = stack_module_state([m.upper for m in self.members])
        y, _ = stack_module_state([m.lower for m in self.members])
        x = {k: v.detach() for k, v in x.items()}
        y = {k: v.detach() for k, v in y.items()}

        def init(fns: Functions, x: Tree, y: Tree, batch: Any) -> State:
            return engine.init(fns, x, y, lower_batch=batch)

        return self._vmap(engine, "init", init, (x, y, lower_batch), (0, 0, self._batch_dim(lower_batch, "lower")))

    def step(self, engine: Engine, state: State, batches: tuple[Any, Any]) -> tuple[State, dict[str, Tensor]]:
        """One vmapped ``engine.step`` of every member: (state, metrics), metrics [P] each."""
        dims = self._batch_dims(batches)
        return self._vmap(engine, "step", engine.step, (state, batches), (0, dims))

    def inner(self, engine: Engine, state: State, lower_batch: Any) -> State:
        """The vmapped ``engine.inner``."""
        return self._vmap(engine, "inner", engine.inner, (state, lower_batch),
                          (0, self._batch_dim(lower_batch, "lower")))

    def estimate(self, engine: Engine, state: State,
                 batches: tuple[Any, Any]) -> tuple[State, Tree, dict[str, Tensor]]:
        """The vmapped ``engine.estimate``: (state, hypergradients [P, ...], metrics [P])."""
        return self._vmap(engine, "estimate", engine.estimate, (state, batches), (0, self._batch_dims(batches)))

    def outer(self, engine: Engine, state: State, hypergrad: Tree) -> State:
        """The vmapped ``engine.outer``."""
        return self._vmap(engine, "outer", engine.outer, (state, hypergrad), (0, 0))

    @torch.no_grad()
    def write_back(self, engine: Engine, state: State) -> None:
        """Copy member i's x and y (``engine.lower_solution``) from the stacked state into member i."""
        x, y = state["x"], engine.lower_solution(state)
        for i, member in enumerate(self.members):
            write_back(member, {k: v[i] for k, v in x.items()}, {k: v[i] for k, v in y.items()})

    # -- data, checks, evaluation ---------------------------------------------------------------

    def data(self) -> tuple[Any, Any] | None:
        """Default (lower_data, upper_data) from the members' ``data()``.

        Shared batches: member 0's (full batches of the members must then be equal). Per-member
        batches: the members' full batches (tuples of tensors) stacked along a new dimension 0.
        """
        found = [m.data() for m in self.members]
        if found[0] is None:
            return None
        if self.batches == "shared":
            for i, other in enumerate(found[1:], start=1):
                if _full_batches(found[0]) and not _tree_equal(found[0], other):
                    raise ValueError(
                        f"Population of {self.name}: member {i}'s data() differs from member 0's; every member "
                        "would see member 0's data. Use Population(..., batches='per_member')"
                    )
            return found[0]
        for i, member_data in enumerate(found):
            if not _full_batches(member_data):
                raise ValueError(
                    f"Population of {self.name}: per-member batches from data() need full batches (tuples of "
                    f"tensors) from every member; member {i} gave {type(member_data).__name__}. Pass lower_data "
                    "and upper_data to bilevel.fit with a leading dimension P instead"
                )
        return tuple(tree_map(lambda *leaves: torch.stack(leaves), *[d[level] for d in found]) for level in (0, 1))

    def member_batch(self, batch: Any, index: int) -> Any:
        """Member ``index``'s part of a batch (the batch itself when batches are shared)."""
        if self.batches == "shared" or batch is None:
            return batch
        return tree_map(lambda t: t[index], batch)

    def check(self, engine: Engine, lower_batch: Any, upper_batch: Any) -> Functions:
        """Check the batches' leading dimensions, member 0's objectives and the engine; member 0's functions."""
        self._batch_dims((lower_batch, upper_batch))
        fns, _, _ = self.members[0].to_functions((self.member_batch(lower_batch, 0), self.member_batch(upper_batch, 0)))
        check_engine(fns, engine)
        return fns

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Every member's ``evaluate()``, in member order."""
        return [{k: float(v) for k, v in m.evaluate().items()} for m in self.members]

    # -- internals -------------------------------------------------------------------------------

    def _vmap(self, engine: Engine, phase: str, fn: Callable, args: tuple, dims: tuple) -> Any:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a hypergrad.Engine (e.g. hypergrad.CG(iters=10)), got "
                            f"{type(engine).__name__}")
        constants, constant_dims = self._constants()

        def member(constants: dict[str, Tensor], *args: Any) -> Any:
            return fn(self._functions(constants), *args)

        try:
            return vmap(member, in_dims=(constant_dims, *dims), randomness=self.randomness)(constants, *args)
        except (RuntimeError, ValueError, TypeError) as err:
            if "vmap" not in str(err).lower():
                raise
            raise RuntimeError(
                f"Population of {len(self)} {self.name}: {type(engine).__name__}.{phase} cannot run under "
                f"torch.func.vmap: {err}\nEvery phase of a population step must be pure (no .item(), no Python "
                "branching on tensor values) and return tensors only, metrics included"
            ) from err

    def _constants(self) -> tuple[dict[str, Tensor], dict[str, int | None]]:
        """Member 0's shared constants (unbatched) and the stacked varying ones ([P, ...])."""
        template = self.members[0]
        values = {n: _get(template, n).detach() for n in self._shared}
        dims: dict[str, int | None] = dict.fromkeys(values)
        values.update(self._stacked_constants())
        for n in self._level_buffers:
            values[n] = torch.stack([_get(m, n) for m in self.members])
        dims.update({n: 0 for n in self._varying})
        return values, dims

    def _stacked_constants(self) -> dict[str, Tensor]:
        # Constants that differ per member are stacked once per device and dtype (Lightning moves
        # the module); stacking them on every phase would cost P copies a step.
        names = sorted(self._varying - self._level_buffers)
        if not names:
            return {}
        first = _get(self.members[0], names[0])
        key = (first.device, first.dtype, first.data_ptr())
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            stacked = {n: torch.stack([_get(m, n).detach() for m in self.members]) for n in names}
            self._stacked_cache = (key, stacked)
        return self._stacked_cache[1]

    def _functions(self, constants: dict[str, Tensor]) -> Functions:
        """Member 0's objectives as pure functions of (x, y, batch), reading ``constants`` for its tensors."""
        template = self.members[0]
        fixed = {f"problem.{n}": v for n, v in constants.items() if n not in self._level_buffers}
        level_buffers = {f"problem.{n}": v for n, v in constants.items() if n in self._level_buffers}

        def bind(method: str) -> Callable:
            call = MethodModule(template, method)

            def fn(x: Tree, y: Tree, batch: Any) -> Tensor:
                params = {f"problem.upper.{k}": v for k, v in x.items()}
                params.update({f"problem.lower.{k}": v for k, v in y.items()})
                params.update(fixed)
                # Clones made inside the transform may be updated in place (running statistics).
                params.update({k: b.clone() for k, b in level_buffers.items()})
                return functional_call(call, params, (batch,), strict=False, tie_weights=False)

            return fn

        lower, upper = levels(template)
        return Functions(
            f=bind("upper_objective"),
            g=bind("lower_objective"),
            c=bind("lower_constraints") if template.has_constraints else None,
            project_x=self._projection(template, "upper", [k for k, _ in upper.named_parameters()], fixed),
            project_y=self._projection(template, "lower", [k for k, _ in lower.named_parameters()], fixed),
            name=f"Population of {self.name}",
        )

    @staticmethod
    def _projection(template: BilevelProblem, level: str, names: list[str],
                    fixed: dict[str, Tensor]) -> Callable[[Tree], Tree] | None:
        projection = level_projection(template, level, names)
        if projection is None or not callable(getattr(template, f"project_{level}", None)):
            return projection
        # A project_<level> method may read the member's constants (a radius buffer): call it functionally.
        call = MethodModule(template, f"project_{level}")
        return lambda tree: functional_call(call, fixed, (tree,), strict=False, tie_weights=False)

    def _batch_dim(self, batch: Any, level: str) -> int | None:
        if self.batches == "shared" or batch is None:
            return None
        leaves, _ = tree_flatten(batch)
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != len(self):
                what = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(
                    f"Population of {len(self)} {self.name} with per-member batches: every entry of the {level} "
                    f"batch must be a tensor with a leading dimension {len(self)}, got {what}"
                )
        return 0

    def _batch_dims(self, batches: tuple[Any, Any]) -> tuple[int | None, int | None]:
        return self._batch_dim(batches[0], "lower"), self._batch_dim(batches[1], "upper")


def _get(module: nn.Module, name: str) -> Tensor:
    """The buffer or parameter ``name`` (dotted) of ``module``."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _equal_across(problems: list[BilevelProblem], name: str) -> bool:
    first = _get(problems[0], name)
    return all(torch.equal(first, _get(p, name)) for p in problems[1:])


def _check_members(problems: list[BilevelProblem]) -> None:
    """Raise naming the first member and entry that differs from member 0 in structure."""
    template = problems[0]
    cls = type(template)
    seen = {id(template): 0}
    for i, problem in enumerate(problems):
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"Population: member {i} must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        if i == 0:
            levels(problem)
            continue
        if id(problem) in seen:
            raise ValueError(f"Population: member {i} is the same object as member {seen[id(problem)]}; each member "
                             "must be its own problem (copy.deepcopy it)")
        seen[id(problem)] = i
        where = f"Population: member {i} ({type(problem).__name__})"
        if type(problem) is not cls:
            raise ValueError(f"{where} is not a {cls.__name__} like member 0: members must be instances of one class")
        for kind in ("parameter", "buffer"):
            ours = {n: (tuple(t.shape), t.dtype) for n, t in getattr(template, f"named_{kind}s")()}
            theirs = {n: (tuple(t.shape), t.dtype) for n, t in getattr(problem, f"named_{kind}s")()}
            for name in [*ours, *theirs]:
                if ours.get(name) != theirs.get(name):
                    raise ValueError(f"{where} differs from member 0 in {kind} '{name}': "
                                     f"{_describe(theirs.get(name))} vs {_describe(ours.get(name))} in member 0")
        modules = zip(template.named_modules(), problem.named_modules(), strict=False)
        for (path, ours_module), (_, their_module) in modules:
            if type(ours_module) is not type(their_module):
                raise ValueError(f"{where} differs from member 0 in submodule '{path}': "
                                 f"{type(their_module).__name__} vs {type(ours_module).__name__}")
            for key, ours_value in vars(ours_module).items():
                their_value = vars(their_module).get(key)
                if key.startswith("_") or not _simple(ours_value):
                    continue
                if ours_value != their_value:
                    attr = f"{path}.{key}" if path else key
                    raise ValueError(
                        f"{where} differs from member 0 in attribute '{attr}': {their_value!r} vs {ours_value!r}. "
                        "Every member is evaluated with member 0's code and plain attributes; only tensors "
                        "(parameters, buffers) may differ"
                    )


def _simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _describe(entry: tuple | None) -> str:
    return "absent" if entry is None else f"shape {entry[0]}, {entry[1]}"


def _full_batches(data: Any) -> bool:
    """Whether ``data`` is (lower, upper) of tuples of tensors: full batches that can be compared or stacked."""
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(d, tuple) and all(isinstance(t, Tensor) for t in d) for d in data))


def _tree_equal(a: Any, b: Any) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    return all(torch.equal(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(leaves_a, leaves_b, strict=True))
