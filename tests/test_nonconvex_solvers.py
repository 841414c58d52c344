"""IFT solvers on an indefinite lower Hessian (ALGORITHMS.md section 8), held to closed forms (float64).

The problem: g(x, y) = 0.5 y'Ay - y'Bx with A symmetric and indefinite (eigenvalues 4, 2.5, 1.5, 0.8,
-0.6 in a random basis), f(x, y) = 0.5 |y - y_t|^2 + 0.5 rho |x|^2. At any (x, y):

    b = grad_y f = y - y_t,   J v = grad_x <grad_y g, v> = -B'v,   hypergradient = rho x + B'v

so every estimate below is checked through v against (A + lam I)^-1 b, A^-1 b, a hand-written
truncated CG loop, or the fallback alpha b.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import hypergrad
from hypergrad import solvers
from hypergrad.engine import Functions
from hypergrad.implicit import Fallback, safeguard

F64 = torch.float64
N, M = 5, 2
RHO = 0.3
EIGENVALUES = torch.tensor([4.0, 2.5, 1.5, 0.8, -0.6], dtype=F64)
_Q = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
A = _Q @ torch.diag(EIGENVALUES) @ _Q.T
NEGATIVE_DIRECTION = _Q[:, 4]  # unit eigenvector of A for -0.6
_GEN = torch.Generator().manual_seed(1)
B = torch.randn(N, M, generator=_GEN, dtype=F64)
Y_T = torch.randn(N, generator=_GEN, dtype=F64)
X0 = torch.randn(M, generator=_GEN, dtype=F64)
Y0 = torch.randn(N, generator=_GEN, dtype=F64)
EYE = torch.eye(N, dtype=F64)
NO_BATCHES = (None, None)


def functions(a: Tensor = A) -> Functions:
    def g(x, y, batch):
        return 0.5 * y["y"] @ a @ y["y"] - y["y"] @ B @ x["x"]

    def f(x, y, batch):
        return 0.5 * (y["y"] - Y_T) @ (y["y"] - Y_T) + 0.5 * RHO * x["x"] @ x["x"]

    return Functions(f=f, g=g, name="IndefiniteQuadratic")


def matvec_of(a: Tensor) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    return lambda p: {"y": a @ p["y"]}


def estimate(engine: hypergrad.Engine, v0: Tensor | None = None, y: Tensor = Y0,
             a: Tensor = A) -> tuple[dict, dict, dict]:
    """(new state, hypergradient, metrics) of ``engine.estimate`` at (X0, y), the warm start set to v0."""
    fns = functions(a)
    state = engine.init(fns, {"x": X0}, {"y": y})
    if v0 is not None:
        state["v"] = {"y": v0}
    return engine.estimate(fns, state, NO_BATCHES)


def hypergradient_of(v: Tensor) -> Tensor:
    return RHO * X0 + B.T @ v


def test_the_problem_is_indefinite_and_its_hypergradient_formula_holds() -> None:
    assert torch.linalg.eigvalsh(A).min() < 0 < torch.linalg.eigvalsh(A).max()
    # Exact (no damping) at a nonsingular indefinite A: v = A^-1 b, checked against the formula.
    _, h, metrics = estimate(hypergrad.Exact(inner_steps=0))
    torch.testing.assert_close(h["x"], hypergradient_of(torch.linalg.solve(A, Y0 - Y_T)), rtol=1e-12, atol=1e-12)
    assert metrics["solve_fallback"] == 0.0


# -- 1. damping: v = (A + lam I)^-1 b ---------------------------------------------------------------

DAMPED = {
    # lam = 1 makes A + lam I positive definite (eigenvalues 5 .. 0.4): CG exact in N iterations,
    # Neumann convergent for alpha < 2 / 5 (0.3: contraction max |1 - 0.3 mu| = 0.88, 400 terms ~ 1e-22).
    "CG": lambda lam: hypergrad.CG(iters=N, tol=0.0, inner_steps=0, damping=lam, warm_start=False),
    "Neumann": lambda lam: hypergrad.Neumann(terms=400, alpha=0.3, inner_steps=0, damping=lam),
    "Exact": lambda lam: hypergrad.Exact(inner_steps=0, damping=lam),
}


@pytest.mark.parametrize("name", sorted(DAMPED))
def test_damping_solves_the_ridge_system(name: str) -> None:
    lam = 1.0
    v = torch.linalg.solve(A + lam * EYE, Y0 - Y_T)
    state, h, metrics = estimate(DAMPED[name](lam))
    torch.testing.assert_close(state["v"]["y"], v, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h["x"], hypergradient_of(v), rtol=1e-9, atol=1e-10)
    assert metrics["solve_residual"] < 1e-9  # the residual of the damped system
    assert metrics["solve_fallback"] == 0.0
    undamped = torch.linalg.solve(A, Y0 - Y_T)
    assert (v - undamped).norm() > 0.1  # damping changed the answer: the check above is not vacuous


def test_exact_damping_below_the_negative_eigenvalue_is_still_exact() -> None:
    lam = 0.25  # A + lam I indefinite (eigenvalue -0.35) but nonsingular: a direct solve is exact
    state, h, _ = estimate(hypergrad.Exact(inner_steps=0, damping=lam))
    torch.testing.assert_close(state["v"]["y"], torch.linalg.solve(A + lam * EYE, Y0 - Y_T), rtol=1e-12, atol=1e-12)


def test_damped_solvers_report_the_damped_residual() -> None:
    lam, b = 1.0, {"y": Y0 - Y_T}
    shorter = solvers.neumann(matvec_of(A), b, terms=2, alpha=0.3, damping=lam).v  # Neumann's: without the last term
    for solution, v in ((solvers.cg(matvec_of(A), b, iters=2, damping=lam), None),
                        (solvers.neumann(matvec_of(A), b, terms=3, alpha=0.3, damping=lam), shorter)):
        v = solution.v if v is None else v
        expected = torch.linalg.norm((A + lam * EYE) @ v["y"] - b["y"]) / torch.linalg.norm(b["y"])
        torch.testing.assert_close(solution.residual, expected, rtol=1e-10, atol=1e-14)
        assert solution.residual > 1e-3  # a partial solve: the residual is not trivially zero


# -- 2. CG on the normal equations ------------------------------------------------------------------


class CountingMatVec:
    def __init__(self, a: Tensor) -> None:
        self.a, self.calls = a, 0

    def __call__(self, p: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        return {"y": self.a @ p["y"]}


def test_normal_cg_solves_an_indefinite_system_with_two_products_per_iteration() -> None:
    b = {"y": Y0 - Y_T}
    matvec = CountingMatVec(A)
    solution = solvers.cg(matvec, b, iters=N, normal=True)
    assert matvec.calls == 2 * N
    torch.testing.assert_close(solution.v["y"], torch.linalg.solve(A, b["y"]), rtol=1e-9, atol=1e-10)
    assert solution.residual < 1e-9
    assert solution.negative_curvature == 0.0
    warm = CountingMatVec(A)
    solvers.cg(warm, b, iters=3, normal=True, v0={"y": torch.ones(N, dtype=F64)})
    assert warm.calls == 2 * 3 + 1


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_normal_cg_reports_the_original_systems_residual(iters: int) -> None:
    b = {"y": Y0 - Y_T}
    for v0 in (None, {"y": torch.linspace(-1, 1, N, dtype=F64)}):
        solution = solvers.cg(matvec_of(A), b, iters=iters, normal=True, v0=v0)
        true = torch.linalg.norm(A @ solution.v["y"] - b["y"]) / torch.linalg.norm(b["y"])
        torch.testing.assert_close(solution.residual, true, rtol=1e-10, atol=1e-14)
        assert solution.residual > 1e-6  # fewer than N iterations: not solved yet


def test_normal_cg_minimizes_the_residual_over_its_krylov_space() -> None:
    # CGLS from 0 after k steps minimizes |A v - b| over span{Ab, A^3 b, ..., A^(2k-1) b}: a least-squares check.
    b = Y0 - Y_T
    k = 2
    basis = torch.stack([torch.linalg.matrix_power(A, 2 * j + 1) @ b for j in range(k)], dim=1)
    coef = torch.linalg.lstsq(A @ basis, b).solution
    solution = solvers.cg(matvec_of(A), {"y": b}, iters=k, normal=True)
    torch.testing.assert_close(solution.v["y"], basis @ coef, rtol=1e-8, atol=1e-10)


def test_normal_cg_engine_gives_the_exact_hypergradient_with_damping() -> None:
    lam = 0.25  # A + lam I indefinite and nonsingular: plain CG has no guarantee, the normal equations do
    engine = hypergrad.CG(iters=N, tol=0.0, inner_steps=0, normal=True, damping=lam, warm_start=False)
    state, h, metrics = estimate(engine)
    v = torch.linalg.solve(A + lam * EYE, Y0 - Y_T)
    torch.testing.assert_close(state["v"]["y"], v, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(h["x"], hypergradient_of(v), rtol=1e-8, atol=1e-9)
    assert metrics["solve_residual"] < 1e-8 and metrics["solve_fallback"] == 0.0


# -- 3. truncated CG at negative curvature ----------------------------------------------------------


def reference_truncated_cg(a: Tensor, b: Tensor, iters: int, v0: Tensor | None = None,
                           eps: float = 0.0) -> tuple[Tensor, int | None]:
    """Nocedal and Wright's Algorithm 7.1 (inner loop) for a v with a v = b, written with Python control flow.

    Returns (v, the index of the direction at which p'Ap <= eps |p|^2 stopped it, or None).
    """
    v = torch.zeros_like(b) if v0 is None else v0.clone()
    r = b - a @ v
    p = r.clone()
    for j in range(iters):
        ap = a @ p
        if p @ ap <= eps * (p @ p):
            if j == 0 and v0 is None:
                return b.clone(), j
            return v, j
        alpha = (r @ r) / (p @ ap)
        v = v + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return v, None


@pytest.mark.parametrize(("seed", "stop_at"), [(1, 2), (10, 4)])
def test_truncated_cg_equals_the_reference_loop(seed: int, stop_at: int) -> None:
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=F64)
    v_ref, j = reference_truncated_cg(A, b, iters=N)
    assert j == stop_at  # the case is what it claims to be: a stop after some progress
    solution = solvers.cg(matvec_of(A), {"y": b}, iters=N)
    torch.testing.assert_close(solution.v["y"], v_ref, rtol=1e-12, atol=1e-13)
    assert solution.negative_curvature == 1.0
    expected = torch.linalg.norm(A @ v_ref - b) / torch.linalg.norm(b)
    torch.testing.assert_close(solution.residual, expected, rtol=1e-10, atol=1e-14)
    longer = solvers.cg(matvec_of(A), {"y": b}, iters=3 * N)  # iterations past the stop leave v unchanged
    assert torch.equal(longer.v["y"], solution.v["y"])


def test_truncated_cg_with_a_curvature_threshold_equals_the_reference_loop() -> None:
    b = torch.randn(N, generator=torch.Generator().manual_seed(10), dtype=F64)
    eps = 1.0  # directions with Rayleigh quotient <= 1 count as nonpositive curvature
    v_ref, j = reference_truncated_cg(A, b, iters=N, eps=eps)
    assert (j, reference_truncated_cg(A, b, iters=N)[1]) == (3, 4)  # eps moved the stop one direction earlier
    solution = solvers.cg(matvec_of(A), {"y": b}, iters=N, curvature_eps=eps)
    torch.testing.assert_close(solution.v["y"], v_ref, rtol=1e-12, atol=1e-13)


def test_negative_curvature_at_the_first_direction() -> None:
    b = {"y": 2.0 * NEGATIVE_DIRECTION}  # p = b at a cold start: p'Ap = -0.6 |b|^2
    cold = solvers.cg(matvec_of(A), b, iters=3)
    torch.testing.assert_close(cold.v["y"], b["y"], rtol=0, atol=0)  # v = b (Nocedal and Wright)
    torch.testing.assert_close(cold.residual, torch.tensor(1.6, dtype=F64), rtol=1e-12, atol=0)  # |A b - b| / |b|
    assert cold.negative_curvature == 1.0
    v0 = torch.linalg.solve(A, b["y"] - 0.5 * NEGATIVE_DIRECTION)  # warm start whose residual is negative curvature
    warm = solvers.cg(matvec_of(A), b, iters=3, v0={"y": v0})
    torch.testing.assert_close(warm.v["y"], v0, rtol=0, atol=0)  # the last iterate is kept
    assert warm.negative_curvature == 1.0
    v_ref, j = reference_truncated_cg(A, b["y"], iters=3, v0=v0)
    assert j == 0 and torch.equal(v_ref, v0)


def test_on_a_positive_definite_system_stop_and_skip_are_plain_cg_bit_for_bit() -> None:
    spd = A + 1.0 * EYE
    b = {"y": Y0 - Y_T}
    for iters in (2, N):
        stop = solvers.cg(matvec_of(spd), b, iters=iters)
        skip = solvers.cg(matvec_of(spd), b, iters=iters, negative_curvature="skip")
        assert torch.equal(stop.v["y"], skip.v["y"]) and torch.equal(stop.residual, skip.residual)
        assert stop.negative_curvature == 0.0 and skip.negative_curvature == 0.0
    torch.testing.assert_close(stop.v["y"], torch.linalg.solve(spd, b["y"]), rtol=1e-10, atol=1e-12)


def reference_skipping_cg(a: Tensor, b: Tensor, iters: int) -> tuple[Tensor, int]:
    """CG that takes no step along a direction with p'Ap <= 0 and goes on (CG before truncation), by hand.

    Returns (v, the number of directions skipped).
    """
    v, r = torch.zeros_like(b), b.clone()
    p, skipped = r.clone(), 0
    for _ in range(iters):
        ap = a @ p
        alpha = (r @ r) / (p @ ap) if p @ ap > 0 else 0.0
        skipped += int(p @ ap <= 0)
        v = v + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return v, skipped


@pytest.mark.parametrize("iters", [N, 2 * N])
def test_skip_equals_the_reference_loop_and_counts_negative_curvature(iters: int) -> None:
    b = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=F64)
    v_ref, skipped = reference_skipping_cg(A, b, iters)
    assert skipped >= 3
    skip = solvers.cg(matvec_of(A), {"y": b}, iters=iters, negative_curvature="skip")
    torch.testing.assert_close(skip.v["y"], v_ref, rtol=1e-10, atol=1e-12)
    assert skip.negative_curvature == 1.0
    stop = solvers.cg(matvec_of(A), {"y": b}, iters=iters)
    assert (skip.v["y"] - stop.v["y"]).abs().max() > 1.0  # it went on past the direction where stop ended


def test_cg_engine_logs_negative_curvature() -> None:
    _, _, metrics = estimate(hypergrad.CG(iters=N, inner_steps=0, fallback_residual=1e6))
    # Y0 - Y_T has a component along the negative eigenvector; check the metric against the reference loop.
    _, j = reference_truncated_cg(A, Y0 - Y_T, iters=N)
    assert metrics["negative_curvature"] == (0.0 if j is None else 1.0)
    _, _, spd_metrics = estimate(hypergrad.CG(iters=N, inner_steps=0), a=A + EYE)
    assert spd_metrics["negative_curvature"] == 0.0


# -- 4. the fallback ---------------------------------------------------------------------------------


def test_fallback_replaces_a_failed_solve_and_resets_the_warm_start() -> None:
    # A warm start whose residual is 5 |b| along the negative eigenvector: truncated CG keeps it
    # (first direction has p'Ap < 0), its residual 5 > 1 fails, the step uses alpha b with alpha = inner_lr.
    b = Y0 - Y_T
    r0 = 5.0 * torch.linalg.norm(b) * NEGATIVE_DIRECTION
    v0 = torch.linalg.solve(A, b - r0)
    inner_lr = 0.07
    state, h, metrics = estimate(hypergrad.CG(iters=3, inner_steps=0, inner_lr=inner_lr), v0=v0)
    torch.testing.assert_close(h["x"], hypergradient_of(inner_lr * b), rtol=1e-12, atol=1e-12)
    assert torch.equal(state["v"]["y"], torch.zeros(N, dtype=F64))
    assert metrics["solve_fallback"] == 1.0 and metrics["negative_curvature"] == 1.0
    torch.testing.assert_close(metrics["solve_residual"], torch.tensor(5.0, dtype=F64), rtol=1e-10, atol=0)
    # Off: the failed v itself is used and kept (the behaviour before the safeguard).
    state, h, metrics = estimate(hypergrad.CG(iters=3, inner_steps=0, inner_lr=inner_lr, fallback_residual=None),
                                 v0=v0)
    torch.testing.assert_close(h["x"], hypergradient_of(v0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["v"]["y"], v0, rtol=0, atol=0)
    assert "solve_fallback" not in metrics
    # A threshold above the residual keeps the solver's v.
    _, h, metrics = estimate(hypergrad.CG(iters=3, inner_steps=0, fallback_residual=6.0), v0=v0)
    torch.testing.assert_close(h["x"], hypergradient_of(v0), rtol=1e-12, atol=1e-12)
    assert metrics["solve_fallback"] == 0.0


def test_neumann_divergence_falls_back_to_its_first_term() -> None:
    alpha, terms = 0.3, 30
    b = Y0 - Y_T
    # On the eigenvalue -0.6 the series grows by 1.18 per term: its last term is far above its first.
    growth = torch.linalg.matrix_power(EYE - alpha * A, terms) @ b
    assert torch.linalg.norm(growth) / torch.linalg.norm(b) > 10
    state, h, metrics = estimate(hypergrad.Neumann(terms=terms, alpha=alpha, inner_steps=0))
    torch.testing.assert_close(h["x"], hypergradient_of(alpha * b), rtol=1e-12, atol=1e-12)
    assert torch.equal(state["v"]["y"], torch.zeros(N, dtype=F64))
    assert metrics["solve_fallback"] == 1.0
    torch.testing.assert_close(metrics["solve_residual"], torch.linalg.norm(growth) / torch.linalg.norm(b))


def test_a_non_finite_solution_triggers_the_fallback() -> None:
    # An exactly singular H: the dense solve's v is not finite; a threshold of 1e300 leaves only that trigger
    # (its residual is NaN or inf, which counts as failed too).
    state, h, metrics = estimate(hypergrad.Exact(inner_steps=0, inner_lr=0.2, fallback_residual=1e300),
                                 a=_exactly_singular())
    torch.testing.assert_close(h["x"], hypergradient_of(0.2 * (Y0 - Y_T)), rtol=1e-12, atol=1e-12)
    assert metrics["solve_fallback"] == 1.0
    assert torch.equal(state["v"]["y"], torch.zeros(N, dtype=F64))
    # Every metric stays finite (the loop's step guard stops on a non-finite one): the blown-up residual
    # is logged as the largest float64.
    assert all(torch.isfinite(value) for value in metrics.values())
    assert metrics["solve_residual"] == torch.finfo(F64).max
    # The trigger on v alone: a finite residual below the threshold with an infinite v.
    b = {"y": Y0 - Y_T}
    bad = solvers.Solution({"y": torch.full((N,), float("inf"), dtype=F64)}, torch.zeros((), dtype=F64))
    v, v_next, failed = safeguard(bad, b, Fallback(threshold=1.0, alpha=0.5))
    assert failed and torch.equal(v["y"], 0.5 * b["y"]) and torch.equal(v_next["y"], torch.zeros(N, dtype=F64))
    good = solvers.Solution({"y": torch.ones(N, dtype=F64)}, torch.tensor(0.5, dtype=F64))
    v, v_next, failed = safeguard(good, b, Fallback(threshold=1.0, alpha=0.5))
    assert not failed and torch.equal(v["y"], good.v["y"]) and torch.equal(v_next["y"], good.v["y"])
    nan_residual = solvers.Solution({"y": torch.ones(N, dtype=F64)}, torch.tensor(float("nan"), dtype=F64))
    assert safeguard(nan_residual, b, Fallback(threshold=1.0, alpha=0.5))[2]


def _exactly_singular() -> Tensor:
    """A symmetric matrix with an exact zero row and column: LU meets a zero pivot, v is not finite."""
    a = A.clone()
    a[:, 2] = 0.0
    a[2, :] = 0.0
    return a


def test_borep_keeps_its_estimate_without_a_fallback() -> None:
    # BO-REP shares implicit_estimate but passes no safeguard: a divergent series is used as it is.
    engine = hypergrad.BOREP(estimator="neumann", refine_steps=0, terms=31, hessian_scale=1 / 0.3)
    _, h, metrics = engine.estimate(functions(), engine.init(functions(), {"x": X0}, {"y": Y0}), NO_BATCHES)
    b = Y0 - Y_T
    series = 0.3 * sum(torch.linalg.matrix_power(EYE - 0.3 * A, j) @ b for j in range(31))
    torch.testing.assert_close(h["x"], hypergradient_of(series), rtol=1e-10, atol=1e-10)
    assert "solve_fallback" not in metrics


# -- 5. under vmap: a population whose members take different branches -------------------------------


def test_population_step_under_vmap_equals_separate_steps() -> None:
    # Member 0: positive definite (no truncation, no fallback); 1: indefinite (truncation);
    # 2: a warm start that fails (fallback). The masks must pick per member.
    matrices = torch.stack([A + EYE, A, A])
    b = Y0 - Y_T
    v0s = torch.stack([torch.zeros(N, dtype=F64), torch.zeros(N, dtype=F64),
                       torch.linalg.solve(A, b - 5.0 * torch.linalg.norm(b) * NEGATIVE_DIRECTION)])
    engines = [hypergrad.CG(iters=3, inner_steps=2, inner_lr=0.05, outer_lr=0.05),
               hypergrad.CG(iters=2, inner_steps=2, inner_lr=0.05, outer_lr=0.05, normal=True, damping=0.1),
               hypergrad.Neumann(terms=30, alpha=0.3, inner_steps=2, inner_lr=0.05, outer_lr=0.05),
               hypergrad.Exact(inner_steps=2, inner_lr=0.05, outer_lr=0.05, damping=0.1)]
    for engine in engines:
        def run(a: Tensor, v0: Tensor, engine: hypergrad.Engine = engine) -> tuple[dict, dict]:
            fns = functions(a)
            state = {**engine.init(fns, {"x": X0}, {"y": Y0}), "v": {"y": v0}}
            steps = []
            for _ in range(2):
                state, metrics = engine.step(fns, state, NO_BATCHES)
                steps.append(metrics)
            return state, {name: torch.stack([m[name] for m in steps]) for name in steps[0]}

        batched_state, batched_metrics = torch.func.vmap(run)(matrices, v0s)
        for i in range(3):
            state, metrics = run(matrices[i], v0s[i])
            for name, value in metrics.items():
                torch.testing.assert_close(batched_metrics[name][i], value, rtol=1e-10, atol=1e-12,
                                           msg=f"{type(engine).__name__} {name} of member {i}")
            for key, leaf in (("x", "x"), ("y", "y"), ("v", "y")):
                torch.testing.assert_close(batched_state[key][leaf][i], state[key][leaf], rtol=1e-10, atol=1e-12)
        # The members took different branches, so the masks really chose per member (first step).
        first_fallback = batched_metrics["solve_fallback"][:, 0].tolist()
        if type(engine) is hypergrad.CG and not engine.normal:
            assert first_fallback == [0.0, 0.0, 1.0]
            assert batched_metrics["negative_curvature"][:, 0].tolist() == [0.0, 1.0, 1.0]
        if type(engine) is hypergrad.Neumann:
            assert first_fallback == [0.0, 1.0, 1.0]


def test_cg_options_compile_whole() -> None:
    from hypergrad.compile import graph_breaks

    fns = functions()
    for engine in (hypergrad.CG(iters=2, inner_steps=1, normal=True, damping=0.1),
                   hypergrad.CG(iters=2, inner_steps=1, curvature_eps=0.1)):
        state = engine.init(fns, {"x": X0}, {"y": Y0})
        assert graph_breaks(engine, fns, state, NO_BATCHES) == []


# -- 6. argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: hypergrad.CG(damping=-0.1), ValueError, r"CG: damping must be a finite number >= 0"),
    (lambda: hypergrad.Neumann(damping=float("nan")), ValueError, r"Neumann: damping must be a finite number >= 0"),
    (lambda: hypergrad.Exact(damping="1"), ValueError, r"Exact: damping must be a finite number >= 0"),
    (lambda: hypergrad.CG(fallback_residual=0.0), ValueError, r"CG: fallback_residual must be a finite number > 0"),
    (lambda: hypergrad.Exact(fallback_residual=float("inf")), ValueError,
     r"Exact: fallback_residual must be a finite number > 0"),
    (lambda: hypergrad.Neumann(fallback_residual=-1), ValueError,
     r"Neumann: fallback_residual must be a finite number > 0"),
    (lambda: hypergrad.CG(negative_curvature="truncate"), ValueError,
     r"CG: negative_curvature must be one of 'stop', 'skip', got 'truncate'"),
    (lambda: hypergrad.CG(curvature_eps=-1e-3), ValueError, r"CG: curvature_eps must be a finite number >= 0"),
    (lambda: hypergrad.CG(normal=1), TypeError, r"CG: normal must be True or False, got 1"),
])
def test_bad_arguments_are_refused_naming_engine_and_argument(make: Callable, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()
