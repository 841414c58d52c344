"""Engines, solvers and outer optimizers held to the closed forms of REFERENCE_PROBLEMS.md (float64).

The golden numbers below are copied from shared/REFERENCE_PROBLEMS.md (10 significant digits);
the closed forms in ``problems.reference`` are computed from the formulas, so the first tests
check the formulas and every later test checks an engine against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bilevel
import hypergrad
from hypergrad import kernels, outer, solvers, tree
from problems.reference import BiasedRegularizationP3, QuadraticP1, RidgeP2, WeightedLeastSquaresP4

F64 = torch.float64
GOLDEN_ATOL = 1e-9  # the tables give 10 significant digits
RTOL = 1e-8

CLOSED_FORM_PROBLEMS = [QuadraticP1, RidgeP2, BiasedRegularizationP3, WeightedLeastSquaresP4]

# -- golden numbers (REFERENCE_PROBLEMS.md) ------------------------------------------------------

GOLDEN = {
    QuadraticP1: {
        "y_star": [0.7962962963, -1.5888888889, 1.3629629630],
        "value": 4.103828532235939,
        "hypergradient": [2.5634705075, -3.6974348422],
    },
    RidgeP2: {
        "y_star": [1.2207717086, 0.1919221133, -0.2555805710],
        "value": 0.8942144177673074,
        "hypergradient": [-0.4396369566, 0.1216932492, -0.0309182085],
    },
    BiasedRegularizationP3: {
        "y_star": [1.3798882682, 0.1493854749, -0.3092737430],
        "value": 1.0671053899691014,
        "hypergradient": [0.2952267407, -0.2574000395, -0.2166572412],
    },
    WeightedLeastSquaresP4: {
        "y_star": [1.4683490611, -0.0280361976, -0.0716924381],
        "value": 1.4362164761567757,
        "hypergradient": [0.1999666411, -0.0389304041, 0.1228585732, 0.0128263501, -0.2845334000],
    },
}
P1_NEUMANN = {  # K -> dF/dx, a = 0.2, at y*(x)
    0: [0.4618518519, -0.8603703704],
    1: [0.8717037037, -1.4527407407],
    5: [1.8807561111, -2.7926486222],
    10: [2.3420057710, -3.4027083419],
    50: [2.5634412014, -3.6973957674],
}
P1_UNROLLED = {  # T -> dF_T/dx, a = 0.2, from y_0 = 0
    1: [0.112, -0.388],
    5: [1.2172449996, -1.9095734349],
    20: [2.5084141583, -3.6240337188],
}
P1_PENALTY = {  # lam -> direction
    10: [2.3271069565, -3.3778482039],
    100: [2.5377280717, -3.6626681577],
    1000: [2.5608731291, -3.6939273341],
}
NEUMANN_ALPHA = 0.2

Tree = dict[str, Tensor]


def t64(values: Any) -> Tensor:
    return torch.tensor(values, dtype=F64)


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float = RTOL, atol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# -- helpers -------------------------------------------------------------------------------------


def engine_grad(engine: hypergrad.Engine, problem: bilevel.BilevelProblem) -> Tensor:
    """The engine's hypergradient of a closed-form problem (one upper tensor) with no batches."""
    (grad,) = engine.hypergradient(problem, None, None).values()
    return grad


def estimate(engine: hypergrad.Engine, problem: bilevel.BilevelProblem) -> tuple[hypergrad.State, Tensor]:
    """(state after inner + estimate, hypergradient) through the protocol's phases."""
    fns, x, y = problem.to_functions((None, None))
    state = engine.inner(fns, engine.init(fns, x, y), None)
    state, grad, _ = engine.estimate(fns, state, (None, None))
    (g,) = grad.values()
    return state, g


def convergent_inner(problem: Any, tol: float = 1e-14) -> tuple[float, int]:
    """(step, steps): gradient descent with step 2 / (l_min + l_max) contracts the error to ``tol``."""
    eigs = torch.linalg.eigvalsh(problem.lower_hessian())
    low, high = eigs[0].item(), eigs[-1].item()
    rate = (high - low) / (high + low)
    return 2.0 / (low + high), math.ceil(math.log(tol) / math.log(rate))


