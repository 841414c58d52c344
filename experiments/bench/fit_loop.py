"""What ``bilevel.fit`` costs per outer step over a plain Python loop of the same engine phases.

    python -m experiments.bench.fit_loop --device cpu --threads 1 --before /tmp/before_fit

Cases (issue 15, part 5):

- ``default job, full batch``: DigitsCleaning and the CG of ``experiments/configs/cleaning_digits.yaml``
  (histograms every 10 steps), the problem's full-batch ``data()``;
- ``default job, minibatches``: the same with the lower level's data a shuffled DataLoader of 100
  examples (the upper level's 100 validation examples as the full batch);
- ``near-no-op engine``: ``NoOp``, an engine whose step returns the state with its counter advanced
  and the default job's metric names as constants, on the tiny QuadraticP1, with fit's defaults
  (histograms every 50 steps): what is left is the fixed cost of the loop.

``bilevel.fit`` runs as a user runs it: its defaults (TensorBoard logger written every 10 steps, a
checkpoint every 50 steps, the progress bar, here into a buffer), ``default_root_dir`` a temporary
folder. The plain loop runs ``engine.inner``, ``estimate`` and ``outer`` on the same ``Functions`` and writes x and y
back into the problem (``Trainable.assign``), as the module does, drawing batches from the same data.

Time per step: a callback stamps the time at every ``on_train_batch_start`` (the plain loop at the
top of every iteration); a run's figure is (stamp[W + S] - stamp[W]) / S over S steps after W
warm-up steps, S a multiple of the checkpoint and histogram periods so that each window pays its
share of both. Two clocks: wall time (``perf_counter``) and the process's CPU time
(``process_time``, every thread of the process, TensorBoard's writer thread included), which other
processes on a shared machine inflate far less; waits for the GIL between the main thread and the
writer thread count in wall time only. Every repetition runs fit and the plain loop in turn
(interleaved); the table gives medians over the repetitions. With ``--before PATH`` (a checkout,
e.g. ``git worktree add -f /tmp/before_fit HEAD``) the same measurement runs, in alternating
rounds, in subprocesses whose ``bilevel``, ``hypergrad`` and ``problems`` come from PATH, and the
table shows both.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

import bilevel
import hypergrad
from bilevel.trainable import as_trainable
from experiments.bench.common import RESULTS, environment, markdown_table, parser, setup
from problems import DigitsCleaning, QuadraticP1

RATIO_TARGET = 1.10
"""fit's time per step over the plain loop's, on the default job."""
FIXED_TARGET_MS = 1.0
"""fit's fixed cost per outer step (near-no-op engine, fit minus the plain loop), in milliseconds."""
CASES = ("default job, full batch", "default job, minibatches", "near-no-op engine")
METRICS = ("upper_objective", "lower_objective", "hypergradient_norm", "lower_stationarity", "solve_residual",
           "negative_curvature", "solve_fallback")
"""CG's metric names: the near-no-op engine reports as many, so that the loop logs what it logs for CG."""


@dataclass(frozen=True, kw_only=True, repr=False)
class NoOp(hypergrad.Engine):
    """An engine whose step only advances the step counter and reports constant metrics."""

    def init(self, fns: hypergrad.Functions, x: Any, y: Any, lower_batch: Any = None) -> Any:
        return self.start(fns, x, y)

    def inner(self, fns: hypergrad.Functions, state: Any, lower_batch: Any) -> Any:
        return state

    def estimate(self, fns: hypergrad.Functions, state: Any, batches: Any) -> Any:
        zero = torch.zeros((), dtype=torch.float32)
        return state, state["x"], dict.fromkeys(METRICS, zero)

    def outer(self, fns: hypergrad.Functions, state: Any, hypergrad_: Any) -> Any:
        return {**state, "step": state["step"] + 1}


def default_engine() -> hypergrad.Engine:
    """The CG of experiments/configs/cleaning_digits.yaml."""
    return hypergrad.CG(iters=10, tol=1e-3, inner_steps=5, inner_lr=2.0, outer_lr=0.1, outer_optimizer="adam")


def job(case: str) -> tuple[Any, hypergrad.Engine, Any, Any]:
    """(problem, engine, lower_data, upper_data) of a case, built afresh (fit trains the problem in place)."""
    if case == "near-no-op engine":
        problem: Any = QuadraticP1()
        return problem, NoOp(), *problem.data()
    problem = DigitsCleaning(seed=0)
    lower, upper = problem.data()
    if case == "default job, minibatches":
        generator = torch.Generator().manual_seed(0)
        lower = DataLoader(TensorDataset(*lower), batch_size=100, shuffle=True, generator=generator)
    return problem, default_engine(), lower, upper


Stamp = tuple[float, float]
CLOCKS = {"wall": 0, "cpu": 1}


def _stamp() -> Stamp:
    """(wall time, CPU time of the whole process, its threads included: TensorBoard's writer thread)."""
    return time.perf_counter(), time.process_time()


