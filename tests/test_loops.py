"""hypergrad.loops.fori_loop: a Python loop eagerly, torch's while_loop under torch.compile, same numbers.

The compiled runs use the "aot_eager" backend (dynamo's capture and AOTAutograd without code generation,
seconds instead of minutes); a recording backend checks that the solvers' loops reach the graph as one
``while_loop`` op, not unrolled.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves

from hypergrad import kernels, loops, solvers
from hypergrad.tree import Tree


def _recording_backend(ops: list[str]) -> Any:
    """A torch.compile backend that runs dynamo's graph as is and records its ops' names in ``ops``."""
    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    return backend


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


def _matvec(h: torch.Tensor) -> Any:
    return loops.mark_loop_safe(lambda v: {"a": h @ v["a"]})


def test_fori_loop_eager_is_the_python_loop() -> None:
    carry = (torch.tensor(1.0, dtype=torch.float64), {"s": torch.zeros(3, dtype=torch.float64)})

    def body(c: Any) -> Any:
        x, d = c
        return x * 1.1, {"s": d["s"] + x}

    expected = carry
    for _ in range(7):
        expected = body(expected)
    got = loops.fori_loop(7, body, carry)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1]["s"], expected[1]["s"])
    assert loops.fori_loop(0, body, carry) is carry


def test_fori_loop_compiled_is_one_while_loop_with_the_same_numbers() -> None:
    def run(x: torch.Tensor, unchanged: torch.Tensor) -> Any:
        # ``unchanged`` is returned as is by the body: the loop must copy it (no aliasing in while_loop).
        return loops.fori_loop(5, lambda c: (torch.sin(c[0]) + c[0], c[1]), (x, unchanged))

    x, u = torch.linspace(0, 1, 4, dtype=torch.float64), torch.ones(2)
    ops: list[str] = []
    with loops.fold_loops(True):
        got = torch.compile(run, backend=_recording_backend(ops), fullgraph=True)(x, u)
    expected = run(x, u)
    assert any("while_loop" in op for op in ops)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], u)


@pytest.mark.parametrize("case", ["cg", "cg-warm", "cg-normal", "cg-damped", "neumann"])
def test_solvers_fold_into_one_loop_under_compile(case: str) -> None:
    torch._dynamo.reset()
    h = _spd(6)
    b = {"a": torch.linspace(-1, 1, 6, dtype=torch.float64)}
    v0 = {"a": torch.full((6,), 0.1, dtype=torch.float64)}

    def solve(b: Tree, v0: Tree) -> Any:
        matvec = _matvec(h)
        if case == "neumann":
            return solvers.neumann(matvec, b, terms=8, alpha=0.3)
        return solvers.cg(matvec, b, iters=5, tol=0.0, v0=v0 if case == "cg-warm" else None,
                          normal=case == "cg-normal", damping=0.5 if case == "cg-damped" else 0.0)

    ops: list[str] = []
    with loops.fold_loops(True):  # opt-in (compile_engine(fold_loops=True))
        got = torch.compile(solve, backend=_recording_backend(ops), fullgraph=True)(b, v0)
    expected = solve(b, v0)
    assert sum("while_loop" in op for op in ops) == 1
    # Not unrolled: a product h @ v per iteration would put ~5-8 matmuls in the outer graph.
    assert sum(op.endswith("mm.default") or op.endswith("mv.default") for op in ops) <= 3
    for got_leaf, want_leaf in zip(tree_leaves(tuple(got)), tree_leaves(tuple(expected)), strict=True):
        torch.testing.assert_close(got_leaf, want_leaf, rtol=1e-13, atol=1e-13)


def test_unmarked_matvec_is_unrolled_under_compile() -> None:
    torch._dynamo.reset()
    h = _spd(4)
    ops: list[str] = []
    solve = lambda b: solvers.cg(lambda v: {"a": h @ v["a"]}, b, iters=4, tol=0.0)  # noqa: E731
    torch.compile(solve, backend=_recording_backend(ops), fullgraph=True)({"a": torch.ones(4, dtype=torch.float64)})
    assert not any("while_loop" in op for op in ops)


def test_hvp_recomputed_in_the_loop_body_compiles_to_a_loop() -> None:
    """A loop-safe HVP (torch.func's reverse-over-reverse product recomputed per call) inside the compiled loop."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    x = {"log": torch.tensor(-1.0, dtype=torch.float64)}
    y = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}

    def g(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        return torch.nn.functional.softplus(batch @ y["w"]).mean() + 0.5 * x["log"].exp() * y["w"].square().sum()

    def solve(x: Tree, y: Tree, batch: torch.Tensor, b: Tree) -> Any:
        matvec = loops.mark_loop_safe(lambda v: kernels.hvp_in_mode(g, x, y, batch, v, "reverse-over-reverse"))
        return solvers.cg(matvec, b, iters=4, tol=0.0)

    b = {"w": torch.ones(5, dtype=torch.float64)}
    ops: list[str] = []
    with loops.fold_loops(True):
        got = torch.compile(solve, backend=_recording_backend(ops), fullgraph=True)(x, y, data, b)
    expected = solve(x, y, data, b)
    assert any("while_loop" in op for op in ops)
    torch.testing.assert_close(got.v["w"], expected.v["w"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.residual, expected.residual, rtol=1e-10, atol=1e-14)


def test_folding_is_opt_in_and_guarded() -> None:
    torch._dynamo.reset()
    h = _spd(4)
    b = {"a": torch.ones(4, dtype=torch.float64)}
    ops: list[str] = []
    compiled = torch.compile(lambda b: solvers.neumann(_matvec(h), b, terms=4, alpha=0.2),
                             backend=_recording_backend(ops), fullgraph=True)
    with loops.fold_loops(False):
        unrolled = compiled(b)
    assert not any("while_loop" in op for op in ops)
    ops.clear()
    with loops.fold_loops(True):
        folded = compiled(b)  # the flag is guarded: folding recompiles, into one loop
    assert any("while_loop" in op for op in ops)
    torch.testing.assert_close(folded.v["a"], unrolled.v["a"], rtol=1e-13, atol=1e-13)


def test_compile_engine_keeps_fold_loops_through_pickling() -> None:
    import pickle

    import hypergrad

    engine = hypergrad.compile_engine(hypergrad.CG(iters=3), fold_loops=True)
    assert "fold_loops=True" in repr(engine)
    assert pickle.loads(pickle.dumps(engine)).fold_loops is True
    assert hypergrad.compile_engine(hypergrad.CG(iters=3)).fold_loops is False  # opt-in


def test_compile_engine_with_fold_loops_gives_the_eager_numbers_on_a_problem() -> None:
    # The whole path: a BilevelProblem's functions (functional_call under compile), hvp_operator's loop-safe
    # product recomputed in the body, CG and Neumann folded; the same step as eager to rounding.
    import bilevel
    import hypergrad

    class Ridge(bilevel.BilevelProblem):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.lower = torch.nn.Linear(5, 1, dtype=torch.float64)
            self.upper = bilevel.Hyper(log_l2=torch.tensor(-1.0, dtype=torch.float64))
            self.register_buffer("inputs", torch.randn(30, 5, generator=gen, dtype=torch.float64))
            self.register_buffer("targets", torch.randn(30, generator=gen, dtype=torch.float64))

        def lower_objective(self, batch: Any) -> torch.Tensor:
            fit = (self.lower(self.inputs[:20]).squeeze(-1) - self.targets[:20]).square().mean()
            return fit + self.upper.log_l2.exp() * self.lower.weight.square().sum()

        def upper_objective(self, batch: Any) -> torch.Tensor:
            return (self.lower(self.inputs[20:]).squeeze(-1) - self.targets[20:]).square().mean()

    for engine in (hypergrad.CG(iters=6, inner_steps=2), hypergrad.Neumann(terms=6, inner_steps=2)):
        torch._dynamo.reset()
        fns, x, y = Ridge().to_functions()
        eager_state = engine.init(fns, x, y)
        compiled = hypergrad.compile_engine(engine, fold_loops=True, backend="aot_eager", fullgraph=True)
        compiled_state = compiled.init(fns, x, y)
        for _ in range(2):
            eager_state, eager_metrics = engine.step(fns, eager_state, (None, None))
            compiled_state, compiled_metrics = compiled.step(fns, compiled_state, (None, None))
        for key in ("x", "y"):
            for k in eager_state[key]:
                torch.testing.assert_close(compiled_state[key][k], eager_state[key][k], rtol=1e-12, atol=1e-14)
