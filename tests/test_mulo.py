"""Meta-training a learned optimizer over the task family (problems/mulo.py): the meta-gradient, the runs' dynamics
and restarts, fit with both engines, exact resume, the CLI config."""

from __future__ import annotations

import glob

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._pytree import tree_map

import bilevel
import hypergrad
from bilevel.cli import main
from hypergrad import dynamics
from hypergrad.dynamics import Truncation
from problems.mulo import LOMetaTraining, UpdateHistograms, load_task_data

CONFIG = "experiments/configs/mulo.yaml"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def tiny_problem(**kwargs) -> LOMetaTraining:
    options = {"architectures": [(2, 4), (2, 8)], "base_width": 4, "datasets": ["digits", "teacher"],
               "horizons": (4, 12), "truncation": 2, "runs": 3, "batch_size": 16}
    return LOMetaTraining(**{**options, **kwargs})


def double(truncation: Truncation) -> Truncation:
    cast = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return Truncation(steps=tree_map(cast, list(truncation.steps)), restart=tree_map(cast, truncation.restart),
                      pairs=truncation.pairs, fresh=truncation.fresh)


@pytest.mark.parametrize("optimizer", ["adafac", "reduced"])
def test_unrolled_meta_gradient_through_three_lo_steps_matches_finite_differences(optimizer):
    # F(theta) = mean over 3 LO steps of f(theta, y_k(theta)), every run restarted by the data at a fresh init
    # and stepped on its own minibatches. Central differences in float64 along random directions; h = 1e-7
    # keeps both points on one side of the ReLU kinks. SP networks: under muP the zero output layer makes
    # the hidden layers' first gradients exactly 0, which puts kinks closer still. The reduced LO's "adam" init
    # sits exactly on kinks (zero biases after exactly-zero units), so it starts from its random init here.
    settings = {"init": "random"} if optimizer == "reduced" else {}
    problem = tiny_problem(optimizer=optimizer, parametrization="sp", truncation=3, horizons=(6, 6),
                           lo_settings=settings).double()
    lower_data, upper_data = problem.data()
    batches = (double(lower_data.item(0)), double(upper_data.item(0)))
    fns, x, y = problem.to_functions(tuple(dynamics.sample(b) for b in batches))
    engine = hypergrad.Unrolled(inner_steps=3, meta_loss="mean")
    state = engine.init(fns, x, y)
    state = engine.inner(fns, state, batches[0])
    _, grad, _ = engine.estimate(fns, state, batches)

    start, lower0 = fns.lower_restart(y, fns.init_lower_state(y), batches[0].restart)
    assert bool(batches[0].restart["restart"].all())  # every run starts its first task here

    def meta_loss(theta):
        y_k, lower, total = start, lower0, 0.0
        for k in range(3):
            y_k, lower, _ = dynamics.run(fns, theta, y_k, lower, torch.zeros((), dtype=torch.int64), batches[0], 1,
                                         first=k)
            total = total + fns.f(theta, y_k, batches[1].steps[k])
        return total / 3

    gen = torch.Generator().manual_seed(0)
    h = 1e-7
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in x.items()}
        finite = (meta_loss({k: x[k] + h * v[k] for k in x}) - meta_loss({k: x[k] - h * v[k] for k in x})) / (2 * h)
        analytic = sum(torch.sum(grad[k] * v[k]) for k in x)
        assert abs(finite) > 1e-5  # the direction matters
        torch.testing.assert_close(analytic, finite, rtol=1e-5, atol=1e-9)


def test_lower_step_is_one_lo_step_per_run_at_its_own_count_with_the_mup_multipliers():
    problem = tiny_problem()
    lower_data, upper_data = problem.data()
    fns, x, y = problem.to_functions((dynamics.sample(lower_data.item(0)), dynamics.sample(upper_data.item(0))))
    gen = torch.Generator().manual_seed(1)
    gy = {k: torch.randn(v.shape, generator=gen) for k, v in y.items()}
    state = fns.init_lower_state(y)
    state["t"] = torch.tensor([0, 5, 17])
    new_y, new_state = fns.lower_step(x, y, gy, state, torch.tensor(0))
    assert problem.multipliers["d2w8.hidden.0.weight"] == 0.5 and problem.multipliers["d2w4.hidden.0.weight"] == 1.0
    for r in range(3):
        run = {k: v[r] for k, v in y.items()}
        expected, _ = problem.rule.step(x, run, {k: v[r] for k, v in gy.items()}, problem.rule.init_state(run),
                                        torch.tensor(int(state["t"][r])), problem.multipliers, problem.step_mult)
        for k in y:
            torch.testing.assert_close(new_y[k][r], expected[k])
    torch.testing.assert_close(new_state["t"], torch.tensor([1, 6, 18]))
    # the step count matters (the LO's time features): run 1 at count 0 would move differently
    other, _ = problem.rule.step(x, {k: v[1] for k, v in y.items()}, {k: v[1] for k, v in gy.items()},
                                 problem.rule.init_state({k: v[1] for k, v in y.items()}), torch.tensor(0),
                                 problem.multipliers, problem.step_mult)
    assert not torch.equal(other["d2w8.input.weight"], new_y["d2w8.input.weight"][1])


