"""bilevel.Population: the vmapped step equals member-by-member steps; fit reaches every member's optimum."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bilevel
import hypergrad
from problems.reference import QuadraticP1

F64 = torch.float64
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
ENGINES = {
    "cg": lambda: hypergrad.CG(iters=2, inner_steps=3, inner_lr=0.2, outer_lr=0.05),
    "unrolled": lambda: hypergrad.Unrolled(inner_steps=4, inner_lr=0.2, truncate=2, outer_lr=0.05),
}


def p1_members(size: int, seed: int = 0) -> list[QuadraticP1]:
    """P1 with random starts x0, y0 and a random c per member (so the optima differ)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[float]:
        return torch.randn(n, generator=gen, dtype=F64).tolist()

    return [QuadraticP1(x0=draw(2), y0=draw(3), c=draw(3)) for _ in range(size)]


def p1_optimum(p: QuadraticP1) -> torch.Tensor:
    """x* of P1: rho x + B^T A^-1 (A^-1 (B x + c) - y_t) = 0, solved in closed form."""
    a_inv = torch.linalg.inv(p.A)
    m = p.rho * torch.eye(p.B.shape[1], dtype=p.A.dtype) + p.B.T @ a_inv @ a_inv @ p.B
    return torch.linalg.solve(m, p.B.T @ a_inv @ (p.y_target - a_inv @ p.c))


class Ridge(bilevel.BilevelProblem):
    """Linear regression with a learned log-L2 weight; data come in batches (x: 1 scalar, y: a Linear)."""

    def __init__(self, log_l2: float = 0.0) -> None:
        super().__init__()
        self.lower = nn.Linear(4, 1, dtype=F64)
        self.upper = bilevel.Hyper(log_l2=torch.tensor(log_l2, dtype=F64))

    def lower_objective(self, batch):
        inputs, targets = batch
        residual = self.lower(inputs).squeeze(-1) - targets
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * self.lower.weight.pow(2).sum()

    def upper_objective(self, batch):
        inputs, targets = batch
        return (self.lower(inputs).squeeze(-1) - targets).pow(2).mean()


def loop_steps(problem: bilevel.BilevelProblem, engine: hypergrad.Engine, batches: list, steps: int):
    fns, x, y = problem.to_functions()
    state = engine.init(fns, x, y)
    for k in range(steps):
        state, metrics = engine.step(fns, state, batches[k])
    return state, metrics


def assert_member_equal(stacked: dict, single: dict, index: int, where: str = "") -> None:
    for k, v in single.items():
        if isinstance(v, dict):
            assert_member_equal(stacked[k], v, index, f"{where}{k}.")
        else:
            torch.testing.assert_close(stacked[k][index], v, rtol=1e-10, atol=1e-12,
                                       msg=f"{where}{k} of member {index}")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_vmapped_step_equals_member_by_member_steps(name: str) -> None:
    engine = ENGINES[name]()
    members = p1_members(5)
    population = bilevel.Population(copy.deepcopy(members))
    state = population.init(engine)
    for _ in range(3):
        state, metrics = population.step(engine, state, ((), ()))
    assert state["x"]["x"].shape == (5, 2)
    for i, member in enumerate(members):
        single_state, single_metrics = loop_steps(member, engine, [((), ())] * 3, 3)
        assert_member_equal(state, single_state, i)
        assert_member_equal(metrics, single_metrics, i)
    population.write_back(engine, state)
    assert torch.equal(population.members[3].upper.x, state["x"]["x"][3])
    assert not torch.allclose(state["x"]["x"][0], state["x"]["x"][1])  # members moved apart


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_per_member_batches_equal_member_by_member_steps(name: str) -> None:
    engine = ENGINES[name]()
    size, steps = 3, 2
    gen = torch.Generator().manual_seed(3)
    members = [Ridge(log_l2=float(s)) for s in (-1.0, 0.0, 1.0)]
    for m in members:
        nn.init.normal_(m.lower.weight, generator=gen)
    batches = [tuple((torch.randn(size, 8, 4, generator=gen, dtype=F64), torch.randn(size, 8, generator=gen,
                                                                                       dtype=F64)) for _ in range(2))
               for _ in range(steps)]
    population = bilevel.Population(copy.deepcopy(members), batches="per_member")
    state = population.init(engine)
    for k in range(steps):
        state, metrics = population.step(engine, state, batches[k])
    for i, member in enumerate(members):
        own = [tuple(tuple(t[i] for t in level) for level in b) for b in batches]
        single_state, single_metrics = loop_steps(member, engine, own, steps)
        assert_member_equal(state, single_state, i)
        assert_member_equal(metrics, single_metrics, i)


