"""PES (Vicol et al. 2021) and the lower-dynamics hook, on a quadratic meta-objective with a closed-form gradient.

Lower dynamics (through ``Functions.lower_step``): y <- y - a * grad_y g with g = |y - x|^2 / 2 and a
per-coordinate step a, so after T steps from y0 at a fixed x

    y_T = r^T y0 + (1 - r^T) x,   r = 1 - a          (elementwise)

and the meta-loss f = |y_T - c|^2 / 2 + lam |x|^2 / 2 has  dL/dx = (1 - r^T)(y_T - c) + lam x.
The lower state counts the steps, so the tests also see it carried and reset. L is quadratic in
x, so the Gaussian-smoothed gradient that ES estimates equals the true gradient: the PES
estimate is unbiased for it with no smoothing bias.
"""

from __future__ import annotations

import io

import pytest
import torch

import hypergrad
from hypergrad import Functions, dynamics

A = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
C = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
LAM = 0.3
X = {"x": torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)}
Y0 = {"y": torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)}


def quadratic_functions() -> Functions:
    def g(x, y, batch):
        return 0.5 * torch.sum((y["y"] - x["x"]) ** 2)

    def f(x, y, batch):
        return 0.5 * torch.sum((y["y"] - C) ** 2) + 0.5 * LAM * torch.sum(x["x"] ** 2)

    def lower_step(x, y, grad_y, lower, t):
        return {"y": y["y"] - A * grad_y["y"]}, {"count": lower["count"] + 1}

    def init_lower_state(y):
        return {"count": torch.zeros((), dtype=torch.float64)}

    return Functions(f=f, g=g, lower_step=lower_step, init_lower_state=init_lower_state, name="Quadratic")


