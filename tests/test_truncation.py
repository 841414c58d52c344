"""Data-driven truncations (``hypergrad.dynamics.Truncation``): a minibatch per lower step, restarts chosen by the data.

On the quadratic of tests/test_pes.py with data: g = |y - x - b_k|^2 / 2 at step k (b_k the step's
minibatch), so y_{k+1} = r y_k + a (x + b_k) with r = 1 - a, and the meta-loss f = |y - c|^2 / 2 +
lam |x|^2 / 2. A run that restarted n steps ago has dy/dx = 1 - r^n (elementwise) whatever its data,
so dL/dx = (1 - r^n)(y - c) + lam x at the run's own y. The references below are hand-written loops
(and autograd for Unrolled), never the engines.
"""

from __future__ import annotations

import pytest
import torch

import hypergrad
from hypergrad import Functions
from hypergrad.dynamics import Truncation

D = torch.float64
A = torch.tensor([0.05, 0.1, 0.2], dtype=D)
LAM = 0.3
X = {"x": torch.tensor([0.5, 1.5, -1.0], dtype=D)}
Y0 = {"y": torch.tensor([2.0, 0.0, 1.0], dtype=D)}


def functions() -> Functions:
    def g(x, y, batch):
        return 0.5 * torch.sum((y["y"] - x["x"] - batch["b"]) ** 2)

    def f(x, y, batch):
        return 0.5 * torch.sum((y["y"] - batch["c"]) ** 2) + 0.5 * LAM * torch.sum(x["x"] ** 2)

    def lower_step(x, y, grad_y, lower, t):
        return {"y": y["y"] - A * grad_y["y"]}, {"count": lower["count"] + 1}

    def init_lower_state(y):
        return {"count": torch.zeros((), dtype=D)}

    def lower_restart(y, lower, restart):
        flag = restart["flag"]
        return ({"y": torch.where(flag, restart["y0"], y["y"])},
                {"count": torch.where(flag, torch.zeros_like(lower["count"]), lower["count"])})

    return Functions(f=f, g=g, lower_step=lower_step, init_lower_state=init_lower_state, lower_restart=lower_restart,
                     name="DataQuadratic")


class Schedule:
    """Per-pair data for truncation j: K shifts b and targets c per pair, pair i restarting every period_i truncations
    (staggered by its phase) from a fresh random y0."""

    def __init__(self, pairs: int, steps: int, seed: int = 0) -> None:
        self.pairs, self.steps, self.seed = pairs, steps, seed
        gen = torch.Generator().manual_seed(seed)
        self.period = torch.randint(2, 4, (pairs,), generator=gen)
        self.phase = torch.randint(0, 3, (pairs,), generator=gen) % self.period

    def flags(self, j: int) -> torch.Tensor:
        return (j == 0) | ((j - self.phase) % self.period == 0)

    def truncation(self, j: int) -> tuple[Truncation, Truncation]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + j)
        n, k = self.pairs, self.steps
        lower = [{"b": 0.3 * torch.randn(n, 3, generator=gen, dtype=D)} for _ in range(k)]
        upper = [{"c": torch.randn(n, 3, generator=gen, dtype=D)} for _ in range(k)]
        flag = self.flags(j)
        restart = {"flag": flag, "y0": torch.randn(n, 3, generator=gen, dtype=D)}
        return (Truncation(steps=lower, restart=restart, pairs=True, fresh=flag),
                Truncation(steps=upper, pairs=True))