def test_fit_reaches_every_members_optimum_and_logs_each_member(tmp_path, capsys) -> None:
    members = p1_members(4, seed=1)
    population = bilevel.Population(members)
    engine = hypergrad.CG(iters=3, inner_steps=5, inner_lr=0.4, outer_lr=0.6, outer_optimizer="sgd")
    trainer = bilevel.fit(population, engine, max_steps=150, default_root_dir=tmp_path, logger=False,
                          enable_checkpointing=False, **QUIET)
    assert trainer.global_step == 150
    optima = [p1_optimum(m) for m in members]
    assert torch.linalg.norm(optima[0] - optima[1]) > 0.1  # the members are different problems
    for member, x_star in zip(members, optima, strict=True):
        assert torch.linalg.norm(member.upper.x.detach() - x_star) <= 1e-3 * torch.linalg.norm(x_star)
        assert torch.allclose(member.lower.y.detach(), member.lower_solution(), rtol=1e-6)
    logged = trainer.logged_metrics
    members_logged = [logged[f"objective/upper/member_{i:02d}"] for i in range(4)]
    torch.testing.assert_close(logged["objective/upper"], torch.stack(members_logged).mean())
    assert "objective/upper/member_04" not in logged


class _Scored(QuadraticP1):
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"distance": float(torch.linalg.norm(self.upper.x - p1_optimum(self)))}


def test_fit_prints_a_table_of_member_metrics(tmp_path, capsys) -> None:
    members = [_Scored(x0=[0.1 * i, 0.0]) for i in range(3)]
    bilevel.fit(bilevel.Population(members), hypergrad.CG(iters=2), max_steps=2, default_root_dir=tmp_path,
                logger=False, enable_checkpointing=False, **QUIET)
    out = capsys.readouterr().out
    assert "Population of 3 _Scored: final metrics" in out
    distances = [m.evaluate()["distance"] for m in members]
    assert f"{distances[2]:.4g}" in out.split("member_02")[1].splitlines()[0]
    assert f"{sum(distances) / 3:.4g}" in out.split("mean")[1].splitlines()[0]


def test_resume_from_checkpoint_is_bit_exact(tmp_path) -> None:
    engine = hypergrad.CG(iters=2, inner_steps=2, inner_lr=0.3, outer_lr=0.1)
    straight = bilevel.Population(p1_members(3))
    bilevel.fit(straight, engine, max_steps=6, default_root_dir=tmp_path / "straight", logger=False, **QUIET)
    first = bilevel.Population(p1_members(3))
    trainer = bilevel.fit(first, engine, max_steps=3, default_root_dir=tmp_path / "part", logger=False, **QUIET)
    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt.endswith("step=3.ckpt")
    assert torch.load(ckpt, weights_only=False)["engine_state"]["x"]["x"].shape == (3, 2)
    resumed = bilevel.Population(p1_members(3))
    with torch.no_grad():  # other starts: x and y must come from the checkpoint
        for member in resumed.members:
            member.upper.x.zero_()
            member.lower.y.zero_()
    trainer = bilevel.fit(resumed, engine, max_steps=6, default_root_dir=tmp_path / "part", logger=False,
                          ckpt_path=ckpt, **QUIET)
    assert trainer.global_step == 6
    for a, b, c in zip(resumed.members, straight.members, first.members, strict=True):
        assert torch.equal(a.upper.x, b.upper.x)
        assert torch.equal(a.lower.y, b.lower.y)
        assert not torch.equal(c.upper.x, b.upper.x)


class _ItemEngine(hypergrad.CG):
    """An impure engine: branches on a tensor value."""

    def estimate(self, fns, state, batches):
        if state["step"].item() > 10:
            pass
        return super().estimate(fns, state, batches)


