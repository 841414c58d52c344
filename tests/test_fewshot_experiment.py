"""experiments/fewshot.py --quick with our methods only (CI does not install the peers of the ``compare`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import fewshot

pytestmark = pytest.mark.filterwarnings("ignore:.*ignored by both lower_objective and upper_objective")


def test_quick_fewshot_experiment_meta_learns_and_writes_its_report(tmp_path: Path) -> None:
    out = fewshot.main(["--quick", "--methods", *fewshot.OURS, "--out", str(tmp_path), "--no-plots"])
    sinusoid, digits = out["benchmarks"]["sinusoid"], out["benchmarks"]["digits"]
    assert set(sinusoid["runs"]) == {"init", *fewshot.OURS} and sinusoid["agreement"]["float64"] == {}
    mse = {m: runs[0]["final"]["meta_test_loss"] for m, runs in sinusoid["runs"].items()}
    # Measured: init 4.42, MAML 3.06 after 40 meta-steps (3 adaptation steps on 40 held-out tasks).
    assert mse["MAML"] < 0.85 * mse["init"]
    assert all(mse[m] < mse["init"] for m in fewshot.OURS)
    # The same tasks and the same initialization for every method: the unadapted init is scored once per seed.
    accuracy = {m: runs[0]["final"]["meta_test_accuracy"] for m, runs in digits["runs"].items()}
    assert accuracy["MAML"] > 0.5 and all(0 <= a <= 1 for a in accuracy.values())  # chance: 1/3
    assert all(len(runs[0]["times"]) == 40 for m, runs in sinusoid["runs"].items() if m != "init")
    report = (tmp_path / "fewshot.md").read_text()
    assert "| MAML |" in report and "process_time" in report
    assert json.loads((tmp_path / "fewshot.json").read_text())["settings"]["quick"] is True