def fixed_point_hypergradient(problem: bilevel.BilevelProblem, iterations: int, alpha: float) -> Tree:
    """grad_x f - J v with v from ``iterations`` steps of v <- v - alpha (H v - grad_y f) from v = 0."""
    fns, x, y = problem.to_functions()
    fx, fy, _ = kernels.grad_xy(fns.f, x, y, None)
    matvec = kernels.hvp_operator(fns.g, x, y, None)
    v = tree.zeros_like(fy)
    for _ in range(iterations):
        v = tree.axpy(-alpha, tree.sub(matvec(v), fy), v)
    jv, _, _ = kernels.mixed_vjp(fns.g, x, y, None, v)
    return tree.sub(fx, jv)



def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """{'a/b': tensor} from nested dicts of tensors (engine states and metrics)."""
    out: dict[str, Tensor] = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stack(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack equally shaped nested dicts of tensors along a new leading dimension."""
    return {k: stack([s[k] for s in states]) if isinstance(v, dict) else torch.stack([s[k] for s in states])
            for k, v in states[0].items()}


# -- 1. the closed forms reproduce the golden numbers --------------------------------------------


@pytest.mark.parametrize("cls", CLOSED_FORM_PROBLEMS, ids=lambda c: c.__name__)
def test_closed_forms_match_golden_numbers(cls: type) -> None:
    problem, golden = cls(), GOLDEN[cls]
    assert problem.upper_objective(()).dtype == F64
    assert_close(problem.lower_solution(), t64(golden["y_star"]), rtol=0, atol=GOLDEN_ATOL)
    assert_close(problem.value(), t64(golden["value"]), rtol=1e-12)
    assert_close(problem.hypergradient(), t64(golden["hypergradient"]), rtol=0, atol=GOLDEN_ATOL)


def test_value_leaves_lower_variable_alone() -> None:
    problem = QuadraticP1(y0=[1.0, 2.0, 3.0])
    problem.value()
    assert problem.lower.y.tolist() == [1.0, 2.0, 3.0]


def test_ridge_by_hand_instance() -> None:
    eye = [[1.0, 0.0], [0.0, 1.0]]
    problem = RidgeP2(lam0=[0.0, 0.0], X_train=eye, y_train=[1.0, 2.0], X_val=eye, y_val=[0.5, 0.5])
    assert_close(problem.lower_solution(), t64([0.5, 1.0]), rtol=1e-14)
    assert_close(problem.hypergradient(), t64([0.0, -0.25]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("terms", sorted(P1_NEUMANN))
def test_p1_neumann_closed_form_matches_golden(terms: int) -> None:
    grad = QuadraticP1().neumann_hypergradient(terms, NEUMANN_ALPHA)
    assert_close(grad, t64(P1_NEUMANN[terms]), rtol=0, atol=GOLDEN_ATOL)


@pytest.mark.parametrize("steps", sorted(P1_UNROLLED))
def test_p1_unrolled_closed_form_matches_golden(steps: int) -> None:
    y_end, grad = QuadraticP1().unrolled(steps, NEUMANN_ALPHA, torch.zeros(3, dtype=F64))
    assert_close(grad, t64(P1_UNROLLED[steps]), rtol=0, atol=GOLDEN_ATOL)
    if steps == 1:
        assert_close(y_end, t64([0.16, -0.34, 0.25]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("lam", sorted(P1_PENALTY))
def test_p1_penalty_closed_form_matches_golden(lam: float) -> None:
    problem = QuadraticP1()
    direction = problem.penalty_hypergradient(lam)
    assert_close(direction, t64(P1_PENALTY[lam]), rtol=0, atol=GOLDEN_ATOL)
    # The bias decays like 1/lam: lam * |bias| stays bounded and away from zero.
    scaled_bias = lam * torch.linalg.norm(direction - problem.hypergradient())
    assert 0.5 < scaled_bias.item() < 5.0


def test_truncated_closed_forms_tend_to_the_exact_one() -> None:
    problem = QuadraticP1()
    exact = problem.hypergradient()
    assert_close(problem.neumann_hypergradient(400, NEUMANN_ALPHA), exact, rtol=1e-12)
    assert_close(problem.unrolled(400, NEUMANN_ALPHA, torch.zeros(3, dtype=F64))[1], exact, rtol=1e-12)
    assert_close(problem.penalty_hypergradient(1e12), exact, rtol=1e-10)


def test_problems_build_from_a_yaml_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(bilevel.BilevelProblem, "problem")
    config = parser.parse_string(
        "problem:\n  class_path: problems.reference.QuadraticP1\n  init_args:\n    x0: [1.0, 2.0]\n    rho: 0.5\n"
    )
    problem = parser.instantiate(config).problem
    assert isinstance(problem, QuadraticP1)
    assert problem.upper.x.tolist() == [1.0, 2.0] and problem.rho == 0.5
    assert problem.upper.x.dtype == F64 and problem.A.dtype == F64


def test_dtype_argument_and_batchless_data() -> None:
    problem = WeightedLeastSquaresP4(dtype="float32")
    assert {p.dtype for p in problem.parameters()} | {b.dtype for b in problem.buffers()} == {torch.float32}
    assert problem.data() == ((), ())
    assert problem.state_dict().keys() == {"upper.x", "lower.w"}  # the data are not persistent
    with pytest.raises(ValueError, match="floating-point"):
        QuadraticP1(dtype="int64")


# -- 2. exact engines match the exact closed form ------------------------------------------------


def exact_engines(dim_y: int, **inner: Any) -> list[hypergrad.Engine]:
    return [hypergrad.Exact(**inner), hypergrad.CG(iters=dim_y, **inner)]


@pytest.mark.parametrize("cls", CLOSED_FORM_PROBLEMS, ids=lambda c: c.__name__)
def test_exact_engines_at_the_lower_solution(cls: type) -> None:
    problem = cls().lower_to_solution()
    dim_y = problem.lower_variable.numel()
    for engine in exact_engines(dim_y, inner_steps=0):
        assert_close(engine_grad(engine, problem), problem.hypergradient())


@pytest.mark.parametrize("cls", CLOSED_FORM_PROBLEMS, ids=lambda c: c.__name__)
def test_exact_engines_after_inner_descent_from_zero(cls: type) -> None:
    problem = cls()
    assert not problem.lower_variable.any()
    lr, steps = convergent_inner(problem)
    assert steps < 500
    for engine in exact_engines(problem.lower_variable.numel(), inner_steps=steps, inner_lr=lr):
        assert_close(engine_grad(engine, problem), problem.hypergradient())
    # Without the inner loop the same engine is wrong: the inner loop is what converges.
    stale = engine_grad(hypergrad.Exact(inner_steps=0), problem)
    assert not torch.allclose(stale, problem.hypergradient(), rtol=1e-3)
    assert not problem.lower_variable.any()  # the problem itself is untouched


def test_cg_with_too_few_iterations_is_inexact() -> None:
    problem = QuadraticP1().lower_to_solution()
    grad = engine_grad(hypergrad.CG(iters=1, inner_steps=0), problem)
    assert not torch.allclose(grad, problem.hypergradient(), rtol=1e-3)


# -- 3. Neumann and Unrolled match their truncated closed forms ----------------------------------


@pytest.mark.parametrize("terms", sorted(P1_NEUMANN))
def test_neumann_engine_matches_truncated_closed_form(terms: int) -> None:
    problem = QuadraticP1().lower_to_solution()
    grad = engine_grad(hypergrad.Neumann(terms=terms, alpha=NEUMANN_ALPHA, inner_steps=0), problem)
    assert_close(grad, problem.neumann_hypergradient(terms, NEUMANN_ALPHA))
    assert_close(grad, t64(P1_NEUMANN[terms]), rtol=0, atol=GOLDEN_ATOL)


def test_neumann_alpha_defaults_to_inner_lr() -> None:
    problem = QuadraticP1().lower_to_solution()
    grad = engine_grad(hypergrad.Neumann(terms=5, inner_steps=0, inner_lr=NEUMANN_ALPHA), problem)
    assert_close(grad, t64(P1_NEUMANN[5]), rtol=0, atol=GOLDEN_ATOL)


@pytest.mark.parametrize("steps", sorted(P1_UNROLLED))
def test_unrolled_engine_matches_itd_closed_form(steps: int) -> None:
    problem = QuadraticP1()
    state, grad = estimate(hypergrad.Unrolled(inner_steps=steps, inner_lr=NEUMANN_ALPHA), problem)
    y_end, expected = problem.unrolled(steps, NEUMANN_ALPHA, torch.zeros(3, dtype=F64))
    assert_close(grad, expected)
    assert_close(state["y"]["y"], y_end, rtol=1e-12)
    assert_close(grad, t64(P1_UNROLLED[steps]), rtol=0, atol=GOLDEN_ATOL)


@pytest.mark.parametrize(("steps", "truncate"), [(5, 1), (5, 3), (20, 5), (20, 20)])
def test_truncated_unrolled_differentiates_the_last_steps(steps: int, truncate: int) -> None:
    problem = QuadraticP1()
    grad = engine_grad(hypergrad.Unrolled(inner_steps=steps, inner_lr=NEUMANN_ALPHA, truncate=truncate), problem)
    y_mid, _ = problem.unrolled(steps - truncate, NEUMANN_ALPHA, torch.zeros(3, dtype=F64))
    _, expected = problem.unrolled(truncate, NEUMANN_ALPHA, y_mid)
    assert_close(grad, expected)
    full = problem.unrolled(steps, NEUMANN_ALPHA, torch.zeros(3, dtype=F64))[1]
    assert torch.allclose(grad, full, rtol=1e-12) == (truncate == steps)


# -- 4. Neumann(K) = Unrolled(K + 1 from y*) = K + 1 fixed-point iterations -----------------------


@pytest.mark.parametrize(("cls", "alpha"), [(QuadraticP1, 0.2), (WeightedLeastSquaresP4, 0.1)], ids=["P1", "P4"])
@pytest.mark.parametrize("terms", [0, 1, 3, 10])
def test_neumann_equals_unrolling_from_the_solution(cls: type, alpha: float, terms: int) -> None:
    problem = cls().lower_to_solution()
    neumann = engine_grad(hypergrad.Neumann(terms=terms, alpha=alpha, inner_steps=0), problem)
    unrolled = engine_grad(hypergrad.Unrolled(inner_steps=terms + 1, inner_lr=alpha), problem)
    (fixed_point,) = fixed_point_hypergradient(problem, terms + 1, alpha).values()
    assert_close(unrolled, neumann, rtol=0, atol=1e-10)
    assert_close(fixed_point, neumann, rtol=0, atol=1e-10)
    # One term more or less is a different number.
    other = engine_grad(hypergrad.Neumann(terms=terms + 1, alpha=alpha, inner_steps=0), problem)
    assert not torch.allclose(other, neumann, rtol=0, atol=1e-6)


# -- 5. the linear solvers ------------------------------------------------------------------------


def spd_system(seed: int = 0) -> tuple[Tensor, Callable[[Tree], Tree], Tree, Callable[[Tensor], Tree]]:
    """(H, matvec, b, unravel): a random 6x6 SPD system, eigenvalues in [1, 5], on two-leaf trees."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    h = q @ torch.diag(torch.linspace(1.0, 5.0, 6, dtype=F64)) @ q.T
    b = {"a": torch.randn(2, generator=gen, dtype=F64), "b": torch.randn(2, 2, generator=gen, dtype=F64)}
    _, unravel = tree.ravel(b)

    def matvec(v: Tree) -> Tree:
        return unravel(h @ tree.ravel(v)[0])

    return h, matvec, b, unravel


def reference_solution(h: Tensor, b: Tree, unravel: Callable[[Tensor], Tree]) -> Tree:
    return unravel(torch.linalg.solve(h, tree.ravel(b)[0]))


def assert_trees_close(a: Tree, b: Tree, **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], **tol)


