"""What a run shows: validation curves, grouped TensorBoard tags, HPARAMS, histograms from step 0, the console.

Issue 14, parts 2-4: Lightning's validation loop every ``val_check_interval`` outer steps (and its
EarlyStopping and ModelCheckpoint on the validation metrics), a dashboard that reads as a bilevel
run, one progress bar over the outer steps, and no noise printed by a default run.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import bilevel
import hypergrad

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


class Ridge(bilevel.BilevelProblem):
    """Ridge regression with a learned log-L2 per feature (4 entries: also logged as scalars) and a validation set."""

    def __init__(self, seed: int = 0, noise: float = 0.5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lower = nn.Linear(4, 1, dtype=F64)
        self.upper = bilevel.Hyper(log_l2=torch.zeros(4, dtype=F64))
        w = torch.randn(4, generator=gen, dtype=F64)
        self.inputs = torch.randn(96, 4, generator=gen, dtype=F64)
        self.targets = self.inputs @ w + noise * torch.randn(96, generator=gen, dtype=F64)

    def loss(self, inputs, targets):
        return (self.lower(inputs).squeeze(-1) - targets).pow(2).mean()

    def lower_objective(self, batch):
        return self.loss(*batch) + (torch.exp(self.upper.log_l2) * self.lower.weight.squeeze(0).pow(2)).sum()

    def upper_objective(self, batch):
        return self.loss(*batch)

    def validation_step(self, batch):
        return {"loss": self.loss(*batch)}

    def data(self):
        return (self.inputs[:32], self.targets[:32]), (self.inputs[32:64], self.targets[32:64])

    def validation_data(self):
        return (self.inputs[64:], self.targets[64:])

    @torch.no_grad()
    def evaluate(self):
        return {"test_loss": float(self.loss(self.inputs[64:], self.targets[64:]))}


ENGINE = hypergrad.CG(iters=5, inner_steps=5, inner_lr=0.1, outer_lr=0.05)


def events(root: Path) -> EventAccumulator:
    files = sorted(root.rglob("events.out.tfevents.*"))
    return EventAccumulator(str(files[-1]), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()


def quiet(tmp_path: Path) -> dict:
    return {"enable_progress_bar": False, "logger": TensorBoardLogger(str(tmp_path)), "default_root_dir": tmp_path}


def test_validation_curves_every_interval(tmp_path) -> None:
    problem = Ridge()
    bilevel.fit(problem, ENGINE, max_steps=12, val_data=problem.validation_data(), val_check_interval=4,
                log_histograms_every=5, log_every_n_steps=1, **quiet(tmp_path))
    acc = events(tmp_path)
    points = acc.Scalars("val/loss")
    # after outer steps 4, 8 and 12, beside those steps' training scalars (Lightning logs step k at k - 1)
    assert [p.step for p in points] == [3, 7, 11]
    assert points[-1].value < points[0].value  # the hyperparameters learn: validation improves
    scalars = set(acc.Tags()["scalars"])
    assert {"objective/upper", "objective/lower", "hypergradient/norm", "solver/residual", "time/inner",
            "time/hypergradient", "time/outer", "time/steps_per_second"} <= scalars
    assert {f"upper/log_l2/{i}" for i in range(4)} <= scalars  # 4 entries: scalars too
    assert "epoch" not in scalars and "hp_metric" not in scalars and "upper_objective" not in scalars
    assert [p.step for p in acc.Scalars("objective/upper")] == list(range(12))
    histograms = acc.Tags()["histograms"]
    for name in ("upper/log_l2", "hypergradient/log_l2", "lower/weight", "lower/bias"):
        assert [h.step for h in acc.Histograms(name)] == [0, 5, 10], name  # from step 0
    first = acc.Histograms("upper/log_l2")[0].histogram_value
    assert first.min == first.max == 0.0  # step 0 shows the starting x (zeros), before any update
    assert len(histograms) == 4


def test_hyperparameters_in_hparams_yaml_and_the_hparams_plugin(tmp_path) -> None:
    bilevel.fit(Ridge(seed=3, noise=0.25), ENGINE, max_steps=2, **quiet(tmp_path))
    record = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert record["problem"] == "Ridge" and record["problem/seed"] == 3 and record["problem/noise"] == 0.25
    assert record["engine"] == "CG" and record["engine/iters"] == 5 and record["engine/inner_lr"] == 0.1
    assert record["max_steps"] == 2 and record["checkpoint_every"] == 50
    acc = events(tmp_path)
    # what the HPARAMS tab reads: the hyperparameters and the scalars it shows beside them
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))
    assert "hp_metric" not in acc.Tags()["scalars"]


def test_validation_from_the_problems_hooks(tmp_path) -> None:
    bilevel.fit(Ridge(), ENGINE, max_steps=6, val_check_interval=3, **quiet(tmp_path / "data"))
    assert [p.step for p in events(tmp_path / "data").Scalars("val/loss")] == [2, 5]  # validation_data()

    class EvaluateOnly(Ridge):
        validation_data = None  # type: ignore[assignment]

    bilevel.fit(EvaluateOnly(), ENGINE, max_steps=6, val_check_interval=3, **quiet(tmp_path / "evaluate"))
    assert [p.step for p in events(tmp_path / "evaluate").Scalars("val/test_loss")] == [2, 5]


def test_early_stopping_and_best_checkpoint_by_a_validation_metric(tmp_path) -> None:
    problem = Ridge()
    # min_delta larger than any change: the second validation "does not improve", and the run stops there.
    stop = EarlyStopping(monitor="val/loss", mode="min", patience=0, min_delta=1e6)
    trainer = bilevel.fit(problem, ENGINE, max_steps=40, val_data=problem.validation_data(), val_check_interval=4,
                          callbacks=[stop], **quiet(tmp_path))
    # Stopped by EarlyStopping at the second validation (a full-batch run's epoch is long: stopped_epoch is 0).
    assert trainer.global_step == 8 and trainer.should_stop and stop.wait_count == 1

    best = ModelCheckpoint(monitor="val/loss", mode="min", save_top_k=1, dirpath=tmp_path / "best")
    problem = Ridge()
    bilevel.fit(problem, ENGINE, max_steps=12, val_data=problem.validation_data(), val_check_interval=3,
                callbacks=[best], **quiet(tmp_path / "run"))
    logged = [p.value for p in events(tmp_path / "run").Scalars("val/loss")]
    assert Path(best.best_model_path).is_file()
    assert float(best.best_model_score) == pytest.approx(min(logged), rel=1e-6)


def test_val_data_without_a_validation_step_is_refused() -> None:
    class NoValidation(Ridge):
        validation_step = None  # type: ignore[assignment]

    with pytest.raises(ValueError, match="val_data was given, but the problem defines no validation_step"):
        bilevel.fit(NoValidation(), ENGINE, max_steps=2, val_data=(torch.zeros(2, 4), torch.zeros(2)))


def test_progress_bar_counts_outer_steps_and_bilevel_fit_prints_no_noise(tmp_path, capsys, recwarn) -> None:
    bilevel.fit(Ridge(), ENGINE, max_steps=7, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    captured = capsys.readouterr()
    out = captured.out
    for noise in ("Tip:", "litlogger", "litmodels", "will override", "deprecated"):
        assert noise not in out + captured.err, noise
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
        [str(w.message) for w in recwarn]
    assert "Outer steps: 100%" in out and "7/7" in out
    assert "upper=" in out and "lower=" in out and "|hypergradient|=" in out
    assert "Epoch" not in out and "v_num" not in out


def test_users_own_warnings_still_show(tmp_path) -> None:
    class Noisy(Ridge):
        def evaluate(self):
            warnings.warn("the user's own warning", UserWarning, stacklevel=1)
            return super().evaluate()

    with pytest.warns(UserWarning, match="the user's own warning"):
        bilevel.fit(Noisy(), ENGINE, max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, default_root_dir=tmp_path)


def test_a_default_bilevel_fit_prints_no_warning_or_advertisement(tmp_path) -> None:
    command = [sys.executable, "-m", "bilevel.cli", "fit", "--config",
               str(ROOT / "experiments/configs/cleaning_digits.yaml"), "--trainer.max_steps", "3",
               "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=True)
    printed = done.stdout + done.stderr
    for noise in ("Warning", "warn(", "deprecated", "Tip:", "litlogger", "litmodels", "will override", "Epoch "):
        assert noise not in printed, f"{noise!r} printed:\n{printed}"
    assert "Outer steps: 100%" in printed and "3/3" in printed and "test_accuracy" in printed
