"""Evidence for issue 10: the hypergradient engines on three NONCONVEX lower levels, before and after the fix.

    python -m experiments.nonconvex --label before --out experiments/results/nonconvex/before.json
    python -m experiments.nonconvex --label after        # writes experiments/results/nonconvex/after.json
    python -m experiments.nonconvex --report             # before.json + after.json -> nonconvex.md and PNGs
    python -m experiments.nonconvex --quick --label after --out /tmp/quick.json   # smoke run (3 steps, 1 seed)

Problems (``problems.nonconvex``): per-layer weight decay of a tanh MLP, per-example reweighting of
noisy labels for a CNN with BatchNorm, iMAML's proximal lower level on sinusoid tasks. Engines:
``CG()``, ``Neumann()``, ``Unrolled()`` at their defaults and the README's
``CG(iters=20, inner_steps=20, inner_lr=0.1, outer_lr=0.1)``; seeds 0, 1, 2; 150 outer steps of
``bilevel.fit`` each (logger, checkpoints and progress bar off). A callback records every logged
metric at every step and the problem's ``evaluate()["validation_loss"]`` after step 1, every
``--eval-every`` steps and at the last step. A run passes when it reaches the last step, every
logged metric stayed finite and the final validation loss is below the one after step 1. An
exception from ``fit`` (the framework may stop a run on the first non-finite value) is caught and
recorded as "stopped at step k: <first line of the message>".

The script uses only API present at the issue's base commit (f17dca8), so the BEFORE runs are
this file run inside an extracted copy of that commit (see the md's header).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

import bilevel
import hypergrad
from bilevel.tensorboard import GROUPS
from experiments.run_problems import cpu
from problems.nonconvex import LayerwiseWeightDecay, NoisyLabelReweighting, ProximalSinusoid

RESULTS = Path(__file__).resolve().parent / "results"
OUT_DIR = RESULTS / "nonconvex"
REPORT = RESULTS / "nonconvex.md"
README_CG = "CG(iters=20, inner_steps=20, inner_lr=0.1, outer_lr=0.1)"

PROBLEMS: dict[str, Callable[[int], bilevel.BilevelProblem]] = {
    "weight_decay_mlp": lambda seed: LayerwiseWeightDecay(seed=seed),
    "reweight_cnn_bn": lambda seed: NoisyLabelReweighting(seed=seed),
    "imaml_sinusoid": lambda seed: ProximalSinusoid(seed=seed),
}
ENGINES: dict[str, Callable[[], hypergrad.Engine]] = {
    "CG()": lambda: hypergrad.CG(),
    "Neumann()": lambda: hypergrad.Neumann(),
    "Unrolled()": lambda: hypergrad.Unrolled(),
    README_CG: lambda: hypergrad.CG(iters=20, inner_steps=20, inner_lr=0.1, outer_lr=0.1),
}
# In the default AFTER grid only: the option that actually solves the system on an indefinite H (CG on
# H^2 v = H b), which did not exist before the fix.
AFTER_ONLY: dict[str, Callable[[], hypergrad.Engine]] = {
    "CG(normal=True)": lambda: hypergrad.CG(normal=True),
}
# Not in the default grid (--engines selects it): the README's inner and outer settings without an IFT solve,
# to tell a failing solve from an outer step too long for the problem.
CONTROLS: dict[str, Callable[[], hypergrad.Engine]] = {
    "Unrolled(inner_steps=20, inner_lr=0.1, outer_lr=0.1)":
        lambda: hypergrad.Unrolled(inner_steps=20, inner_lr=0.1, outer_lr=0.1),
}
# Metrics the fixed solvers may log (0/1 per step); counted when present.
COUNTED = ("solve_fallback", "negative_curvature")
ENGINE_NAMES = {tag: name for name, tag in GROUPS.items()}
"""TensorBoard tag -> the engine's metric name."""




