"""``torch.compile`` for engines: ``compile_engine(engine)`` is an engine whose phases run compiled.

The engines are written for it (``hypergrad.engine``): pure phases, no ``.item()``, no Python
branching on tensor values (BO-REP's data-dependent lower update is the ``cond`` operator), so
dynamo captures ``step``, ``inner``, ``estimate`` and ``outer`` of every engine as one graph each,
torch.func transforms included (measured in ``experiments/results/speed/compile.md``).

Solver loops: ``hypergrad.solvers`` runs CG's and Neumann's iterations through ``hypergrad.loops.fori_loop``,
which under compile is torch's ``while_loop`` op (one traced body, so compile time does not grow with the
iterations) when the solver's ``matvec`` is marked loop-safe (``loops.mark_loop_safe``: it closes over no
``torch.func`` pullback built outside the loop, which torch 2.13 cannot carry into a loop body), and the
unrolled Python loop otherwise. ``compile_engine(engine, fold_loops=True)`` asks for it, and then
``kernels.hvp_operator`` gives such a matvec (off by default: see ``CompiledEngine``). Eagerly it is always
the Python loop, bit for bit (``experiments/results/speed/compile_k.md``). The inner descent loops stay
unrolled.

Python-side branching (on hyperparameters such as ``Unrolled.truncate``, or on the problem's
structure such as ``fns.project_x is None``) is specialized at compile time and guarded: an engine
with other hyperparameters (engines are frozen: another instance) or other ``Functions`` recompiles,
it never reuses a stale graph.
Shapes are static by default (``dynamic=False``): a batch of a new shape (the short last batch of an
epoch) compiles once more instead of making every graph shape-generic; dynamo stops recompiling
after ``torch._dynamo.config.recompile_limit`` variants of one function and runs it eagerly.

Under a process group (``hypergrad.distributed``) the all-reduces are functional collectives, captured
in the graph with no break (measured for CG, F2SA, BO-REP and LV-HBA with backend "aot_eager": no
break, the same numbers as eager). Three engines average over ranks inside a ``torch.func`` transform,
which torch 2.13 does not compile correctly: Exact (its dense solve vmaps the HVPs: the compiled
collective under vmap returned wrong numbers), PES (its particles are vmapped: wrong numbers) and
Unrolled (the reverse pass through the averaged lower steps: tracing fails). Their ``step`` and
``estimate`` refuse to run compiled under more than one rank (``UNCOMPILABLE_UNDER_RANKS``); the
other phases and one rank are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hypergrad import distributed, loops
from hypergrad.engine import Batches, Engine, Functions, Metrics, State
from hypergrad.exact import Exact
from hypergrad.pes import PES
from hypergrad.tree import Tree
from hypergrad.unrolled import Unrolled

UNCOMPILABLE_UNDER_RANKS: dict[type[Engine], str] = {
    Exact: "its dense solve averages the HVPs over ranks inside torch.func.vmap",
    PES: "its particles' lower steps average over ranks inside torch.func.vmap",
    Unrolled: "its reverse pass averages the adjoints over ranks inside torch.func.vjp",
}
"""Engines whose ``step``/``estimate`` reduce over ranks inside a torch.func transform, and where."""

PHASES = ("step", "inner", "estimate", "outer")
"""The methods that run compiled; ``init``, ``lower_solution`` and the checks stay eager (once per run)."""

DEFAULTS: dict[str, Any] = {"dynamic": False, "fullgraph": False}
"""``torch.compile`` options unless the caller overrides them. ``fullgraph=False``: a graph break in
the problem's own objectives (an op dynamo cannot trace) costs speed, not the run; pass
``fullgraph=True`` to make any break an error (the engines themselves have none)."""


class CompiledEngine(Engine[Any]):
    """An engine whose ``step``, ``inner``, ``estimate`` and ``outer`` run through ``torch.compile``.

    Same protocol and same state as the wrapped engine, so callers that run the phases one by one
    (the Lightning module) or ``step`` whole work unchanged. Hyperparameters and capability flags
    read through to the wrapped engine (``compiled.inner_steps``, ``compiled.supports_constraints``).
    ``step`` is compiled as one graph of its own (not as the three compiled phases), so a caller
    that only calls ``step`` compiles one graph, and one that only calls the phases compiles three;
    each compiles on first call.

    Args:
        engine: the engine to compile (any ``hypergrad.Engine``; a ``CompiledEngine`` is unwrapped).
        fold_loops: compile the solvers' loops to one ``while_loop`` op each (``hypergrad.loops``), the HVP
            recomputed inside the body (``kernels.hvp_operator``), so compile time stays nearly flat in the
            iterations (``experiments/results/speed/compile_k.md``). Off by default: torch 2.13 refuses
            objectives with side effects inside a loop body (BatchNorm's running statistics in training
            mode) with a hard error, and the recomputed product costs one forward of g per iteration.
        **options: ``torch.compile`` keyword arguments, over ``DEFAULTS`` (``dynamic=False``,
            ``fullgraph=False``), e.g. ``backend="aot_eager"``, ``mode="max-autotune"``.
    """

    def __init__(self, engine: Engine, fold_loops: bool = False, **options: Any) -> None:
        if isinstance(engine, CompiledEngine):
            options = {**engine.options, **options}
            engine = engine.engine
        if not isinstance(engine, Engine):
            raise TypeError(
                f"compile_engine: engine must be a hypergrad.Engine (e.g. hypergrad.CG(iters=10)), "
                f"got {type(engine).__name__}"
            )
        super().__init__()
        # Instance attributes, not properties: ``Engine.check_functions`` lists able engines by class attribute.
        self.engine: Engine = engine
        self.options: dict[str, Any] = {**DEFAULTS, **options}
        self.fold_loops = bool(fold_loops)
        self.supports_constraints = engine.supports_constraints
        self.supports_lower_set = engine.supports_lower_set
        self.supports_lower_step = engine.supports_lower_step
        self.supports_lower_start = engine.supports_lower_start
        self._compiled: dict[str, Callable[..., Any]] = {
            name: torch.compile(getattr(engine, name), **self.options) for name in PHASES
        }

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the wrapped engine's hyperparameters and helpers.
        if name in ("engine", "options", "_compiled", "fold_loops"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __getstate__(self) -> dict[str, Any]:
        # Compiled functions do not pickle: keep what rebuilds them (checkpoints, deepcopy, spawn).
        return {"engine": self.engine, "options": self.options, "fold_loops": self.fold_loops}

    def __setstate__(self, state: dict[str, Any]) -> None:
        CompiledEngine.__init__(self, state["engine"], state.get("fold_loops", False), **state["options"])

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        options += ", fold_loops=True" if self.fold_loops else ""
        return f"compile_engine({self.engine!r}{options})"

    # -- compiled: the per-step work -----------------------------------------------------------

    def step(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Metrics]:
        """The wrapped engine's ``step``, compiled as one graph."""
        self._check_ranks("step")
        with loops.fold_loops(self.fold_loops):
            return self._compiled["step"](fns, state, batches)

    def inner(self, fns: Functions, state: State, lower_batch: Any) -> State:
        """The wrapped engine's ``inner``, compiled."""
        with loops.fold_loops(self.fold_loops):
            return self._compiled["inner"](fns, state, lower_batch)

    def estimate(self, fns: Functions, state: State, batches: Batches) -> tuple[State, Tree, Metrics]:
        """The wrapped engine's ``estimate``, compiled."""
        self._check_ranks("estimate")
        with loops.fold_loops(self.fold_loops):
            return self._compiled["estimate"](fns, state, batches)

    def outer(self, fns: Functions, state: State, hypergrad: Tree) -> State:
        """The wrapped engine's ``outer``, compiled."""
        with loops.fold_loops(self.fold_loops):
            return self._compiled["outer"](fns, state, hypergrad)

    def _check_ranks(self, phase: str) -> None:
        """Refuse a phase torch.compile would get wrong under a process group (``UNCOMPILABLE_UNDER_RANKS``)."""
        if distributed.world_size() == 1:
            return
        for cls, where in UNCOMPILABLE_UNDER_RANKS.items():
            if isinstance(self.engine, cls):
                raise RuntimeError(
                    f"compile_engine: {type(self.engine).__name__}.{phase} cannot run compiled under "
                    f"{distributed.world_size()} ranks: {where}, which torch.compile does not capture correctly "
                    f"in this torch version. Run {type(self.engine).__name__} uncompiled under a process group."
                )

    # -- eager: once per run -------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> State:
        """The wrapped engine's ``init`` (eager: it runs once and checks the problem)."""
        return self.engine.init(fns, x, y, lower_batch=lower_batch)

    def lower_solution(self, state: State) -> Tree:
        """The wrapped engine's ``lower_solution``."""
        return self.engine.lower_solution(state)

    def check_functions(self, fns: Functions) -> None:
        """The wrapped engine's refusals (constraints, lower sets, lower dynamics)."""
        self.engine.check_functions(fns)


