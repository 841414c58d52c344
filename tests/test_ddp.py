"""Training on several processes (issue 11): Lightning's DDP on 2 CPU ranks equals one process fed the union.

``tests/ddp_script.py`` runs ``bilevel.fit`` (or the ``bilevel`` command) under "ddp" / "ddp_spawn"
in a subprocess, since both start processes of their own; every rank records its batches, its
logged metrics and its final x, y and engine state. Asserted here, in float64: the ranks are
bit-identical; each rank's lower batches are the rows of Lightning's DistributedSampler (epoch = the
level's pass) and the upper full batch is split in contiguous halves; one process fed at each step
the union of the ranks' batches ends at the same x, y, engine state and logged metrics to 1e-10
relative, for CG and Unrolled under "ddp" and "ddp_spawn" and for the seven other engines (Exact,
Neumann, F2SA, Penalty, BOREP, LV-HBA on a mean-over-batch constraint, PES with lower dynamics) under
"ddp_fork" (the launcher of "ddp_spawn", forking). Also: checkpoints written on 2 ranks resume on
1 and the other way round (with a warning about the data order), and FSDP, DeepSpeed and
populations on several processes are refused before any work. One subprocess per configuration,
run at once, 3 steps each: the processes' start dominates the time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data.distributed import DistributedSampler

import bilevel
import hypergrad
from bilevel.cli import main as cli_main
from bilevel.distributed import UnsupportedStrategy, check_strategy, split_batch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_script  # noqa: E402  (the problem, the data and the recorder shared with the subprocesses)

HERE = Path(__file__).parent
STEPS, RANKS, TOL = 3, 2, 1e-10
# The engines other than CG and Unrolled: consecutive fits in one "ddp_fork" launch (see ``runs``).
OTHER_ENGINES = ("Exact", "Neumann", "F2SA", "Penalty", "BOREP", "LVHBA", "PES")


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _run_all(commands: dict[str, list[str]], out: Path, timeout: int = 170) -> dict[str, str]:
    """Run the commands at once (their time is mostly the processes' start), each to success within ``timeout``
    seconds of the start; their output. Each writes to a file (no pipe to fill) in its own session, so that one
    still running at the deadline is killed with the ranks it started, and named."""
    procs, late = {}, []
    for name, args in commands.items():
        with open(out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                           cwd=HERE.parent, start_new_session=True)
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            late.append(name)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logs = {name: (out / f"{name}.log").read_text() for name in commands}
    assert not late, f"still running after {timeout} s: " + "; ".join(f"{n}: ...{logs[n][-2000:]}" for n in late)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {logs[name][-4000:]}"
    return logs


def _ranks(out: Path, tag: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{tag}-rank{r}.pt", weights_only=False) for r in range(RANKS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Every DDP configuration, run once: CG through the CLI ("ddp"), Unrolled through bilevel.fit ("ddp"),
    both through bilevel.fit ("ddp_spawn"), the seven other engines one after the other through bilevel.fit
    ("ddp_fork", in one script: each "ddp_spawn" fit would start two fresh interpreters, about 25 s a fit here, where
    a fork costs nothing), and a 1-process checkpoint resumed on 2 ranks."""
    out = tmp_path_factory.mktemp("ddp")
    config = {
        "model": {"problem": {"class_path": "ddp_script.Ridge"},
                  "engine": {"class_path": "hypergrad.CG",
                             "init_args": {"iters": 3, "inner_steps": 3, "inner_lr": 0.3, "outer_lr": 0.05}},
                  "checkpoint_every": 100},
        "trainer": {"max_steps": STEPS, "default_root_dir": str(out), "enable_progress_bar": False,
                    "callbacks": [{"class_path": "ddp_script.Record",
                                   "init_args": {"out": str(out), "tag": "cli-CG", "save_at": 2}}]},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    # A checkpoint of step 2 written by one process, to be resumed on two.
    ddp_script.run(str(out), "auto", "CG", 2, 1, 2, None, tag="single-CG")
    script = [str(HERE / "ddp_script.py"), str(out)]
    logs = _run_all({
        "cli": ["-m", "bilevel.cli", "fit", "--config", str(out / "config.yaml"), "--trainer.devices", "2",
                "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        "ddp": [*script, "--strategy", "ddp", "--engines", "Unrolled"],
        "spawn-CG": [*script, "--strategy", "ddp_spawn", "--engines", "CG"],
        "spawn-Unrolled": [*script, "--strategy", "ddp_spawn", "--engines", "Unrolled"],
        "fork-others": [*script, "--strategy", "ddp_fork", "--engines", ",".join(OTHER_ENGINES)],
        "resume": [*script, "--strategy", "ddp", "--engines", "CG", "--ckpt-path", str(out / "single-CG-step2.ckpt")],
    }, out)
    return {"out": out, "logs": logs}


def _sampler_batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s lower batches: DistributedSampler(seed 0, shuffled) rows, epoch k for the level's pass k."""
    features, targets = ddp_script.make_data()[0]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = 0
    while len(batches) < steps:
        sampler = DistributedSampler(range(len(features)), num_replicas=RANKS, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [(features[order[i:i + ddp_script.BATCH]], targets[order[i:i + ddp_script.BATCH]])
                    for i in range(0, len(order), ddp_script.BATCH)]
        epoch += 1
    return batches[:steps]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _assert_bit_identical(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    for key in ("x", "y", "state", "metrics"):
        left, right = _leaves(a[key]), _leaves(b[key])
        assert len(left) == len(right) > 0, key
        assert all(torch.equal(u, v) for u, v in zip(left, right, strict=True)), f"ranks differ in {key}"


def _reference(engine: str, tmp: Path) -> dict[str, Any]:
    """One process fed, at each step, the union (rank 0's rows, then rank 1's) of the ranks' batches."""
    shards = [_sampler_batches(r, STEPS) for r in range(RANKS)]
    union = [tuple(torch.cat(parts) for parts in zip(*step, strict=True)) for step in zip(*shards, strict=True)]
    bilevel.fit(ddp_script.problem_for(engine), ddp_script.ENGINES[engine](), union, ddp_script.make_data()[1],
                max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, callbacks=[ddp_script.Record(str(tmp), f"ref-{engine}")])
    return torch.load(tmp / f"ref-{engine}-rank0.pt", weights_only=False)


@pytest.mark.parametrize(("tag", "engine"), [("cli-CG", "CG"), ("ddp-Unrolled", "Unrolled"),
                                             ("ddp_spawn-CG", "CG"), ("ddp_spawn-Unrolled", "Unrolled"),
                                             *((f"ddp_fork-{engine}", engine) for engine in OTHER_ENGINES)])
def test_ranks_equal_one_process_fed_the_union(runs, tmp_path, tag, engine):
    ranks = _ranks(runs["out"], tag)
    assert [r["world_size"] for r in ranks] == [RANKS, RANKS] and [r["step"] for r in ranks] == [STEPS, STEPS]
    _assert_bit_identical(ranks)
    # Sharding: the lower rows are the DistributedSampler's, the upper full batch is split in contiguous halves.
    full_upper = ddp_script.make_data()[1]
    for r, record in enumerate(ranks):
        for step, (batch, expected) in enumerate(zip(record["batches"], _sampler_batches(r, STEPS), strict=True)):
            assert all(torch.equal(u, v) for u, v in zip(batch["lower"], expected, strict=True)), (r, step)
    for step in range(STEPS):
        halves = [ranks[r]["batches"][step]["upper"] for r in range(RANKS)]
        joined = [torch.cat(parts) for parts in zip(*halves, strict=True)]
        assert all(torch.equal(u, v) for u, v in zip(joined, full_upper, strict=True))
    reference = _reference(engine, tmp_path)
    worst = 0.0
    for key in ("x", "y", "state"):
        for u, v in zip(_leaves(ranks[0][key]), _leaves(reference[key]), strict=True):
            worst = max(worst, _rel(u, v))
    assert len(ranks[0]["metrics"]) == len(reference["metrics"]) == STEPS
    for got, want in zip(ranks[0]["metrics"], reference["metrics"], strict=True):
        assert set(got) == set(want)
        for name, value in want.items():
            if name == "solver/residual" and float(value.abs()) < 1e-12:
                # |H v - b| / |b| of an exact solve (Exact) is rounding alone, 1e-16: not comparable relatively.
                assert float((got[name] - value).abs()) <= 1e-12, name
            else:
                worst = max(worst, _rel(got[name], value))
    print(f"{tag}: max relative difference to one process {worst:.2e}")
    assert worst <= TOL
    # The steps moved x (the comparison is not between two untrained problems).
    assert not torch.equal(ranks[0]["x"]["log_l2"], ddp_script.Ridge().upper.log_l2)


def test_checkpoint_of_two_ranks_resumes_on_one(runs, tmp_path):
    out = runs["out"]
    ckpt = out / "cli-CG-step2.ckpt"
    at_save = _ranks(out, "cli-CG")[0]["at_save"]
    record = ddp_script.Record(str(tmp_path), "resumed")
    with pytest.warns(UserWarning, match=r"written on 2 process\(es\) and this run has 1.*new pass"):
        trainer = bilevel.fit(ddp_script.Ridge(), ddp_script.ENGINES["CG"](), ddp_script.lower_loader(),
                              ddp_script.make_data()[1], max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                              enable_progress_bar=False, enable_checkpointing=False, callbacks=[record],
                              ckpt_path=str(ckpt))
    assert trainer.global_step == STEPS and len(record.batches) == STEPS - 2
    # The engine state continues exactly; the data restarts a pass after those the checkpoint had made.
    assert all(torch.equal(u, v) for u, v in zip(_leaves(record.loaded), _leaves(at_save["state"]), strict=True))
    assert record.batches[0]["lower"][0].shape[0] == ddp_script.BATCH  # the whole data's batch, not a rank's shard
    assert trainer.train_dataloader.levels["lower"].passes == at_save["passes"]["lower"] + 1


def test_checkpoint_of_one_process_resumes_on_two(runs):
    out = runs["out"]
    ranks = _ranks(out, "ddp-CG")
    single = torch.load(out / "single-CG-rank0.pt", weights_only=False)
    assert "written on 1 process(es) and this run has 2" in runs["logs"]["resume"]
    assert [r["step"] for r in ranks] == [STEPS, STEPS] and [len(r["batches"]) for r in ranks] == [1, 1]
    _assert_bit_identical(ranks)
    for r in ranks:  # both ranks start from the checkpoint's engine state
        assert all(torch.equal(u, v) for u, v in zip(_leaves(r["loaded"]), _leaves(single["state"]), strict=True))
    # and each trains on its own shard of a fresh pass.
    assert not torch.equal(ranks[0]["batches"][0]["lower"][0], ranks[1]["batches"][0]["lower"][0])


def test_logged_metrics_are_global_and_rank_zero_writes_checkpoints(runs):
    out = runs["out"]
    ranks = _ranks(out, "cli-CG")
    assert {"objective/upper", "hypergradient/norm", "solver/residual"} <= set(ranks[0]["metrics"][-1])
    # Rank 0 wrote the checkpoint at the last step (the CLI's ModelCheckpoint) and it holds the final engine state.
    (ckpt,) = (out / "lightning_logs").glob("version_*/checkpoints/*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint["global_step"] == STEPS
    assert all(torch.equal(u, v) for u, v in zip(_leaves(checkpoint["engine_state"]), _leaves(ranks[0]["state"]),
                                                 strict=True))
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == RANKS


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "deepspeed_stage_2", "xla"])
def test_strategies_that_shard_parameters_are_refused_before_work(tmp_path, strategy):
    with pytest.raises(UnsupportedStrategy, match=rf"strategy '{strategy}' is not supported.*'ddp', 'ddp_spawn'"):
        bilevel.fit(ddp_script.Ridge(), ddp_script.ENGINES["CG"](), ddp_script.lower_loader(),
                    ddp_script.make_data()[1], max_steps=2, accelerator="cpu", devices=2, strategy=strategy,
                    default_root_dir=str(tmp_path))
    assert not (tmp_path / "lightning_logs").exists()


def test_strategy_classes_and_instances():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    check_strategy(DDPStrategy(find_unused_parameters=False))
    check_strategy("ddp_spawn_find_unused_parameters_true")
    with pytest.raises(UnsupportedStrategy, match="FSDPStrategy"):
        check_strategy(FSDPStrategy)


def test_cli_refuses_fsdp_before_the_trainer(tmp_path, capsys):
    config = {"model": {"problem": {"class_path": "problems.reference.QuadraticP1"},
                        "engine": {"class_path": "hypergrad.CG"}},
              "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(tmp_path / "c.yaml"), "--trainer.strategy", "deepspeed",
                  "--trainer.devices", "2", "--trainer.accelerator", "cpu"])
    assert "strategy 'deepspeed' is not supported" in str(exit_info.value)
    assert not (tmp_path / "lightning_logs").exists()


def test_population_on_several_processes_is_refused(tmp_path):
    population = bilevel.Population([ddp_script.Ridge(), ddp_script.Ridge()])
    with pytest.raises(UnsupportedStrategy, match=r"Population of Ridge.*2 processes.*devices=1"):
        bilevel.fit(population, hypergrad.CG(iters=2, inner_steps=2), ddp_script.lower_loader(),
                    ddp_script.make_data()[1], max_steps=2, accelerator="cpu", devices=2, strategy="ddp",
                    default_root_dir=str(tmp_path))


def test_full_batches_split_in_contiguous_equal_shards_or_are_refused():
    features, targets = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    shards = [split_batch((features, targets), r, 3, "lower_data") for r in range(3)]
    assert torch.equal(torch.cat([s[0] for s in shards]), features) and torch.equal(shards[1][1], targets[2:4])
    with pytest.raises(ValueError, match=r"cannot be split over 4 ranks.*\(6, 2\), \(6,\)"):
        split_batch((features, targets), 0, 4, "lower_data (the full batch)")
    with pytest.raises(ValueError, match=r"one leading size.*\(6, 2\), \(3,\)"):
        split_batch({"x": features, "w": torch.ones(3)}, 0, 3, "upper_data batch 0")
