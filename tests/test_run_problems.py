"""experiments.runner and experiments.oracles: oracle calls per step match the engines' documented costs."""

import glob
import math
from pathlib import Path

import pytest

from bilevel.cli import main
from experiments.runner import run
from experiments.specs import SPECS, suboptimality
from hypergrad.cg import CG
from hypergrad.exact import Exact
from hypergrad.f2sa import F2SA
from hypergrad.unrolled import Unrolled
from problems.quadratic import SpectralQuadratic

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _quadratic() -> SpectralQuadratic:
    return SpectralQuadratic(dim_x=3, dim_y=8, condition_number=10.0, seed=0)


@pytest.mark.parametrize("iters, inner_steps", [(4, 5), (0, 2)])
def test_cg_oracle_calls_per_step(iters, inner_steps):
    # CG(iters=K, inner_steps=T): T gradients of g and one grad_xy of f; K HVPs plus one for the warm
    # start's residual; one mixed VJP (whose inner gradient of g is part of it, not a separate call).
    result = run(_quadratic(), CG(iters=iters, inner_steps=inner_steps, inner_lr=0.1, outer_lr=0.5,
                                  outer_optimizer="sgd"), 3, suboptimality, records=3)
    assert result.final["gradients_per_step"] == inner_steps + 1
    assert result.final["hvps_per_step"] == iters + 1
    assert result.final["mixed_vjps_per_step"] == 1
    assert result.steps == [0, 1, 2, 3]
    assert all(b > a for a, b in zip(result.times, result.times[1:], strict=False))
    assert result.final["seconds"] == result.times[-1]
    assert math.isnan(result.final["diverged_at"])
    if iters > 0:  # with K = 0 the adjoint stays 0 and x = 0 is stationary for f alone: no move
        assert result.objectives[-1] < result.objectives[0]


def test_vmapped_hvps_count_once_per_vector():
    # Exact forms H with one vmapped HVP over the dim(y) = 8 unit vectors: 8 HVPs per step.
    result = run(_quadratic(), Exact(inner_steps=2, inner_lr=0.1, outer_lr=0.5), 2, suboptimality)
    assert (result.final["gradients_per_step"], result.final["hvps_per_step"]) == (3, 8)
    assert result.final["mixed_vjps_per_step"] == 1


def test_first_order_and_unrolled_costs():
    # F2SA: 3T + 3 gradients, no second-order oracle. Unrolled: T gradients of g (its metrics reuse the last one).
    f2sa = run(_quadratic(), F2SA(inner_steps=4, schedule="deterministic"), 2, suboptimality)
    assert f2sa.final["gradients_per_step"] == 3 * 4 + 3
    assert f2sa.final["hvps_per_step"] == f2sa.final["mixed_vjps_per_step"] == 0
    unrolled = run(_quadratic(), Unrolled(inner_steps=4, inner_lr=0.1), 2, suboptimality)
    assert (unrolled.final["gradients_per_step"], unrolled.final["hvps_per_step"]) == (4, 0)


def test_divergence_stops_the_run():
    # inner_lr 1.0 on eigenvalues up to 10: the unrolled map is expanding, x blows up to non-finite values.
    result = run(_quadratic(), Unrolled(inner_steps=30, inner_lr=1.0, outer_lr=1.0, outer_optimizer="sgd"),
                 50, suboptimality)
    assert result.final["diverged_at"] < 50
    assert math.isnan(result.final["objective"]) and math.isnan(result.final["test"])


def test_every_spec_names_engines_that_accept_its_problem():
    for name, spec in SPECS.items():
        problem = spec.make(0) if name not in ("hpo_ijcnn1", "hyperrep_digits") else None
        for label, make_engine in spec.engines.items():
            engine = make_engine()
            if label in spec.make_for or problem is None:
                continue
            fns, _, _ = problem.to_functions()
            engine.check_functions(fns)  # raises if the engine cannot honour the problem


@pytest.mark.parametrize("config", ["svm_lvhba.yaml", "coupled_p5.yaml", "active_p6.yaml"])
def test_lvhba_config_runs_three_steps(config, tmp_path):
    main(["fit", "--config", str(CONFIGS / config), "--trainer.max_steps", "3", "--trainer.default_root_dir",
          str(tmp_path), "--trainer.enable_progress_bar", "false"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=3.ckpt")