class _Stamps(Callback):
    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.stamps.append(_stamp())


def run_fit(case: str, steps: int, **options: Any) -> list[Stamp]:
    """Stamps at the start of every training step of ``bilevel.fit`` with its defaults (and ``options``)."""
    problem, engine, lower, upper = job(case)
    stamps = _Stamps()
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        # The default job's YAML draws histograms every 10 steps; the near-no-op run keeps fit's default (50).
        histograms = {"log_histograms_every": 10} if case.startswith("default") else {}
        bilevel.fit(problem, engine, lower, upper, max_steps=steps, default_root_dir=root, callbacks=[stamps],
                    **{**histograms, **options})
    return stamps.stamps


def _cycle(data: Any) -> Iterator[Any]:
    """A tuple as the same batch every step; anything else iterated over and over."""
    if isinstance(data, tuple):
        while True:
            yield data
    while True:
        yield from data


def run_plain(case: str, steps: int) -> list[Stamp]:
    """Stamps at the start of every iteration of a plain loop of the module's phases on the same data."""
    problem, engine, lower, upper = job(case)
    trainable = as_trainable(problem)
    lower_batches, upper_batches = _cycle(lower), _cycle(upper)
    batches = (next(lower_batches), next(upper_batches))
    fns, x, y = trainable.to_functions(batches)
    state = engine.init(fns, x, y, lower_batch=batches[0])
    stamps = []
    for i in range(steps):
        stamps.append(_stamp())
        if i:
            batches = (next(lower_batches), next(upper_batches))
        state = engine.inner(fns, state, batches[0])
        state, hypergrad_, _ = engine.estimate(fns, state, batches)
        state = engine.outer(fns, state, hypergrad_)
        trainable.assign(state["x"], engine.lower_solution(state))
    stamps.append(_stamp())
    return stamps


def per_step(stamps: list[Stamp], warmup: int, steps: int, clock: str = "wall") -> float:
    i = CLOCKS[clock]
    return (stamps[warmup + steps][i] - stamps[warmup][i]) / steps


def windows(case: str, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps): whole periods of checkpoints (50 steps), logger writes (10) and histograms
    (10 or 50 steps)."""
    if quick:
        return 2, 10
    return (20, 50) if case.startswith("default") else (50, 400)


def measure(repeats: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of fit and of the plain loop, one entry per repetition, interleaved."""
    out = _empty()
    runs: dict[str, Callable[[str, int], list[Stamp]]] = {"fit": run_fit, "plain": run_plain}
    for _ in range(repeats):
        for case in CASES:
            warmup, steps = windows(case, quick)
            for name, run in runs.items():
                # fit stamps the start of each step only: one step more ends the window.
                stamps = run(case, warmup + steps + 1)
                for clock in CLOCKS:
                    out[case][f"{name} {clock}"].append(per_step(stamps, warmup, steps, clock))
    return out


