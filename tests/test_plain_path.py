"""Plain eager calls take torch.autograd and multi-tensor arithmetic; transformed calls take torch.func (issue 15).

``hypergrad.plain.plain_call`` decides. These tests run the same engine calls both ways (the torch.func
route forced by patching the decision, which is what a vmap or compile sees) on a nonconvex network
with a LayerNorm or a training-mode BatchNorm, and check that they agree, that the plain route records
g's gradient once per IFT estimate (J v from the solve's own graph), and that the one-shot
``engine.hypergradient`` checks a problem once per batch structure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel
import hypergrad
from bilevel import functional
from hypergrad import kernels
from hypergrad import tree as T

F64 = torch.float64


class NormMLP(bilevel.BilevelProblem):
    """Per-parameter L2 on a tanh MLP with a normalization layer: y = the weights, x = log decays."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lower = nn.Sequential(nn.Linear(6, 8), norm(8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
        self.upper = bilevel.Hyper(**{k.replace(".", "_"): torch.full_like(p, -1.0)
                                      for k, p in self.lower.named_parameters()})
        self.lower_calls = 0

    def lower_objective(self, batch):
        self.lower_calls += 1
        inputs, labels = batch
        decay = sum((d.exp() * w.square()).sum() for d, w in zip(self.upper.parameters(), self.lower.parameters(),
                                                                   strict=True))
        return nn.functional.cross_entropy(self.lower(inputs), labels) + 0.5 * decay

    def upper_objective(self, batch):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.lower(inputs), labels)


def batches() -> tuple:
    gen = torch.Generator().manual_seed(1)
    return tuple((torch.randn(32, 6, generator=gen, dtype=F64), torch.randint(0, 3, (32,), generator=gen))
                 for _ in range(2))


@pytest.fixture
def transformed(monkeypatch):
    """Make every call take the route a torch.func transform or compile would (``plain_call`` False)."""
    def force() -> None:
        monkeypatch.setattr(kernels, "_plain_call", lambda: False)
        monkeypatch.setattr(T, "plain_call", lambda: False)
    return force


ENGINES = {
    "CG": lambda: hypergrad.CG(iters=4, inner_steps=2, inner_lr=0.1),
    "Neumann": lambda: hypergrad.Neumann(terms=4, inner_steps=2, inner_lr=0.1),
    "Exact": lambda: hypergrad.Exact(inner_steps=2, inner_lr=0.1),
    "Unrolled": lambda: hypergrad.Unrolled(inner_steps=3, inner_lr=0.1),
}


def two_steps(name: str, norm: type[nn.Module]) -> tuple[dict, list[dict]]:
    """Two engine steps from the problem's start: the final state and each step's metrics."""
    problem, data = NormMLP(norm), batches()
    engine = ENGINES[name]()
    fns, x, y = problem.to_functions(data)
    state = engine.init(fns, x, y)
    metrics = []
    for _ in range(2):
        state, m = engine.step(fns, state, data)
        metrics.append(m)
    return state, metrics


def assert_trees_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-11, atol=1e-13, msg=k)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d], ids=["layernorm", "batchnorm"])
@pytest.mark.parametrize("name", list(ENGINES))
def test_the_plain_route_equals_the_torch_func_route(name, norm, transformed) -> None:
    plain_state, plain_metrics = two_steps(name, norm)
    transformed()
    func_state, func_metrics = two_steps(name, norm)
    for key in ("x", "y"):
        assert_trees_close(plain_state[key], func_state[key])
    for got, want in zip(plain_metrics, func_metrics, strict=True):
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)
    assert (plain_state["x"]["0_weight"] != NormMLP(norm).upper.state_dict()["0_weight"]).any()  # x moved


@pytest.mark.parametrize("name", ["CG", "Neumann"])
def test_a_plain_ift_estimate_records_the_lower_gradient_once(name, transformed) -> None:
    # J v is a reverse pass through the graph the solve's HVPs use: one forward of g per estimate, where the
    # torch.func route (and the code before this change) records a second gradient of g for the mixed VJP.
    counts = {}
    for route in ("plain", "transformed"):
        if route == "transformed":
            transformed()
        problem, data = NormMLP(nn.LayerNorm), batches()
        engine = ENGINES[name]()
        fns, x, y = problem.to_functions(data)
        state = engine.init(fns, x, y)
        problem.lower_calls = 0
        engine.estimate(fns, state, data)
        counts[route] = problem.lower_calls
    assert counts == {"plain": 1, "transformed": 2}


