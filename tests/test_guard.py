"""The step guard: a non-finite step stops (or is skipped) before it reaches the problem or a checkpoint;
warnings for failing solves and exploding hypergradients; a batch whose structure changes is named."""

from __future__ import annotations

import glob

import pytest
import torch

import bilevel
import hypergrad
from bilevel.guard import RESIDUAL_PATIENCE, StepGuard
from hypergrad.finite import finite_flags

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


class _Ridge(bilevel.BilevelProblem):
    """y = argmin 0.5 |A y - b|^2 + 0.5 exp(x) |y|^2 on the lower batch (A, b); f = |y - 1|^2 on the upper batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lower = bilevel.Hyper(y=torch.zeros(3, dtype=torch.float64))
        self.upper = bilevel.Hyper(log_l2=torch.zeros((), dtype=torch.float64))

    def lower_objective(self, batch):
        a, b = batch
        y = self.lower.y
        return 0.5 * (a @ y - b).pow(2).sum() + 0.5 * torch.exp(self.upper.log_l2) * y.pow(2).sum()

    def upper_objective(self, batch):
        (target,) = batch
        return (self.lower.y - target).pow(2).sum()


def _batches(poison: int | None = None, n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = [(torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64))
           for _ in range(n)]
    if poison is not None:  # a corrupt example in this lower batch: y goes non-finite in the inner phase
        a, b = out[poison]
        out[poison] = (a, torch.where(torch.arange(4) == 1, torch.tensor(float("nan"), dtype=b.dtype), b))
    return out


UPPER = [(torch.ones(3, dtype=torch.float64),)]
ENGINE = hypergrad.CG(iters=3, inner_steps=3, inner_lr=0.05, outer_lr=0.1)


def test_first_nonfinite_step_raises_naming_step_quantity_and_last_objectives(tmp_path):
    clean = _Ridge()
    bilevel.fit(clean, ENGINE, _batches(), UPPER, max_steps=2, enable_checkpointing=False,
                default_root_dir=tmp_path / "clean", **QUIET)
    problem = _Ridge()
    with pytest.raises(bilevel.NonFiniteStep) as info:
        bilevel.fit(problem, ENGINE, _batches(poison=2), UPPER, max_steps=5, default_root_dir=tmp_path / "run",
                    checkpoint_every=1, **QUIET)
    message = str(info.value)
    assert "_Ridge: outer step 3 produced non-finite values: y went non-finite first" in message
    assert "Last finite objectives (step 2): upper_objective=" in message
    assert "on_nonfinite='skip'" in message
    # The problem holds step 2's parameters, bit for bit the clean 2-step run's.
    assert torch.equal(problem.upper.log_l2, clean.upper.log_l2)
    assert torch.equal(problem.lower.y, clean.lower.y)
    paths = glob.glob(str(tmp_path / "run" / "**" / "*.ckpt"), recursive=True)
    assert paths  # steps 1 and 2 were checkpointed: the loop below checks something
    for path in paths:
        state = torch.load(path, weights_only=False)
        tensors = [t for t in state["state_dict"].values()] + [state["engine_state"]["x"]["log_l2"]]
        assert all(torch.isfinite(t).all() for t in tensors), path


def test_skip_discards_the_step_and_equals_a_run_without_that_batch(tmp_path):
    batches = _batches(poison=2)
    skipping = _Ridge()
    with pytest.warns(RuntimeWarning, match="outer step 3 .* discarded"):
        trainer = bilevel.fit(skipping, ENGINE, batches, UPPER, max_steps=5, on_nonfinite="skip",
                              enable_checkpointing=False, default_root_dir=tmp_path, **QUIET)
    assert trainer.callback_metrics["guard/nonfinite_skipped"].item() == 1.0
    without = _Ridge()
    bilevel.fit(without, ENGINE, [b for i, b in enumerate(batches) if i != 2], UPPER, max_steps=4,
                enable_checkpointing=False, default_root_dir=tmp_path, **QUIET)
    assert torch.equal(skipping.upper.log_l2, without.upper.log_l2)
    assert torch.equal(skipping.lower.y, without.lower.y)


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be one of 'raise', 'skip'"):
        bilevel.fit(_Ridge(), ENGINE, _batches(), UPPER, on_nonfinite="ignore")


def test_finite_flags_name_each_quantity():
    flags = finite_flags({"x": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "f": torch.tensor(1.0),
                          "count": torch.tensor(3), "nested": {"m": {"k": torch.tensor([float("nan")])}}})
    assert flags.tolist() == [False, True, True, False]


def _metrics(residual: float, norm: float) -> dict[str, torch.Tensor]:
    return {"upper_objective": torch.tensor(1.0), "lower_objective": torch.tensor(2.0),
            "solve_residual": torch.tensor(residual), "hypergradient_norm": torch.tensor(norm)}


def test_warns_once_when_the_solve_residual_stays_above_one():
    guard = StepGuard(name="P")
    quantities = {"x": torch.zeros(2)}
    with pytest.warns(RuntimeWarning, match=f"solve_residual has stayed above 1 for {RESIDUAL_PATIENCE} steps") as rec:
        for step in range(1, 3 * RESIDUAL_PATIENCE):
            # one good solve in the middle restarts the count
            residual = 0.5 if step == RESIDUAL_PATIENCE // 2 else 3.0
            assert guard.accept(step, quantities, _metrics(residual, 1.0))
    assert sum("solve_residual" in str(w.message) for w in rec) == 1
    quiet = StepGuard(name="P")
    for step in range(1, RESIDUAL_PATIENCE):
        quiet.accept(step, quantities, _metrics(3.0, 1.0))
    assert "solve_residual" not in quiet._warned


def test_warns_when_the_hypergradient_norm_grows_a_millionfold():
    guard = StepGuard(name="P")
    quantities = {"x": torch.zeros(2)}
    guard.accept(1, quantities, _metrics(0.1, 2.0))
    guard.accept(2, quantities, _metrics(0.1, 1.9e6))  # below 1e6 x the first value: quiet
    assert not guard._warned
    with pytest.warns(RuntimeWarning, match="hypergradient_norm grew from 2 to 3e\\+06"):
        guard.accept(3, quantities, _metrics(0.1, 3e6))


def test_a_batch_whose_structure_changes_is_named(tmp_path):
    batches = _batches()
    batches[1] = (batches[1][0], batches[1][1], torch.arange(4))  # an extra index tensor from step 2 on
    with pytest.raises(ValueError) as info:
        bilevel.fit(_Ridge(), ENGINE, batches, UPPER, max_steps=3, enable_checkpointing=False,
                    default_root_dir=tmp_path, **QUIET)
    message = str(info.value)
    assert "the lower batch of outer step 2 is a tuple(float64 2-d, float64 1-d, int64 1-d)" in message
    assert "the first lower batch was a tuple(float64 2-d, float64 1-d)" in message


def test_a_huge_finite_step_is_not_called_nonfinite():
    # |y| = 1e30 overflows the fast check's float32 2-norm; the exact check must accept the step.
    guard = StepGuard(name="P")
    assert guard.accept(1, {"y": {"w": torch.tensor([1e30, 1.0])}, "x": torch.zeros(1)}, _metrics(0.1, 1.0))
    with pytest.raises(bilevel.NonFiniteStep, match="outer step 2 .*: x went non-finite first"):
        guard.accept(2, {"y": {"w": torch.tensor([1e30, 1.0])}, "x": torch.tensor([float("inf")])}, _metrics(0.1, 1.0))


def test_skipped_count_survives_a_resume(tmp_path):
    batches = _batches(poison=1)
    with pytest.warns(RuntimeWarning, match="discarded"):
        first = bilevel.fit(_Ridge(), ENGINE, batches, UPPER, max_steps=3, on_nonfinite="skip", checkpoint_every=1,
                            default_root_dir=tmp_path, **QUIET)
    ckpt = first.checkpoint_callback.best_model_path
    assert torch.load(ckpt, weights_only=False)["guard"]["skipped"] == 1
    resumed = bilevel.fit(_Ridge(), ENGINE, batches, UPPER, max_steps=5, on_nonfinite="skip", ckpt_path=ckpt,
                          default_root_dir=tmp_path, **QUIET)
    assert resumed.callback_metrics["guard/nonfinite_skipped"].item() == 1.0


def test_guard_benchmark_quick_run_reports_both_jobs(capsys):
    from experiments.bench import guard as bench

    bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| default job (cleaning digits, CG) |" in out and "| MLP (quick) |" in out
