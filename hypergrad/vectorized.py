"""``VmappedEngine``: an engine whose phases run under ``torch.func.vmap`` over the members of a population.

Like ``CompiledEngine`` it wraps an engine behind the same protocol, so a caller that steps an engine
steps a population the same way and nothing downstream branches on vectorization. The state is
the wrapped engine's with a leading member dimension P on every tensor. Each member runs the
wrapped engine on its own functions: ``Members.member_functions`` rebinds one problem's code to a
member's constants (its data, its buffers), which enter the vmap batched where they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor
from torch.func import vmap

from hypergrad.engine import Batches, Engine, Functions, Metrics, State
from hypergrad.tree import Tree

Constants = dict[str, Tensor]


class Members(Protocol):
    """What a vmapped engine needs from a population of P problems (``bilevel.Population`` has it)."""

    @property
    def label(self) -> str:
        """Names the population in error messages (``Population of 3 Ridge``)."""
        ...

    randomness: str
    """``torch.func.vmap``'s randomness mode for the members' objectives."""

    def member_constants(self) -> tuple[Constants, dict[str, int | None]]:
        """The members' constants by name and their vmap dimension (0: stacked [P, ...], None: shared)."""
        ...

    def member_functions(self, constants: Constants) -> Functions:
        """One member's functions, reading that member's ``constants`` (one entry of each stacked tensor)."""
        ...

    def batch_dim(self, batch: Any, level: str) -> int | None:
        """The vmap dimension of a batch of ``level`` ("lower", "upper"): 0 per member, None shared."""
        ...


class VmappedEngine(Engine):
    """``engine`` run on every member of a population at once: each phase is one ``torch.func.vmap``.

    ``init`` takes stacked x and y ([P, ...] leaves) and returns the stacked state; ``step``,
    ``inner``, ``estimate`` and ``outer`` return states, hypergradients and metrics with a leading
    dimension P. The ``fns`` they take are the population's template functions (member 0's), used
    for the capability checks; each member evaluates its own (``Members.member_functions``).
    Hyperparameters and capability flags read through to the wrapped engine.
    """

    def __init__(self, engine: Engine, members: Members) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a hypergrad.Engine (e.g. hypergrad.CG(iters=10)), got "
                            f"{type(engine).__name__}")
        self.engine = engine
        self.members = members
        self.supports_constraints = engine.supports_constraints
        self.supports_lower_set = engine.supports_lower_set
        self.supports_lower_step = engine.supports_lower_step
        self.supports_lower_start = engine.supports_lower_start

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the wrapped engine's hyperparameters.
        if name in ("engine", "members"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __repr__(self) -> str:
        return f"VmappedEngine({self.engine!r})"

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> State:
        """The stacked initial state from stacked x and y."""
        self.engine.check_functions(fns)

        def init(member: Functions, x: Tree, y: Tree, batch: Any) -> State:
            return self.engine.init(member, x, y, lower_batch=batch)

        return self._vmap("init", init, (x, y, lower_batch), (0, 0, self.members.batch_dim(lower_batch, "lower")))

    def step(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Metrics]:
        return self._vmap("step", self.engine.step, (state, batches), (0, self._batch_dims(batches)))

    def inner(self, fns: Functions, state: State, lower_batch: Any) -> State:
        return self._vmap("inner", self.engine.inner, (state, lower_batch),
                          (0, self.members.batch_dim(lower_batch, "lower")))

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        return self._vmap("estimate", self.engine.estimate, (state, batches), (0, self._batch_dims(batches)))

    def outer(self, fns: Functions, state: State, hypergrad: Tree) -> State:
        return self._vmap("outer", self.engine.outer, (state, hypergrad), (0, 0))

    def lower_solution(self, state: State) -> Tree:
        """The wrapped engine's choice of entries, stacked."""
        return self.engine.lower_solution(state)

    def check_functions(self, fns: Functions) -> None:
        self.engine.check_functions(fns)

    def _batch_dims(self, batches: Batches) -> tuple[int | None, int | None]:
        return self.members.batch_dim(batches[0], "lower"), self.members.batch_dim(batches[1], "upper")

    def _vmap(self, phase: str, fn: Callable[..., Any], args: tuple, dims: tuple) -> Any:
        constants, constant_dims = self.members.member_constants()

        def member(constants: Constants, *args: Any) -> Any:
            return fn(self.members.member_functions(constants), *args)

        try:
            return vmap(member, in_dims=(constant_dims, *dims), randomness=self.members.randomness)(constants, *args)
        except (RuntimeError, ValueError, TypeError) as err:
            if "vmap" not in str(err).lower():
                raise
            engine = type(self.engine).__name__
            raise RuntimeError(
                f"{self.members.label}: {engine}.{phase} cannot run under torch.func.vmap: {err}\n"
                "Every phase of a population step must be pure (no .item(), no Python branching on tensor values) "
                "and return tensors only, metrics included"
            ) from err
