"""Regenerate experiments/results/problems.md and its plots: every applicable engine on every problem.

    python -m experiments.run_problems                    # all problems, seeds 0, 1, 2
    python -m experiments.run_problems quadratic          # one problem -> results/problems_quadratic.md
    python -m experiments.run_problems --seeds 0 quadratic  # one seed (for tuning)

For each problem: the final tracked objective (suboptimality F(x) - F* where a closed form or a
reference optimum exists, else the upper objective), the test metric, engine wall time and oracle
calls per step (counted through hypergrad.kernels), median and spread over the seeds; and a PNG of
the objective against engine wall time for all engines (seed 0). Only the full run (all problems,
seeds 0, 1, 2) writes problems.md and the PNGs under results/problems/; partial runs write to
$TMPDIR/bilevel_problems/.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from experiments.runner import Run, run
from experiments.specs import SPECS, SUMMARY, Spec

RESULTS = Path(__file__).resolve().parent / "results"
PARTIAL = Path(tempfile.gettempdir()) / "bilevel_problems"  # partial runs (some problems or seeds) go here
SEEDS = (0, 1, 2)


def cpu() -> str:
    """The CPU model (Linux) and the number of cores, for the results header."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.3g}"


def _spread(values: list[float]) -> str:
    """median [min, max]; NaN runs (diverged) are counted and left out of the statistics."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "NaN (all diverged)"
    text = f"{statistics.median(finite):.4g} [{_fmt(min(finite))}, {_fmt(max(finite))}]"
    return text if len(finite) == len(values) else f"{text}, {len(values) - len(finite)} NaN"


def table(name: str, spec: Spec, runs: dict[str, list[Run]], seconds: float) -> str:
    """One markdown section: median [min, max] over seeds of every column."""
    lines = [f"## {spec.title}", "", f"`{name}`: {spec.steps} outer steps per engine; plot: `problems/{name}.png`; "
             f"this section took {seconds:.0f} s to regenerate.", ""]
    if spec.note:
        lines += [spec.note, ""]
    lines += [f"| engine | {spec.objective_name} | {spec.test_name if spec.test else 'test metric'} | engine seconds "
              "| gradients / step | HVPs / step | mixed VJPs / step |", "|---|---|---|---|---|---|---|"]
    for engine, seeds in runs.items():
        cols = [[r.final[k] for r in seeds] for k in ("objective", "test", "seconds")]
        first = seeds[0].final
        test = _spread(cols[1]) if spec.test else "-"
        diverged = [int(r.final["diverged_at"]) for r in seeds if not math.isnan(r.final["diverged_at"])]
        label = engine if not diverged else f"{engine} (diverged at step {', '.join(map(str, diverged))})"
        lines.append(f"| {label} | {_spread(cols[0])} | {test} | {_spread(cols[2])} | "
                     f"{first['gradients_per_step']:.3g} | {first['hvps_per_step']:.3g} | "
                     f"{first['mixed_vjps_per_step']:.3g} |")
    return "\n".join(lines)


def plot(path: Path, spec: Spec, runs: dict[str, list[Run]]) -> None:
    """The objective against engine wall time, seed 0, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", "-.", ":"]
    for i, (engine, seeds) in enumerate(runs.items()):
        r = seeds[0]
        values = [max(v, 1e-16) for v in r.objectives] if spec.log_scale else r.objectives
        diverged = not math.isnan(r.final["diverged_at"])
        label = f"{engine} (diverged at step {int(r.final['diverged_at'])})" if diverged else engine
        (line,) = ax.plot(r.times, values, styles[i % len(styles)], marker="o", markersize=2.5, label=label)
        if diverged:  # a cross at the last finite record
            last = max(j for j, v in enumerate(values) if not math.isnan(v))
            ax.plot(r.times[last], values[last], "x", color=line.get_color(), markersize=9, mew=2)
    if spec.log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("engine wall time (s), one CPU thread")
    ax.set_ylabel(spec.objective_name)
    ax.set_title(f"{spec.title.split(' (')[0]} (seed 0, {spec.steps} steps)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_spec(name: str, spec: Spec, seeds: tuple[int, ...]) -> dict[str, list[Run]]:
    """Every engine of ``spec`` on every seed; prints one line per engine."""
    runs: dict[str, list[Run]] = {}
    for label, make_engine in spec.engines.items():
        make = spec.make_for.get(label, spec.make)
        runs[label] = [run(make(seed), make_engine(), spec.steps, spec.objective, spec.test, spec.records)
                       for seed in seeds]
        finals = [r.final for r in runs[label]]
        print(f"{name} {label}: objective {[_fmt(f['objective']) for f in finals]} test "
              f"{[_fmt(f['test']) for f in finals]} seconds {[round(f['seconds'], 2) for f in finals]}", flush=True)
    return runs


def main(names: list[str], seeds: tuple[int, ...] = SEEDS) -> None:
    torch.set_num_threads(1)
    chosen = names or list(SPECS)
    unknown = [n for n in chosen if n not in SPECS]
    if unknown:
        raise SystemExit(f"unknown problem(s) {unknown}; choose from {list(SPECS)}")
    full = not names and seeds == SEEDS
    start = time.perf_counter()
    sections = []
    for name in chosen:
        spec, began = SPECS[name], time.perf_counter()
        runs = run_spec(name, spec, seeds)
        plot((RESULTS if full else PARTIAL) / "problems" / f"{name}.png", spec, runs)
        sections.append(table(name, spec, runs, time.perf_counter() - began))
    total = time.perf_counter() - start
    header = f"""# The problem library: every applicable engine, {len(seeds)} seed(s)

Regenerate: `python -m experiments.run_problems` ({total / 60:.1f} min for this file, one CPU thread).
Each cell is the median [min, max] over seeds {", ".join(map(str, seeds))}. Engine seconds are the time
inside `engine.step` only (no Lightning, no evaluation of the objective or the test metric). Oracle
calls per step are counted through `hypergrad.kernels` (a kernel called inside another counts once,
as the outer one; a vmapped HVP over k vectors counts k): gradients = `grad_y` and `grad_xy` calls
(one reverse pass each, of f or g), HVPs = `hvp`, mixed VJPs = `mixed_vjp`. LV-HBA's constraint VJPs
and Jacobians (for its projection) are not kernels calls and are not counted. Every engine of a
problem runs the same number of outer steps; inner budgets differ by engine and are in the labels
and notes. The PNG of each problem plots the tracked objective of seed 0 against engine seconds.
Machine: {cpu()}; torch {torch.__version__}, Python {platform.python_version()}.
"""
    if full:
        header += f"\n## Which engine wins where\n\n{SUMMARY}"
    out = RESULTS / "problems.md" if full else PARTIAL / f"problems_{'_'.join(chosen)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {out} in {total:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"problems (default: all of {list(SPECS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args()
    main(args.names, tuple(args.seeds))
