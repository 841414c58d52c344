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

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.func import stack_module_state
from torch.utils._pytree import tree_flatten, tree_map

from bilevel.functional import Binding, VariableWriter, levels
from bilevel.problem import BilevelProblem
from bilevel.validate import check_engine, check_objectives
from hypergrad import Engine, Functions, State
from hypergrad.tree import Tree
from hypergrad.vectorized import VmappedEngine

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

    which is the engine protocol with a vmapped engine: ``fns, x, y = population.to_functions()``
    gives member 0's functions (bound exactly as a single problem's) and the stacked x and y, and
    ``population.engine_for(engine)`` the engine whose every phase is one ``torch.func.vmap`` over
    the members (``hypergrad.VmappedEngine``), each member evaluating its own functions.
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
        self._problems: list[BilevelProblem] = problems  # the same modules, typed (ModuleList items are nn.Module)
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
        self._writers = [VariableWriter(m) for m in problems]
        self._binding = Binding(problems[0], self._level_buffers, self.title)

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"{len(self)} x {self.name}, batches={self.batches!r}"

    @property
    def label(self) -> str:
        """``Population of 3 Ridge`` (for messages)."""
        return f"Population of {len(self)} {self.name}"

    @property
    def title(self) -> str:
        """``Population of Ridge`` (for messages and tables)."""
        return f"Population of {self.name}"

    # -- the engine protocol, vmapped (hypergrad.VmappedEngine) ---------------------------------

    def engine_for(self, engine: Engine) -> VmappedEngine:
        """``engine`` run on every member at once: each phase one ``torch.func.vmap`` over the members."""
        return VmappedEngine(engine, self)

    def init(self, engine: Engine, lower_batch: Any = None) -> State:
        """The stacked engine state from the members' current parameters: every tensor [P, ...]."""
        fns, x, y = self.to_functions()
        return self.engine_for(engine).init(fns, x, y, lower_batch=lower_batch)

    def step(self, engine: Engine, state: State, batches: tuple[Any, Any]) -> tuple[State, dict[str, Tensor]]:
        """One vmapped ``engine.step`` of every member: (state, metrics), metrics [P] each."""
        return self.engine_for(engine).step(self._template_functions(), state, batches)

    @torch.no_grad()
    def write_back(self, engine: Engine, state: State) -> None:
        """Copy member i's x and y (``engine.lower_solution``) from the stacked state into member i."""
        self.assign(state["x"], engine.lower_solution(state))

    def assign(self, x: Tree, y: Tree) -> None:
        """Member i's parameters <- entry i of the stacked x and y."""
        for i, writer in enumerate(self._writers):
            writer(x, y, index=i)

    # -- one binding of the problem's code, per member ------------------------------------------

    def to_functions(self, batches: tuple[Any, Any] | None = None) -> tuple[Functions, Tree, Tree]:
        """(member 0's Functions, stacked x, stacked y), every leaf of x and y [P, ...].

        The functions are those of a single problem (``bilevel.functional.Binding``) reading
        member 0's constants; the vmapped engine rebinds them to each member's. With ``batches``
        they are checked on member 0's part of them first.
        """
        x, _ = stack_module_state([m.upper for m in self._problems])
        y, _ = stack_module_state([m.lower for m in self._problems])
        x = {k: v.detach() for k, v in x.items()}
        y = {k: v.detach() for k, v in y.items()}
        fns = self._template_functions()
        if batches is not None:
            self._batch_dims(batches)
            check_objectives(fns, {k: v[0] for k, v in x.items()}, {k: v[0] for k, v in y.items()},
                             self.member_batch(batches[0], 0), self.member_batch(batches[1], 0))
        return fns, x, y

    def member_functions(self, constants: dict[str, Tensor]) -> Functions:
        """Member 0's code as pure functions, reading ``constants`` (one member's) for its tensors."""
        return self._binding.functions(constants)

    def member_constants(self) -> tuple[dict[str, Tensor], dict[str, int | None]]:
        """Member 0's shared constants (unbatched) and the stacked varying ones ([P, ...]), with their vmap dims."""
        template = self._problems[0]
        values = {n: _get(template, n).detach() for n in self._shared}
        dims: dict[str, int | None] = dict.fromkeys(values)
        values.update(self._stacked_constants())
        for n in self._level_buffers:
            values[n] = torch.stack([_get(m, n) for m in self._problems])
        dims.update({n: 0 for n in self._varying})
        return values, dims

    def _template_functions(self) -> Functions:
        return self.member_functions({n: _get(self._problems[0], n) for n in [*self._shared, *self._varying]})

    # -- data, checks, evaluation ---------------------------------------------------------------

    def data(self) -> tuple[Any, Any] | None:
        """Default (lower_data, upper_data) from the members' ``data()``.

        Shared batches: member 0's (full batches of the members must then be equal). Per-member
        batches: the members' full batches (tuples of tensors) stacked along a new dimension 0.
        """
        found = [m.data() for m in self._problems]
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
        lower, upper = (tree_map(lambda *leaves: torch.stack(leaves), *[d[level] for d in found if d is not None])
                        for level in (0, 1))
        return lower, upper

    def member_batch(self, batch: Any, index: int) -> Any:
        """Member ``index``'s part of a batch (the batch itself when batches are shared)."""
        if self.batches == "shared" or batch is None:
            return batch
        return tree_map(lambda t: t[index], batch)

    def check(self, engine: Engine, lower_batch: Any, upper_batch: Any) -> Functions:
        """Check the batches' leading dimensions, member 0's objectives and the engine; member 0's functions."""
        fns, _, _ = self.to_functions((lower_batch, upper_batch))
        check_engine(fns, engine)
        return fns

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Every member's ``evaluate()``, in member order."""
        return [{k: float(v) for k, v in m.evaluate().items()} for m in self._problems]

    # -- the rest of the loop's interface (bilevel.trainable) -----------------------------------

    is_population = True

    @property
    def init_arguments(self) -> dict[str, Any]:
        """Member 0's arguments and the population's own."""
        return {**self._problems[0].init_arguments, "members": len(self), "batches": self.batches}

    @torch.no_grad()
    def refresh_statistics(self, lower_batch: Any) -> None:
        """One forward of g per member at its new parameters, when the levels hold running statistics."""
        if self._level_buffers and self.training:
            for i, member in enumerate(self._problems):
                member.lower_objective(self.member_batch(lower_batch, i))

    def named_metrics(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each metric [P] as its mean under ``name`` and member i's value under ``name/member_i``."""
        named = {}
        for name, value in metrics.items():
            named[name] = (value if value.is_floating_point() else value.double()).mean()
            for i, member_value in enumerate(value.unbind(0)):
                named[f"{name}/{member_name(i, value.shape[0])}"] = member_value
        return named

    def finish(self) -> dict[str, float]:
        """Every member's ``evaluate()``: the mean and each member's value, printed as one table."""
        size = len(self)
        per_member = self.evaluate()
        names = list(dict.fromkeys(k for metrics in per_member for k in metrics))
        if not names:
            return {}
        final = {k: sum(m[k] for m in per_member if k in m) / sum(k in m for m in per_member) for k in names}
        final.update({f"{k}/{member_name(i, size)}": m[k] for i, m in enumerate(per_member) for k in m})
        _print_member_table(f"Population of {size} {self.name}", names, per_member)
        return final

    def step_parameters(self) -> Iterator[nn.Parameter]:
        return self._problems[0].upper.parameters()

    @property
    def can_validate_batches(self) -> bool:
        return callable(getattr(self._problems[0], "validation_step", None))

    def validation_data(self) -> Any:
        hook = getattr(self._problems[0], "validation_data", None)
        return hook() if callable(hook) else None

    def validate(self, batch: Any) -> dict[str, Any]:
        """Each member's ``validation_step`` on its part of the batch (or ``evaluate()``): means and per member."""
        if batch is None:
            per_member = [m.evaluate() for m in self._problems]
        else:
            per_member = [m.validation_step(self.member_batch(batch, i))  # type: ignore[operator]
                          for i, m in enumerate(self._problems)]
        names = per_member[0].keys()
        return self.named_metrics({k: torch.stack([torch.as_tensor(m[k], dtype=torch.float64) for m in per_member])
                                   for k in names})

    def parameter_views(self, x: Tree, y: Tree) -> dict[str, Tensor]:
        """Member i's entries as views of entry i of the stacked x and y."""
        return {f"members.{i}.{level}.{k}": v[i] for i in range(len(self))
                for level, tree in (("upper", x), ("lower", y)) for k, v in tree.items()}

    # -- internals -------------------------------------------------------------------------------

    def _stacked_constants(self) -> dict[str, Tensor]:
        # Constants that differ per member are stacked once per device and dtype (Lightning moves
        # the module); stacking them on every phase would cost P copies a step.
        names = sorted(self._varying - self._level_buffers)
        if not names:
            return {}
        first = _get(self._problems[0], names[0])
        key = (first.device, first.dtype, first.data_ptr())
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            stacked = {n: torch.stack([_get(m, n).detach() for m in self._problems]) for n in names}
            self._stacked_cache = (key, stacked)
        return self._stacked_cache[1]

    def batch_dim(self, batch: Any, level: str) -> int | None:
        """0 for per-member batches (checked: every tensor [P, ...]), None for shared ones."""
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
        return self.batch_dim(batches[0], "lower"), self.batch_dim(batches[1], "upper")


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


def member_name(index: int, size: int) -> str:
    """``member_07``: the index zero-padded to the width of the largest index (at least two digits)."""
    return f"member_{index:0{max(2, len(str(size - 1)))}d}"


@rank_zero_only
def _print_member_table(title: str, names: list[str], per_member: list[dict[str, float]]) -> None:
    rows = [(member_name(i, len(per_member)), m) for i, m in enumerate(per_member)]
    mean = {k: sum(m[k] for m in per_member if k in m) / max(1, sum(k in m for m in per_member)) for k in names}
    width = max(len(rows[-1][0]), 4)
    print(f"\n{title}: final metrics")
    print(f"  {'':<{width}}  " + "  ".join(f"{k:>12}" for k in names))
    for label, metrics in [*rows, ("mean", mean)]:
        cells = (f"{metrics[k]:>12.4g}" if k in metrics else f"{'-':>12}" for k in names)
        print(f"  {label:<{width}}  " + "  ".join(cells))
