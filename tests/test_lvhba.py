"""LV-HBA (Yao, Yu, Zeng, Zhang 2024), the affine projection, and the constrained problems P5, P6 (float64).

The two convergence runs compile the engine's own ``step`` with ``torch.compile`` (after checking
that the compiled step equals the eager one): eager torch.func costs ~5-10 ms per step on this
machine, the compiled step ~0.2 ms after ~10-15 s of compilation.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import bilevel
import hypergrad
from hypergrad import feasible
from hypergrad.lvhba import LVHBA
from problems.constrained import ActiveConstraintP6, CoupledToyP5

F64 = torch.float64
NO_DATA = ((), ())


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=F64)


def compiled_run(engine: LVHBA, fns: hypergrad.Functions, state: dict, steps: int) -> tuple[dict, dict]:
    """``steps`` engine steps through torch.compile, after checking one compiled step against eager."""
    torch._dynamo.reset()
    step = torch.compile(lambda s: engine.step(fns, s, NO_DATA), fullgraph=True)
    eager, compiled = engine.step(fns, state, NO_DATA), step(state)
    for a, b in zip(torch.utils._pytree.tree_leaves(eager), torch.utils._pytree.tree_leaves(compiled), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    metrics: dict = {}
    for _ in range(steps):
        state, metrics = step(state)
    return state, metrics


# -- the problems' closed forms ------------------------------------------------------------------


def test_p6_closed_forms():
    for x, slope in ((0.0, -9.0), (0.5, -6.5), (2.0, -1.0), (3.0, 1.0)):  # REFERENCE_PROBLEMS P6
        problem = ActiveConstraintP6(x0=x)
        assert problem.hypergradient().item() == pytest.approx(slope, abs=1e-12)
        h = 1e-6  # F'(x) by central differences of the closed-form value F(x) = f(x, y*(x))
        values = []
        for shift in (h, -h):
            values.append(ActiveConstraintP6(x0=x + shift).value())
        assert ((values[0] - values[1]) / (2 * h)).item() == pytest.approx(slope, abs=1e-6)
    best = ActiveConstraintP6(x0=2.5)
    assert best.value().item() == pytest.approx(0.25, abs=1e-12)
    assert best.lower_solution().item() == pytest.approx(3.5) and best.lower_multiplier().item() == 1.5


@pytest.mark.parametrize("n", [1, 2, 5])
def test_p5_closed_forms(n):
    problem = CoupledToyP5(n=n, x0=-0.3)
    sol = problem.solution()
    assert problem.value().item() == pytest.approx(0.05 * n, abs=1e-12)
    assert sol["value"].item() == pytest.approx(0.05 * n, abs=1e-15)
    lower = problem.lower_solution()
    torch.testing.assert_close(lower["y1"], sol["y1"])
    torch.testing.assert_close(lower["y2"], sol["y2"])
    with torch.no_grad():
        problem.lower.y1.copy_(lower["y1"])
        problem.lower.y2.copy_(lower["y2"])
        assert problem.lower_constraints(()).abs().max() < 1e-12  # active at the lower solution
        assert problem.upper_objective(()).item() == pytest.approx(0.05 * n, abs=1e-12)
    h = 1e-6  # x* is stationary for the optimistic F (central differences along 1), and F is larger away
    slope = (CoupledToyP5(n=n, x0=-0.3 + h).value() - CoupledToyP5(n=n, x0=-0.3 - h).value()) / (2 * h)
    assert abs(slope.item()) < 1e-6
    for shift in (0.05, -0.05):
        assert CoupledToyP5(n=n, x0=-0.3 + shift).value() > 0.05 * n + 1e-4


# -- convergence ---------------------------------------------------------------------------------


COMPILE_WARNING = pytest.mark.filterwarnings("ignore:.*_prims_common.check.*:FutureWarning")  # inside inductor


@COMPILE_WARNING
def test_p6_reaches_the_optimum_and_the_multiplier():
    problem = ActiveConstraintP6()
    fns, x, y = problem.to_functions(NO_DATA)
    engine = LVHBA()  # the official toy defaults: alpha 0.008, beta 0.02, eta 0.01, c_k = 0.025 (k+1)^0.3
    state, metrics = compiled_run(engine, fns, engine.init(fns, x, y), 6000)  # measured: 1.3 % off at 3000
    sol = problem.solution()
    assert abs(state["x"]["x"] - sol["x"]).item() <= 0.02 * 2.5
    assert abs(state["y"]["y"] - sol["y"]).item() <= 0.02 * 3.5
    assert abs(state["mu"] - sol["multiplier"]).item() <= 0.02 * 1.5
    bilevel.functional.write_back(problem, state["x"], state["y"])
    assert problem.value().item() == pytest.approx(0.25, rel=0.02)  # F(x_k) = f(x_k, y*(x_k))
    assert metrics["upper_objective"].item() == pytest.approx(0.25, rel=0.02)  # f(x_k, y_k)
    assert (state["y"]["y"] - state["x"]["x"] - 1.0).item() <= 1e-12  # kept feasible by P_C


@COMPILE_WARNING
def test_p5_reaches_the_optimum():
    n = 2
    problem = CoupledToyP5(n=n)
    fns, x, y = problem.to_functions(NO_DATA)
    # Measured on this toy (start 0): with alpha = eta = 0.003, c_k = (k+1)^0.3 (ALGORITHMS.md) F is
    # still 3.6 % off after 5e4 steps; c_k = 3 (k+1)^0.45 (p < 1/2 as the theory asks) and
    # alpha = eta = 0.02 reach x 0.4 %, F 0.8 % in 3000 steps.
    engine = LVHBA(alpha=0.02, eta=0.02, c0=3.0, p=0.45)
    state, metrics = compiled_run(engine, fns, engine.init(fns, x, y), 3000)
    sol = problem.solution()
    for tree, name in ((state["x"], "x"), (state["y"], "y1"), (state["y"], "y2")):
        torch.testing.assert_close(tree[name], sol[name], rtol=0.03, atol=0.0)
    assert metrics["upper_objective"].item() == pytest.approx(0.05 * n, rel=0.03)
    assert state["mu"].item() == pytest.approx(1.0, rel=0.03)
    assert metrics["constraint_violation"].item() <= 1e-12


# -- one step by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize(("theta", "mu", "z"), [(3.2, 0.7, 0.4), (1.5, 0.005, 0.0)], ids=["active", "mu-clamped"])
def test_one_step_matches_the_formulas(theta, mu, z):
    alpha, beta, eta, g1, g2, c0, p = 0.1, 0.2, 0.1, 2.0, 3.0, 0.5, 0.25
    engine = LVHBA(alpha=alpha, beta=beta, eta=eta, gamma1=g1, gamma2=g2, c0=c0, p=p)
    fns, _, _ = ActiveConstraintP6().to_functions(NO_DATA)
    x, y, k = 2.0, 2.95, 4
    state = {"x": {"x": t(x)}, "y": {"y": t(y)}, "theta": {"y": t(theta)}, "mu": t(mu), "z": t(z),
             "step": torch.tensor(k)}
    new, metrics = engine.step(fns, state, NO_DATA)
    # P6: g = 1/2 (y - 2x)^2, c = y - x - 1, f = 1/2 (x - 3)^2 + 1/2 (y - 3)^2
    d_theta = (theta - 2 * x) + mu + (theta - y) / g1
    d_mu = -(theta - x - 1) + (mu - z) / g2
    theta1, mu1 = theta - eta * d_theta, max(0.0, mu - eta * d_mu)
    c_k = c0 * (k + 1) ** p
    d_x = (x - 3) / c_k - 2 * (y - 2 * x) + 2 * (theta1 - 2 * x) + mu1
    d_y = (y - 3) / c_k + (y - 2 * x) - (y - theta1) / g1
    x_step, y_step = x - alpha * d_x, y - alpha * d_y
    excess = max(0.0, y_step - x_step - 1)  # P_C onto y - x <= 1: move half the excess along (-1, 1)
    expected = {"x": x_step + excess / 2, "y": y_step - excess / 2, "theta": theta1, "mu": mu1,
                "z": max(0.0, z - beta * (z - mu1) / g2)}
    got = {"x": new["x"]["x"], "y": new["y"]["y"], "theta": new["theta"]["y"], "mu": new["mu"], "z": new["z"]}
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-12, abs=1e-14), name
    assert new["step"].item() == k + 1 and set(new) == set(state)
    assert (excess > 0) if theta > 2 else (mu1 == 0.0)  # each case exercises a projection
    assert metrics["hypergradient_norm"].item() == pytest.approx(abs(d_x), rel=1e-12)
    assert metrics["penalty"].item() == pytest.approx(c_k, rel=1e-12)
    assert metrics["upper_objective"].item() == pytest.approx(0.5 * (x - 3) ** 2 + 0.5 * (y - 3) ** 2)
    assert metrics["constraint_violation"].item() == pytest.approx(y - x - 1)
    assert metrics["theta_gap"].item() == pytest.approx(abs(theta1 - y), rel=1e-12)
    assert metrics["multiplier_norm"].item() == pytest.approx(mu1, abs=1e-15)
    assert metrics["lower_stationarity"].item() == pytest.approx(abs(y - 2 * x))
    assert all(v.dim() == 0 for v in metrics.values())


# -- vmap, fit, init ----------------------------------------------------------------------------


def test_vmap_over_8_instances_equals_separate_runs():
    engine = LVHBA(alpha=0.05, eta=0.05)
    fns, _, _ = ActiveConstraintP6().to_functions(NO_DATA)
    xs, ys = {"x": torch.linspace(-1.0, 4.0, 8, dtype=F64)[:, None]}, {"y": torch.full((8, 1), 2.5, dtype=F64)}
    states = torch.func.vmap(lambda x, y: engine.init(fns, x, y))(xs, ys)
    for _ in range(3):
        states, metrics = torch.func.vmap(lambda s: engine.step(fns, s, NO_DATA))(states)
    for i in range(8):
        state = engine.init(fns, {"x": xs["x"][i]}, {"y": ys["y"][i]})
        for _ in range(3):
            state, single = engine.step(fns, state, NO_DATA)
        flat, flat_v = torch.utils._pytree.tree_flatten((state, single)), torch.utils._pytree.tree_flatten((states,
                                                                                                          metrics))
        for a, b in zip(flat[0], flat_v[0], strict=True):
            torch.testing.assert_close(b[i], a, rtol=1e-12, atol=1e-12)
    assert (states["y"]["y"] - states["x"]["x"] - 1).max() <= 1e-12  # the starts x < 1.5 were infeasible


def test_fit_runs_and_matches_the_engine():
    problem = ActiveConstraintP6()
    engine = LVHBA()
    trainer = bilevel.fit(problem, engine, max_steps=5, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
    fns, x, y = ActiveConstraintP6().to_functions(NO_DATA)
    state = engine.init(fns, x, y)
    for _ in range(5):
        state, _ = engine.step(fns, state, NO_DATA)
    assert trainer.global_step == 5
    torch.testing.assert_close(problem.upper.x.detach(), state["x"]["x"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(problem.lower.y.detach(), state["y"]["y"], rtol=1e-12, atol=1e-12)
    assert "engine/constraint_violation" in trainer.callback_metrics


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    straight, engine = ActiveConstraintP6(), LVHBA()
    bilevel.fit(straight, engine, max_steps=6, default_root_dir=tmp_path / "straight", **quiet)
    first = ActiveConstraintP6()
    trainer = bilevel.fit(first, engine, max_steps=3, default_root_dir=tmp_path / "part", **quiet)
    resumed = ActiveConstraintP6()  # theta, mu, z and the step count come from the checkpoint
    bilevel.fit(resumed, engine, max_steps=6, default_root_dir=tmp_path / "part",
                ckpt_path=trainer.checkpoint_callback.best_model_path, **quiet)
    assert torch.equal(resumed.upper.x, straight.upper.x) and torch.equal(resumed.lower.y, straight.lower.y)
    assert not torch.equal(first.upper.x, straight.upper.x)


class _DataConstrained(bilevel.BilevelProblem):
    """Constraints read from the lower batch (like an SVM's margins): batch @ y <= 1, shape (k,)."""

    def __init__(self) -> None:
        super().__init__()
        self.upper = bilevel.Hyper(x=t(0.5))
        self.lower = bilevel.Hyper(y=t(2.0, 2.0))

    def lower_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.lower.y - self.upper.x) ** 2)

    def upper_objective(self, batch: Any) -> Tensor:
        return torch.sum(self.lower.y**2)

    def lower_constraints(self, batch: Any) -> Tensor:
        return batch @ self.lower.y - 1.0