def closed_form(steps: int, x: torch.Tensor = X["x"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_T, dL/dx) after ``steps`` lower steps from Y0 at a fixed x."""
    r = (1 - A) ** steps
    y = r * Y0["y"] + (1 - r) * x
    return y, (1 - r) * (y - C) + LAM * x


def truncated_gradient(steps: int, truncation: int) -> torch.Tensor:
    """What plain truncated ES / truncated backprop estimates: only the last ``truncation`` steps depend on x."""
    y, _ = closed_form(steps)
    return (1 - (1 - A) ** truncation) * (y - C) + LAM * X["x"]


def run_truncations(engine: hypergrad.PES, count: int):
    """``count`` truncations at the fixed X; yields (state, per-pair estimates) after each."""
    fns = quadratic_functions()
    state = engine.init(fns, X, Y0)
    for _ in range(count):
        state = engine.inner(fns, state, None)
        state, estimates, _ = engine.pair_estimates(fns, state, (None, None))
        yield state, estimates["x"]


def test_pes_is_unbiased_within_sampling_error():
    # 4000 independent pairs: the mean of their estimates is within 4.5 standard errors of the
    # closed form in every coordinate after each of 3 truncations (9 z-scores; a false alarm has
    # probability < 1e-4), while the gradient of the last truncation alone is rejected.
    K, pairs = 5, 4000
    engine = hypergrad.PES(particles=pairs, sigma=0.1, inner_steps=K, seed=3)
    for j, (state, estimates) in enumerate(run_truncations(engine, 3), start=1):
        mean, se = estimates.mean(0), estimates.std(0) / pairs**0.5
        y_true, grad_true = closed_form(j * K)
        torch.testing.assert_close(state["y"]["y"], y_true)  # the unperturbed run at x
        assert state["lower"]["count"] == j * K and state["t"] == j * K
        z = (mean - grad_true) / se
        assert z.abs().max() < 4.5, (j, z)
        if j == 3:
            z_truncated = (mean - truncated_gradient(j * K, K)) / se
            assert z_truncated.abs().max() > 10, z_truncated  # the test can tell PES from truncated ES


def test_pes_variance_falls_with_more_particles():
    # Over 60 seeds, the spread of the estimate with 32 pairs is about 1/8 of that with 4 pairs
    # (independent pairs); require at least a factor 4.
    def spread(pairs: int) -> torch.Tensor:
        runs = []
        for seed in range(60):
            engine = hypergrad.PES(particles=pairs, sigma=0.1, inner_steps=4, seed=seed)
            *_, (_, estimates) = run_truncations(engine, 2)
            runs.append(estimates.mean(0))
        return torch.stack(runs).var(0).sum()

    few, many = spread(4), spread(32)
    assert many < few / 4, (few, many)


def test_reset_at_the_horizon_restarts_particles_and_perturbations():
    K = 4
    engine = hypergrad.PES(particles=3, sigma=0.1, inner_steps=K, horizon=2 * K, seed=0)
    *_, (state, _) = run_truncations(engine, 3)  # the third truncation starts after a reset
    assert state["t"] == K and state["lower"]["count"] == K
    xi = state["particles"]["xi"]["x"]  # only this truncation's eps since the reset
    r = (1 - A) ** K
    expected_plus = r * Y0["y"] + (1 - r) * (X["x"] + xi)
    expected_minus = r * Y0["y"] + (1 - r) * (X["x"] - xi)
    torch.testing.assert_close(state["particles"]["y"]["y"], torch.cat([expected_plus, expected_minus]))
    torch.testing.assert_close(state["particles"]["lower"]["count"], torch.full((6,), float(K), dtype=torch.float64))


def test_pes_steps_are_reproducible_and_resume_from_a_saved_state():
    fns = quadratic_functions()
    engine = hypergrad.PES(particles=4, sigma=0.1, inner_steps=3, seed=7, outer_lr=0.05, outer_optimizer="sgd")
    state = engine.init(fns, X, Y0)
    state, _ = engine.step(fns, state, (None, None))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = torch.load(buffer, weights_only=False)
    a, _ = engine.step(fns, state, (None, None))
    b, _ = engine.step(fns, resumed, (None, None))
    torch.testing.assert_close(a["x"], b["x"])
    other = hypergrad.PES(particles=4, sigma=0.1, inner_steps=3, seed=8, outer_lr=0.05, outer_optimizer="sgd")
    c, _ = other.step(fns, other.init(fns, X, Y0), (None, None))
    assert not torch.allclose(c["x"]["x"], state["x"]["x"])  # another seed draws other perturbations


def test_pes_descends_the_meta_objective():
    # 60 outer Adam steps with a fixed horizon: the meta-loss at the end of the horizon falls.
    fns = quadratic_functions()
    engine = hypergrad.PES(particles=8, sigma=0.05, inner_steps=5, horizon=10, outer_lr=0.05, seed=1)
    state = engine.init(fns, X, Y0)
    start = fns.f(X, {"y": closed_form(10)[0]}, None)
    for _ in range(60):
        state, _ = engine.step(fns, state, (None, None))
    end = fns.f(state["x"], {"y": closed_form(10, state["x"]["x"])[0]}, None)
    assert end < 0.5 * start, (start, end)


def test_unrolled_differentiates_the_lower_dynamics():
    # Truncated backprop through the hook: without truncation the closed-form gradient of the whole
    # run since the last reset; with truncate=k (all steps in one truncation) the gradient through k steps.
    fns = quadratic_functions()
    engine = hypergrad.Unrolled(inner_steps=6, horizon=12)
    state = engine.init(fns, X, Y0)
    state = engine.inner(fns, state, None)
    state, grad, metrics = engine.estimate(fns, state, (None, None))
    torch.testing.assert_close(grad["x"], closed_form(6)[1])
    torch.testing.assert_close(state["y"]["y"], closed_form(6)[0])
    assert state["t"] == 6 and state["lower"]["count"] == 6
    engine = hypergrad.Unrolled(inner_steps=6, truncate=2)
    state = engine.inner(fns, engine.init(fns, X, Y0), None)
    _, grad, _ = engine.estimate(fns, state, (None, None))
    torch.testing.assert_close(grad["x"], truncated_gradient(6, 2))


def test_unrolled_resets_at_the_horizon():
    fns = quadratic_functions()
    engine = hypergrad.Unrolled(inner_steps=3, horizon=6, outer_lr=1e-9, outer_optimizer="sgd")
    state = engine.init(fns, X, Y0)
    for _ in range(3):
        state, _ = engine.step(fns, state, (None, None))
    assert state["t"] == 3
    torch.testing.assert_close(state["y"]["y"], closed_form(3)[0])


@pytest.mark.parametrize("engine", [hypergrad.CG(), hypergrad.F2SA()])
def test_engines_without_lower_dynamics_refuse_them(engine):
    with pytest.raises(ValueError, match="lower_step.*engines that can: PES, Unrolled"):
        engine.init(quadratic_functions(), X, Y0)


def test_lower_step_without_initial_state_is_refused():
    fns = quadratic_functions()
    broken = Functions(f=fns.f, g=fns.g, lower_step=fns.lower_step, name="Quadratic")
    with pytest.raises(ValueError, match="PES: Quadratic defines lower_step but not init_lower_state"):
        hypergrad.PES().init(broken, X, Y0)


def test_pes_arguments_are_checked():
    with pytest.raises(ValueError, match="PES: horizon must be >= inner_steps"):
        hypergrad.PES(inner_steps=10, horizon=5)
    with pytest.raises(ValueError, match="sigma"):
        hypergrad.PES(sigma=0.0)
    with pytest.raises(ValueError, match="meta_loss"):
        hypergrad.PES(meta_loss="last")


def test_pes_without_lower_dynamics_runs_gradient_descent():
    # The default dynamics are gradient steps on g of size inner_lr: a = inner_lr in every coordinate.
    fns = quadratic_functions()
    plain = Functions(f=fns.f, g=fns.g, name="Quadratic")
    engine = hypergrad.PES(particles=2, inner_steps=4, inner_lr=0.1)
    state = engine.inner(plain, engine.init(plain, X, Y0), None)
    torch.testing.assert_close(state["y"]["y"], 0.9**4 * Y0["y"] + (1 - 0.9**4) * X["x"])
    assert dynamics.reset_due(torch.tensor(5), None).item() is False
