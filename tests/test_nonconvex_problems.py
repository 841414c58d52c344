"""problems.nonconvex (issue 10's three nonconvex lower levels) and the experiment that runs them.

Shapes and seeding of each problem's data, a negative eigenvalue of each lower Hessian at the start
(the problems are what they claim), a few ``bilevel.fit`` steps with finite ``evaluate()``, and the
``experiments.nonconvex`` smoke run and report.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch.utils.data import DataLoader

import bilevel
import hypergrad
from experiments import nonconvex as experiment
from problems.nonconvex import LayerwiseWeightDecay, NoisyLabelReweighting, ProximalSinusoid


def _first(data):
    """The first batch of a level's data: a DataLoader's or a list's first item, or the full-batch tuple."""
    return data if isinstance(data, tuple) else next(iter(data))


def test_weight_decay_data_shapes_and_seeded_order():
    problem = LayerwiseWeightDecay(seed=3)
    lower, upper = problem.data()
    assert isinstance(lower, DataLoader) and len(lower) == 1000 // 100
    inputs, labels = _first(lower)
    assert inputs.shape == (100, 64) and inputs.dtype == torch.float32 and labels.shape == (100,)
    assert upper[0].shape == (300, 64) and upper[1].shape == (300,) and upper[1].dtype == torch.int64
    assert problem.upper.log_decay.shape == (3,)  # one decay per Linear layer of 64-32-32-10
    # The order comes from the loader's own generator: the global RNG does not move it, the seed does.
    torch.manual_seed(123)
    again = _first(LayerwiseWeightDecay(seed=3).data()[0])[0]
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, _first(LayerwiseWeightDecay(seed=4).data()[0])[0])
    # Reshuffled every epoch: the second epoch's first batch differs from the first epoch's.
    epochs = [next(iter(lower))[0] for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])


def test_reweighting_data_carries_the_index_and_the_noise():
    problem = NoisyLabelReweighting(seed=1, noise=0.35)
    lower, (val_images, val_labels) = problem.data()
    images, labels, index = _first(lower)
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,) and index.shape == (32,)
    assert val_images.shape == (200, 1, 8, 8) and val_labels.shape == (200,)
    assert problem.upper.logits.shape == (1000,)
    assert torch.equal(problem.train_labels[index], labels) and torch.equal(problem.train_images[index], images)
    assert int(problem.corrupted.sum()) == 350
    flipped = problem.train_labels != problem.true_train_labels
    assert torch.equal(flipped, problem.corrupted)  # every flip lands on another class
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in problem.lower.modules())


def test_reweighting_evaluate_leaves_batchnorm_statistics_alone():
    problem = NoisyLabelReweighting(seed=0)
    before = {k: b.clone() for k, b in problem.lower.named_buffers()}
    metrics = problem.evaluate()
    assert all(torch.equal(before[k], b) for k, b in problem.lower.named_buffers())
    assert metrics["weight_clean"] == metrics["weight_corrupted"] == 0.5
    assert problem.lower.training


def test_sinusoid_streams_are_aligned_lists_of_the_same_tasks():
    problem = ProximalSinusoid(seed=2, n_tasks=7, support=5, query=4)
    lower, upper = problem.data()
    assert isinstance(lower, list) and isinstance(upper, list) and len(lower) == len(upper) == 7
    for t, ((sx, sy, s_id), (qx, qy, q_id)) in enumerate(zip(lower, upper, strict=True)):
        assert sx.shape == (5, 1) and sy.shape == (5,) and qx.shape == (4, 1) and qy.shape == (4,)
        assert int(s_id) == int(q_id) == t
        # Same task: both sets lie on one sine of the task's amplitude (|y| <= amplitude).
        assert max(sy.abs().max(), qy.abs().max()) <= problem.train_amplitude[t] + 1e-5
    shapes = [p.shape for p in problem.lower.parameters()]
    assert shapes == [p.shape for p in problem.upper.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(problem.lower.parameters(), problem.upper.parameters(), strict=True))


def _smallest_eigenvalue(problem: bilevel.BilevelProblem, iters: int = 40) -> float:
    """An upper bound on the smallest eigenvalue of the lower Hessian on the first lower batch.

    Shifted power iteration; the value returned is the Rayleigh quotient v^T H v of a unit v, which
    is >= the smallest eigenvalue whether or not the iteration has converged, so "< -0.1" proves a
    negative eigenvalue.
    """
    lower, upper = problem.data()
    batch = _first(lower)
    fns, x, y = problem.to_functions((batch, _first(upper)))
    y = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    # One recorded gradient, differentiated again per product: far cheaper than a fresh grad-of-grad.
    grads = torch.autograd.grad(fns.g(x, y, batch), list(y.values()), create_graph=True)

    def hvp(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = torch.autograd.grad(grads, list(y.values()), grad_outputs=[v[k] for k in y], retain_graph=True)
        return dict(zip(y, out, strict=True))

    def power(shift: float) -> float:
        gen = torch.Generator().manual_seed(0)
        v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in y.items()}
        value = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum(t.square().sum() for t in v.values()))
            v = {k: t / norm for k, t in v.items()}
            w = hvp(v)
            value = float(sum((v[k] * w[k]).sum() for k in v))  # v^T H v, |v| = 1
            v = {k: w[k] - shift * v[k] for k in w}
        return value

    return power(power(0.0))