def test_init_sizes_multipliers_from_the_lower_batch():
    batch = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=F64)
    fns, x, y = _DataConstrained().to_functions((batch, ()))
    engine = LVHBA(sweeps=50)
    state = engine.init(fns, x, y, lower_batch=batch)
    assert state["mu"].shape == (3,) and state["z"].shape == (3,)
    assert (batch @ state["y"]["y"] - 1).max() <= 1e-9  # (2, 2) projected onto three half-spaces: (0.5, 0.5)
    torch.testing.assert_close(state["y"]["y"], t(0.5, 0.5))
    state, metrics = engine.step(fns, state, (batch, ()))
    assert metrics["constraint_violation"].item() <= 1e-9 and set(state) == {"x", "y", "theta", "mu", "z", "step"}
    with pytest.raises(ValueError, match=r"_DataConstrained\.lower_constraints, which failed without a batch"):
        engine.init(fns, x, y)
    # hypergradient() hands its lower batch to init: d_x at the projected start after one inner step
    direction = engine.hypergradient(_DataConstrained(), batch, ())
    assert direction["x"].shape == (1,) and torch.isfinite(direction["x"]).all()


def test_user_projection_and_lower_set():
    calls = []

    def exact_p6(x, y):  # the same half-space, written by hand
        calls.append(1)
        excess = torch.clamp(y["y"] - x["x"] - 1.0, min=0.0)
        return {"x": x["x"] + excess / 2}, {"y": y["y"] - excess / 2}

    fns, x, y = ActiveConstraintP6(x0=0.0, y0=3.0).to_functions(NO_DATA)
    ours, theirs = LVHBA(), LVHBA(projection=exact_p6)
    a, b = ours.init(fns, x, y), theirs.init(fns, x, y)
    for _ in range(3):
        (a, _), (b, _) = ours.step(fns, a, NO_DATA), theirs.step(fns, b, NO_DATA)
    assert len(calls) == 4
    for key in ("x", "y"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)

    boxed = ActiveConstraintP6(x0=0.0, y0=3.0)
    boxed.lower_sets = {"y": bilevel.Box(high=0.5)}  # the half-space and Y meet at a corner: Dykstra
    fns, x, y = boxed.to_functions(NO_DATA)
    state = LVHBA().init(fns, x, y)
    for _ in range(20):
        state, _ = LVHBA().step(fns, state, NO_DATA)
        assert state["y"]["y"].item() <= 0.5 and state["theta"]["y"].item() <= 0.5
        assert (state["y"]["y"] - state["x"]["x"] - 1).item() <= 1e-9


