"""torch.compile: one engine step eager vs compiled (``hypergrad.compile.compile_engine``), per engine.

Problems: P1 (``problems.reference.QuadraticP1``, 3 lower and 2 upper variables, float64), where an
eager step is almost all Python and torch.func dispatch overhead, and the MLP 784-256-256-10 per-
parameter L2 problem of ``experiments/bench/models.py`` (float32, batch 64), where the work is real.
Exact forms the dense Hessian (dim(y) = 269k on the MLP) and runs on P1 only.

Every engine is compiled with ``fullgraph=True`` (so a compile that succeeds has no graph break;
a failing one is retried with ``fullgraph=False`` and its breaks are listed) and ``dynamic=False``.
The compile time is the first compiled call minus one eager step (inductor's on-disk caches off,
so it is a cold compile), reported apart; the step times
are medians of interleaved repetitions after warm-up; "max |diff|" compares the states and metrics
of one compiled and one eager step from the same state.

The loops are kept short (2 inner steps, 3 solver iterations or terms) because dynamo unrolls
Python loops: compile time grows with them, the per-step speed-up hardly does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
from torch.utils._pytree import tree_leaves

import hypergrad
from experiments.bench.common import RESULTS, environment, interleaved_medians, markdown_table, parser, setup
from experiments.bench.models import l2_problem, mlp
from hypergrad.compile import compile_engine, graph_breaks
from problems.reference import QuadraticP1

ENGINES: dict[str, Callable[[], hypergrad.Engine]] = {
    "Exact": lambda: hypergrad.Exact(inner_steps=2),
    "Neumann": lambda: hypergrad.Neumann(terms=3, inner_steps=2),
    "CG": lambda: hypergrad.CG(iters=3, inner_steps=2),
    "Unrolled": lambda: hypergrad.Unrolled(inner_steps=3),
    "F2SA": lambda: hypergrad.F2SA(inner_steps=2),
    "Penalty": lambda: hypergrad.Penalty(inner_steps=2),
    "BOREP": lambda: hypergrad.BOREP(refine_steps=2, inner_steps=2, terms=3),
    "LVHBA": lambda: hypergrad.LVHBA(),
}
PROBLEMS = ("P1", "MLP")
DEFAULT_MLP_ENGINES = ("Neumann", "CG", "Unrolled")
"""On the MLP a compile costs minutes on a 2-core CPU: the default run covers the IFT engines and
Unrolled; ``--mlp-engines`` adds others (all but Exact)."""


def problem(name: str, device: torch.device) -> tuple[hypergrad.Functions, Any, Any, Any]:
    """(fns, x, y, batches) of P1 or the MLP problem."""
    if name == "P1":
        p1 = QuadraticP1().to(device)
        fns, x, y = p1.to_functions()
        return fns, x, y, p1.data()
    torch.manual_seed(0)
    return l2_problem(mlp(), batch_size=64, device=device)


def max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between the floating leaves of two trees of equal structure."""
    diffs = [(u.double() - v.double()).abs().max().item() for u, v in zip(tree_leaves(a), tree_leaves(b), strict=True)
             if u.is_floating_point() and u.numel()]
    return max(diffs, default=0.0)


def measure(problem_name: str, engine_name: str, device: torch.device, warmup: int, repeats: int,
            backend: str) -> dict[str, Any]:
    """Breaks, compile time, eager and compiled step times and their difference for one engine."""
    fns, x, y, batches = problem(problem_name, device)
    engine = ENGINES[engine_name]()
    state = engine.init(fns, x, y, lower_batch=batches[0])
    torch._dynamo.reset()
    start = time.perf_counter()
    eager_out = engine.step(fns, state, batches)
    eager_once = time.perf_counter() - start
    breaks: list[str] = []
    compiled = compile_engine(engine, fullgraph=True, backend=backend)
    start = time.perf_counter()
    try:
        compiled_out = compiled.step(fns, state, batches)
    except Exception:  # a graph break under fullgraph: name the breaks and compile around them
        breaks = graph_breaks(engine, fns, state, batches)
        compiled = compile_engine(engine, fullgraph=False, backend=backend)
        start = time.perf_counter()
        compiled_out = compiled.step(fns, state, batches)
    compile_s = max(time.perf_counter() - start - eager_once, 0.0)
    times = interleaved_medians({"eager": lambda: engine.step(fns, state, batches),
                                 "compiled": lambda: compiled.step(fns, state, batches)},
                                device, warmup=warmup, repeats=repeats)
    return {"problem": problem_name, "engine": engine_name, "breaks": breaks, "compile": compile_s,
            "eager": times["eager"], "compiled": times["compiled"],
            "difference": max_difference(eager_out, compiled_out), "repeats": repeats}


