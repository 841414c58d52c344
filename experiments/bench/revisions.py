"""Two source trees side by side: the time of one outer step of every engine, a population and ``bilevel.fit``.

    python -m experiments.bench.revisions --before /tmp/before --rounds 5 --threads 1

``--before`` is a checkout of another revision (``git worktree add /tmp/before <commit>``); the
current tree is "after". Each round runs a worker process per tree, alternating which goes first,
with ``PYTHONPATH`` pointing at that tree, so both import their own ``bilevel``, ``hypergrad`` and
``problems``; the worker uses only what both revisions have. A worker reports, per case, the
median over ``--repeats`` calls after ``--warmup``; the table gives the median over rounds of those
medians and after / before. Writes ``experiments/results/speed/revisions.md``.

Cases: ``engine.step`` of each of the nine engines with its defaults on P1 (float64; tiny, so it
shows the Python and dispatch overhead a refactor changes), CG on the default job's problem
(``DigitsCleaning``), a population of 8 P1 problems (CG and Unrolled, one vmapped step), and one
Lightning training step of ``bilevel.fit`` on the default job (its CG, timed by a callback).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "experiments" / "results" / "speed" / "revisions.md"


def _median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _engines() -> dict[str, Any]:
    import hypergrad

    return {
        "Exact": hypergrad.Exact(), "Neumann": hypergrad.Neumann(), "CG": hypergrad.CG(),
        "Unrolled": hypergrad.Unrolled(), "F2SA": hypergrad.F2SA(), "Penalty": hypergrad.Penalty(),
        "BOREP": hypergrad.BOREP(), "LVHBA": hypergrad.LVHBA(), "PES": hypergrad.PES(particles=4, inner_steps=10),
    }


def worker(warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per case in this process's tree."""
    import torch
    from lightning.pytorch import Callback

    import bilevel
    import hypergrad
    from problems import DigitsCleaning
    from problems.reference import QuadraticP1

    results: dict[str, float] = {}

    def step_case(problem: Any, engine: Any, batches: Any) -> Callable[[], Any]:
        fns, x, y = problem.to_functions()
        holder = {"state": engine.init(fns, x, y)}

        def run() -> None:
            holder["state"], _ = engine.step(fns, holder["state"], batches)

        return run

    for name, engine in _engines().items():
        results[f"engine.step {name}, P1"] = _median_time(step_case(QuadraticP1(), engine, ((), ())), warmup, repeats)
    cleaning = DigitsCleaning(seed=0)
    default = hypergrad.CG(iters=10, tol=1e-3, inner_steps=5, inner_lr=2.0, outer_lr=0.1)
    results["engine.step CG, DigitsCleaning"] = _median_time(step_case(cleaning, default, cleaning.data()),
                                                             warmup, repeats)
    for name in ("CG", "Unrolled"):
        population = bilevel.Population([QuadraticP1(x0=[0.1 * i, 0.0]) for i in range(8)])
        engine = _engines()[name]
        holder = {"state": population.init(engine)}

        def run(population: Any = population, engine: Any = engine, holder: dict = holder) -> None:
            holder["state"], _ = population.step(engine, holder["state"], ((), ()))

        results[f"Population(8).step {name}, P1"] = _median_time(run, warmup, repeats)

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    torch.manual_seed(0)
    bilevel.fit(DigitsCleaning(seed=0), default, max_steps=warmup + repeats, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    results["bilevel.fit training step, default job"] = statistics.median(timer.times[warmup:])
    return results






def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="a checkout of the revision to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.warmup, args.repeats)))
        return
    if args.before is None:
        p.error("--before PATH is required")
    # Here, not at the top: a worker imports the compared tree's experiments package, which may lack these.
    from experiments.bench.common import revision, run_worker

    trees = {"before": args.before.resolve(), "after": ROOT}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for label in order:
            flags = ["--worker", "--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats",
                     str(args.repeats)]
            runs[label].append(run_worker(trees[label], __file__, flags, args.threads))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    cases = list(runs["after"][0])
    rows = []
    for case in cases:
        before = statistics.median(r[case] for r in runs["before"])
        after = statistics.median(r[case] for r in runs["after"])
        spread = {label: max(abs(r[case] / median - 1) for r in runs[label])
                  for label, median in (("before", before), ("after", after))}
        rows.append(f"| {case} | {before * 1e3:.3f} | {after * 1e3:.3f} | {after / before:.3f} | "
                    f"{spread['before']:.1%} / {spread['after']:.1%} |")
    import platform

    import torch

    text = "\n".join([
        "# Before and after, side by side",
        "",
        f"`python -m experiments.bench.revisions --before <checkout> --rounds {args.rounds} --threads {args.threads} "
        f"--warmup {args.warmup} --repeats {args.repeats}`",
        "",
        f"before: {revision(trees['before'])}; after: {revision(trees['after'])}. torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), CPU, eager. Each figure is the "
        f"median over {args.rounds} alternating rounds of each worker's median over {args.repeats} calls after "
        f"{args.warmup} warm-up calls; 'noise' is the largest deviation of one round's median from the median over "
        "rounds, for each tree.",
        "",
        "| case | before ms | after ms | after / before | noise across rounds (before / after) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