# -- the affine projection -----------------------------------------------------------------------


def test_one_half_space_by_hand():
    def c(x, y, batch):  # x1 + 2 y1 - y2 <= 2
        return (x["x"][0] + 2 * y["y"][0] - y["y"][1] - 2.0).reshape(1)

    x, y = {"x": t(1.0)}, {"y": t(1.0, 0.0)}
    affine, value = feasible.linearize(c, x, y, None)
    torch.testing.assert_close(affine.jac, t(1.0, 2.0, -1.0)[None])
    torch.testing.assert_close(affine.offset, t(-2.0))
    torch.testing.assert_close(value, t(1.0))
    # min 1/2 |w - (1, 1, 0)|^2 s.t. a.w <= 2, a = (1, 2, -1): w = (1, 1, 0) - (1/6) a by the KKT conditions
    px, py = feasible.project(c, x, y, None, sweeps=1)
    torch.testing.assert_close(px["x"], t(5 / 6), rtol=0, atol=1e-15)
    torch.testing.assert_close(py["y"], t(2 / 3, 1 / 6), rtol=0, atol=1e-15)
    qx, qy = feasible.project(c, px, py, None, sweeps=1)  # idempotent: a feasible point stays
    torch.testing.assert_close(qx["x"], px["x"], rtol=0, atol=1e-15)
    torch.testing.assert_close(qy["y"], py["y"], rtol=0, atol=1e-15)


