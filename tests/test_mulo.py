"""Meta-training a learned optimizer (problems/mulo.py): the meta-gradient, fit with both engines, the CLI config."""

from __future__ import annotations

import glob

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bilevel
import hypergrad
from bilevel.cli import main
from hypergrad import dynamics
from problems.mulo import LOMetaTraining, UpdateHistograms, load_task_data

CONFIG = "experiments/configs/mulo.yaml"


def tiny_problem(**kwargs) -> LOMetaTraining:
    options = {"base_width": 4, "widths": [4, 8], "datasets": ["digits"], "batch_size": 16, "step_mult": 0.05,
               "lo_init": "random"}
    return LOMetaTraining(**{**options, **kwargs})


def float64_batches(problem: LOMetaTraining):
    lower, upper = problem.data()
    cast = lambda batch: {k: (v[0].double(), v[1]) for k, v in batch.items()}  # noqa: E731
    return cast(next(iter(lower))), cast(next(iter(upper)))


def test_unrolled_meta_gradient_through_three_lo_steps_matches_finite_differences():
    # F(theta) = f(theta, y_3(theta)): three LO steps of both task networks (widths 4 and 8) from their
    # initial weights. Central differences in float64 along random directions. The LO and the task
    # networks are ReLU nets, so F has kinks: h = 1e-7 keeps both points on one side of them (at
    # h = 1e-6 some directions already cross one, a 1e-4 relative error) while the rounding error
    # stays near 1e-8 relative. SP networks: under muP the zero output layer makes the hidden
    # layers' first gradients exactly 0, which puts kinks closer still.
    problem = tiny_problem(parametrization="sp").double()
    batches = float64_batches(problem)
    fns, x, y = problem.to_functions(batches)
    engine = hypergrad.Unrolled(inner_steps=3)
    state = engine.init(fns, x, y)
    state = engine.inner(fns, state, batches[0])
    _, grad, _ = engine.estimate(fns, state, batches)

    lower0 = fns.init_lower_state(y)

    def meta_loss(theta):
        y_end, _, _ = dynamics.run(fns, theta, y, lower0, torch.zeros((), dtype=torch.int64), batches[0], 3)
        return fns.f(theta, y_end, batches[1])

    gen = torch.Generator().manual_seed(0)
    h = 1e-7
    for _ in range(4):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in x.items()}
        plus = meta_loss({k: x[k] + h * v[k] for k in x})
        minus = meta_loss({k: x[k] - h * v[k] for k in x})
        finite = (plus - minus) / (2 * h)
        analytic = sum(torch.sum(grad[k] * v[k]) for k in x)
        assert abs(finite) > 1e-4  # the direction matters
        torch.testing.assert_close(analytic, finite, rtol=1e-6, atol=1e-9)


def test_lower_step_is_one_lo_step_with_the_mup_multipliers():
    problem = tiny_problem()
    (lower_batch, upper_batch) = next(zip(*problem.data(), strict=True))
    fns, x, y = problem.to_functions((lower_batch, upper_batch))
    gy = {k: torch.randn_like(v) for k, v in y.items()}
    new_y, state = fns.lower_step(x, y, gy, fns.init_lower_state(y), torch.tensor(0))
    hidden = "digits_w8.hidden.0.weight"
    assert problem.multipliers[hidden] == 0.5 and problem.multipliers["digits_w4.hidden.0.weight"] == 1.0
    expected, _ = bilevel.lo_step(x, problem.upper, y, gy, bilevel.lo_init_state(y), torch.tensor(0),
                                  problem.multipliers, problem.step_mult)
    for k in y:
        torch.testing.assert_close(new_y[k], expected[k])
        torch.testing.assert_close(state[f"update/{k}"], (expected[k] - y[k]).abs())


@pytest.mark.parametrize("engine", [
    hypergrad.Unrolled(inner_steps=3, horizon=6, outer_lr=0.01),
    hypergrad.PES(particles=2, sigma=0.01, inner_steps=3, horizon=6, outer_lr=0.01),
])
def test_meta_training_runs_through_fit_and_logs_per_width(tmp_path, engine):
    problem = tiny_problem(lo_init="adam")
    theta0 = {k: v.detach().clone() for k, v in problem.upper.named_parameters()}
    trainer = bilevel.fit(problem, engine, max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          callbacks=[UpdateHistograms(every=1)])
    metrics = trainer.callback_metrics
    for name in ("meta_loss/w4", "meta_loss/w8", "meta_loss/digits_w4", "objective/upper"):
        assert torch.isfinite(metrics[name]), name
    assert any(not torch.equal(p, theta0[k]) for k, p in problem.upper.named_parameters())
    (events,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))
    tags = EventAccumulator(events).Reload().Tags()
    assert {"update_log10_abs/digits_w4", "update_log10_abs/digits_w8"} <= set(tags["histograms"])
    assert "meta_loss/w8" in tags["scalars"]


def test_cli_config_runs_with_a_tiny_budget(tmp_path):
    main(["fit", "--config", CONFIG, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--model.problem.init_args.widths", "[8, 16]",
          "--model.problem.init_args.base_width", "8", "--model.engine.init_args.inner_steps", "2"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=2.ckpt")
    state = torch.load(ckpt, weights_only=False)["engine_state"]
    assert state["t"] == 4 and "digits_w16.hidden.0.weight/m0.9" in state["lower"]


def test_generated_images_are_learnable_and_reproducible():
    inputs, labels = load_task_data("images", seed=0)
    again, _ = load_task_data("images", seed=0)
    assert inputs.shape == (2000, 64) and torch.equal(inputs, again)
    assert labels.bincount(minlength=10).min() > 100
    # Nearest class mean separates the classes far above chance (10%), but not perfectly.
    means = torch.stack([inputs[labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(inputs, means).argmin(1) == labels).float().mean()
    assert 0.5 < accuracy < 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="parametrization must be 'mup' or 'sp'"):
        LOMetaTraining(parametrization="ntk")
    with pytest.raises(ValueError, match="datasets must be a non-empty subset"):
        LOMetaTraining(datasets=["cifar"])
    with pytest.raises(ValueError, match="lower_step.*engines that can: PES, Unrolled"):
        bilevel.fit(tiny_problem(), hypergrad.CG(), max_steps=1)


def test_experiment_quick_run_writes_its_report(tmp_path):
    from experiments.learned_optimizers import main as experiment

    path = experiment(["--quick", "--out", str(tmp_path), "--threads", "1"])
    text = path.read_text()
    assert "python -m experiments.learned_optimizers --quick" in text
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| digits | ") and line.split("|")[2].strip().isdigit()]
    assert len(rows) == 6  # widths 1x and 2x at depth 2, depth 3 at 1x; at the horizon and at the end
    losses = [float(cell) for row in rows for cell in row.strip("|").split("|")[6:10]]
    assert all(0 < loss < 5 for loss in losses)  # finite cross-entropies of 10 classes
    for name in ("learned_optimizers_digits.png", "learned_optimizers_meta.png", "learned_optimizers_muLO.pt"):
        assert (tmp_path / name).stat().st_size > 1000
