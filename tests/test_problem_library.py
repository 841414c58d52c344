"""The problem library: SpectralQuadratic, LogisticL2, DigitsCleaning(model="mlp"), HyperRepresentation.

Closed forms are checked in float64 against ``hypergrad.Exact`` and central finite differences;
every problem runs 5 steps of each applicable engine; every config runs 3 steps through the CLI.
The module runs on one intra-op thread: on this shared 2-core machine two OpenMP threads per op
were measured 10-100x slower on the 50k-row logistic problem (thread contention).
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest
import torch

import hypergrad
from bilevel.cli import main
from bilevel.functional import write_back
from problems.cleaning import DigitsCleaning
from problems.hpo import LogisticL2, _hypergradient, _newton, _value_hessian
from problems.hyperrep import HyperRepresentation
from problems.quadratic import SpectralQuadratic

F64 = torch.float64
CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _run(problem, engine, steps: int):
    """``steps`` engine steps on the problem's full batches; writes x, y back. Returns (first, last) metrics."""
    batches = problem.data()
    fns, x, y = problem.to_functions(batches)
    state = engine.init(fns, x, y)
    first = None
    for _ in range(steps):
        state, metrics = engine.step(fns, state, batches)
        first = first or metrics
    write_back(problem, state["x"], state["y"])
    return first, metrics, state


# -- SpectralQuadratic ---------------------------------------------------------------------------


def _lower_hessian(problem: SpectralQuadratic) -> torch.Tensor:
    """d_yy g by autodiff of the problem's own lower objective (not the stored A)."""
    fns, x, y = problem.to_functions()
    return torch.func.hessian(lambda y_: fns.g(x, {"y": y_}, ()))(y["y"])


def test_quadratic_hessian_has_the_chosen_eigenvalues():
    chosen = [0.5, 1.0, 2.0, 5.0, 10.0, 40.0]
    for problem, want in ((SpectralQuadratic(dim_x=3, dim_y=6, eigenvalues=chosen, seed=4), torch.tensor(chosen)),
                          (SpectralQuadratic(dim_x=4, dim_y=30, condition_number=1e3),
                           torch.logspace(0, 3, 30, dtype=F64))):
        hessian = _lower_hessian(problem)
        torch.testing.assert_close(torch.linalg.eigvalsh(hessian), want.to(F64), rtol=1e-10, atol=1e-12)
    ratio = torch.linalg.eigvalsh(problem.A)
    assert ratio[-1] / ratio[0] == pytest.approx(1e3, rel=1e-9)


def test_quadratic_closed_forms_match_exact_and_finite_differences():
    p = SpectralQuadratic(dim_x=5, dim_y=20, condition_number=50.0, seed=1, x0=[0.3, -1.0, 0.5, 2.0, -0.2])
    closed = p.hypergradient()
    exact = hypergrad.Exact(inner_steps=0).hypergradient(p.lower_to_solution(), (), ())["x"]
    torch.testing.assert_close(exact, closed, rtol=1e-8, atol=1e-12)
    x, eps = p.upper.x.detach(), 1e-4
    for i in range(5):
        e = torch.zeros(5, dtype=F64)
        e[i] = eps
        fd = (p.value_at(x + e) - p.value_at(x - e)) / (2 * eps)  # exact up to rounding: F is quadratic
        assert closed[i].item() == pytest.approx(fd.item(), rel=1e-7, abs=1e-9)
    assert closed.abs().min() > 1e-3
    # A truncated engine's closed form (inherited from P1) holds at this size too.
    neumann = hypergrad.Neumann(terms=7, alpha=0.02, inner_steps=0).hypergradient(p, (), ())["x"]
    torch.testing.assert_close(neumann, p.neumann_hypergradient(7, 0.02), rtol=1e-8, atol=1e-12)


def test_quadratic_optimum_is_stationary_and_minimal():
    p = SpectralQuadratic(seed=2)
    x_star = p.optimum()
    with torch.no_grad():
        p.upper.x.copy_(x_star)
    assert p.hypergradient().norm() < 1e-10
    assert p.value().item() == pytest.approx(p.optimal_value().item(), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert p.value_at(x_star + 1e-3 * torch.randn(10, generator=gen, dtype=F64)) > p.optimal_value()
    assert p.evaluate()["suboptimality"] == pytest.approx(0.0, abs=1e-12)


# -- LogisticL2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breast_cancer():
    return LogisticL2(dataset="breast_cancer", seed=0)


def test_logistic_exact_hypergradient_matches_finite_differences_and_the_closed_form(breast_cancer):
    p = breast_cancer
    gen = torch.Generator().manual_seed(1)
    x = torch.full((30,), -4.0, dtype=F64) + 0.5 * torch.randn(30, generator=gen, dtype=F64)
    with torch.no_grad():
        p.upper.log_l2.copy_(x)
    exact = hypergrad.Exact(inner_steps=0).hypergradient(p.lower_to_solution(), *p.data())["log_l2"]
    torch.testing.assert_close(p.hypergradient(), exact, rtol=1e-8, atol=1e-14)
    eps = 1e-5
    for i in (0, 3, 11, 22, 29):
        e = torch.zeros(30, dtype=F64)
        e[i] = eps
        fd = (p.value(x + e) - p.value(x - e)) / (2 * eps)
        assert exact[i].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-11), i
    assert exact.abs().max() > 1e-4