class Recorder(Callback):
    """Every logged metric after every training step, and the problem's validation loss on some steps.

    ``trace`` is a list of {"step": k, name: value, ...} (k = outer steps done, from 1); ``validation``
    a list of [k, validation_loss] taken after step 1, every ``every`` steps and after ``last``.
    """

    def __init__(self, problem: bilevel.BilevelProblem, every: int, last: int) -> None:
        self.problem, self.every, self.last = problem, every, last
        self.trace: list[dict[str, float]] = []
        self.validation: list[list[float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        row: dict[str, float] = {"step": step}
        # The engines' own metric names (the traces committed before TensorBoard tags were grouped use them).
        row.update({ENGINE_NAMES.get(name, name.removeprefix("engine/")): float(value)
                    for name, value in trainer.callback_metrics.items()})
        self.trace.append(row)
        if step == 1 or step % self.every == 0 or step == self.last:
            self.validation.append([step, float(self.problem.evaluate()["validation_loss"])])


def _finite(value: float) -> bool:
    return math.isfinite(value)


def run_one(problem_name: str, engine_name: str, seed: int, steps: int, every: int) -> dict[str, Any]:
    """One ``bilevel.fit`` run; returns its record (status, traces, verdict)."""
    torch.manual_seed(seed)
    problem = PROBLEMS[problem_name](seed)
    engine = {**ENGINES, **AFTER_ONLY, **CONTROLS}[engine_name]()
    recorder = Recorder(problem, every, steps)
    status, start = "completed", time.perf_counter()
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        try:
            # The final-metrics table fit prints is silenced (redirect_stdout): the recorder keeps what counts.
            bilevel.fit(problem, engine, *problem.data(), max_steps=steps, log_histograms_every=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu", devices=1,
                        default_root_dir=root, callbacks=[recorder])
        except Exception as err:  # noqa: BLE001 - any failure of fit is the evidence being recorded
            message = (str(err).strip().splitlines() or [type(err).__name__])[0]
            status = f"stopped at step {len(recorder.trace)}: {type(err).__name__}: {message}"
    wall = time.perf_counter() - start
    try:  # every final metric of the problem (the upper variables' summaries among them), for the record
        final = {k: float(v) for k, v in problem.evaluate().items()}
    except Exception as err:  # noqa: BLE001 - a broken problem state must not lose the run's record
        final = {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    return summarize({"problem": problem_name, "engine": engine_name, "seed": seed, "max_steps": steps,
                      "status": status, "wall_s": wall, "trace": recorder.trace,
                      "validation": recorder.validation, "final_metrics": final})


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Add the verdict and summary numbers to a run record (from its trace and validation losses)."""
    trace, validation = run["trace"], run["validation"]
    run["steps_reached"] = len(trace)
    bad = [row["step"] for row in trace if not all(_finite(v) for k, v in row.items() if k != "step")]
    run["first_nonfinite_step"] = bad[0] if bad else None
    residuals = [row["solve_residual"] for row in trace if "solve_residual" in row]
    finite_residuals = [r for r in residuals if _finite(r)]
    run["max_solve_residual"] = max(finite_residuals) if finite_residuals else None
    run["first_residual_above_1"] = next((row["step"] for row in trace
                                          if "solve_residual" in row and not row["solve_residual"] <= 1.0), None)
    run["counts"] = {name: sum(1 for row in trace if row.get(name, 0.0) > 0) for name in COUNTED
                     if any(name in row for row in trace)}
    times = [sum(v for k, v in row.items() if k.startswith("time/")) for row in trace]
    run["step_ms_median"] = 1e3 * statistics.median(times) if times else None
    run["validation_first"] = validation[0][1] if validation else None
    run["validation_final"] = validation[-1][1] if validation else None
    run["passed"] = (run["status"] == "completed" and len(trace) == run["max_steps"] and not bad
                     and len(validation) >= 2 and validation[-1][0] == run["max_steps"]
                     and _finite(validation[-1][1]) and validation[-1][1] < validation[0][1])
    return run


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem x engine x seed asked for; the JSON written after each run (partial results survive)."""
    out = Path(args.out) if args.out else OUT_DIR / f"{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "label": args.label, "command": "python -m experiments.nonconvex " + " ".join(sys.argv[1:]),
        "cwd": os.getcwd(), "bilevel_path": str(Path(bilevel.__file__).resolve().parent),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu(),
        "python": platform.python_version(), "steps": args.steps, "quick": args.quick, "runs": [],
    }
    for problem_name in args.problems:
        for engine_name in args.engines:
            for seed in args.seeds:
                record = run_one(problem_name, engine_name, seed, args.steps, args.eval_every)
                result["runs"].append(record)
                first, final = record["validation_first"], record["validation_final"]
                print(f"{problem_name:18s} {engine_name:58s} seed {seed}: {'PASS' if record['passed'] else 'FAIL'} "
                      f"steps {record['steps_reached']:3d} val {_fmt(first)} -> {_fmt(final)} "
                      f"max res {_fmt(record['max_solve_residual'])} {record['step_ms_median'] or 0:.0f} ms/step "
                      f"{record['status'] if record['status'] != 'completed' else ''}", flush=True)
                out.write_text(dumps(result))
    print(f"wrote {out}")
    return result


def _columns(rows: list[dict[str, float]]) -> dict[str, list[float | None]]:
    """A trace as one list per metric (None where a step lacks it): the names are stored once, not per step."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def _rows(columns: dict[str, list[float | None]]) -> list[dict[str, float]]:
    """The inverse of ``_columns``."""
    length = len(next(iter(columns.values()), []))
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(length)]


def load(path: Path) -> dict[str, Any]:
    """A result file written by ``run_all``, each run's trace back as a list of per-step dicts."""
    result = json.loads(Path(path).read_text())
    for run in result["runs"]:
        if isinstance(run["trace"], dict):
            run["trace"] = _rows(run["trace"])
    return result


def dumps(result: dict[str, Any]) -> str:
    """Compact JSON with floats at 6 significant digits and traces stored by column (they are most of the file)."""
    result = {**result, "runs": [{**run, "trace": _columns(run["trace"])} for run in result["runs"]]}

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.6g}") if _finite(value) else value
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    return json.dumps(rounded(result), separators=(",", ":"))


# -- the report -----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if _finite(value) else str(value)


def _run_cell(run: dict[str, Any] | None) -> list[str]:
    """The report's columns for one run: passed, steps, validation, max residual, counts, first failure."""
    if run is None:
        return ["not run"] + ["-"] * 5
    counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items()) or "-"
    failure = []
    if run["first_residual_above_1"] is not None:
        failure.append(f"res>1 @{run['first_residual_above_1']}")
    if run["first_nonfinite_step"] is not None:
        failure.append(f"non-finite @{run['first_nonfinite_step']}")
    if run["status"] != "completed":
        failure.append(run["status"].replace("|", "/"))
    return ["yes" if run["passed"] else "**NO**", f"{run['steps_reached']}/{run['max_steps']}",
            f"{_fmt(run['validation_first'])} -> {_fmt(run['validation_final'])}", _fmt(run["max_solve_residual"]),
            counts, "; ".join(failure) or "-"]


