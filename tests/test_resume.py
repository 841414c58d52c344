"""Exact resume from a checkpoint written at any step, checkpoint compatibility checks, and data forms.

A run killed after any step (a real ``kill -9`` of a subprocess, or an exception in-process) and
resumed from its latest checkpoint ends bit for bit where the uninterrupted run ends: x, y and the
whole engine state, with shuffled minibatch DataLoaders (own generators), cycled lists of batches
and full-batch tuples. Run as a script, this file trains the run the kill test interrupts.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel
import hypergrad
from bilevel.checkpoint import CheckpointError

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
STEPS = 12  # 2.4 epochs of the lower loader (5 batches); the upper loader (3 batches) cycles within them


class Ridge(bilevel.BilevelProblem):
    """Ridge regression with a learned log-L2 weight (x: a scalar, y: a Linear) on minibatches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lower = nn.Linear(4, 1).double()
        self.upper = bilevel.Hyper(log_l2=torch.zeros((), dtype=torch.float64))

    def lower_objective(self, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        residual = self.lower(inputs).squeeze(-1) - targets
        return residual.pow(2).mean() + torch.exp(self.upper.log_l2) * self.lower.weight.pow(2).sum()

    def upper_objective(self, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return (self.lower(inputs).squeeze(-1) - targets).pow(2).mean()


def _tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=gen, dtype=torch.float64)


def make_data(kind: str) -> tuple[Any, Any]:
    """Lower and upper data of one form: "loader" (shuffled, own generators), "list" (cycled batches), "full"."""
    train, val = _tensors(40, 0), _tensors(24, 1)
    if kind == "loader":
        own = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
        return (DataLoader(TensorDataset(*train), batch_size=8, shuffle=True, generator=own[0]),
                DataLoader(TensorDataset(*val), batch_size=8, shuffle=True, generator=own[1]))
    if kind == "list":
        return ([(train[0][i:i + 8], train[1][i:i + 8]) for i in range(0, 40, 8)],
                [(val[0][i:i + 8], val[1][i:i + 8]) for i in range(0, 24, 8)])
    return train, val


def make_engine(name: str) -> hypergrad.Engine:
    if name == "CG":
        return hypergrad.CG(iters=3, inner_steps=3, inner_lr=0.1, outer_lr=0.05)
    if name == "Unrolled":
        return hypergrad.Unrolled(inner_steps=3, inner_lr=0.1, truncate=2, outer_lr=0.05)
    return hypergrad.F2SA(inner_steps=3, lr_y=0.05, lr_z=0.1, lr_x_ratio=0.01, momentum=True)


def run(engine: str, kind: str, steps: int, root: Path, **kwargs: Any) -> tuple[Ridge, Any]:
    problem = Ridge()
    lower, upper = make_data(kind)
    options = {"logger": False, "default_root_dir": root, **QUIET, **kwargs}
    trainer = bilevel.fit(problem, make_engine(engine), lower, upper, max_steps=steps, **options)
    return problem, trainer


class _Died(Exception):
    """The error ``_Die`` stops a run with."""


class _Die(Callback):
    """Stops the run with an error as step ``after + 1`` starts (after step ``after``'s checkpoint)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.after:
            raise _Died  # a crash in-process; a kill -9 is tested with a subprocess


class _Slow(Callback):
    """A pause after each step, so that a test can kill the run between steps at a step of its choice."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


def _leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}/{key}").items()}
    return {prefix: tree}


def assert_same_run(a: Ridge, state_a: Any, b: Ridge, state_b: Any) -> None:
    assert torch.equal(a.upper.log_l2, b.upper.log_l2)
    for (name, p), q in zip(a.lower.named_parameters(), b.lower.parameters(), strict=True):
        assert torch.equal(p, q), name
    leaves_a, leaves_b = _leaves(state_a), _leaves(state_b)
    assert leaves_a.keys() == leaves_b.keys()
    for key, value in leaves_a.items():
        assert torch.equal(value, leaves_b[key]), key