def test_logistic_value_hessian_matches_finite_differences(breast_cancer):
    task = breast_cancer._task()
    x = torch.full((30,), -3.0, dtype=F64)
    hessian = _value_hessian(task, x, _newton(task, x))
    eps = 1e-5
    for i in (1, 9, 27):
        e = torch.zeros(30, dtype=F64)
        e[i] = eps
        column = (_hypergradient(task, x + e, _newton(task, x + e)) - _hypergradient(task, x - e, _newton(task, x - e)))
        torch.testing.assert_close(hessian[:, i], column / (2 * eps), rtol=1e-5, atol=1e-10)


def test_logistic_reference_optimum_is_stationary_and_a_local_minimum(breast_cancer):
    p = breast_cancer
    x_star, f_star = p.reference_optimum()
    assert p.hypergradient(x_star).norm() < 1e-8
    assert p.value(x_star).item() == pytest.approx(f_star.item(), rel=1e-14)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(3):
            assert p.value(x_star + scale * torch.randn(30, generator=gen, dtype=F64)) >= f_star
    assert p.reference_optimum()[1] == f_star  # cached: the same tensor value, no recomputation


def test_ijcnn1_synthetic_shape_imbalance_seed_and_fast_reference():
    p = LogisticL2(dataset="ijcnn1_synthetic", seed=0)
    assert p.train_inputs.shape == (50_000, 22) and p.val_inputs.shape == (90_000, 22)
    assert p.lower.weight.shape == (22,) and p.upper.log_l2.shape == (22,)
    for labels in (p.train_labels, p.val_labels):
        assert 0.08 < labels.mean().item() < 0.12  # ijcnn1: 9.7 % positives
    assert float(p.train_inputs.min()) >= -1.0 and float(p.train_inputs.max()) <= 1.0
    small = {"n_train": 500, "n_val": 500, "n_test": 100}
    a, b, c = (LogisticL2(dataset="ijcnn1_synthetic", seed=s, **small) for s in (3, 3, 4))
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.val_labels, b.val_labels)
    assert not torch.equal(a.train_inputs, c.train_inputs)
    start = time.perf_counter()
    x_star, _ = p.reference_optimum()  # full size, 23 x 23 lower Hessian: about 2 s on one thread
    elapsed = time.perf_counter() - start
    assert p.hypergradient(x_star).norm() < 1e-8
    assert elapsed < 30, f"reference optimum took {elapsed:.1f} s"


# -- five steps of every applicable engine ---------------------------------------------------------


PROBLEMS = {
    "quadratic": (lambda: SpectralQuadratic(dim_x=4, dim_y=12, condition_number=10.0), 0.15, True),
    "hpo_breast_cancer": (lambda: LogisticL2(dataset="breast_cancer"), 0.4, True),
    "hpo_ijcnn1_small": (lambda: LogisticL2(dataset="ijcnn1_synthetic", n_train=2000, n_val=2000, n_test=200),
                         1.0, True),
    "cleaning_mlp": (lambda: DigitsCleaning(model="mlp", hidden=16, n_train=200, n_corrupt=100), 1.0, False),
    "hyperrep": (lambda: HyperRepresentation(n_tasks=3, width=4, hidden=8), 5.0, True),
}
ENGINES = {
    "Exact": lambda lr: hypergrad.Exact(inner_steps=5, inner_lr=lr, outer_lr=0.01),
    "Neumann": lambda lr: hypergrad.Neumann(terms=5, inner_steps=5, inner_lr=lr, outer_lr=0.01),
    "CG": lambda lr: hypergrad.CG(iters=5, inner_steps=5, inner_lr=lr, outer_lr=0.01),
    "Unrolled": lambda lr: hypergrad.Unrolled(inner_steps=5, inner_lr=lr, outer_lr=0.01),
    "F2SA": lambda lr: hypergrad.F2SA(schedule="deterministic", inner_steps=5, lr_z=lr, lr_y=lr / 10, lam0=10.0,
                                      lr_x_ratio=1.0),
    "Penalty": lambda lr: hypergrad.Penalty(sigma=0.1, inner_steps=5, inner_lr=lr / 2, outer_lr=0.01,
                                            outer_optimizer="adam"),
    "BOREP": lambda lr: hypergrad.BOREP(refine_steps=2, period=2, inner_steps=3, inner_lr=lr, outer_lr=0.01,
                                        terms=3),
}
# Exact forms the dense lower Hessian: it applies to small lower levels only.
APPLICABLE = [(p, e) for p in PROBLEMS for e in ENGINES if e != "Exact" or PROBLEMS[p][2]]