def report(rows: list[dict[str, Any]], device: torch.device, backend: str, command: str) -> str:
    lines = ["# torch.compile: one engine step, eager vs compiled", "", environment(device), "",
             f"Regenerate: `{command}`", "",
             f"`compile_engine(engine, fullgraph=True, dynamic=False, backend={backend!r})`; engines with short "
             "loops (Exact/Neumann/CG/F2SA/Penalty: 2 inner steps; Neumann 3 terms, CG 3 iterations; Unrolled 3 "
             "differentiated steps; BOREP 2 refinement and 2 lower steps, 3 terms; LVHBA defaults). Step times "
             "are medians of interleaved repetitions after warm-up; compile time is the first compiled call "
             "less one eager step, caches off (cold). Graph breaks: 0 means the fullgraph compile succeeded. "
             "Eager and compiled steps are timed side by side, so their ratio holds under load; "
             "absolute times do not.", ""]
    for name in PROBLEMS:
        part = [r for r in rows if r["problem"] == name]
        if not part:
            continue
        title = ("P1 (closed form, 3 + 2 variables, float64)" if name == "P1"
                 else "MLP 784-256-256-10, per-parameter L2, batch 64 (float32)")
        lines += [f"## {title}", ""]
        table = [[r["engine"], len(r["breaks"]), r["compile"], 1e3 * r["eager"], 1e3 * r["compiled"],
                  r["eager"] / r["compiled"], f"{r['difference']:.1e}", r["repeats"]] for r in part]
        lines += [markdown_table(["engine", "graph breaks", "compile (s)", "eager step (ms)", "compiled step (ms)",
                                  "speed-up", "max abs diff", "repeats"], table), ""]
    broken = [r for r in rows if r["breaks"]]
    lines += ["## Graph breaks", ""]
    if not broken:
        lines.append("None: every engine's step compiled as one graph (fullgraph=True) on every problem above.")
    for r in broken:
        lines += [f"- {r['engine']} on {r['problem']}:"] + [f"  - {b}" for b in r["breaks"]]
    lines.append("")
    lines.append("![speed-ups](compile.png)")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # lazy: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(PROBLEMS)
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    for k, name in enumerate(PROBLEMS):
        part = {r["engine"]: r["eager"] / r["compiled"] for r in rows if r["problem"] == name}
        xs = [i + k * width for i, e in enumerate(engines) if e in part]
        ax.bar(xs, [part[e] for e in engines if e in part], width, label=name)
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set_xticks([i + width * (len(PROBLEMS) - 1) / 2 for i in range(len(engines))], engines)
    ax.set_yscale("log")
    ax.set_ylabel("eager / compiled step time")
    ax.set_title("torch.compile speed-up per engine step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "speed", help="directory of the table and plot")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--p1-engines", nargs="*", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--mlp-engines", nargs="*", default=list(DEFAULT_MLP_ENGINES),
                   choices=[e for e in ENGINES if e != "Exact"])
    args = p.parse_args(argv)
    device = setup(args)
    if args.quick:  # a smoke test: dynamo's capture without code generation, two engines on P1
        args.backend, args.p1_engines, args.mlp_engines = "eager", ["CG", "Unrolled"], []
    rows = []
    # Cold compile times: without this a re-run would read inductor's on-disk caches from the last one.
    with torch._inductor.config.patch(force_disable_caches=True):
        for name, engines in (("P1", args.p1_engines), ("MLP", args.mlp_engines)):
            for engine in engines:
                repeats = args.repeats if name == "P1" else max(3, args.repeats // 3)  # an MLP step is ~0.1-1 s
                rows.append(measure(name, engine, device, args.warmup, repeats, args.backend))
                r = rows[-1]
                print(f"{name} {engine}: compile {r['compile']:.1f} s, eager {1e3 * r['eager']:.2f} ms, "
                      f"compiled {1e3 * r['compiled']:.2f} ms, breaks {len(r['breaks'])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.bench.compile " + " ".join(argv if argv is not None else sys.argv[1:])
    path = args.out / "compile.md"
    path.write_text(report(rows, device, args.backend, command.strip()))
    plot(rows, args.out / "compile.png")
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