@pytest.mark.parametrize("build", [lambda: LayerwiseWeightDecay(seed=0), lambda: NoisyLabelReweighting(seed=0),
                                   lambda: ProximalSinusoid(seed=0)], ids=["mlp", "cnn", "sinusoid"])
def test_lower_hessian_is_indefinite_at_the_start(build):
    assert _smallest_eigenvalue(build()) < -0.1


@pytest.mark.parametrize("build", [lambda: LayerwiseWeightDecay(seed=0), lambda: NoisyLabelReweighting(seed=0),
                                   lambda: ProximalSinusoid(seed=0, n_val_tasks=4)], ids=["mlp", "cnn", "sinusoid"])
def test_a_few_outer_steps_run_and_evaluate_is_finite(build, tmp_path):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    problem = build()
    x0 = {k: p.detach().clone() for k, p in problem.upper.named_parameters()}
    start = problem.evaluate()
    engine = hypergrad.Unrolled(inner_steps=3, inner_lr=0.1, outer_lr=0.01)
    bilevel.fit(problem, engine, *problem.data(), max_steps=4, log_histograms_every=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    metrics = problem.evaluate()
    assert "validation_loss" in metrics and all(math.isfinite(v) for v in metrics.values())
    assert metrics["validation_loss"] != start["validation_loss"]
    assert any(not torch.equal(x0[k], p) for k, p in problem.upper.named_parameters())  # x moved


def test_same_seed_same_run():
    results = []
    for _ in range(2):
        problem = LayerwiseWeightDecay(seed=5)
        engine = hypergrad.Unrolled(inner_steps=2, outer_lr=0.01)
        bilevel.fit(problem, engine, *problem.data(), max_steps=3, log_histograms_every=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False)
        results.append(problem.evaluate()["validation_loss"])
    assert results[0] == results[1]


def test_experiment_quick_smoke_and_report(tmp_path):
    out = tmp_path / "after.json"
    # One engine keeps the test short (about 10 s on a busy 2-core machine); the grid's code path is the same.
    experiment.main(["--quick", "--label", "after", "--out", str(out), "--engines", "CG()"])
    assert isinstance(json.loads(out.read_text())["runs"][0]["trace"], dict)  # stored by column
    result = experiment.load(out)
    assert result["quick"] and result["steps"] == 3
    assert len(result["runs"]) == len(experiment.PROBLEMS)
    for run in result["runs"]:
        assert run["steps_reached"] == 3 or run["status"].startswith("stopped at step")
        assert [row["step"] for row in run["trace"]] == list(range(1, run["steps_reached"] + 1))
        assert run["validation"][0][0] == 1  # the validation loss after step 1 is always taken
        assert "upper_objective" in run["trace"][0]
        assert "solve_residual" in run["trace"][0] and "validation_loss" in run["final_metrics"]
    md, png_dir = tmp_path / "report.md", tmp_path / "png"
    # Only an after file: the report still builds, with the before column absent.
    experiment.main(["--report", "--before", str(tmp_path / "missing.json"), "--after", str(out), "--md", str(md),
                     "--png-dir", str(png_dir), "--control", str(tmp_path / "no_control.json")])
    text = md.read_text()
    assert "## Every run: after" in text and "## Every run: before" not in text
    assert "weight_decay_mlp" in text and "imaml_sinusoid" in text and torch.__version__ in text
    assert sorted(p.name for p in png_dir.glob("*.png")) == sorted(f"{name}.png" for name in experiment.PROBLEMS)


def test_summarize_verdicts():
    base = {"problem": "p", "engine": "CG()", "seed": 0, "max_steps": 3, "status": "completed", "wall_s": 0.0}
    rows = [{"step": k, "solve_residual": r, "time/outer": 0.001} for k, r in ((1, 0.1), (2, 5.0), (3, 0.2))]
    good = experiment.summarize({**base, "trace": rows, "validation": [[1, 2.0], [3, 1.0]]})
    assert good["passed"] and good["first_residual_above_1"] == 2 and good["max_solve_residual"] == 5.0
    worse = experiment.summarize({**base, "trace": rows, "validation": [[1, 2.0], [3, 2.5]]})
    assert not worse["passed"]
    nan_rows = [*rows[:2], {"step": 3, "solve_residual": float("nan")}]
    broken = experiment.summarize({**base, "trace": nan_rows, "validation": [[1, 2.0], [3, 1.0]]})
    assert not broken["passed"] and broken["first_nonfinite_step"] == 3
    stopped = experiment.summarize({**base, "status": "stopped at step 2: x", "trace": rows[:2],
                                    "validation": [[1, 2.0]]})
    assert not stopped["passed"] and stopped["steps_reached"] == 2
