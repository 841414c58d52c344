"""bilevel.fit: convergence on P1, exact resume from checkpoints, data forms, TensorBoard logs."""

from __future__ import annotations

import glob

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import bilevel
import hypergrad
from problems.reference import QuadraticP1

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def p1_optimum(p: QuadraticP1) -> torch.Tensor:
    """x* of P1: rho x + B^T A^-1 (A^-1 (B x + c) - y_t) = 0, solved in closed form."""
    a_inv = torch.linalg.inv(p.A)
    m = p.rho * torch.eye(p.B.shape[1], dtype=p.A.dtype) + p.B.T @ a_inv @ a_inv @ p.B
    return torch.linalg.solve(m, p.B.T @ a_inv @ (p.y_target - a_inv @ p.c))


def test_fit_reaches_p1_optimum(tmp_path):
    problem = QuadraticP1()
    engine = hypergrad.CG(iters=3, inner_steps=5, inner_lr=0.4, outer_lr=0.6, outer_optimizer="sgd")
    trainer = bilevel.fit(problem, engine, max_steps=150, default_root_dir=tmp_path, logger=False,
                          enable_checkpointing=False, **QUIET)
    x_star = p1_optimum(problem)
    assert trainer.global_step == 150
    assert torch.linalg.norm(problem.upper.x.detach() - x_star) <= 1e-3 * torch.linalg.norm(x_star)
    assert torch.allclose(problem.lower.y.detach(), problem.lower_solution(), rtol=1e-6)


@pytest.mark.parametrize("engine", [
    hypergrad.CG(iters=2, inner_steps=2, inner_lr=0.3, outer_lr=0.1),
    hypergrad.Unrolled(inner_steps=3, inner_lr=0.3, truncate=2, outer_lr=0.1),
])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, engine):
    straight = QuadraticP1()
    bilevel.fit(straight, engine, max_steps=6, default_root_dir=tmp_path / "straight", logger=False, **QUIET)

    first = QuadraticP1()
    trainer = bilevel.fit(first, engine, max_steps=3, default_root_dir=tmp_path / "part", logger=False, **QUIET)
    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt.endswith("step=3.ckpt")
    resumed = QuadraticP1()  # fresh parameters: everything must come from the checkpoint
    trainer = bilevel.fit(resumed, engine, max_steps=6, default_root_dir=tmp_path / "part", logger=False,
                          ckpt_path=ckpt, **QUIET)
    assert trainer.global_step == 6
    assert torch.equal(resumed.upper.x, straight.upper.x)
    assert torch.equal(resumed.lower.y, straight.lower.y)
    # and both differ from a 3-step run, so the comparison could fail
    assert not torch.equal(first.upper.x, straight.upper.x)


class _Regression(bilevel.BilevelProblem):
    """Ridge regression with a learned log-L2 weight on minibatches (x: 1 scalar, y: a Linear)."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        layers = [nn.BatchNorm1d(4)] if batchnorm else []
        self.lower = nn.Sequential(*layers, nn.Linear(4, 1))
        self.upper = bilevel.Hyper(log_l2=torch.zeros(()))

    def lower_objective(self, batch):
        inputs, targets = batch
        residual = self.lower(inputs).squeeze(-1) - targets
        l2 = sum(p.pow(2).sum() for p in self.lower.parameters())
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * l2

    def upper_objective(self, batch):
        inputs, targets = batch
        return (self.lower(inputs).squeeze(-1) - targets).pow(2).mean()


def _regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=gen)
    return inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3 * torch.randn(n, generator=gen)


def test_fit_accepts_dataloader_list_and_tuple(tmp_path):
    train, val = _regression_data(64, 0), _regression_data(32, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=16)
    batches = [(val[0][:16], val[1][:16]), (val[0][16:], val[1][16:])]
    problem = _Regression()
    engine = hypergrad.Neumann(terms=3, inner_steps=3, inner_lr=0.1, outer_lr=0.05)
    trainer = bilevel.fit(problem, engine, loader, batches, max_steps=9, logger=False, enable_checkpointing=False,
                          default_root_dir=tmp_path, **QUIET)
    assert trainer.global_step == 9
    assert problem.upper.log_l2.item() != 0.0
    problem2 = _Regression()
    bilevel.fit(problem2, engine, train, val, max_steps=2, logger=False, enable_checkpointing=False,
                default_root_dir=tmp_path, **QUIET)
    assert problem2.upper.log_l2.item() != 0.0


def test_fit_rejects_bad_data():
    problem, engine = _Regression(), hypergrad.CG()
    train = _regression_data(8, 0)
    with pytest.raises(ValueError, match="both lower_data and upper_data"):
        bilevel.fit(problem, engine, train, None)
    with pytest.raises(TypeError, match="upper_data is a one-shot iterator"):
        bilevel.fit(problem, engine, train, (b for b in [train]))
    with pytest.raises(ValueError, match="defines no data"):
        bilevel.fit(problem, engine)
    with pytest.raises(ValueError, match="max_steps"):
        bilevel.fit(problem, engine, train, train, max_steps=0)


def test_batchnorm_running_stats_follow_training(tmp_path):
    problem = _Regression(batchnorm=True)
    train = (_regression_data(64, 0)[0] * 3 + 1, _regression_data(64, 0)[1])
    bilevel.fit(problem, hypergrad.CG(iters=3, inner_steps=2), train, _regression_data(32, 1), max_steps=3,
                logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **QUIET)
    assert torch.isfinite(problem.upper.log_l2).all()
    assert problem.lower[0].num_batches_tracked.item() == 3
    assert problem.lower[0].running_mean.abs().min() > 0.1  # moved toward the data mean of 1


def test_tensorboard_gets_metrics_phase_times_and_histograms(tmp_path):
    problem = QuadraticP1()
    bilevel.fit(problem, hypergrad.CG(iters=3), max_steps=4, log_histograms_every=2, default_root_dir=tmp_path,
                enable_checkpointing=False, log_every_n_steps=1, **QUIET)
    (events,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"objective/upper", "objective/lower", "hypergradient/norm", "solver/lower_stationarity",
                "solver/residual", "time/inner", "time/hypergradient", "time/outer"}
    assert expected <= scalars
    assert len(acc.Scalars("objective/upper")) == 4
    # x_k at index k (steps taken), from the starting x_0; the hypergradient at x_k beside it
    assert [e.step for e in acc.Histograms("upper/x")] == [0, 2]
    assert [e.step for e in acc.Histograms("hypergradient/x")] == [0, 2]


def test_compile_option_runs_the_compiled_engine_and_matches_eager(tmp_path):
    # aot_eager traces every phase through dynamo and AOTAutograd (what fails on a graph break or an
    # untraceable op) without inductor's code generation, which would cost minutes here.
    runs = {}
    for compiled in (False, {"backend": "aot_eager", "fullgraph": True}):
        problem = QuadraticP1()
        engine = hypergrad.CG(iters=3, inner_steps=2, inner_lr=0.4, outer_lr=0.3, outer_optimizer="sgd")
        trainer = bilevel.fit(problem, engine, max_steps=4, compile=compiled, default_root_dir=tmp_path,
                              logger=False, enable_checkpointing=False, **QUIET)
        assert isinstance(trainer.lightning_module.engine, hypergrad.CompiledEngine) == bool(compiled)
        runs[bool(compiled)] = problem.upper.x.detach().clone()
    assert not torch.equal(runs[False], QuadraticP1().upper.x.detach())  # the runs moved x
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-12, atol=1e-14)


def test_compile_option_rejects_other_values():
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        bilevel.fit(QuadraticP1(), hypergrad.CG(), max_steps=1, compile="yes")