def reference(schedule: Schedule, truncations: int, meta_loss: str) -> list[torch.Tensor]:
    """Per truncation: the true dL_i/dx of every pair [N, 3], by hand at the fixed X."""
    n, x = schedule.pairs, X["x"]
    y = Y0["y"].expand(n, 3).clone()
    since = torch.zeros(n, dtype=torch.int64)
    out = []
    for j in range(truncations):
        lower, upper = schedule.truncation(j)
        flag = schedule.flags(j)
        y = torch.where(flag[:, None], lower.restart["y0"], y)
        since = torch.where(flag, 0, since)
        grads = torch.zeros(n, 3, dtype=D)
        for k in range(schedule.steps):
            y = (1 - A) * y + A * (x + lower.steps[k]["b"])
            since = since + 1
            jac = 1 - (1 - A)[None, :] ** since[:, None].to(D)
            if meta_loss == "mean" or k == schedule.steps - 1:
                grads = grads + jac * (y - upper.steps[k]["c"]) + LAM * x
        out.append(grads / (schedule.steps if meta_loss == "mean" else 1))
    return out


@pytest.mark.parametrize("meta_loss", ["final", "mean"])
def test_pes_with_per_pair_data_and_staggered_restarts_is_unbiased(meta_loss):
    # 3000 pairs, each with its own minibatches, restart times and fresh starts: the mean over the pairs of
    # (estimate_i - true_i) is within 4.5 standard errors of 0 after each of 4 truncations (12 z-scores per
    # case), while ignoring the restarts (the gradient of a run from the very start) is rejected.
    pairs, K = 3000, 3
    schedule = Schedule(pairs, K, seed=1)
    engine = hypergrad.PES(particles=pairs, sigma=0.1, inner_steps=K, meta_loss=meta_loss, seed=5)
    fns = functions()
    state = engine.init(fns, X, Y0)
    truths = reference(schedule, 4, meta_loss)
    for j, truth in enumerate(truths):
        batches = schedule.truncation(j)
        state = engine.inner(fns, state, batches[0])
        state, estimates, _ = engine.pair_estimates(fns, state, batches)
        error = estimates["x"] - truth
        z = error.mean(0) / (error.std(0) / pairs**0.5)
        assert z.abs().max() < 4.5, (j, z)
    # the particles' state: pair i's runs restarted where the schedule says (count = steps since its restart)
    since = torch.zeros(pairs, dtype=torch.int64)
    for j in range(4):
        since = torch.where(schedule.flags(j), 0, since) + K
    torch.testing.assert_close(state["particles"]["lower"]["count"], torch.cat([since, since]).to(D))
    # xi was reset at each pair's last restart: it holds exactly the perturbations drawn since
    assert (state["particles"]["xi"]["x"].abs().sum(1) > 0).all()


def test_pes_resets_the_perturbations_of_exactly_the_restarted_pairs():
    # xi_i sums the perturbations since pair i's last restart, so its mean square is sigma^2 per coordinate
    # and truncation since then: 1, 2 or 3 truncations here (restart periods 2-3), each group within 10 %.
    pairs, K, sigma = 3000, 3, 0.1
    schedule = Schedule(pairs, K, seed=1)
    engine = hypergrad.PES(particles=pairs, sigma=sigma, inner_steps=K, seed=5)
    fns = functions()
    state = engine.init(fns, X, Y0)
    since = torch.zeros(pairs, dtype=torch.int64)
    for j in range(5):
        batches = schedule.truncation(j)
        state = engine.inner(fns, state, batches[0])
        state, _, _ = engine.pair_estimates(fns, state, batches)
        since = torch.where(schedule.flags(j), 0, since) + 1
    square = state["particles"]["xi"]["x"].pow(2).mean(1) / sigma**2
    assert set(since.tolist()) == {1, 2, 3}
    for m in (1, 2, 3):
        assert abs(float(square[since == m].mean()) / m - 1) < 0.1, (m, float(square[since == m].mean()))


