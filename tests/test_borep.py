"""BO-REP (Hao, Gong, Liu, ICLR 2024) held to P1's closed forms in float64 (REFERENCE_PROBLEMS.md).

P1: g = 1/2 y^T A y - y^T (B x + c), f = 1/2 |y - y_t|^2 + rho/2 |x|^2, so H = A, J v = -B^T v and
x* solves (rho I + B^T A^-2 B) x = B^T A^-1 (y_t - A^-1 c).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

import bilevel
from hypergrad import Functions
from hypergrad.borep import BOREP
from problems.reference import QuadraticP1

F64 = torch.float64
P1 = QuadraticP1()
A, B, C_VEC, Y_T, RHO = P1.A, P1.B, P1.c, P1.y_target, P1.rho
I2, I3 = torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)
X0 = torch.tensor([0.3, -0.7], dtype=F64)
BATCHES = ((), ())


def p1_functions() -> Functions:
    """P1 as plain closures (the same formulas as QuadraticP1, without functional_call): fast long runs."""
    return Functions(f=lambda x, y, b: 0.5 * torch.sum((y["y"] - Y_T) ** 2) + 0.5 * RHO * torch.sum(x["x"] ** 2),
                     g=lambda x, y, b: 0.5 * y["y"] @ A @ y["y"] - y["y"] @ (B @ x["x"] + C_VEC), name="P1")


def counting(fns: Functions) -> tuple[Functions, list[int]]:
    """fns whose g counts its calls (eager mode runs Python, so the count is the real work)."""
    calls = [0]

    def g(x, y, batch):
        calls[0] += 1
        return fns.g(x, y, batch)

    return dataclasses.replace(fns, g=g), calls


def lower_grad(x: Tensor, y: Tensor) -> Tensor:
    return A @ y - (B @ x + C_VEC)


def neumann_matrix(terms: int, scale: float) -> Tensor:
    """(1/C) sum_{q=0..Q-1} (I - A/C)^q, dense."""
    return sum(torch.linalg.matrix_power(I3 - A / scale, q) for q in range(terms)) / scale


def stationary_point(inverse: Tensor) -> Tensor:
    """x with rho x + B^T S (A^-1 (B x + c) - y_t) = 0: x* for S = A^-1, the truncated Neumann fixed point else."""
    solve_a = torch.linalg.solve
    return torch.linalg.solve(RHO * I2 + B.T @ inverse @ solve_a(A, B), B.T @ inverse @ (Y_T - solve_a(A, C_VEC)))


def test_linear_system_step_matches_hand_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    y0, z0, m0 = (torch.randn(n, generator=gen, dtype=F64) for n in (3, 3, 2))
    beta, z_lr, a, lr = 0.8, 0.3, 0.2, 0.07
    engine = BOREP(estimator="linear-system", refine_steps=2, period=2, inner_steps=3, inner_lr=a, average=True,
                   beta=beta, outer_lr=lr, z_lr=z_lr)
    fns, x, y = QuadraticP1(y0=y0.tolist()).to_functions()
    state = {**engine.init(fns, x, y), "z": {"y": z0}, "m": {"x": m0}}
    new, metrics = engine.step(fns, state, BATCHES)

    y = y0
    for _ in range(2):  # refinement
        y = y - a * lower_grad(X0, y)
    iterates = []
    for _ in range(3):  # periodic update, averaged
        y = y - a * lower_grad(X0, y)
        iterates.append(y)
    y = torch.stack(iterates).mean(0)
    b = y - Y_T
    z = z0 - z_lr * (A @ z0 - b)
    h = RHO * X0 + B.T @ z
    m = beta * m0 + (1 - beta) * h
    x = X0 - lr * m / torch.linalg.norm(m)
    for got, want in ((new["y"]["y"], y), (new["z"]["y"], z), (new["m"]["x"], m), (new["x"]["x"], x)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert new["step"] == 1
    expected = {"hypergradient_norm": torch.linalg.norm(h), "momentum_norm": torch.linalg.norm(m),
                "solve_residual": torch.linalg.norm(A @ z0 - b) / torch.linalg.norm(b),
                "lower_stationarity": torch.linalg.norm(lower_grad(X0, y)), "step_size": torch.tensor(lr, dtype=F64),
                "upper_objective": 0.5 * b @ b + 0.5 * RHO * X0 @ X0,
                "lower_objective": 0.5 * y @ A @ y - y @ (B @ X0 + C_VEC)}
    for name, want in expected.items():
        torch.testing.assert_close(metrics[name], want, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(("terms", "scale"), [(1, 4.0), (3, 4.0), (8, 6.0), (80, 4.0)])
def test_neumann_estimate_at_lower_solution_matches_truncated_closed_form(terms: int, scale: float) -> None:
    problem = QuadraticP1().lower_to_solution()
    fns, x, y = problem.to_functions()
    engine = BOREP(estimator="neumann", terms=terms, hessian_scale=scale)
    _, h, metrics = engine.estimate(fns, engine.init(fns, x, y), BATCHES)
    b = problem.lower_solution() - Y_T
    torch.testing.assert_close(h["x"], RHO * X0 + B.T @ neumann_matrix(terms, scale) @ b, rtol=1e-12, atol=1e-14)
    # The series' last term over its first: (I - H/C)^(Q-1) b, the residual of the sum without that term.
    residual = torch.linalg.matrix_power(I3 - A / scale, terms - 1) @ b
    torch.testing.assert_close(metrics["solve_residual"], torch.linalg.norm(residual) / torch.linalg.norm(b))
    if terms == 80:  # 0.75^80 ~ 1e-10: the exact hypergradient (golden (2.5634705075, -3.6974348422))
        torch.testing.assert_close(h["x"], problem.hypergradient(), rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("estimator", ["neumann", "linear-system"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_every_step_has_length_outer_lr(estimator: str, beta: float) -> None:
    fns = p1_functions()
    engine = BOREP(estimator=estimator, refine_steps=3, period=2, inner_steps=2, inner_lr=0.2, beta=beta,
                   outer_lr=0.3, terms=3, hessian_scale=4.0, z_lr=0.2)
    state = engine.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})
    moves, momenta = [], []
    for _ in range(12):  # 0.3 per step: x crosses x* and the momentum turns, so |m| varies widely
        new, metrics = engine.step(fns, state, BATCHES)
        moves.append(torch.linalg.norm(new["x"]["x"] - state["x"]["x"]))
        momenta.append(torch.linalg.norm(new["m"]["x"]))
        torch.testing.assert_close(metrics["momentum_norm"], momenta[-1], rtol=1e-14, atol=0.0)
        if beta == 0.0:
            torch.testing.assert_close(metrics["momentum_norm"], metrics["hypergradient_norm"], rtol=1e-14, atol=0.0)
        state = new
    torch.testing.assert_close(torch.stack(moves), torch.full((12,), 0.3, dtype=F64), rtol=1e-12, atol=0.0)
    assert max(momenta) > 3 * min(momenta)  # the step length does not follow |m|


STAGE_STEPS = 200


@pytest.mark.parametrize("estimator", ["neumann", "linear-system"])
def test_reaches_the_stationary_point_within_its_step_resolution(estimator: str) -> None:
    # Normalized momentum with a constant step circles its target at a distance proportional to outer_lr
    # (measured up to ~8 lr for neumann, ~13.5 lr for linear-system with beta 0.9); a 10x smaller step
    # from where the first stage stopped must come 10x closer.
    target = stationary_point(neumann_matrix(3, 4.0) if estimator == "neumann" else torch.linalg.inv(A))
    fns = p1_functions()
    state = None
    for lr in (0.05, 0.01):
        engine = BOREP(estimator=estimator, refine_steps=20, period=2, inner_steps=5, inner_lr=0.2, outer_lr=lr,
                       terms=3, hessian_scale=4.0, z_lr=0.2)
        state = state or engine.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})
        distances = []
        for _ in range(STAGE_STEPS):
            state, _ = engine.step(fns, state, BATCHES)
            distances.append(float(torch.linalg.norm(state["x"]["x"] - target)) / lr)
        assert max(distances[-50:]) <= 20, (lr, distances[-50:])
    assert torch.linalg.norm(X0 - target) > 5 * 20 * 0.01  # the start lies far outside the final tolerance


def test_periodic_update_and_refinement_run_only_on_their_steps() -> None:
    fns, calls = counting(P1.to_functions()[0])
    engine = BOREP(estimator="linear-system", refine_steps=4, period=3, inner_steps=2, inner_lr=0.2, outer_lr=0.05)
    state = engine.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})
    for k in range(8):
        before, y_before = calls[0], state["y"]["y"]
        state = engine.inner(fns, state, BATCHES[0])
        expected = (4 if k == 0 else 0) + (2 if k % 3 == 0 else 0)
        assert calls[0] - before == expected, f"lower gradients at step {k}"
        assert torch.equal(state["y"]["y"], y_before) == (expected == 0), f"y at step {k}"
        state, h, _ = engine.estimate(fns, state, BATCHES)
        state = engine.outer(fns, state, h)


@pytest.mark.parametrize("average", [False, True])
def test_radius_keeps_each_update_in_its_ball(average: bool) -> None:
    fns = p1_functions()
    engine = BOREP(refine_steps=0, period=2, inner_steps=4, inner_lr=0.2, radius=0.05, average=average, outer_lr=0.05)
    state = engine.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})
    for k in range(6):
        start = state["y"]["y"]
        state, _ = engine.step(fns, state, BATCHES)
        moved = torch.linalg.norm(state["y"]["y"] - start)
        assert moved <= 0.05 * (1 + 1e-12) if k % 2 == 0 else moved == 0
        if k == 0 and not average:  # y* is ~2 away: the last iterate sits on the sphere
            torch.testing.assert_close(moved, torch.tensor(0.05, dtype=F64), rtol=1e-12, atol=0.0)
    unprojected = BOREP(refine_steps=0, period=2, inner_steps=4, inner_lr=0.2, average=average, outer_lr=0.05)
    free = unprojected.inner(fns, unprojected.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)}), ())
    assert torch.linalg.norm(free["y"]["y"]) > 0.05  # the ball did bind


def test_average_is_the_mean_of_the_new_iterates() -> None:
    fns = p1_functions()
    y0 = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    for average in (True, False):
        engine = BOREP(refine_steps=0, inner_steps=5, inner_lr=0.2, average=average)
        y = engine.inner(fns, engine.init(fns, {"x": X0}, {"y": y0}), ())["y"]["y"]
        iterates, current = [], y0
        for _ in range(5):
            current = current - 0.2 * lower_grad(X0, current)
            iterates.append(current)
        want = torch.stack(iterates).mean(0) if average else iterates[-1]
        torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-15)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
    return {prefix: tree}


@pytest.mark.parametrize("estimator", ["neumann", "linear-system"])
def test_step_under_vmap_equals_separate_steps(estimator: str) -> None:
    fns, calls = counting(P1.to_functions()[0])
    engine = BOREP(estimator=estimator, refine_steps=2, period=2, inner_steps=3, inner_lr=0.2, radius=0.3,
                   outer_lr=0.05, terms=3, hessian_scale=4.0, z_lr=0.2)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 2, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)

    def run(state, steps=4):
        for _ in range(steps):
            state, metrics = engine.step(fns, state, BATCHES)
        return state, metrics

    singles = [run(engine.init(fns, {"x": xs[i]}, {"y": ys[i]})) for i in range(8)]
    stacked = torch.func.vmap(lambda x, y: engine.init(fns, {"x": x}, {"y": y}))(xs, ys)
    batched = _flatten(dict(zip(("state", "metrics"), torch.func.vmap(run)(stacked), strict=True)))
    # All members share the step count: with it unbatched the branch is taken once and off-steps are free.
    shared_dims = {k: (None if k == "step" else 0) for k in stacked}
    off_step = torch.func.vmap(lambda s: engine.inner(fns, s, ()), in_dims=(shared_dims,))
    before = calls[0]
    shared = off_step({**stacked, "step": torch.tensor(1)})
    assert calls[0] == before and torch.equal(shared["y"]["y"], stacked["y"]["y"])
    for i, single in enumerate(singles):
        for k, value in _flatten(dict(zip(("state", "metrics"), single, strict=True))).items():
            torch.testing.assert_close(batched[k][i], value, rtol=1e-10, atol=1e-12, msg=f"{k} of instance {i}")


def test_compiled_step_equals_eager() -> None:
    fns = p1_functions()
    engine = BOREP(estimator="linear-system", refine_steps=2, period=2, inner_steps=2, inner_lr=0.2, outer_lr=0.05,
                   z_lr=0.2)
    eager = compiled = engine.init(fns, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})
    step = torch.compile(lambda s: engine.step(fns, s, BATCHES), backend="eager", fullgraph=True)
    for _ in range(3):
        eager, _ = engine.step(fns, eager, BATCHES)
        compiled, _ = step(compiled)
    for k, value in _flatten(eager).items():
        torch.testing.assert_close(_flatten(compiled)[k], value, rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize(("name", "value"), [
    ("estimator", "cg"), ("refine_steps", -1), ("period", 0), ("inner_steps", 0), ("inner_lr", 0.0),
    ("radius", -1.0), ("average", "yes"), ("beta", 1.0), ("beta", -0.1), ("outer_lr", float("nan")),
    ("terms", 0), ("hessian_scale", 0.0), ("z_lr", -1e-2), ("period", 2.5),
])
def test_arguments_are_validated(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"BOREP: {name}"):
        BOREP(**{name: value})


def test_defaults_and_refusals() -> None:
    engine = BOREP()
    defaults = (engine.estimator, engine.beta, engine.z_lr, engine.period, engine.average)
    assert defaults == ("neumann", 0.9, 1e-2, 2, True)
    assert engine.hessian_scale == pytest.approx(1 / engine.inner_lr)
    constrained = dataclasses.replace(p1_functions(), c=lambda x, y, b: y["y"].sum()[None])
    with pytest.raises(ValueError, match="BOREP cannot honour lower-level constraints"):
        engine.init(constrained, {"x": X0}, {"y": torch.zeros(3, dtype=F64)})


def test_fit_runs_five_steps() -> None:
    problem = QuadraticP1()
    engine = BOREP(estimator="neumann", refine_steps=5, inner_steps=3, inner_lr=0.2, outer_lr=0.05, terms=3,
                   hessian_scale=4.0)
    trainer = bilevel.fit(problem, engine, max_steps=5, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
    assert trainer.global_step == 5
    moved = torch.linalg.norm(problem.upper.x.detach() - X0)
    assert 0.05 < moved <= 5 * 0.05 + 1e-12  # five steps of length 0.05, not all cancelling
    assert torch.linalg.norm(problem.lower.y.detach()) > 0  # y left zero only if the lower update never ran
