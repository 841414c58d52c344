"""``hypergrad.compile``: compiled engines equal eager ones, the IFT engines are one graph, bad input is refused.

Compilation costs seconds per graph on CPU, so the problem is P1 (closed form, float64) and the
engines run few inner steps and solver iterations; the compiled steps are also held to P1's closed
forms after a few steps, so equality with eager is not equality of two wrong answers.
"""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch.utils._pytree import tree_leaves

import hypergrad
from hypergrad.compile import CompiledEngine, compile_engine, graph_breaks
from problems.reference import QuadraticP1

ENGINES = {
    "Exact": lambda: hypergrad.Exact(inner_steps=2, inner_lr=0.2, outer_lr=0.05, outer_optimizer="sgd"),
    "Neumann": lambda: hypergrad.Neumann(terms=3, inner_steps=2, inner_lr=0.2, outer_lr=0.05, outer_optimizer="sgd"),
    "CG": lambda: hypergrad.CG(iters=2, inner_steps=2, inner_lr=0.2, outer_lr=0.05),
    "Unrolled": lambda: hypergrad.Unrolled(inner_steps=3, truncate=2, inner_lr=0.2, outer_lr=0.05),
}
IFT = ("Exact", "Neumann", "CG")


@pytest.fixture(scope="module")
def p1():
    problem = QuadraticP1()
    fns, x, y = problem.to_functions()
    return problem, fns, x, y, problem.data()


@pytest.mark.parametrize("name", list(ENGINES))
def test_compiled_step_equals_eager(p1, name: str) -> None:
    problem, fns, x, y, batches = p1
    engine = ENGINES[name]()
    # The IFT engines must compile whole (fullgraph=True raises at the first break); Unrolled as fit would.
    compiled = compile_engine(engine, fullgraph=name in IFT)
    eager_state = compiled_state = engine.init(fns, x, y)
    for _ in range(3):
        eager_state, eager_metrics = engine.step(fns, eager_state, batches)
        compiled_state, compiled_metrics = compiled.step(fns, compiled_state, batches)
    eager_leaves, compiled_leaves = tree_leaves((eager_state, eager_metrics)), tree_leaves((compiled_state,
                                                                                           compiled_metrics))
    assert len(eager_leaves) == len(compiled_leaves)
    for a, b in zip(eager_leaves, compiled_leaves, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    if name == "Exact":
        # The phases compiled one by one (as the Lightning module runs them) give P1's closed form at
        # y = y*(x); aot_eager keeps dynamo's and AOTAutograd's capture but skips code generation (time).
        problem.lower_to_solution()
        _, x_star, y_star = problem.to_functions()
        exact = compile_engine(hypergrad.Exact(inner_steps=0), fullgraph=True, backend="aot_eager")
        state = exact.inner(fns, exact.init(fns, x_star, y_star), batches[0])
        _, hypergrad_, _ = exact.estimate(fns, state, batches)
        torch.testing.assert_close(hypergrad_["x"], problem.hypergradient(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", IFT)
def test_ift_engines_have_no_graph_breaks(p1, name: str) -> None:
    _, fns, x, y, batches = p1
    engine = ENGINES[name]()
    state = engine.init(fns, x, y)
    assert graph_breaks(engine, fns, state, batches) == []
    explanation = torch._dynamo.explain(lambda s: engine.step(fns, s, batches))(state)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)


def test_a_graph_break_is_found_and_named(p1) -> None:
    _, fns, x, y, batches = p1

    def breaking_g(x, y, batch):
        torch._dynamo.graph_break()
        return fns.g(x, y, batch)

    engine = hypergrad.Neumann(terms=1, inner_steps=0)
    broken = type(fns)(f=fns.f, g=breaking_g, name="broken")
    breaks = graph_breaks(engine, broken, engine.init(broken, x, y), batches)
    assert breaks and any("graph_break" in b for b in breaks)


def test_wrapper_is_an_engine_that_reads_through(p1) -> None:
    _, fns, x, y, _ = p1
    engine = hypergrad.CG(iters=4, inner_steps=3)
    compiled = compile_engine(engine, backend="eager")
    assert isinstance(compiled, hypergrad.Engine) and isinstance(compiled, CompiledEngine)
    assert (compiled.iters, compiled.inner_steps, compiled.supports_constraints) == (4, 3, False)
    assert compiled.options == {"dynamic": False, "fullgraph": False, "backend": "eager"}
    assert repr(compiled).startswith("compile_engine(CG(") and "backend='eager'" in repr(compiled)
    state = compiled.init(fns, x, y)
    assert set(state) == set(engine.init(fns, x, y)) and compiled.lower_solution(state) is state["y"]
    again = compile_engine(compiled, fullgraph=True)  # no wrapper around a wrapper
    assert again.engine is engine and again.options["backend"] == "eager" and again.options["fullgraph"]
    copy = pickle.loads(pickle.dumps(compiled))
    assert isinstance(copy, CompiledEngine) and repr(copy) == repr(compiled) and copy.engine is not engine
    lvhba = compile_engine(hypergrad.LVHBA())
    assert lvhba.supports_constraints and not hypergrad.Engine.supports_constraints


@pytest.mark.parametrize("thing", [hypergrad.CG, "CG", None, torch.nn.Linear(2, 2)])
def test_rejects_non_engines(thing) -> None:
    with pytest.raises(TypeError, match="compile_engine: engine must be a hypergrad.Engine"):
        compile_engine(thing)


def test_graph_breaks_rejects_unknown_phase(p1) -> None:
    _, fns, x, y, batches = p1
    engine = hypergrad.CG()
    with pytest.raises(ValueError, match="graph_breaks: phase must be one of"):
        graph_breaks(engine, fns, engine.init(fns, x, y), batches, phase="solve")


def test_benchmark_quick_run_writes_table_and_plot(tmp_path) -> None:
    from experiments.bench import compile as bench

    path = bench.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path)])
    text = path.read_text()
    assert (tmp_path / "compile.png").stat().st_size > 1000
    assert "torch " in text and "Regenerate: `python -m experiments.bench.compile" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| (CG|Unrolled) \|", line)]
    assert [r[0].strip() for r in rows] == ["CG", "Unrolled"]
    for row in rows:
        breaks, eager, compiled, speedup, difference = int(row[1]), *map(float, row[3:7])
        assert breaks == 0 and eager > 0 and compiled > 0
        assert abs(speedup - eager / compiled) <= 0.01 * speedup + 0.01  # the table's ratio is its columns'
        assert difference < 1e-10  # the compiled step computed what the eager one did (float64)