def test_restarts_come_from_the_data_fresh_inits_zero_states_staggered():
    problem = tiny_problem(horizons=(2, 8), runs=4)
    lower_data, upper_data = problem.data()
    fns, x, y = problem.to_functions((dynamics.sample(lower_data.item(0)), dynamics.sample(upper_data.item(0))))
    state = {**fns.init_lower_state(y)}
    state = {k: v + 1 if k != "t" else v + 3 for k, v in state.items()}  # as after some steps
    flags = [lower_data.item(i).restart["restart"] for i in range(12)]
    assert all(bool(f.all()) for f in flags[:1]) and any(0 < int(f.sum()) < 4 for f in flags[1:])  # staggered
    i = next(i for i in range(1, 12) if 0 < int(flags[i].sum()) < 4)
    restart = lower_data.item(i).restart
    new_y, new_state = fns.lower_restart(y, state, restart)
    for r in range(4):
        for k in y:
            expected = restart["init"][k][r] if restart["restart"][r] else y[k][r]
            assert torch.equal(new_y[k][r], expected)
        for k, v in new_state.items():
            if k != "t":
                assert torch.equal(v[r], torch.zeros_like(v[r]) if restart["restart"][r] else state[k][r]), k
    assert torch.equal(new_state["t"], restart["t"])


@pytest.mark.parametrize("engine", [
    hypergrad.Unrolled(inner_steps=2, meta_loss="mean", outer_lr=0.01, outer_clip=1.0),
    hypergrad.PES(particles=2, sigma=0.01, inner_steps=2, meta_loss="mean", outer_lr=0.01, outer_clip=1.0),
])
def test_meta_training_runs_through_fit_and_logs_per_slot(tmp_path, engine):
    problem = tiny_problem(pes_pairs=2 if isinstance(engine, hypergrad.PES) else None)
    theta0 = {k: v.detach().clone() for k, v in problem.upper.named_parameters()}
    trainer = bilevel.fit(problem, engine, max_steps=3, default_root_dir=str(tmp_path),
                          callbacks=[UpdateHistograms(every=1)], **QUIET)
    metrics = trainer.callback_metrics
    for name in ("meta_loss/d2w4", "meta_loss/d2w8", "objective/upper"):
        assert torch.isfinite(metrics[name]), name
    assert any(not torch.equal(p, theta0[k]) for k, p in problem.upper.named_parameters())
    (events,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))
    tags = EventAccumulator(events).Reload().Tags()
    assert {"update_log10_abs/d2w4", "update_log10_abs/d2w8"} <= set(tags["histograms"])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("pes", [False, True])
def test_meta_training_resumes_exactly(tmp_path, pes):
    from lightning.pytorch import Callback

    class Die(Callback):  # stops the run as step 4 starts, after step 3's checkpoint
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                raise _Stop

    def engine():
        if pes:
            return hypergrad.PES(particles=2, sigma=0.01, inner_steps=2, meta_loss="mean", outer_lr=0.01, seed=3)
        return hypergrad.Unrolled(inner_steps=2, meta_loss="mean", outer_lr=0.01)

    def problem():
        return tiny_problem(pes_pairs=2 if pes else None, horizons=(2, 4))

    straight = problem()
    bilevel.fit(straight, engine(), max_steps=6, logger=False, enable_checkpointing=False, **QUIET)
    part = problem()
    with pytest.raises(_Stop):
        bilevel.fit(part, engine(), max_steps=6, logger=False, checkpoint_every=1, callbacks=[Die()],
                    default_root_dir=str(tmp_path), **QUIET)
    (ckpt,) = glob.glob(str(tmp_path / "**" / "*step=3.ckpt"), recursive=True)
    resumed = problem()
    bilevel.fit(resumed, engine(), max_steps=6, logger=False, ckpt_path=ckpt, default_root_dir=str(tmp_path), **QUIET)
    for (k, a), b in zip(straight.upper.named_parameters(), resumed.upper.parameters(), strict=True):
        assert torch.equal(a, b), k
    assert not all(torch.equal(a, b) for a, b in zip(straight.upper.parameters(), part.upper.parameters(),
                                                      strict=True))  # the comparison above could fail