def test_unrolled_takes_each_steps_minibatch_and_the_datas_restarts():
    # Truncated backprop through K steps with a minibatch per step and a restart before the first: the
    # hypergradient equals autograd through a hand-written loop, and the restart happened.
    K = 4
    fns = functions()
    gen = torch.Generator().manual_seed(0)
    lower = Truncation(steps=[{"b": torch.randn(3, generator=gen, dtype=D)} for _ in range(K)],
                       restart={"flag": torch.tensor(True), "y0": torch.randn(3, generator=gen, dtype=D)})
    upper = Truncation(steps=[{"c": torch.randn(3, generator=gen, dtype=D)} for _ in range(K)])
    for meta_loss in ("final", "mean"):
        engine = hypergrad.Unrolled(inner_steps=K, meta_loss=meta_loss, truncate=2)
        state = engine.init(fns, X, Y0)
        state = engine.inner(fns, state, lower)
        state, hypergrad_, _ = engine.estimate(fns, state, (lower, upper))

        x = X["x"].clone().requires_grad_()
        y = lower.restart["y0"]
        losses = []
        for k in range(K):
            y = y.detach() if k <= K - 2 else y  # truncate=2: the first K - 2 steps are not differentiated
            y = (1 - A) * y + A * (x + lower.steps[k]["b"])
            if meta_loss == "mean" and k >= K - 2 or k == K - 1:
                losses.append(0.5 * torch.sum((y - upper.steps[k]["c"]) ** 2) + 0.5 * LAM * torch.sum(x**2))
        (expected,) = torch.autograd.grad(torch.stack(losses).mean(), x)
        torch.testing.assert_close(hypergrad_["x"], expected)
        torch.testing.assert_close(state["y"]["y"], y.detach())
        assert state["lower"]["count"] == K  # counted from the restart


def test_refusals_name_the_mismatch():
    fns = functions()
    lower, upper = Schedule(2, 3).truncation(0)
    with pytest.raises(ValueError, match="only PES takes it"):
        engine = hypergrad.Unrolled(inner_steps=3)
        engine.estimate(fns, engine.init(fns, X, Y0), (lower, upper))
    with pytest.raises(ValueError, match="set horizon=None"):
        engine = hypergrad.PES(particles=2, inner_steps=3, horizon=6)
        engine.inner(fns, engine.init(fns, X, Y0), lower)
    with pytest.raises(ValueError, match="one flag per pair"):
        engine = hypergrad.PES(particles=3, inner_steps=3)
        engine.inner(fns, engine.init(fns, X, Y0), lower)
    with pytest.raises(ValueError, match="truncation length"):
        engine = hypergrad.PES(particles=2, inner_steps=4)
        engine.inner(fns, engine.init(fns, X, Y0), lower)
    no_restart = Functions(f=fns.f, g=fns.g, lower_step=fns.lower_step, init_lower_state=fns.init_lower_state)
    with pytest.raises(ValueError, match="defines no lower_restart"):
        engine = hypergrad.PES(particles=2, inner_steps=3)
        engine.inner(no_restart, engine.init(no_restart, X, Y0), lower)


def test_outer_clip_takes_the_step_along_the_clipped_meta_gradient():
    # Against torch's own clip_grad_norm_ and torch.optim.Adam on the same hypergradients: a large one is
    # clipped to norm 1, a small one passes unchanged, and the Adam state follows the clipped ones.
    engine = hypergrad.PES(particles=1, outer_lr=0.1, outer_clip=1.0)
    transform = engine.outer_transform()
    x = {"a": torch.tensor([1.0, 2.0], dtype=D), "b": torch.tensor(0.5, dtype=D)}
    state = transform.init(x)
    ref = {k: v.clone().requires_grad_() for k, v in x.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=0.1)
    for t, scale in enumerate((30.0, 0.01, 5.0), start=1):
        h = {"a": scale * torch.tensor([0.6, -0.8], dtype=D), "b": torch.tensor(scale * 0.3, dtype=D)}
        x, state = transform.update(x, h, state, torch.tensor(t))
        for k, p in ref.items():
            p.grad = h[k].clone()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0)
        opt.step()
        for k in x:
            torch.testing.assert_close(x[k], ref[k].detach())
    with pytest.raises(ValueError, match="outer_clip"):
        hypergrad.Unrolled(outer_clip=0.0)