def _latest(directory: Path) -> str:
    paths = glob.glob(str(directory / "**" / "*.ckpt"), recursive=True)
    return max(paths, key=lambda p: int(Path(p).stem.split("step=")[1]))


# -- exact resume --------------------------------------------------------------------------------------


def test_kill_9_mid_epoch_then_resume_is_bit_exact(tmp_path):
    """A real kill -9 of a training process at a random step; the resumed run ends where the uninterrupted one does."""
    kill_at = random.Random().randint(3, 8)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, __file__, str(root), "CG", "loader", str(STEPS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            paths = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
            if any(int(Path(p).stem.split("step=")[1]) >= kill_at for p in paths):
                break
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = _latest(root)
    step = int(Path(ckpt).stem.split("step=")[1])
    assert kill_at <= step < STEPS  # killed mid-run
    straight, straight_trainer = run("CG", "loader", STEPS, tmp_path / "straight", enable_checkpointing=False)
    resumed, trainer = run("CG", "loader", STEPS, tmp_path / "resumed", ckpt_path=ckpt, enable_checkpointing=False)
    assert trainer.global_step == STEPS
    assert_same_run(resumed, trainer.lightning_module.state, straight, straight_trainer.lightning_module.state)


@pytest.mark.parametrize(("engine", "kind", "after"), [
    ("CG", "loader", 7),        # mid-epoch: lower at batch 2 of 5, upper at 1 of 3
    ("Unrolled", "loader", 5),  # at the end of an epoch, the upper loader mid-pass
    ("F2SA", "loader", 4),      # STORM momentum: the engine state holds the previous step's batch gradients
    ("CG", "list", 6),
    ("Unrolled", "full", 3),
])
def test_resume_after_any_step_is_bit_exact(tmp_path, engine, kind, after):
    straight, straight_trainer = run(engine, kind, STEPS, tmp_path / "straight", enable_checkpointing=False)
    first = Ridge()
    with pytest.raises(_Died):
        bilevel.fit(first, make_engine(engine), *make_data(kind), max_steps=STEPS, checkpoint_every=1,
                    callbacks=[_Die(after)], logger=False, default_root_dir=tmp_path / "part", **QUIET)
    ckpt = _latest(tmp_path / "part")
    assert ckpt.endswith(f"step={after}.ckpt")
    assert not torch.equal(first.upper.log_l2, straight.upper.log_l2)  # the comparison below could fail
    resumed, trainer = run(engine, kind, STEPS, tmp_path / "part", ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    assert_same_run(resumed, trainer.lightning_module.state, straight, straight_trainer.lightning_module.state)


def test_resume_order_depends_on_the_saved_data_position(tmp_path):
    """The data position in the checkpoint matters: dropping it (a fresh epoch at resume) changes the result."""
    straight, _ = run("CG", "loader", STEPS, tmp_path / "straight", enable_checkpointing=False)
    with pytest.raises(_Died):
        run("CG", "loader", STEPS, tmp_path / "part", checkpoint_every=1, callbacks=[_Die(7)])
    ckpt = _latest(tmp_path / "part")
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(checkpoint, tmp_path / "no_position.ckpt")
    resumed, _ = run("CG", "loader", STEPS, tmp_path / "resumed", ckpt_path=str(tmp_path / "no_position.ckpt"))
    assert not torch.equal(resumed.upper.log_l2, straight.upper.log_l2)


def test_checkpoints_every_n_steps_and_at_the_last(tmp_path):
    saved = []

    class Spy(Callback):
        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
            saved.append(trainer.global_step)

    run("CG", "list", 7, tmp_path, checkpoint_every=3, callbacks=[Spy()])
    assert saved == [3, 6, 7]
    (ckpt,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)  # only the latest is kept
    assert ckpt.endswith("step=7.ckpt")
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        run("CG", "list", 2, tmp_path, checkpoint_every=0)


def test_resumed_run_continues_its_tensorboard_run_without_logging_a_step_twice(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(version: Path) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(version))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("objective/upper")]

    every_step = {"logger": True, "log_every_n_steps": 1}
    run("CG", "loader", STEPS, tmp_path / "straight", enable_checkpointing=False, **every_step)
    with pytest.raises(_Died):
        run("CG", "loader", STEPS, tmp_path / "part", checkpoint_every=2, callbacks=[_Die(7)], **every_step)
    ckpt = _latest(tmp_path / "part")
    assert ckpt.endswith("step=6.ckpt")  # steps 7 was logged after the last checkpoint, and is logged again
    # A resume happens later, in a new process. In this one, within the same second, the event files' names differ
    # only in the process's writer counter, which sorts as text (".10" before ".9") after ten writers: TensorBoard
    # would then read the resumed file first and take the killed run's steps for a restart.
    time.sleep(1.1)
    run("CG", "loader", STEPS, tmp_path / "part", ckpt_path=ckpt, **every_step)
    versions = sorted(p.name for p in (tmp_path / "part" / "lightning_logs").iterdir())
    assert versions == ["version_0"]
    resumed = scalars(tmp_path / "part" / "lightning_logs" / "version_0")
    assert [s for s, _ in resumed] == list(range(STEPS))
    assert resumed == scalars(tmp_path / "straight" / "lightning_logs" / "version_0")


# -- compatibility -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_at_4(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    run("CG", "list", 4, root)
    return _latest(root)


def _resume(ckpt: str, tmp_path: Path, engine: hypergrad.Engine, steps: int = 6, **kwargs: Any) -> Any:
    lower, upper = make_data("list")
    return bilevel.fit(Ridge(), engine, lower, upper, max_steps=steps, ckpt_path=ckpt, logger=False,
                       default_root_dir=tmp_path, **QUIET, **kwargs)


def test_other_hyperparameters_are_refused_naming_each(tmp_path, checkpoint_at_4):
    engine = hypergrad.CG(iters=3, inner_steps=3, inner_lr=5.0, outer_lr=0.05, outer_optimizer="sgd")
    with pytest.raises(CheckpointError) as info:
        _resume(checkpoint_at_4, tmp_path, engine)
    message = str(info.value)
    assert f"checkpoint {checkpoint_at_4} was written by CG(inner_steps=3, inner_lr=0.1," in message
    assert "this run has inner_lr=5.0 (checkpoint: 0.1), outer_optimizer='sgd' (checkpoint: 'adam')" in message
    assert "resume_changed_engine=True" in message
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)  # refused before any step