PARTS = {
    "fit's defaults": {},
    "the defaults before: logger every step, checkpoint every 10": {"log_every_n_steps": 1, "checkpoint_every": 10},
    "the logger every step": {"log_every_n_steps": 1},
    "without the TensorBoard logger": {"logger": False},
    "without checkpoints": {"enable_checkpointing": False},
    "without the progress bar": {"enable_progress_bar": False},
    "without all three": {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
}
"""What the near-no-op engine's fixed cost is made of: fit with one piece of its machinery off at a time."""


def parts(repeats: int, quick: bool) -> list[list[Any]]:
    """Rows (configuration, wall ms/step, CPU ms/step) of fit on the near-no-op engine, interleaved."""
    case = "near-no-op engine"
    warmup, steps = windows(case, quick)
    times: dict[str, dict[str, list[float]]] = {name: {clock: [] for clock in CLOCKS} for name in PARTS}
    for _ in range(repeats):
        for name, options in PARTS.items():
            stamps = run_fit(case, warmup + steps + 1, **options)
            for clock in CLOCKS:
                times[name][clock].append(per_step(stamps, warmup, steps, clock))
    return [[name, *(statistics.median(times[name][clock]) * 1e3 for clock in CLOCKS)] for name in PARTS]


def _empty() -> dict[str, dict[str, list[float]]]:
    return {case: {f"{name} {clock}": [] for name in ("fit", "plain") for clock in CLOCKS} for case in CASES}


def _in_subprocess(tree: str, args: Any, repeats: int) -> dict[str, dict[str, list[float]]]:
    """``measure`` in a fresh interpreter whose bilevel, hypergrad and problems come from ``tree``."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads), "--repeats",
                   str(repeats), "--json", out, *(["--quick"] if args.quick else [])]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
        return json.loads(Path(out).read_text())


def _rows(label: str, times: dict[str, dict[str, list[float]]]) -> list[list[Any]]:
    rows = []
    for case in CASES:
        row: list[Any] = [label, case]
        verdicts = []
        for clock in CLOCKS:
            fits, plains = times[case][f"fit {clock}"], times[case][f"plain {clock}"]
            ratio = statistics.median([f / p for f, p in zip(fits, plains, strict=True)])
            extra = statistics.median([(f - p) * 1e3 for f, p in zip(fits, plains, strict=True)])
            row += [statistics.median(fits) * 1e3, statistics.median(plains) * 1e3, ratio, extra]
            met = ratio <= RATIO_TARGET if case.startswith("default") else extra < FIXED_TARGET_MS
            verdicts.append(f"{clock}: {'met' if met else 'missed'}")
        rows.append([*row, ", ".join(verdicts), len(times[case]["fit wall"])])
    return rows


NOTES = """\
What bilevel.fit does per outer step besides the engine's phases: Lightning's loop (a full-batch
run's epoch is ``bilevel.data.FULL_BATCH_EPOCH`` steps, so no epoch hooks per step), the step guard
(one fused norm and one read-back), the step count through Lightning's optimizer wrapper, the metrics
(``_publish`` in ``bilevel/module.py``: the tags into ``trainer.callback_metrics``/``logged_metrics``
as tensors and, on the Trainer's ``log_every_n_steps`` cadence (10 steps by default), one read-back and
one TensorBoard event holding every tag), a histogram of x, the hypergradient and y every ``log_histograms_every``
steps, a checkpoint every ``checkpoint_every`` (50) steps (about 5 ms a save: Lightning's checkpoint
dict, torch.save, the previous file's removal), the bar (redrawn at most every 0.1 s). TensorBoard's
writer thread checksums events in C (``bilevel.tensorboard.native_checksums``, google-crc32c).
"""


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--before", help="a checkout of the revision to compare with (its bilevel, hypergrad, problems)")
    p.add_argument("--rounds", type=int, default=3, help="with --before: alternating rounds of --repeats each")
    p.add_argument("--json", help="write the raw seconds per step here instead of a table (used with --before)")
    p.add_argument("--out", default=str(RESULTS / "speed" / "fit_loop.md"))
    args = p.parse_args(argv)
    device = setup(args)
    if args.device != "cpu":
        raise SystemExit("fit_loop measures the CPU loop; --device cuda is not supported")
    if args.json:
        Path(args.json).write_text(json.dumps(measure(args.repeats, args.quick)))
        return
    if not args.before:
        after, before = measure(args.repeats, args.quick), None
    else:
        # Both revisions in fresh interpreters, in alternating rounds: a load spike hits both alike.
        after, before = _empty(), _empty()
        repeats = max(1, args.repeats // args.rounds)
        for _ in range(args.rounds):
            for times, tree in ((after, str(Path(__file__).resolve().parents[2])), (before, args.before)):
                new = _in_subprocess(tree, args, repeats)
                for case in CASES:
                    for name in times[case]:
                        times[case][name] += new[case][name]
    rows = _rows("this tree", after) + (_rows("before", before) if before is not None else [])
    headers = [f"{what}, {clock}" for clock in CLOCKS for what in ("fit (ms/step)", "plain loop (ms/step)",
                                                                   "fit / plain", "fit - plain (ms/step)")]
    target = f"target (fit / plain <= {RATIO_TARGET}; no-op: fit - plain < {FIXED_TARGET_MS} ms)"
    table = markdown_table(["revision", "case", *headers, target, "repetitions"], rows)
    windows_text = ", ".join(f"{case}: {windows(case, args.quick)[1]} steps after {windows(case, args.quick)[0]}"
                             for case in CASES)
    before_text = (f" `before`: the same measurement with `bilevel`, `hypergrad` and `problems` of `{args.before}` "
                   "(subprocesses, alternating rounds with this tree's)." if args.before else "")
    breakdown = markdown_table(["near-no-op engine, bilevel.fit", "ms/step, wall", "ms/step, cpu"],
                               parts(args.repeats, args.quick))
    command = (f"python -m experiments.bench.fit_loop --device cpu --threads {args.threads} --repeats {args.repeats}"
               + (f" --before {args.before} --rounds {args.rounds}" if args.before else ""))
    text = (f"# bilevel.fit against a plain loop of the same engine phases\n\n`{command}`\n\n{environment(device)}; "
            f"medians over repetitions of the per-step time over a window ({windows_text}), fit and the plain loop "
            f"interleaved.{before_text}\n\n{table}\n\nTargets (issue 15, part 5): fit / plain <= {RATIO_TARGET} on "
            f"the default job; fit - plain < {FIXED_TARGET_MS} ms per step with the near-no-op engine.\n\n"
            f"Where the near-no-op engine's fixed cost goes (this tree, medians of {args.repeats} interleaved "
            f"repetitions; the plain loop of that engine costs about 0.02 ms a step):\n\n{breakdown}\n\n{NOTES}")
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
