"""Unrolled against TorchOpt's MetaSGD and higher at equal T, and against the previous revision of the engine.

    PYTHONPATH=/work/main /tmp/cmpvenv/bin/python -m experiments.bench.unrolled --threads 1 \\
        [--before /tmp/before_unrolled] [--rounds 2]

The peers (``pip install -e ".[compare]"``: torchopt 0.7.3, higher 0.2.1) live in their own environment;
run this module with that environment's Python and this repository on ``PYTHONPATH``. Without them only
our rows are produced, with a line naming what is missing.

Problems (``experiments.bench.peers_problems``, the ones ``peers.py`` uses): digits hyper-cleaning, a
logistic regression with per-example weights (float64, y 650 numbers, x 1000), and the per-parameter L2
problem on the MLP 784-256-256-10 (float32, y and x 235k numbers each). Every method computes dF/dx
through T gradient steps of size alpha on g from the same (x, y), T in {5, 10, 20, 50}:

- ours: ``Unrolled(inner_steps=T, inner_lr=alpha).estimate`` as it ships (T differentiated steps, the
  reverse pass, and the metrics: f, and g and the lower stationarity from the last step's own gradient),
  in a plain eager call; in the current tree also with the unroll forced onto torch.func (``_TAPE = False``,
  the path vmap and compile take), to isolate the tape from other changes between the revisions;
- TorchOpt ``MetaSGD`` and higher ``innerloop_ctx`` (``peers_torchopt.meta_sgd``, ``peers_higher.unrolled``).

Timing: each tree (the current one, "after", and with ``--before`` a checkout of another revision, e.g.
``git worktree add -f /tmp/before_unrolled HEAD``) runs in its own worker process with ``PYTHONPATH`` set
to it, in ``--rounds`` rounds alternating which tree goes first. Inside a worker every case is timed
interleaved with the others (``common.interleaved_medians``), so ours / peer is a ratio of times taken
side by side; the tables give the median over rounds of each worker's medians and ratios. Agreement: the
relative difference of each method's dF/dx from ours (the same computation: rounding only), and of the
before tree's from the after tree's. Writes ``experiments/results/speed/unrolled.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STEPS = (5, 10, 20, 50)
QUICK_STEPS = (2, 5)
PEERS = {"torchopt": "TorchOpt MetaSGD", "higher": "higher"}
OURS, FUNC = "ours", "ours, torch.func path"


def worker(args: Any) -> dict[str, Any]:
    """Per problem and T: median seconds per case and each case's relative difference from ours; dumps ours."""
    import torch

    import hypergrad
    from experiments.bench import common
    from experiments.bench import peers_problems as pp

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    steps = QUICK_STEPS if args.quick else STEPS
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    present = [name for name in PEERS if find_spec(name) is not None]
    module = sys.modules.get("hypergrad.unrolled")
    results: dict[str, Any] = {"times": {}, "diffs": {}, "present": present}
    dumped = {}
    for label, build in (("logistic regression", pp.cleaning), ("MLP", pp.mlp)):
        spec = build(args.quick, device)
        results.setdefault("names", {})[label] = spec.name
        for n in steps:
            engine = hypergrad.Unrolled(inner_steps=n, inner_lr=spec.alpha)
            state = engine.init(spec.fns, spec.x, spec.y)

            def ours(engine: Any = engine, state: Any = state, spec: Any = spec) -> Any:
                return engine.estimate(spec.fns, state, spec.batches)[1]

            cases: dict[str, Callable[[], Any]] = {OURS: ours}
            if module is not None and hasattr(module, "_TAPE"):
                def func_path(ours: Callable[[], Any] = ours) -> Any:
                    module._TAPE = False  # type: ignore[union-attr]
                    try:
                        return ours()
                    finally:
                        module._TAPE = True  # type: ignore[union-attr]

                cases[FUNC] = func_path
            if "torchopt" in present:
                from experiments.bench import peers_torchopt

                cases[PEERS["torchopt"]] = peers_torchopt.meta_sgd(spec, n)
            if "higher" in present:
                from experiments.bench import peers_higher

                cases[PEERS["higher"]] = peers_higher.unrolled(spec, n)
            outputs = {name: fn() for name, fn in cases.items()}
            key = f"{label}|{n}"
            results["diffs"][key] = {name: pp.relative_error(h, outputs[OURS]) for name, h in outputs.items()}
            results["times"][key] = common.interleaved_medians(cases, device, warmup, repeats)
            dumped[key] = {k: v.detach().to(torch.float64) for k, v in outputs[OURS].items()}
            print(f"{key} done", file=sys.stderr, flush=True)
    torch.save(dumped, args.dump)
    return results


def _worker_flags(args: Any, dump: Path) -> list[str]:
    flags = ["--worker", "--dump", str(dump), "--threads", str(args.threads), "--warmup", str(args.warmup),
             "--repeats", str(args.repeats)]
    return flags + (["--quick"] if args.quick else [])