def test_the_one_shot_hypergradient_checks_a_problem_once_per_batch_structure(monkeypatch) -> None:
    checked = []
    original = functional.check_objectives
    monkeypatch.setattr(functional, "check_objectives", lambda *a: (checked.append(1), original(*a))[1])
    problem, (lower, upper) = NormMLP(nn.LayerNorm), batches()
    engine = hypergrad.CG(iters=3, inner_steps=0)
    first = engine.hypergradient(problem, lower, upper)
    for _ in range(3):
        again = engine.hypergradient(problem, lower, upper)
    assert len(checked) == 1
    assert_trees_close(first, again)
    # A new tuple of the same structure is not checked again; another problem instance is, and refused if faulty.
    engine.hypergradient(problem, lower, upper[:1] + upper[1:])
    assert len(checked) == 1
    other = NormMLP(nn.LayerNorm)
    other.upper_objective = lambda batch: torch.tensor([1.0, 2.0], dtype=F64)  # not 0-d
    with pytest.raises(ValueError, match="upper_objective"):
        engine.hypergradient(other, lower, upper)
    assert len(checked) == 2


def test_multi_tensor_tree_arithmetic_is_the_leaf_by_leaf_arithmetic(transformed) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = ({k: torch.randn(shape, generator=gen) for k, shape in (("w", (7, 5)), ("b", (5,)), ("s", ()))}
            for _ in range(2))
    alphas = (0.37, torch.tensor(-1.3), torch.tensor(0.7, dtype=F64))  # the last: not the leaves' dtype
    ops = {"add": lambda: T.add(a, b), "sub": lambda: T.sub(a, b), "dot": lambda: T.dot(a, b),
           **{f"axpy {s}": (lambda s=s: T.axpy(s, a, b)) for s in alphas},
           **{f"scale {s}": (lambda s=s: T.scale(a, s)) for s in alphas}}
    plain = {name: op() for name, op in ops.items()}
    transformed()
    for name, op in ops.items():
        got, want = plain[name], op()
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), name
        else:
            assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want), name


def test_the_fused_norm_is_the_norm_of_all_leaves_on_both_routes(transformed) -> None:
    gen = torch.Generator().manual_seed(4)
    a = {k: torch.randn(shape, generator=gen) for k, shape in (("w", (70, 50)), ("b", (50,)), ("s", ()))}
    stacked = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in a.values()]).double())
    plain = T.norm(a)
    transformed()
    for got in (plain, T.norm(a)):
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got.double(), stacked, rtol=1e-6, atol=0.0)


def test_neumanns_residual_costs_no_hvp_on_either_route(transformed) -> None:
    # Neumann's residual is its series' last term over its first, |(I - a H)^K b| / |b|: K HVPs and one
    # mixed VJP on both routes, checked against the same series taken by hand in torch.autograd.
    from experiments.oracles import count_oracles

    terms, alpha = 4, 0.1
    problem, data = NormMLP(nn.LayerNorm), batches()
    weights = list(problem.lower.parameters())
    fy = torch.autograd.grad(problem.upper_objective(data[1]), weights)
    gy = torch.autograd.grad(problem.lower_objective(data[0]), weights, create_graph=True)
    c = list(fy)
    for _ in range(terms):
        hc = torch.autograd.grad(gy, weights, c, retain_graph=True)
        c = [ci - alpha * hi for ci, hi in zip(c, hc, strict=True)]
    by_hand = torch.cat([t.flatten() for t in c]).norm() / torch.cat([t.flatten() for t in fy]).norm()
    assert 1e-3 < by_hand < 1.0  # a partial solve: not trivially zero

    hvps, residuals = {}, {}
    for route in ("plain", "transformed"):
        if route == "transformed":
            transformed()
        engine = hypergrad.Neumann(terms=terms, inner_steps=0, inner_lr=alpha)
        fns, x, y = problem.to_functions(data)
        state = engine.init(fns, x, y)
        with count_oracles() as calls:
            _, _, metrics = engine.estimate(fns, state, data)
        hvps[route], residuals[route] = calls["hvps"], metrics["solve_residual"]
        assert calls["mixed_vjps"] == 1, route
    assert hvps == {"plain": terms, "transformed": terms}
    for route in residuals:
        torch.testing.assert_close(residuals[route], by_hand, rtol=1e-10, atol=0.0)


def test_a_gradient_in_x_that_f_does_not_use_holds_no_memory(transformed) -> None:
    # f of most problems (a validation loss) has no hyperparameter: its x-gradient is zero. On the plain route
    # that zero is a stride-0 view (one element of memory), not a dense tensor the size of x held through the solve.
    problem, data = NormMLP(nn.LayerNorm), batches()
    fns, x, y = problem.to_functions(data)
    fx, fy, value = kernels.grad_xy(fns.f, x, y, data[1])
    for k, t in fx.items():
        assert t.shape == x[k].shape and not t.any() and t.untyped_storage().nbytes() == t.element_size(), k
    transformed()
    fx_func, fy_func, value_func = kernels.grad_xy(fns.f, x, y, data[1])
    for k in fx:
        torch.testing.assert_close(fx[k], fx_func[k], rtol=0, atol=0)
    for k in fy:
        torch.testing.assert_close(fy[k], fy_func[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value, value_func)