def _plot(problem: str, labelled: dict[str, dict[str, Any]], path: Path) -> None:
    """Solve residual (top) and validation loss (bottom) against steps, one column per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labelled)
    fig, axes = plt.subplots(2, len(labels), figsize=(6.5 * len(labels), 7.5), squeeze=False, sharex="col")
    colors = dict(zip([*ENGINES, *AFTER_ONLY, *CONTROLS],
                      ("tab:blue", "tab:green", "tab:orange", "tab:red", "tab:brown", "tab:purple"), strict=True))
    styles = ("-", "--", ":")
    for col, label in enumerate(labels):
        for run in labelled[label]["runs"]:
            if run["problem"] != problem:
                continue
            color, style = colors.get(run["engine"], "black"), styles[run["seed"] % len(styles)]
            name = f"{run['engine']} s{run['seed']}"
            steps = [row["step"] for row in run["trace"] if "solve_residual" in row]
            residual = [row["solve_residual"] for row in run["trace"] if "solve_residual" in row]
            if steps:
                # Non-finite residuals are drawn as gaps; the trace's last finite point shows where it broke.
                axes[0][col].plot(steps, [r if _finite(r) else float("nan") for r in residual], style, color=color,
                                  label=name, linewidth=1)
            if run["validation"]:
                vs, vl = zip(*run["validation"], strict=True)
                axes[1][col].plot(vs, [v if _finite(v) else float("nan") for v in vl], style, color=color,
                                  label=name, linewidth=1, marker="." if len(vs) < 20 else None)
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{problem}: {label}")
        axes[0][col].set_ylabel("solve_residual |Hv - b| / |b|")
        axes[1][col].set_yscale("log")
        axes[1][col].set_ylabel("validation loss")
        axes[1][col].set_xlabel("outer step")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(before_path: Path, after_path: Path, md_path: Path, png_dir: Path, control_path: Path | None = None) -> str:
    """Merge the before and after JSON files into the markdown report and one PNG per problem.

    ``control_path``, when it exists, adds a table of the control runs (``CONTROLS``, e.g. Unrolled
    with the README's settings), which tell a failing solve from an outer step too long for the problem.
    """
    labelled: dict[str, dict[str, Any]] = {}
    for label, path in (("before", before_path), ("after", after_path)):
        if path.exists():
            labelled[label] = load(path)
    if not labelled:
        raise FileNotFoundError(f"neither {before_path} nor {after_path} exists: run --label before/after first")
    index = {(label, r["problem"], r["engine"], r["seed"]): r for label, res in labelled.items() for r in res["runs"]}
    keys = list(dict.fromkeys((p, e, s) for (_, p, e, s) in index))
    lines = ["# Nonconvex lower levels (issue 10): engines before and after the fix", ""]
    lines += ["Regenerate from the repository root (BEFORE runs in an extracted copy of the base commit f17dca8",
              "with this script and `problems/nonconvex.py` copied in; no git state changes):", "", "```",
              "mkdir -p /tmp/before && git -C . archive f17dca8 | tar -x -C /tmp/before",
              "cp problems/nonconvex.py problems/__init__.py /tmp/before/problems/ && cp experiments/nonconvex.py "
              "/tmp/before/experiments/",
              "REPO=$PWD; (cd /tmp/before && python -m experiments.nonconvex --label before "
              "--out $REPO/experiments/results/nonconvex/before.json)",
              "python -m experiments.nonconvex --label after",
              "(cd /tmp/before && python -m experiments.nonconvex --label before --engines "
              "'Unrolled(inner_steps=20, inner_lr=0.1, outer_lr=0.1)' --out $REPO/experiments/results/nonconvex/"
              "control.json)   # optional control",
              "python -m experiments.nonconvex --report", "```", ""]
    for label, res in labelled.items():
        lines.append(f"- {label}: `{res['command']}` in `{res['cwd']}` (bilevel from `{res['bilevel_path']}`), "
                     f"torch {res['torch']}, {res['threads']} thread(s), {res['cpu']}, Python {res['python']}, "
                     f"{res['steps']} outer steps{' (QUICK smoke run)' if res['quick'] else ''}."
                     + (f" Note: {res['note']}" if res.get("note") else ""))
    lines += ["", "Problems (`problems/nonconvex.py`, float32): `weight_decay_mlp` = `LayerwiseWeightDecay` (tanh MLP "
              "64-32-32-10, x = log weight decay of its 3 layers, lower minibatches of 100 of 1000 digits, "
              "validation 300 full batch); `reweight_cnn_bn` = `NoisyLabelReweighting` (conv 8 + BatchNorm + ReLU + "
              "linear, 35 % of 1000 training labels flipped, x = 1000 weight logits, minibatches of 32, clean "
              "validation 200); `imaml_sinusoid` = `ProximalSinusoid` (tanh MLP 1-20-20-1, 1/2 MSE, lam = 1, "
              "25 tasks cycled, one per step, validation loss = 1/2 query MSE on 16 held-out tasks after 10 "
              "adaptation steps (lr 0.1) from theta).", "",
              "A run passes when it reaches the last step, every logged metric stays finite and the final "
              "validation loss is below the one after step 1. `res>1 @k`: first step whose solve residual "
              "|Hv - b|/|b| exceeded 1 (the solve made v worse than v = 0); `non-finite @k`: first step with a "
              "NaN or inf metric. Counts: steps on which `solve_fallback` / `negative_curvature` was > 0 (only "
              "where the engine logs them).", ""]
    lines += ["How to read the after runs: a step with `solve_fallback` used the safeguard's v = inner_lr grad_y f "
              "(a first-order estimate, the hypergradient of one differentiated inner step) instead of a solve "
              "that failed; on networks whose lower Hessian stays indefinite default CG does so on most steps. "
              "`CG(normal=True)` (CG on H^2 v = H b, after only) solves the same systems with residual below 1 "
              "and no fallback. The validation loss falls about equally under every engine that stays finite: "
              "most of it is the lower level's own training, so it shows that a run is sound, not which "
              "hypergradient is best. The control table (when present) runs the README's inner and outer "
              "settings without any solve: where it fails too, the outer step is too long for the problem.", ""]
    lines += ["## Summary: seeds passed", "", "| problem | engine | " + " | ".join(labelled) + " |",
              "|---|---|" + "---|" * len(labelled)]
    for problem, engine in dict.fromkeys((p, e) for p, e, _ in keys):
        cells = []
        for label in labelled:
            runs = [r for (lab, p, e, _), r in index.items() if (lab, p, e) == (label, problem, engine)]
            cells.append(f"{sum(r['passed'] for r in runs)}/{len(runs)}" if runs else "-")
        lines.append(f"| {problem} | `{engine}` | " + " | ".join(cells) + " |")
    lines += ["", "## Median time per outer step (ms, engine phases only, from the logged `time/*`)", "",
              "Measured inside the runs on a shared 2-core machine with other jobs running: a rough guide only.", "",
              "| problem | engine | " + " | ".join(labelled) + " |", "|---|---|" + "---|" * len(labelled)]
    for problem, engine in dict.fromkeys((p, e) for p, e, _ in keys):
        cells = []
        for label in labelled:
            ms = [r["step_ms_median"] for (lab, p, e, _), r in index.items()
                  if (lab, p, e) == (label, problem, engine) and r["step_ms_median"] is not None]
            cells.append(f"{statistics.median(ms):.1f}" if ms else "-")
        lines.append(f"| {problem} | `{engine}` | " + " | ".join(cells) + " |")
    header = "| passed | steps | validation: step 1 -> final | max solve_residual | counts | failure |"
    for label in labelled:
        lines += ["", f"## Every run: {label}", "", "| problem | engine | seed " + header,
                  "|---|---|---|" + "---|" * 6]
        for problem, engine, seed in keys:
            cells = _run_cell(index.get((label, problem, engine, seed)))
            lines.append(f"| {problem} | `{engine}` | {seed} | " + " | ".join(cells) + " |")
    if control_path is not None and control_path.exists():
        control = load(control_path)
        lines += ["", "## Control: no IFT solve, the README's inner and outer settings", "",
                  f"`{control['command']}` in `{control['cwd']}`: if these pass where the README's CG fails, the "
                  "failure is the solve's, not the outer step's.", "", "| problem | engine | seed " + header,
                  "|---|---|---|" + "---|" * 6]
        for run in control["runs"]:
            lines.append(f"| {run['problem']} | `{run['engine']}` | {run['seed']} | "
                         + " | ".join(_run_cell(summarize(run))) + " |")
    lines += ["", "## Plots", ""]
    png_dir.mkdir(parents=True, exist_ok=True)
    for problem in dict.fromkeys(p for p, _, _ in keys):
        path = png_dir / f"{problem}.png"
        _plot(problem, labelled, path)
        lines.append(f"![{problem}]({_rel(path, md_path.parent)})")
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    print(f"wrote {md_path} and {len(keys) and len(set(p for p, _, _ in keys))} PNGs under {png_dir}")
    return text


def _rel(path: Path, base: Path | None = None) -> str:
    """``path`` relative to ``base`` (default: the repository root) when it lies below it."""
    base = base or RESULTS.parents[1]
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", choices=("before", "after"), help="run the grid and write <label>.json")
    parser.add_argument("--out", help="the JSON to write (default experiments/results/nonconvex/<label>.json)")
    parser.add_argument("--report", action="store_true", help="merge before.json and after.json into the md + PNGs")
    parser.add_argument("--before", default=str(OUT_DIR / "before.json"), help="--report: the before JSON")
    parser.add_argument("--after", default=str(OUT_DIR / "after.json"), help="--report: the after JSON")
    parser.add_argument("--control", default=str(OUT_DIR / "control.json"), help="--report: control runs, if any")
    parser.add_argument("--md", default=str(REPORT), help="--report: the markdown to write")
    parser.add_argument("--png-dir", default=str(OUT_DIR), help="--report: where the PNGs go")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, seed 0, validation every step")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--engines", nargs="+", choices=[*ENGINES, *AFTER_ONLY, *CONTROLS],
                        help="default: the four engines, plus CG(normal=True) with --label after")
    args = parser.parse_args(argv)
    if args.label is None and not args.report:
        parser.error("pass --label before|after (run the grid), --report, or both")
    if args.engines is None:
        args.engines = [*ENGINES, *(AFTER_ONLY if args.label == "after" else ())]
    if args.quick:
        args.steps, args.seeds, args.eval_every = 3, [0], 1
    # One thread: the machine is shared, and these small problems are overhead-bound anyway.
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    if args.label is not None:
        run_all(args)
    if args.report:
        report(Path(args.before), Path(args.after), Path(args.md), Path(args.png_dir), Path(args.control))


if __name__ == "__main__":
    main()