def test_resume_changed_engine_allows_a_change_that_keeps_the_state_shape(tmp_path, checkpoint_at_4):
    engine = hypergrad.CG(iters=5, inner_steps=3, inner_lr=0.2, outer_lr=0.05)
    trainer = _resume(checkpoint_at_4, tmp_path, engine, resume_changed_engine=True)
    assert trainer.global_step == 6
    assert trainer.lightning_module.state["x"]["log_l2"].shape == ()


def test_resume_changed_engine_refuses_a_state_of_another_shape(tmp_path):
    run("F2SA", "list", 2, tmp_path / "a", checkpoint_every=1)
    engine = hypergrad.F2SA(inner_steps=3, lr_y=0.05, lr_z=0.1, lr_x_ratio=0.01, momentum=False)
    with pytest.raises(CheckpointError, match=r"momentum=False \(checkpoint: True\).*another shape: .*absent"):
        _resume(_latest(tmp_path / "a"), tmp_path, engine, resume_changed_engine=True)


def test_another_engine_class_is_refused_even_when_changes_are_allowed(tmp_path, checkpoint_at_4):
    with pytest.raises(CheckpointError, match=r"written by CG\(.*this run's engine is Neumann\(.*even with"):
        _resume(checkpoint_at_4, tmp_path, hypergrad.Neumann(terms=3), resume_changed_engine=True)