def test_cg_solves_spd_system_in_dim_iterations() -> None:
    h, matvec, b, unravel = spd_system()
    solution = solvers.cg(matvec, b, iters=6)
    assert_trees_close(solution.v, reference_solution(h, b, unravel), rtol=1e-10, atol=1e-12)
    assert solution.residual.item() < 1e-10
    partial = solvers.cg(matvec, b, iters=2)
    assert partial.residual.item() > 1e-3


def test_cg_warm_start_at_the_solution_stays_there() -> None:
    h, matvec, b, unravel = spd_system()
    exact = reference_solution(h, b, unravel)
    solution = solvers.cg(matvec, b, iters=4, tol=1e-12, v0=exact)
    assert_trees_close(solution.v, exact, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tol", [1e-8, 0.3])
def test_cg_tolerance_freezes_the_iterate(tol: float) -> None:
    _, matvec, b, _ = spd_system()
    short = solvers.cg(matvec, b, iters=6, tol=tol)
    long = solvers.cg(matvec, b, iters=40, tol=tol)
    assert short.residual.item() <= tol
    for k in b:
        assert torch.equal(short.v[k], long.v[k])
    assert torch.equal(short.residual, long.residual)
    if tol == 0.3:  # it stopped early, far from the exact solution
        assert short.residual.item() > 1e-3


def test_neumann_solver_is_the_truncated_series() -> None:
    h, matvec, b, unravel = spd_system()
    alpha, terms = 0.3, 7
    flat_b = tree.ravel(b)[0]
    step = torch.eye(6, dtype=F64) - alpha * h
    series = alpha * sum(torch.linalg.matrix_power(step, j) @ flat_b for j in range(terms + 1))
    solution = solvers.neumann(matvec, b, terms=terms, alpha=alpha)
    assert_trees_close(solution.v, unravel(series), rtol=1e-12, atol=1e-14)
    # The residual is that of the series without its last term: |H v' - b| / |b| with v' = a sum_{j<K}.
    shorter = alpha * sum(torch.linalg.matrix_power(step, j) @ flat_b for j in range(terms))
    expected_residual = torch.linalg.norm(h @ shorter - flat_b) / torch.linalg.norm(flat_b)
    assert_close(solution.residual, expected_residual, rtol=1e-10)
    converged = solvers.neumann(matvec, b, terms=200, alpha=1 / 3)  # 2 / (l_min + l_max)
    assert_trees_close(converged.v, reference_solution(h, b, unravel), rtol=1e-10, atol=1e-12)


def test_dense_solver_matches_linalg_solve() -> None:
    h, matvec, b, unravel = spd_system()
    solution = solvers.dense(matvec, b)
    assert_trees_close(solution.v, reference_solution(h, b, unravel), rtol=1e-12, atol=1e-14)
    assert solution.residual.item() < 1e-13


@pytest.mark.parametrize(
    "solve",
    [
        lambda m, b: solvers.cg(m, b, iters=8, tol=1e-6),
        lambda m, b: solvers.cg(m, b, iters=8, tol=0.0),
        lambda m, b: solvers.neumann(m, b, terms=5, alpha=0.2),
        solvers.dense,
    ],
    ids=["cg-tol", "cg-no-tol", "neumann", "dense"],
)
def test_solvers_on_a_zero_right_hand_side(solve: Callable) -> None:
    _, matvec, b, _ = spd_system()
    solution = solve(matvec, tree.zeros_like(b))
    for k in b:
        assert torch.equal(solution.v[k], torch.zeros_like(b[k]))
    assert solution.residual.item() == 0.0


# -- 6. engine.step under vmap --------------------------------------------------------------------

VMAP_ENGINES: dict[str, Callable[[str], hypergrad.Engine]] = {
    "exact": lambda opt: hypergrad.Exact(inner_steps=3, inner_lr=0.2, outer_lr=0.05, outer_optimizer=opt),
    "neumann": lambda opt: hypergrad.Neumann(terms=4, alpha=0.2, inner_steps=3, inner_lr=0.2, outer_lr=0.05,
                                             outer_optimizer=opt),
    "cg": lambda opt: hypergrad.CG(iters=2, inner_steps=3, inner_lr=0.2, outer_lr=0.05, outer_optimizer=opt),
    "unrolled": lambda opt: hypergrad.Unrolled(inner_steps=4, inner_lr=0.2, truncate=2, outer_lr=0.05,
                                               outer_optimizer=opt),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(VMAP_ENGINES))
def test_step_under_vmap_equals_separate_steps(name: str, optimizer: str) -> None:
    engine = VMAP_ENGINES[name](optimizer)
    fns, _, _ = QuadraticP1().to_functions()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(8, 2, generator=gen, dtype=F64)
    ys = torch.randn(8, 3, generator=gen, dtype=F64)

    def run(state: hypergrad.State, steps: int = 3) -> tuple[hypergrad.State, hypergrad.Metrics]:
        for _ in range(steps):
            state, metrics = engine.step(fns, state, (None, None))
        return state, metrics

    singles = [run(engine.init(fns, {"x": xs[i]}, {"y": ys[i]})) for i in range(8)]
    initial = stack([engine.init(fns, {"x": xs[i]}, {"y": ys[i]}) for i in range(8)])
    batched_state, batched_metrics = torch.func.vmap(run)(initial)

    batched = flatten({"state": batched_state, "metrics": batched_metrics})
    for i, (state, metrics) in enumerate(singles):
        single = flatten({"state": state, "metrics": metrics})
        assert single.keys() == batched.keys()
        for k, value in single.items():
            torch.testing.assert_close(batched[k][i], value, rtol=1e-10, atol=1e-12, msg=f"{k} of instance {i}")
    assert (batched_state["step"] == 3).all()
    assert not torch.allclose(batched_state["x"]["x"], xs)  # x moved


# -- 7. the outer optimizers ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "torch_optimizer"), [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_outer_update_matches_torch_optim(kind: str, torch_optimizer: type) -> None:
    gen = torch.Generator().manual_seed(2)
    x = {"w": torch.randn(3, 2, generator=gen, dtype=F64), "b": torch.randn(4, generator=gen, dtype=F64)}
    params = {k: nn.Parameter(v.clone()) for k, v in x.items()}
    reference = torch_optimizer(list(params.values()), lr=0.05, foreach=False)
    state = outer.init(kind, x)
    start = {k: v.clone() for k, v in x.items()}
    for t in range(1, 6):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=F64) * 10.0**t for k, v in x.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
        reference.step()
        x, state = outer.update(kind, x, grads, state, 0.05, torch.tensor(t))
        for k in x:
            torch.testing.assert_close(x[k], params[k].detach(), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(x["w"], start["w"])


# -- 8. engine.hypergradient: keys and no side effects --------------------------------------------


class _NestedUpper(bilevel.BilevelProblem):
    """Upper variables in nested modules (keys '0.scale', '1.weight', '1.bias'); a ridge lower level."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.upper = nn.Sequential(bilevel.Hyper(scale=torch.tensor([0.5], dtype=F64)), nn.Linear(3, 2, dtype=F64))
        self.lower = bilevel.Hyper(w=torch.randn(2, generator=gen, dtype=F64))
        self.register_buffer("inputs", torch.randn(5, 3, generator=gen, dtype=F64), persistent=False)

    def lower_objective(self, batch: Any) -> Tensor:
        features = self.upper[1](self.inputs)
        ridge = 0.5 * torch.exp(self.upper[0].scale[0]) * torch.sum(self.lower.w**2)
        return 0.5 * torch.sum((features @ self.lower.w - 1.0) ** 2) + ridge

    def upper_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.lower.w - 0.3) ** 2)


@pytest.mark.parametrize(
    "engine",
    [
        hypergrad.Exact(inner_steps=5),
        hypergrad.Neumann(terms=3, inner_steps=5),
        hypergrad.CG(iters=2, inner_steps=5),
        hypergrad.Unrolled(inner_steps=5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_hypergradient_keys_and_no_side_effects(engine: hypergrad.Engine) -> None:
    problem = _NestedUpper()
    before = {k: v.detach().clone() for k, v in problem.state_dict(keep_vars=True).items()}
    grads = engine.hypergradient(problem, None, None)
    names = [name for name, _ in problem.upper.named_parameters()]
    assert list(grads) == names == ["0.scale", "1.weight", "1.bias"]
    for name, p in problem.upper.named_parameters():
        assert grads[name].shape == p.shape and torch.isfinite(grads[name]).all()
        assert not grads[name].requires_grad
    assert any(g.abs().sum() > 0 for g in grads.values())
    for k, v in problem.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cg_without_warm_start_is_exact_and_saves_the_warm_start_hvp() -> None:
    from experiments.oracles import count_oracles

    problem = QuadraticP1().lower_to_solution()
    dim_y = problem.lower_variable.numel()
    counts = {}
    for warm in (True, False):
        with count_oracles() as calls:
            grad = engine_grad(hypergrad.CG(iters=dim_y, inner_steps=0, warm_start=warm), problem)
        assert_close(grad, problem.hypergradient())
        counts[warm] = calls["hvps"]
    assert counts == {True: dim_y + 1, False: dim_y}
    with pytest.raises(TypeError, match="warm_start must be True or False"):
        hypergrad.CG(warm_start="no")