class _FloatMetricEngine(hypergrad.CG):
    def estimate(self, fns, state, batches):
        state, hypergrad_, metrics = super().estimate(fns, state, batches)
        return state, hypergrad_, {**metrics, "constant": 1.0}


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least one problem"):
        bilevel.Population([])
    with pytest.raises(TypeError, match="list of bilevel.BilevelProblem"):
        bilevel.Population(QuadraticP1())
    with pytest.raises(TypeError, match="member 1 must be a bilevel.BilevelProblem"):
        bilevel.Population([QuadraticP1(), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="member 1 .* is not a QuadraticP1"):
        bilevel.Population([QuadraticP1(), Ridge()])
    with pytest.raises(ValueError, match=r"member 2 .* parameter 'upper.x': shape \(3,\)"):
        bilevel.Population([QuadraticP1(), QuadraticP1(), QuadraticP1(x0=[0.0, 0.0, 0.0], B=[[1.0, 0.0, 0.0]] * 3)])
    with pytest.raises(ValueError, match="attribute 'rho': 0.5 vs 0.1"):
        bilevel.Population([QuadraticP1(), QuadraticP1(rho=0.5)])
    same = QuadraticP1()
    with pytest.raises(ValueError, match="member 1 is the same object as member 0"):
        bilevel.Population([same, same])
    with pytest.raises(ValueError, match="batches must be one of"):
        bilevel.Population([QuadraticP1()], batches="stacked")
    per_member = bilevel.Population([Ridge(), Ridge()], batches="per_member")
    with pytest.raises(ValueError, match="leading dimension 2, got .3, 8, 4."):
        per_member.check(hypergrad.CG(), (torch.zeros(3, 8, 4, dtype=F64), torch.zeros(3, 8, dtype=F64)), None)
    population = bilevel.Population(p1_members(2))
    for engine in (_ItemEngine(iters=2), _FloatMetricEngine(iters=2)):
        state = population.init(engine)
        with pytest.raises(RuntimeError, match=f"Population of 2 QuadraticP1: {type(engine).__name__}.step cannot "
                                               "run under torch.func.vmap"):
            population.step(engine, state, ((), ()))
    with pytest.raises(TypeError, match="problem must be a bilevel.BilevelProblem, a bilevel.Population"):
        bilevel.fit([QuadraticP1()], hypergrad.CG())


class _NormedRidge(Ridge):
    """Ridge with a BatchNorm in front: running statistics are buffers under the lower level."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.lower = nn.Sequential(nn.BatchNorm1d(4, dtype=F64), nn.Linear(4, 1, dtype=F64))
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(16, 4, generator=gen, dtype=F64) + shift
        self.register_buffer("inputs", inputs, persistent=False)
        self.register_buffer("targets", inputs.sum(1), persistent=False)

    def lower_objective(self, batch):
        residual = self.lower(self.inputs).squeeze(-1) - self.targets
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * self.lower[1].weight.pow(2).sum()

    def upper_objective(self, batch):
        return (self.lower(self.inputs).squeeze(-1) - self.targets).pow(2).mean()

    def data(self):
        return (self.inputs,), (self.targets,)


def test_members_own_data_and_running_statistics(tmp_path) -> None:
    members = [_NormedRidge(shift=s) for s in (0.0, 3.0)]
    population = bilevel.Population(members)
    assert population._varying >= {"inputs", "targets", "lower.0.running_mean"}
    with pytest.raises(ValueError, match="member 1's data\\(\\) differs from member 0's"):
        population.data()
    stacked = bilevel.Population(members, batches="per_member").data()
    assert stacked[0][0].shape == (2, 16, 4) and torch.equal(stacked[0][0][1], members[1].inputs)
    engine = hypergrad.CG(iters=2, inner_steps=2, inner_lr=0.05)
    with pytest.raises(ValueError, match="member 1's data\\(\\) differs"):
        bilevel.fit(population, engine, max_steps=3)
    bilevel.fit(population, engine, ((),), ((),), max_steps=3,
                logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **QUIET)
    for member, shift in zip(members, (0.0, 3.0), strict=True):
        assert member.lower[0].num_batches_tracked.item() == 3
        # each member's statistics follow its own data (mean about `shift`), not member 0's
        assert abs(member.lower[0].running_mean.mean().item() - 0.271 * shift) < 0.5