def test_each_pass_of_the_data_serves_the_next_truncations():
    # bilevel.fit tells the data its pass number (set_epoch), so pass p serves truncations p * len, ...: an
    # epoch boundary replays no task, and a resumed run's pass serves what the uninterrupted one served.
    problem = tiny_problem()
    lower, upper = problem.data()
    lower.length = upper.length = 2
    lower.set_epoch(3)
    items = list(lower)
    expected = problem.task_runs.truncation(7, levels=("lower",))
    assert len(items) == 2 and torch.equal(items[1].steps[0]["d2w4"][0], expected["lower"][0]["d2w4"][0])
    assert torch.equal(items[1].restart["init"]["d2w8.input.weight"], expected["init"]["d2w8.input.weight"])
    upper.set_epoch(3)
    assert not torch.equal(list(upper)[1].steps[0]["d2w4"][0], items[1].steps[0]["d2w4"][0])  # its own minibatches


def test_cli_config_runs_with_a_tiny_budget(tmp_path):
    main(["fit", "--config", CONFIG, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--model.problem.init_args.architectures", "[[2, 8]]",
          "--model.problem.init_args.base_width", "8", "--model.problem.init_args.truncation", "2",
          "--model.problem.init_args.horizons", "[4, 8]", "--model.engine.init_args.inner_steps", "2"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=2.ckpt")
    state = torch.load(ckpt, weights_only=False)["engine_state"]
    assert state["lower"]["t"].shape == (4,) and "d2w8.hidden.0.weight/m" in " ".join(state["lower"])


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
    with pytest.raises(ValueError, match="optimizer must be 'adafac' or 'reduced'"):
        LOMetaTraining(optimizer="velo")
    with pytest.raises(ValueError, match="parametrization must be 'mup' or 'sp'"):
        LOMetaTraining(parametrization="ntk")
    with pytest.raises(ValueError, match="datasets"):
        LOMetaTraining(datasets=["cifar"])
    with pytest.raises(ValueError, match="lower_step.*engines that can: PES, Unrolled"):
        bilevel.fit(tiny_problem(), hypergrad.CG(), max_steps=1)
    for k in (1, 3):  # data of K = 2 steps, an engine of K = 1 or 3
        with pytest.raises(ValueError, match="truncation length"):
            bilevel.fit(tiny_problem(), hypergrad.Unrolled(inner_steps=k), max_steps=1, logger=False, **QUIET)
    with pytest.raises(ValueError, match="set horizon=None"):
        bilevel.fit(tiny_problem(), hypergrad.Unrolled(inner_steps=2, horizon=4), max_steps=1, logger=False, **QUIET)


def test_experiment_quick_run_writes_its_report(tmp_path):
    from bilevel.learned import LearnedOptimizer
    from experiments.learned_optimizers import main as experiment

    path = experiment(["--quick", "--out", str(tmp_path), "--workers", "1"])
    text = path.read_text()
    assert "python -m experiments.learned_optimizers --quick" in text
    targets = [line for line in text.splitlines() if line.startswith(("| muLO-1w | mnist1d", "| muLO-mw | teacher"))]
    assert len(targets) == 2  # the target rows: two muLO arms x two evaluation datasets at the widest width
    for label in ("muLO init", "SP-LO init", "MuAdamW", "AdamW-oracle"):  # the ablation and the baselines
        rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) >= 3, label  # the tables of depth 2 at 1x and 2x, depth 3 (then the coordinate check)
        losses = [float(cell) for cell in rows[0].strip("|").split("|")[1:]]
        assert all(0 < loss < 5 for loss in losses), rows[0]  # finite cross-entropies of 10 classes
    for name in ("learned_optimizers_meta.png", "learned_optimizers_curves.png", "learned_optimizers.json"):
        assert (tmp_path / name).stat().st_size > 1000
    model = torch.nn.Linear(3, 2)
    lo = LearnedOptimizer.load(tmp_path / "learned_optimizers" / "lo_muLO-1w_seed0.pt", model.named_parameters())
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    lo.step()
    assert not torch.equal(before, model.weight)  # a working optimizer, read back from its documented format

    from experiments.learned_optimizers_long import main as long_run

    text = long_run(["--quick", "--lo-dir", str(tmp_path / "learned_optimizers"), "--out", str(tmp_path),
                     "--workers", "1"]).read_text()
    assert "H = 8, the longest meta-training horizon" in text and "2H = 16 steps" in text  # --quick: 2H
    for label in ("muLO-1w", "muLO init", "AdamW", "AdamW-oracle"):
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        assert all(0 < float(cell) < 5 for cell in row.strip("|").split("|")[1:]), row
    assert text.count("meta-training seeds and base-tuned AdamW") == 2  # one verdict per evaluation dataset
    with pytest.raises(FileNotFoundError, match="run `python -m experiments.learned_optimizers` first"):
        long_run(["--quick", "--lo-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
