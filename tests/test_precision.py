"""Mixed and double precision (``bilevel/precision.py``): objectives under autocast, the engine in float32.

Tolerances: on the default job the bf16-mixed hypergradient is 0.5-1 % (relative) from float32's and
float16 autocast's 0.1 % (``experiments/results/precision.md``); bfloat16 keeps 8 significant bits
(eps = 2^-8 = 0.4 %), so a hypergradient within 5 % (about 13 eps) is bf16's rounding, and one that
is not is a bug. float32's own run-to-run difference is 0, so "differs by more than 1e-5" shows the
objectives really ran in 16 bits.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

import bilevel
import hypergrad
from bilevel.precision import StepPrecision, autocast_functions, check_requested, step_precision
from experiments.bench import precision as bench
from hypergrad.tree import Tree
from problems import DigitsCleaning

BF16_TOLERANCE = 0.05
"""Relative distance of a bf16-mixed hypergradient from float32's that is bf16 rounding (module docstring)."""

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


class Recording(bilevel.BilevelProblem):
    """Weighted least squares with a linear lower model; records the dtype its activations and projections see.

    ``activations`` gets (dtype of the lower model's output [B, 3], autocast on?) per objective call;
    ``projections`` gets whether autocast was on in each ``project_upper`` call (the engine's arithmetic).
    """

    def __init__(self, n: int = 64, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lower = torch.nn.Linear(8, 3, dtype=dtype)
        with torch.no_grad():
            self.lower.weight.copy_(torch.randn(3, 8, generator=gen) * 0.1)
            self.lower.bias.zero_()
        self.upper = bilevel.Hyper(logits=torch.zeros(n, dtype=dtype))
        self.activations: list[tuple[torch.dtype, bool]] = []
        self.projections: list[bool] = []
        inputs, targets = torch.randn(n, 8, generator=gen), torch.randn(n, 3, generator=gen)
        self.train = (inputs.to(dtype), targets.to(dtype), torch.arange(n))
        self.val = (torch.randn(32, 8, generator=gen).to(dtype), torch.randn(32, 3, generator=gen).to(dtype))

    def _out(self, inputs: Tensor) -> Tensor:
        out = self.lower(inputs)
        self.activations.append((out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    def lower_objective(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inputs, targets, index = batch
        losses = (self._out(inputs) - targets).square().mean(dim=1)
        return (torch.sigmoid(self.upper.logits[index]) * losses).mean() + 1e-2 * self.lower.weight.square().sum()

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.mse_loss(self._out(inputs), targets)

    def project_upper(self, x: Tree) -> Tree:
        self.projections.append(torch.is_autocast_enabled("cpu"))
        return {"logits": x["logits"].clamp(-5.0, 5.0)}


def _engine() -> hypergrad.CG:
    return hypergrad.CG(iters=5, inner_steps=3, inner_lr=0.5, outer_lr=0.05)


def _fit(problem: Recording, steps: int, **kwargs: Any) -> Any:
    return bilevel.fit(problem, _engine(), problem.train, problem.val, max_steps=steps, **QUIET, **kwargs)


def _float_leaves(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(tree, Tensor):
        return {prefix: tree} if tree.is_floating_point() else {}
    return {k: v for key, sub in tree.items() for k, v in _float_leaves(sub, f"{prefix}/{key}").items()}


def _relative(a: Tree, b: Tree) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b) ** 0.5
    return num / sum(float(b[k].double().square().sum()) for k in b) ** 0.5


def test_bf16_mixed_runs_objectives_in_bf16_and_keeps_the_engine_in_float32() -> None:
    problem = Recording()
    trainer = _fit(problem, 3, precision="bf16-mixed")
    state = trainer.lightning_module.state
    leaves = _float_leaves(state)
    assert {"/x/logits", "/y/weight", "/v/weight", "/outer/m/logits", "/outer/s/logits"} <= set(leaves)
    assert {k: v.dtype for k, v in leaves.items()} == dict.fromkeys(leaves, torch.float32)
    assert all(p.dtype == torch.float32 for p in problem.parameters())
    # The checks before training (g, then f) ran in float32; every call in the training steps under autocast.
    calls = problem.activations
    assert calls[:2] == [(torch.float32, False)] * 2, calls[:3]
    assert len(calls) > 8 and all(entry == (torch.bfloat16, True) for entry in calls[2:]), set(calls[2:])
    # The engine's own arithmetic (here the projection onto X after each outer step) ran with autocast off.
    assert len(problem.projections) >= 3 and not any(problem.projections[-3:])
    assert trainer.lightning_module._precision == StepPrecision("bf16-mixed", "cpu", torch.bfloat16)


def test_bf16_mixed_hypergradient_is_within_tolerance_of_float32_and_differs() -> None:
    problem = DigitsCleaning(seed=0, n_train=300, n_corrupt=150, n_val=60)
    batches = problem.data()
    fns, x, y = problem.to_functions(batches)
    engine = bench.default_cg()
    state = engine.inner(fns, engine.init(fns, x, y), batches[0])
    results = {}
    for name, f in (("float32", fns), ("bf16", autocast_functions(fns, "cpu", torch.bfloat16)),
                    ("fp16", autocast_functions(fns, "cpu", torch.float16))):
        _, h, metrics = engine.estimate(f, state, batches)
        assert h["logits"].dtype == torch.float32
        assert all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in metrics.values()), metrics
        results[name] = h
    bf16, fp16 = _relative(results["bf16"], results["float32"]), _relative(results["fp16"], results["float32"])
    assert 1e-5 < bf16 < BF16_TOLERANCE, bf16
    assert 1e-5 < fp16 < bf16, (fp16, bf16)  # float16 keeps 3 more significant bits than bfloat16
    assert bench.angle_degrees(results["bf16"], results["float32"]) < 3.0


def test_bf16_mixed_through_lightning_changes_the_hypergradient_by_rounding_only() -> None:
    norms = {}
    for precision in ("32-true", "bf16-mixed"):
        trainer = _fit(Recording(), 1, precision=precision)
        norms[precision] = float(trainer.callback_metrics["hypergradient/norm"])
    difference = abs(norms["bf16-mixed"] - norms["32-true"]) / norms["32-true"]
    assert 1e-6 < difference < BF16_TOLERANCE, norms


def test_64_true_keeps_the_state_in_float64_and_matches_a_float64_run() -> None:
    converted = Recording()
    trainer = _fit(converted, 3, precision="64-true")
    leaves = _float_leaves(trainer.lightning_module.state)
    assert {v.dtype for v in leaves.values()} == {torch.float64}
    native = Recording(dtype=torch.float64)
    _fit(native, 3)
    torch.testing.assert_close(converted.upper.logits, native.upper.logits, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(converted.lower.weight, native.lower.weight, rtol=1e-12, atol=1e-14)
    single = Recording()
    _fit(single, 3)
    assert single.upper.logits.dtype == torch.float32
    assert not torch.allclose(single.upper.logits.double(), native.upper.logits, rtol=1e-10, atol=1e-12)


def test_16_mixed_plugin_runs_without_loss_scaling() -> None:
    # What Lightning builds for precision="16-mixed" on CUDA, on the CPU: float16 autocast and a GradScaler.
    problem = Recording()
    trainer = _fit(problem, 2, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert not trainer.precision_plugin.scaler.is_enabled()
    assert problem.activations[-1] == (torch.float16, True)
    assert {v.dtype for v in _float_leaves(trainer.lightning_module.state).values()} == {torch.float32}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_16_bit_true_precisions_are_refused(precision: str) -> None:
    with pytest.raises(ValueError, match=rf"precision='{precision}'.*engine state.*Supported: '32-true', "
                                         r"'64-true', 'bf16-mixed' \("):
        _fit(Recording(), 1, precision=precision)


def test_requested_precisions_are_checked() -> None:
    with pytest.raises(ValueError, match=r"'16-mixed' is not available on CPU.*precision='bf16-mixed'"):
        check_requested("16-mixed", "cpu")
    with pytest.raises(ValueError, match=r"'16-mixed' is not available on CPU"):
        check_requested(16, "cpu")  # Lightning's legacy spelling of 16-mixed
    with pytest.raises(ValueError, match=r"does not support precision='transformer-engine'"):
        check_requested("transformer-engine", "cpu")
    for fine in (None, "32-true", "64-true", "bf16-mixed", 32, "bf16"):
        check_requested(fine, "cpu")
    check_requested("16-mixed", "cuda")


def test_population_refuses_mixed_precision() -> None:
    population = bilevel.Population([Recording(), Recording()])
    plugin = MixedPrecision("bf16-mixed", "cpu")
    with pytest.raises(ValueError, match=r"not supported for a bilevel.Population.*'32-true' or '64-true'"):
        step_precision(plugin, population=True)
    assert step_precision(plugin).mixed and len(population) == 2


def test_hvp_probe_and_validation_run_on_mixed_precision_objectives() -> None:
    problem = Recording()
    batches = (problem.train, problem.val)
    fns, x, y = problem.to_functions(batches)  # bilevel.validate's checks, in float32
    mixed = autocast_functions(fns, "cpu", torch.bfloat16)
    assert mixed.g.compute_dtype is torch.bfloat16 and mixed.g.__qualname__ == fns.g.__qualname__
    engine = hypergrad.CG(iters=5, inner_steps=3, inner_lr=0.5, hvp_mode="forward-over-reverse")
    state = engine.inner(mixed, engine.init(mixed, x, y), batches[0])
    with warnings.catch_warnings():
        # The probe compares modes at float32's tolerance; bf16 rounding may replace the mode (with a warning).
        warnings.simplefilter("ignore", RuntimeWarning)
        _, h, _ = engine.estimate(mixed, state, batches)
    _, reference, _ = engine.estimate(fns, state, batches)
    assert 0 < _relative(h, reference) < BF16_TOLERANCE


def test_bench_quick_reports_every_precision() -> None:
    rows = bench.main(["--quick"])
    by = {(row[0], row[1]): row for row in rows}
    assert {precision for _, precision in by} == set(bench.PRECISIONS)
    for (job, precision), row in by.items():
        estimate_error, angle, float64_error, step_ms = row[2], row[3], row[6], row[8]
        assert step_ms > 0 and math.isfinite(estimate_error)
        if precision == "float32":
            assert estimate_error == 0.0 and angle < 1e-6
        elif by[job, "float32"][6] < 1e-5:
            # Where float32 itself is within 1e-5 of float64 (about 100 float32 eps), the computation does not
            # amplify rounding much, and mixed precision adds 16-bit rounding only.
            assert 1e-6 < estimate_error < BF16_TOLERANCE and angle < 3.0, (job, precision, row)
        else:
            # An unconverged, ill-conditioned solve (CG on H^2, in --quick also the damped one) amplifies
            # rounding in any precision (precision.md); 16-bit rounding moves it further than float32's.
            assert float64_error > by[job, "float32"][6]
