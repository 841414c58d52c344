"""The Lightning step without the machinery it does not need (issue 15, part 5): what must still hold.

Checkpoints are written by outer steps (every ``checkpoint_every`` and at the last), not at the end
of Lightning's epochs (one step long on full-batch data); the metrics reach callbacks, loggers and
progress bars without Lightning's per-key ``self.log``, on the Trainer's ``log_every_n_steps``
cadence; the engine state is checked once per checkpoint in one read-back. No timings here: the
costs are measured by ``experiments/bench/fit_loop.py``.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bilevel
import hypergrad
from bilevel.guard import all_finite
from experiments.bench.fit_loop import per_step, run_fit, run_plain
from problems import QuadraticP1

ENGINE = hypergrad.CG(iters=5, inner_steps=5, inner_lr=0.1, outer_lr=0.05)

TAGS = {"objective/upper", "objective/lower", "hypergradient/norm", "solver/residual", "time/inner",
        "time/hypergradient", "time/outer"}


class _Saves(Callback):
    """The global step of every checkpoint written."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


def _scalars(root: Path) -> EventAccumulator:
    files = sorted(root.rglob("events.out.tfevents.*"))
    return EventAccumulator(str(files[-1]), size_guidance={"scalars": 0}).Reload()


def test_full_batch_checkpoints_by_steps_not_at_every_epoch_end(tmp_path) -> None:
    saves = _Saves()
    bilevel.fit(QuadraticP1(), ENGINE, max_steps=7, checkpoint_every=3, logger=False, enable_progress_bar=False,
                default_root_dir=tmp_path, callbacks=[saves])
    assert saves.steps == [3, 6, 7]  # each full-batch step ends an epoch; no save there
    files = [p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")]
    assert len(files) == 1 and files[0].endswith("-step=7.ckpt")  # the latest only


def test_metrics_reach_callbacks_and_tensorboard_at_every_step(tmp_path) -> None:
    trainer = bilevel.fit(QuadraticP1(), ENGINE, max_steps=5, enable_progress_bar=False, log_every_n_steps=1,
                          logger=TensorBoardLogger(str(tmp_path)), default_root_dir=tmp_path)
    assert TAGS <= set(trainer.callback_metrics) and TAGS <= set(trainer.logged_metrics)
    assert all(isinstance(v, torch.Tensor) for v in trainer.callback_metrics.values())
    assert trainer.callback_metrics["objective/upper"].dtype == torch.float64  # the engine's own value, not a copy
    acc = _scalars(tmp_path)
    for name in TAGS:
        assert [p.step for p in acc.Scalars(name)] == list(range(5)), name  # step k at index k - 1, as before
    final = trainer.callback_metrics["objective/upper"].item()
    assert acc.Scalars("objective/upper")[-1].value == torch.tensor(final, dtype=torch.float32).item()


@pytest.mark.filterwarnings("ignore:The number of training batches")  # Lightning's, about one-step epochs
def test_loggers_write_on_the_trainers_log_every_n_steps(tmp_path) -> None:
    bilevel.fit(QuadraticP1(), ENGINE, max_steps=6, log_every_n_steps=2, enable_progress_bar=False,
                logger=TensorBoardLogger(str(tmp_path)), default_root_dir=tmp_path)
    # Lightning's cadence: the steps whose count is a multiple of n, at their index (count - 1).
    assert [p.step for p in _scalars(tmp_path).Scalars("objective/upper")] == [1, 3, 5]


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_by_default_the_logger_writes_every_10_steps_and_the_last(tmp_path) -> None:
    trainer = bilevel.fit(QuadraticP1(), ENGINE, max_steps=25, enable_progress_bar=False,
                          logger=TensorBoardLogger(str(tmp_path)), default_root_dir=tmp_path)
    points = _scalars(tmp_path).Scalars("objective/upper")
    assert [p.step for p in points] == [9, 19, 24]
    final = trainer.callback_metrics["objective/upper"].item()
    assert points[-1].value == torch.tensor(final, dtype=torch.float32).item()  # the last step's own value


def test_a_progress_bar_of_ones_own_gets_the_metrics(tmp_path) -> None:
    class Bar(TQDMProgressBar):
        pass

    with redirect_stdout(io.StringIO()):
        trainer = bilevel.fit(QuadraticP1(), ENGINE, max_steps=3, logger=False, enable_checkpointing=False,
                              default_root_dir=tmp_path, callbacks=[Bar()])
    shown = trainer.progress_bar_metrics
    assert {"objective/upper", "objective/lower", "hypergradient/norm"} <= set(shown)
    assert all(isinstance(v, float) for v in shown.values())


def test_all_finite_is_exact() -> None:
    assert all_finite({"x": {"a": torch.ones(3)}, "step": torch.tensor(3)})
    assert not all_finite({"x": {"a": torch.tensor([1.0, float("nan")])}})
    assert not all_finite({"m": [torch.zeros(2), torch.tensor([float("inf")])]})
    assert all_finite({"big": torch.full((4,), 3e38)})  # its float32 norm overflows; every entry is finite


def test_fit_loop_benchmark_runs_both_loops() -> None:
    for run in (run_fit, run_plain):
        stamps = run("near-no-op engine", 4)
        assert len(stamps) >= 4 and per_step(stamps, 1, 2, "wall") > 0 and per_step(stamps, 1, 2, "cpu") >= 0


def test_native_checksums_are_tensorboards_own() -> None:
    # The C CRC-32C that replaces TensorBoard's pure-Python one gives the same masked checksums, so event files
    # stay readable (tests/test_dashboard.py reads them back through TensorBoard's own reader).
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure
    from tensorboard.summary.writer import record_writer

    from bilevel.tensorboard import native_checksums

    assert native_checksums() and native_checksums()  # idempotent
    assert record_writer.masked_crc32c is not pure
    gen = torch.Generator().manual_seed(0)
    for size in (0, 1, 7, 64, 1000):
        data = bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())
        assert record_writer.masked_crc32c(data) == pure(data), size
