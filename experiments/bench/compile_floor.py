"""What compiling costs on this machine: the floor of one cold compile, and a second run's warm cache.

    python -m experiments.bench.compile_floor --threads 1 [--ks 1 5 10]

Context for ``experiments/results/speed/compile_k.md`` (issue 15 part 4: compile time <= 20 s on the
MLP at any K), on the MLP 784-256-256-10 L2 problem of ``peers_problems`` (float32). What each row
measures is ``DESCRIPTION``, which the result file repeats. Writes
``experiments/results/speed/compile_floor.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.bench import common

ROOT = Path(__file__).resolve().parents[2]
KS = (1, 5, 10)
DESCRIPTION = (
    "Inductor on the CPU, each case compiled in a fresh process after a throwaway compile (inductor and its C++ "
    "toolchain loaded). Floor: `torch.compile` of the lower objective g alone, of its gradient in y "
    "(`torch.func.grad`) and of one reverse-over-reverse HVP, no bilevel machinery. Ours: "
    "`compile_engine(CG(iters=K, tol=0, warm_start=False, inner_steps=0), fullgraph=True)`, its `estimate`. "
    "Compile = first compiled call less one eager call; *cold*: an empty inductor cache directory; *warm*: a "
    "second process on the directory the cold one filled (what a second run of the same job pays: inductor's "
    "on-disk caches are on by default).")
FLOOR = ("forward of g", "gradient of g", "one HVP of g")


def _case(name: str) -> Callable[[bool], Any]:
    """A case on the MLP problem: called with False it runs eagerly, with True compiled."""
    from experiments.bench.peers_problems import mlp

    spec = mlp(False, torch.device("cpu"))
    fns, x, y = spec.fns, spec.x, spec.y
    lower = spec.batches[0]
    if name.startswith("CG"):
        import hypergrad

        engine = hypergrad.CG(iters=int(name.split("=")[1]), tol=0.0, warm_start=False, inner_steps=0)
        state = engine.init(fns, x, y)
        compiled = hypergrad.compile_engine(engine, fullgraph=True, backend="inductor")
        return lambda compile_: (compiled if compile_ else engine).estimate(fns, state, spec.batches)
    gradient = torch.func.grad(fns.g, argnums=1)
    fn = {
        "forward of g": lambda x_, y_: fns.g(x_, y_, lower),
        "gradient of g": lambda x_, y_: gradient(x_, y_, lower),
        "one HVP of g": lambda x_, y_: torch.func.vjp(lambda w: gradient(x_, w, lower), y_)[1](y_),
    }[name]
    compiled_fn = torch.compile(fn, fullgraph=True)
    return lambda compile_: (compiled_fn if compile_ else fn)(x, y)


def worker(name: str) -> float:
    """Seconds of the first compiled call of case ``name`` less one eager call, in this process."""
    torch.compile(lambda t: torch.sin(t) + 1, fullgraph=True)(torch.ones(3))  # loads inductor and the toolchain
    call = _case(name)
    start = time.perf_counter()
    call(False)
    eager = time.perf_counter() - start
    start = time.perf_counter()
    call(True)
    return max(time.perf_counter() - start - eager, 0.0)


def _run(name: str, cache: str, threads: int) -> float:
    flags = ["--worker", name, "--threads", str(threads)]
    return float(common.run_worker(ROOT, __file__, flags, threads, env={"TORCHINDUCTOR_CACHE_DIR": cache})["compile"])


def main(argv: list[str] | None = None) -> Path:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--ks", type=int, nargs="*", default=list(KS))
    p.add_argument("--worker", help="internal: compile one case in this process")
    p.add_argument("--out", type=Path, default=common.RESULTS / "speed" / "compile_floor.md")
    args = p.parse_args(argv)
    common.setup(args)
    if args.worker:
        print(json.dumps({"compile": worker(args.worker)}))
        return args.out
    rows = []
    for name in (*FLOOR, *(f"CG K={k}" for k in args.ks)):
        with tempfile.TemporaryDirectory() as cache:
            cold = _run(name, cache, args.threads)
            warm = _run(name, cache, args.threads)
        rows.append([name, round(cold, 1), round(warm, 1)])
        print(rows[-1], file=sys.stderr, flush=True)
    command = "python -m experiments.bench.compile_floor " + " ".join(argv if argv is not None else sys.argv[1:])
    table = common.markdown_table(["case (MLP 784-256-256-10 L2, float32)", "compile, cold (s)",
                                   "compile, warm cache (s)"], rows)
    text = (f"# Compile time: the floor on this machine, and a warm cache\n\n{common.environment(torch.device('cpu'))}"
            f"\n\nRegenerate: `{command.strip()}`\n\n{DESCRIPTION}\n\n{table}\n")
    args.out.write_text(text)
    print(text)
    return args.out


if __name__ == "__main__":
    main()