def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: dict[str, list[dict[str, Any]]], dumps: dict[str, list[Path]], args: Any, command: str) -> str:
    import torch

    from experiments.bench import common
    from experiments.bench import peers_problems as pp

    after = runs["after"]
    first = after[0]
    present = first["present"]
    peers = [PEERS[name] for name in present]
    before = runs.get("before", [])
    lines = ["# Unrolled against TorchOpt MetaSGD and higher, and against the previous revision", "",
             common.environment(torch.device("cpu")), "", f"Regenerate: `{command}`", "",
             f"after: {common.revision(ROOT)}" + (f"; before: {common.revision(args.before)}" if before else "") + ". "
             f"Each time is the median over {len(after)} round(s) of a worker's median over {args.repeats} "
             f"interleaved calls after {args.warmup} warm-up calls (one thread, eager, CPU); ratios are taken "
             "inside a worker (cases timed side by side) and then their median over rounds. 'noise' is the largest "
             "deviation of one round's time of ours from the median over rounds. See the module docstring of "
             "`experiments/bench/unrolled.py` for what each case computes.", ""]
    missing = [name for name in PEERS if name not in present]
    if missing:
        lines += [f"Peers not installed here: {', '.join(missing)} (`pip install -e \".[compare]\"` in a separate "
                  "environment, then run this module with its Python); only our rows are produced for them.", ""]
    if before:
        after_dump = torch.load(dumps["after"][0])
        before_dump = torch.load(dumps["before"][0])
    targets = []
    for label, name in first["names"].items():
        keys = [k for k in first["times"] if k.startswith(label + "|")]
        headers = ["T", "ours (ms)"] + (["before (ms)", "after / before"] if before else []) \
            + [f"{FUNC} (ms)"] + [f"{p} (ms)" for p in peers] + [f"ours / {p}" for p in peers] \
            + ["noise (ours)"]
        diff_headers = ["T"] + [f"{p} vs ours" for p in peers] + [f"{FUNC} vs ours"] \
            + (["before vs after"] if before else [])
        rows, diff_rows = [], []
        for key in keys:
            n = int(key.split("|")[1])
            t = {case: _median([r["times"][key][case] for r in after]) for case in first["times"][key]}
            ratio = {p: _median([r["times"][key][OURS] / r["times"][key][p] for r in after]) for p in peers}
            noise = max(abs(r["times"][key][OURS] / t[OURS] - 1) for r in after)
            row: list[Any] = [n, t[OURS] * 1e3]
            if before:
                tb = _median([r["times"][key][OURS] for r in before])
                row += [tb * 1e3, t[OURS] / tb]
            row += [t.get(FUNC, float("nan")) * 1e3] + [t[p] * 1e3 for p in peers] + [ratio[p] for p in peers]
            row += [f"{noise:.0%}"]
            rows.append(row)
            diffs = first["diffs"][key]
            diff_row: list[Any] = [n] + [f"{diffs[p]:.1e}" for p in peers] + [f"{diffs.get(FUNC, float('nan')):.1e}"]
            if before:
                diff_row.append(f"{pp.relative_error(before_dump[key], after_dump[key]):.1e}")
            diff_rows.append(diff_row)
            targets += [f"{label}, T = {n}: ours / {p} = {ratio[p]:.2f} "
                        f"({'met' if ratio[p] <= 1.0 else 'missed'})" for p in peers]
        lines += [f"## {label}: {name}", "", "Time per hypergradient", "", common.markdown_table(headers, rows), "",
                  "Relative difference of dF/dx from ours (|h - h_ours| / |h_ours|)", "",
                  common.markdown_table(diff_headers, diff_rows), ""]
    lines += ["Notes: ours is the engine's estimate as it ships, metrics included (g and |grad_y g| come from the "
              "last step's own gradient, at y_{T-1}, so they cost no oracle call). The torch.func column "
              "is the same engine in the same worker with the unroll forced onto torch.func "
              "(`hypergrad.unrolled._TAPE = False`), the route a population's vmap or a compiled engine takes; the "
              "before column is the revision named above, in its own worker.", ""]
    if targets:
        lines += ["## Target: ours / peer <= 1.0 at equal T", "", *[f"- {t}" for t in targets], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from experiments.bench import common

    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--before", type=Path, help="a checkout of the revision to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=common.RESULTS / "speed" / "unrolled.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(args.threads)  # as the workers: named in the table's header
    if args.quick:
        args.warmup, args.repeats = 1, 3  # what the workers use
    trees = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    dumps: dict[str, list[Path]] = {label: [] for label in trees}
    folder = Path(tempfile.mkdtemp(prefix="bench_unrolled_"))
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for label in order:
            dump = folder / f"{label}{round_}.pt"
            runs[label].append(common.run_worker(trees[label], __file__, _worker_flags(args, dump), args.threads))
            dumps[label].append(dump)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    options = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"PYTHONPATH=. {sys.executable} -m experiments.bench.unrolled {options}"
    text = report(runs, dumps, args, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
