"""One engine interface for a problem and a population; Lightning's lifecycle (issue 12, parts 1 and 2).

A population is stepped by its vmapped engine (``Population.engine_for``) with the same functions
a single problem gets, so lower dynamics, constraints and every other feature of the functions
reach each member; the loop builds those functions and checks the problem once per fit; a
checkpoint holds each tensor once.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

import bilevel
import hypergrad
from bilevel import functional

F64 = torch.float64
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


class Damped(bilevel.BilevelProblem):
    """Ridge whose lower level runs its own dynamics: heavy-ball steps with a member-specific momentum.

    The momentum is a buffer outside the levels (a constant of the member) that only ``lower_step``
    reads, so a population that ran plain gradient descent, or member 0's momentum for everyone,
    would differ from the members run alone.
    """

    def __init__(self, seed: int, momentum: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lower = nn.Linear(4, 1, dtype=F64)
        with torch.no_grad():
            for p in self.lower.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        self.upper = bilevel.Hyper(log_l2=torch.tensor(-1.0 + 0.2 * seed, dtype=F64),
                                   log_lr=torch.tensor(-2.0, dtype=F64))
        self.register_buffer("momentum", torch.tensor(momentum, dtype=F64))
        self.register_buffer("inputs", torch.randn(16, 4, generator=gen, dtype=F64))
        self.register_buffer("targets", torch.randn(16, generator=gen, dtype=F64))

    def lower_objective(self, batch):
        residual = self.lower(self.inputs).squeeze(-1) - self.targets
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * self.lower.weight.pow(2).sum()

    def upper_objective(self, batch):
        return (self.lower(self.inputs[:8]).squeeze(-1) - self.targets[:8]).pow(2).mean()

    def lower_step(self, x, y, grad_y, lower_state, t):
        velocity = {k: self.momentum * lower_state[k] - torch.exp(x["log_lr"]) * grad_y[k] for k in y}
        return {k: y[k] + velocity[k] for k in y}, velocity

    def init_lower_state(self, y):
        return {k: torch.zeros_like(v) for k, v in y.items()}


def run_alone(problem: bilevel.BilevelProblem, engine: hypergrad.Engine, steps: int) -> dict:
    fns, x, y = problem.to_functions()
    state = engine.init(fns, x, y)
    for _ in range(steps):
        state, _ = engine.step(fns, state, ((), ()))
    return state


def test_population_runs_each_members_own_lower_dynamics() -> None:
    members = [Damped(seed, momentum) for seed, momentum in ((0, 0.0), (1, 0.5), (2, 0.9))]
    population = bilevel.Population(members)
    engine = hypergrad.Unrolled(inner_steps=5, inner_lr=0.1, outer_lr=0.05)
    state = population.init(engine)
    for _ in range(3):
        state, _ = population.step(engine, state, ((), ()))
    assert "lower" in state  # the engine runs lower dynamics, whose state the population stacks
    for i, member in enumerate(members):
        alone = run_alone(member, engine, 3)
        for k in alone["x"]:
            torch.testing.assert_close(state["x"][k][i], alone["x"][k], rtol=1e-10, atol=1e-12)
        for k in alone["y"]:
            torch.testing.assert_close(state["y"][k][i], alone["y"][k], rtol=1e-10, atol=1e-12)
    # the members really differ: the momentum changes the trajectory
    assert not torch.allclose(state["y"]["weight"][0], state["y"]["weight"][2])


def test_population_fit_equals_members_fit_with_lower_dynamics(tmp_path) -> None:
    members = [Damped(seed, momentum) for seed, momentum in ((0, 0.2), (1, 0.7))]
    alone = copy.deepcopy(members)
    engine = hypergrad.Unrolled(inner_steps=4, inner_lr=0.1, outer_lr=0.05)
    bilevel.fit(bilevel.Population(members), engine, ((),), ((),), max_steps=4, enable_checkpointing=False,
                default_root_dir=tmp_path, **QUIET)
    for member, reference in zip(members, alone, strict=True):
        bilevel.fit(reference, engine, ((),), ((),), max_steps=4, enable_checkpointing=False,
                    default_root_dir=tmp_path, **QUIET)
        for (name, p), q in zip(member.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


class Normed(bilevel.BilevelProblem):
    """A tanh MLP with a LayerNorm or a BatchNorm after its first layer, on the member's own data."""

    def __init__(self, seed: int, norm: type[nn.Module]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lower = nn.Sequential(nn.Linear(3, 4, dtype=F64), norm(4, dtype=F64), nn.Tanh(),
                                   nn.Linear(4, 1, dtype=F64))
        with torch.no_grad():
            for p in self.lower.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
        self.upper = bilevel.Hyper(log_l2=torch.tensor(-1.0 + 0.3 * seed, dtype=F64))
        self.register_buffer("inputs", torch.randn(16, 3, generator=gen, dtype=F64))
        self.register_buffer("targets", torch.randn(16, generator=gen, dtype=F64))

    def lower_objective(self, batch):
        residual = self.lower(self.inputs).squeeze(-1) - self.targets
        decay = sum(p.pow(2).sum() for p in self.lower.parameters())
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * decay

    def upper_objective(self, batch):
        return (self.lower(self.inputs).squeeze(-1) - self.targets).pow(2).mean()


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d], ids=["layernorm", "batchnorm"])
def test_exact_population_with_normalization_equals_members_alone(tmp_path, norm) -> None:
    """Exact vmaps its HVPs over the basis inside the population's vmap (vmap of vmap)."""
    members = [Normed(seed, norm) for seed in range(3)]
    alone = copy.deepcopy(members)
    engine = hypergrad.Exact(inner_steps=2, inner_lr=0.05, outer_lr=0.02)
    bilevel.fit(bilevel.Population(members), engine, ((),), ((),), max_steps=3, enable_checkpointing=False,
                default_root_dir=tmp_path, **QUIET)
    for member, reference in zip(members, alone, strict=True):
        bilevel.fit(reference, engine, ((),), ((),), max_steps=3, enable_checkpointing=False,
                    default_root_dir=tmp_path, **QUIET)
        for (name, p), q in zip(member.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        for (name, b), c in zip(member.named_buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)  # running statistics too


def test_a_populations_engine_is_an_engine() -> None:
    members = [Damped(0, 0.1), Damped(1, 0.2)]
    population = bilevel.Population(members)
    vmapped = population.engine_for(hypergrad.CG(iters=2))
    assert isinstance(vmapped, hypergrad.Engine) and vmapped.iters == 2
    fns, x, y = population.to_functions()
    assert fns.lower_step is not None and fns.init_lower_state is not None  # the same binding as one problem
    assert x["log_l2"].shape == (2,)
    with pytest.raises(ValueError, match="defines lower dynamics .lower_step., but CG cannot honour"):
        vmapped.init(fns, x, y)


class Counted(bilevel.BilevelProblem):
    """Ridge on a full batch that counts the calls of its objectives."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lower = nn.Linear(4, 1, dtype=F64)
        self.upper = bilevel.Hyper(log_l2=torch.tensor(0.0, dtype=F64))
        self.inputs = torch.randn(32, 4, generator=gen, dtype=F64)
        self.targets = self.inputs.sum(1)
        self.calls: collections.Counter = collections.Counter()

    def lower_objective(self, batch):
        self.calls["lower_objective"] += 1
        inputs, targets = batch
        residual = self.lower(inputs).squeeze(-1) - targets
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * self.lower.weight.pow(2).sum()

    def upper_objective(self, batch):
        self.calls["upper_objective"] += 1
        inputs, targets = batch
        return (self.lower(inputs).squeeze(-1) - targets).pow(2).mean()

    def data(self):
        return (self.inputs, self.targets), (self.inputs, self.targets)


@pytest.mark.parametrize("passed", [False, True], ids=["data()", "data passed to fit"])
def test_fit_builds_the_functions_once_and_checks_the_objectives_once(tmp_path, monkeypatch, passed) -> None:
    engine = hypergrad.CG(iters=3, inner_steps=2)
    by_hand = Counted()
    fns, x, y = by_hand.to_functions()
    by_hand.calls.clear()
    engine.step(fns, engine.init(fns, x, y), by_hand.data())
    one_step = dict(by_hand.calls)

    builds = collections.Counter()
    bind = functional.bind_functions

    def counted_bind(*args, **kwargs):
        builds["bind_functions"] += 1
        return bind(*args, **kwargs)

    monkeypatch.setattr(functional, "bind_functions", counted_bind)
    problem = Counted()
    data = problem.data() if passed else (None, None)
    bilevel.fit(problem, engine, *data, max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path, **QUIET)
    assert builds["bind_functions"] == 1
    # the check evaluates g and f once each on the first batches; everything else is the step itself
    assert dict(problem.calls) == {"lower_objective": one_step["lower_objective"] + 1,
                                   "upper_objective": one_step["upper_objective"] + 1}


def _storages(checkpoint: dict) -> dict[str, int]:
    return {name: t.untyped_storage().data_ptr() for name, t in checkpoint["state_dict"].items()}


def test_a_checkpoint_holds_each_tensor_once(tmp_path) -> None:
    problem = Counted()
    engine = hypergrad.CG(iters=3, inner_steps=2)
    bilevel.fit(problem, engine, max_steps=2, default_root_dir=tmp_path, **QUIET)
    path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    state, entries = checkpoint["engine_state"], _storages(checkpoint)
    assert entries["problem.upper.log_l2"] == state["x"]["log_l2"].untyped_storage().data_ptr()
    assert entries["problem.lower.weight"] == state["y"]["weight"].untyped_storage().data_ptr()
    torch.testing.assert_close(checkpoint["state_dict"]["problem.lower.bias"], problem.lower.bias.detach())


def test_a_population_checkpoint_holds_each_tensor_once_and_resumes(tmp_path) -> None:
    members = [Damped(seed, 0.3) for seed in range(3)]
    engine = hypergrad.Unrolled(inner_steps=3, inner_lr=0.1, outer_lr=0.05)
    bilevel.fit(bilevel.Population(members), engine, ((),), ((),), max_steps=2, default_root_dir=tmp_path, **QUIET)
    path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    entries, stacked = _storages(checkpoint), checkpoint["engine_state"]["x"]["log_lr"]
    assert {entries[f"problem.members.{i}.upper.log_lr"] for i in range(3)} == {stacked.untyped_storage().data_ptr()}
    resumed = [Damped(seed, 0.3) for seed in range(3)]
    bilevel.fit(bilevel.Population(resumed), engine, ((),), ((),), max_steps=3, ckpt_path=str(path),
                default_root_dir=tmp_path / "resumed", **QUIET)
    straight = [Damped(seed, 0.3) for seed in range(3)]
    bilevel.fit(bilevel.Population(straight), engine, ((),), ((),), max_steps=3, enable_checkpointing=False,
                default_root_dir=tmp_path / "straight", **QUIET)
    for a, b in zip(resumed, straight, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
