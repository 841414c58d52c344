"""experiments.hpo_vs_optuna: the hypergradient side improves the hyperparameters (no Optuna needed), a
missing Optuna is a clear message, and with Optuna installed (the ``experiments`` extra, which CI does not
install) the ``--quick`` smoke run writes its table, curves and plots."""

from __future__ import annotations

import json
import math
import sys

import pytest

from experiments import hpo_vs_optuna as experiment


def test_hypergradient_run_lowers_the_validation_loss_of_the_starting_hyperparameters():
    workload = experiment.Ijcnn1()
    # A step count, not a CPU budget, so that the test does not depend on the machine's speed.
    curve = experiment.run_hypergradient(workload, seed=0, budget=math.inf, max_steps=15)
    assert curve.iterations == 15
    assert curve.times == sorted(curve.times) and len(curve.times) == len(curve.val) == len(curve.test) >= 2
    # F(x0): the starting hyperparameters, the lower level solved exactly (what Optuna's first trial reports).
    problem = workload.make(0)
    workload.fit_lower(problem, workload.x_of(problem).detach().clone())
    start = workload.val_loss(problem)
    # The final x, retrained the same way, is better: the hypergradient steps improved the hyperparameters ...
    assert curve.refit_val < start - 1e-3, (curve.refit_val, start)
    # ... and the model in hand trained from w = 0 (validation loss log 2) towards it.
    assert curve.val[-1] < 0.5 * curve.val[0]
    assert all(math.isfinite(v) for v in curve.val + curve.test)


def test_missing_optuna_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    assert experiment.main(["--quick"]) == 2
    assert 'pip install -e ".[experiments]"' in capsys.readouterr().err


def test_quick_run_writes_table_curves_and_plots(tmp_path):
    pytest.importorskip("optuna")  # the experiments extra; CI installs dev only
    assert experiment.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "hpo_vs_optuna.json").read_text())
    for problem, methods in experiment.METHODS.items():
        assert (tmp_path / f"hpo_vs_optuna_{problem}.png").stat().st_size > 0
        for method in methods:
            (curve,) = raw["runs"][problem][method]
            budget = raw["budgets_cpu_s"][problem]
            assert curve["iterations"] >= 1 and max(curve["times"]) <= budget
            assert curve["val"][-1] < curve["val"][0]  # below the untrained model's loss
    table = (tmp_path / "hpo_vs_optuna.md").read_text()
    assert "| ijcnn1 | optuna-tpe |" in table and "| mlp | hypergradient |" in table