def nearest_feasible(w0: np.ndarray, rows: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """The projection of w0 onto {G v <= h} by brute force: the nearest feasible point among the
    projections onto every set of constraints taken as equalities (one of them is the answer)."""
    best, best_dist = None, np.inf
    for mask in itertools.product([False, True], repeat=len(rhs)):
        g, h = rows[list(mask)], rhs[list(mask)]
        v = w0 - g.T @ np.linalg.pinv(g @ g.T) @ (g @ w0 - h) if len(h) else w0
        if np.all(rows @ v <= rhs + 1e-10) and np.linalg.norm(v - w0) < best_dist:
            best, best_dist = v, np.linalg.norm(v - w0)
    return best


@pytest.mark.parametrize("with_box", [False, True])
def test_several_half_spaces_match_a_qp_solver(with_box):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 6, generator=gen, dtype=F64)
    w0 = 2.0 * torch.randn(6, generator=gen, dtype=F64)
    o = t(1.0, 1.5, 2.0) - a @ w0  # every constraint violated at w0

    def c(x, y, batch):  # x: (2,), y: a (2, 2) matrix; three coupled half-spaces
        return a @ torch.cat([x["x"], y["m"].reshape(-1)]) + o

    x, y = {"x": w0[:2]}, {"m": w0[2:].reshape(2, 2)}
    box = (lambda x_: {"x": torch.clamp(x_["x"], -0.5, 0.5)}) if with_box else None
    px, py = feasible.project(c, x, y, None, sweeps=300, project_x=box)
    w = torch.cat([px["x"], py["m"].reshape(-1)])

    rows, rhs = a.numpy(), -o.numpy()  # all constraints as G v <= h
    if with_box:
        eye = np.eye(6)[:2]
        rows, rhs = np.vstack([rows, eye, -eye]), np.concatenate([rhs, np.full(4, 0.5)])
    ref = nearest_feasible(w0.numpy(), rows, rhs)
    torch.testing.assert_close(w, torch.from_numpy(ref), rtol=0, atol=1e-7)
    assert (a @ w + o).max() <= 1e-9
    again = feasible.project(c, px, py, None, sweeps=300, project_x=box)
    torch.testing.assert_close(torch.cat([again[0]["x"], again[1]["m"].reshape(-1)]), w, rtol=0, atol=1e-8)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"p": 0.5}, r"LVHBA: p must lie in \(0, 1/2\)"),
    ({"p": 0.0}, r"LVHBA: p must be a finite number > 0"),
    ({"p": -0.2}, r"LVHBA: p must be"),
    ({"alpha": -0.1}, r"LVHBA: alpha must be a finite number > 0"),
    ({"beta": 0.0}, r"LVHBA: beta must be"),
    ({"eta": float("nan")}, r"LVHBA: eta must be"),
    ({"gamma1": 0.0}, r"LVHBA: gamma1 must be"),
    ({"gamma2": -1.0}, r"LVHBA: gamma2 must be"),
    ({"c0": 0.0}, r"LVHBA: c0 must be"),
    ({"sweeps": 0}, r"LVHBA: sweeps must be an integer >= 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LVHBA(**kwargs)


def test_bad_projection_and_refusal_by_other_engines():
    with pytest.raises(TypeError, match=r"LVHBA: projection must be None or a callable"):
        LVHBA(projection="qp")
    with pytest.raises(ValueError, match=r"ActiveConstraintP6 defines lower_constraints, but Neumann cannot honour "
                                         r"lower-level constraints; engines that can: (.*, )?LVHBA\b"):
        hypergrad.Neumann().hypergradient(ActiveConstraintP6(), (), ())


@pytest.mark.parametrize("engine", [e() for e in hypergrad.ENGINES if not e.supports_constraints],
                         ids=lambda e: type(e).__name__)
def test_every_engine_without_constraint_support_refuses_p6(engine):
    with pytest.raises(ValueError, match=rf"ActiveConstraintP6 defines lower_constraints, but {type(engine).__name__} "
                                         r"cannot honour lower-level constraints; engines that can: LVHBA"):
        engine.hypergradient(ActiveConstraintP6(), (), ())