def compile_engine(engine: Engine, fold_loops: bool = False, **options: Any) -> CompiledEngine:
    """``engine`` with its phases compiled by ``torch.compile(**options)`` (see ``CompiledEngine``).

    Example::

        engine = compile_engine(hypergrad.CG(iters=10))        # dynamic=False, fullgraph=False
        state = engine.init(fns, x, y)
        state, metrics = engine.step(fns, state, batches)     # compiles on this first call
    """
    return CompiledEngine(engine, fold_loops, **options)


def graph_breaks(engine: Engine, fns: Functions, state: State, batches: Batches,
                 phase: str = "step") -> list[str]:
    """The graph breaks dynamo meets in ``engine.<phase>(fns, state, batches)``: one line per break, cause first.

    Traces (does not compile) with ``torch._dynamo.explain``; empty when the phase is one graph.
    ``phase`` is one of ``PHASES``; for "inner" pass the lower batch as ``batches``, for "outer" the
    hypergradient. Resets dynamo's caches first so earlier compilations do not hide a break.
    """
    if isinstance(engine, CompiledEngine):
        engine = engine.engine
    if phase not in PHASES:
        raise ValueError(f"graph_breaks: phase must be one of {', '.join(PHASES)}, got {phase!r}")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(getattr(engine, phase))(fns, state, batches)
    breaks = []
    for item in explanation.break_reasons:
        where = item.user_stack[-1] if item.user_stack else None
        at = f" (at {where.filename}:{where.lineno})" if where is not None else ""
        breaks.append(" ".join(str(item.reason).split()) + at)
    return breaks