def test_checkpoint_without_engine_state_is_refused(tmp_path, checkpoint_at_4):
    checkpoint = torch.load(checkpoint_at_4, weights_only=True)
    del checkpoint["engine_state"]
    path = tmp_path / "plain.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} holds no engine state"):
        _resume(str(path), tmp_path, make_engine("CG"))


@pytest.mark.parametrize("steps", [4, 3])
def test_max_steps_at_or_below_the_checkpoint_is_an_error(tmp_path, checkpoint_at_4, steps):
    with pytest.raises(CheckpointError, match=f"max_steps={steps} is at or below step 4 of checkpoint .*max_steps > 4"):
        _resume(checkpoint_at_4, tmp_path, make_engine("CG"), steps=steps)


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_unreadable_checkpoint_gives_one_line_naming_the_file(tmp_path, checkpoint_at_4, damage):
    data = Path(checkpoint_at_4).read_bytes()
    path = tmp_path / f"{damage}.ckpt"
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(CheckpointError) as info:
        _resume(str(path), tmp_path, make_engine("CG"))
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} ")
    assert "\n" not in message
    assert info.value.__context__ is None or info.value.__suppress_context__  # no pickle traceback chained


def test_cli_refuses_a_corrupt_checkpoint_in_one_line(tmp_path, checkpoint_at_4):
    from bilevel.cli import main

    path = tmp_path / "cut.ckpt"
    path.write_bytes(Path(checkpoint_at_4).read_bytes()[:100])
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.problem", "problems.reference.QuadraticP1", "--model.engine", "hypergrad.CG",
              "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path)])
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert f"checkpoint {path} cannot be read" in info.value.code
    assert not (tmp_path / "lightning_logs").exists()


def test_resume_with_other_data_is_refused(tmp_path, checkpoint_at_4):
    lower, upper = make_data("list")
    with pytest.raises(ValueError, match="checkpoint's lower data had 5 batches per pass .* has 4"):
        bilevel.fit(Ridge(), make_engine("CG"), lower[:4], upper, max_steps=6, ckpt_path=checkpoint_at_4,
                    logger=False, default_root_dir=tmp_path, **QUIET)


# -- data forms ----------------------------------------------------------------------------------------


def test_list_of_two_tensors_is_refused_showing_the_fix():
    inputs, targets = _tensors(8, 0)
    with pytest.raises(TypeError) as info:
        bilevel.fit(Ridge(), make_engine("CG"), (inputs, targets), [inputs, targets], max_steps=1)
    message = str(info.value)
    assert "upper_data is a list of 2 tensors with shapes (8, 4), (8,)" in message
    assert "pass a tuple: upper_data=(X, Y)" in message and "DataLoader(TensorDataset(X, Y)" in message


def test_shuffled_loader_without_generator_warns_that_resume_is_not_exact():
    inputs, targets = _tensors(16, 0)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=True)
    with pytest.warns(UserWarning, match="lower_data is a shuffled DataLoader without its own generator"):
        bilevel.BilevelModule(Ridge(), make_engine("CG")).prepare_data_for(loader, (inputs, targets))


if __name__ == "__main__":  # the run the kill test interrupts: ROOT ENGINE KIND STEPS
    torch.set_num_threads(1)
    root, engine, kind, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    run(engine, kind, steps, Path(root), checkpoint_every=1, callbacks=[_Slow(0.25)])


def test_checkpoint_benchmark_quick_run_reports_the_save_cost(capsys):
    from experiments.bench import checkpoint as bench

    bench.main(["--quick", "--threads", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    from bilevel.checkpoint import DEFAULT_CHECKPOINT_EVERY

    assert "| training step (ms) | checkpoint save (ms) |" in out
    assert f"share of a run at checkpoint_every={DEFAULT_CHECKPOINT_EVERY}" in out