@pytest.mark.parametrize(("problem_name", "engine_name"), APPLICABLE)
def test_five_steps_of_each_engine(problem_name, engine_name):
    make, inner_lr, _ = PROBLEMS[problem_name]
    problem = make()
    x0 = {k: v.detach().clone() for k, v in problem.upper.named_parameters()}
    _, metrics, state = _run(problem, ENGINES[engine_name](inner_lr), 5)
    assert int(state["step"]) == 5
    for name in ("upper_objective", "lower_objective", "hypergradient_norm", "lower_stationarity"):
        assert torch.isfinite(metrics[name]), name
    moved = sum((p.detach() - x0[k]).abs().max().item() for k, p in problem.upper.named_parameters())
    assert moved > 1e-4  # x took 5 Adam steps of size ~0.01


# -- DigitsCleaning(model="mlp") -------------------------------------------------------------------


def test_mlp_cleaning_cg_steps_lower_the_upper_objective_and_evaluate_works():
    p = DigitsCleaning(model="mlp", seed=0)
    assert isinstance(p.lower, torch.nn.Sequential) and p.lower[0].out_features == 64
    again = DigitsCleaning(model="mlp", seed=0)
    assert torch.equal(p.lower[0].weight, again.lower[0].weight)  # seeded init, whatever the global RNG
    settings = {"iters": 10, "tol": 1e-3, "inner_steps": 10, "inner_lr": 1.0}
    first, _, state = _run(p, hypergrad.CG(outer_lr=0.1, **settings), 5)
    frozen = DigitsCleaning(model="mlp", seed=0)  # the same inner steps with x held still
    _, _, frozen_state = _run(frozen, hypergrad.CG(outer_lr=1e-12, **settings), 5)
    _, upper = p.data()
    after = p.upper_objective(upper).item()
    assert after < first["upper_objective"].item() - 0.5
    assert after < frozen.upper_objective(upper).item() - 0.05  # the hypergradient, not the inner steps, helped
    m = p.evaluate()
    assert set(m) >= {"test_accuracy", "cleaning_f1", "baseline_all_accuracy", "baseline_oracle_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["baseline_all_accuracy"] < m["baseline_oracle_accuracy"]


@pytest.mark.parametrize("make, name", [
    (lambda: SpectralQuadratic(dim_y=3, eigenvalues=[1.0, 2.0]), "eigenvalues"),
    (lambda: SpectralQuadratic(dim_y=3, eigenvalues=[1.0, 0.0, 2.0]), "eigenvalues"),
    (lambda: SpectralQuadratic(condition_number=0.5), "condition_number"),
    (lambda: LogisticL2(dataset="covtype"), "dataset"),
    (lambda: LogisticL2(n_train=400, n_val=200), "n_train"),
    (lambda: DigitsCleaning(model="resnet"), "model"),
    (lambda: DigitsCleaning(model="mlp", hidden=0), "hidden"),
    (lambda: HyperRepresentation(ways=11), "ways"),
    (lambda: HyperRepresentation(shots=60, queries=60), "shots"),
])
def test_bad_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# -- HyperRepresentation ---------------------------------------------------------------------------


def test_hyperrep_tasks_and_a_short_run_lowers_the_upper_objective():
    p = HyperRepresentation(seed=0)
    (tx, ty), (vx, vy) = p.data()
    assert tx.shape == (20, 25, 64) and vx.shape == (20, 75, 64) and p.lower.weight.shape == (20, 32, 5)
    assert int(ty.min()) == 0 and int(ty.max()) == 4 and (torch.bincount(vy[0]) == 15).all()
    assert p.test_train_inputs.shape == (20, 25, 64)
    start = time.perf_counter()
    engine = hypergrad.CG(iters=10, tol=1e-4, inner_steps=10, inner_lr=20.0, outer_lr=0.01)
    first, last, _ = _run(p, engine, 40)
    assert time.perf_counter() - start < 20
    assert last["upper_objective"] < 0.5 * first["upper_objective"]
    m = p.evaluate()
    assert m["held_out_accuracy"] > m["random_trunk_accuracy"] + 0.05


# -- every config through the CLI ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quadratic", "hpo_breast_cancer", "hpo_ijcnn1", "cleaning_digits_mlp",
                                  "hyperrep_digits", "layerwise_weight_decay"])
def test_config_runs_three_steps_through_the_cli(tmp_path, capsys, name):
    main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.max_steps", "3",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=3.ckpt")
    assert "final metrics" in capsys.readouterr().out
