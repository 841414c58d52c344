"""Compile time against the solver's iterations K: our compiled CG against JAXopt's CG under ``jax.jit``.

    PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.compile_k --device cpu --threads 1
    PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.compile_k --quick   # smoke test, tiny sizes

Needs jax and jaxopt (the ``compare`` extra); without them only our rows are produced.

On the peer comparison's digits hyper-cleaning (weighted logistic regression, float64) and MLP
784-256-256-10 L2 (float32) problems (``peers_problems``), for K = 1, 5, 10, 20:

- ours: ``compile_engine(CG(iters=K, tol=0, warm_start=False, inner_steps=0), fullgraph=True)``, its
  ``estimate`` from the same (x, y); compile time = the first compiled call less one eager call, cold
  (inductor's on-disk caches off). Two variants of the products H v: "as shipped" (whatever
  ``kernels.hvp_operator`` returns under compile: a ``torch.func`` pullback built once, which a
  compiled loop body cannot hold, so dynamo unrolls the K iterations) and "loop-safe HVP" (the HVP
  recomputed inside each product, ``loops.mark_loop_safe``: ``solvers.cg`` then runs as one
  ``while_loop`` op; patched in here as ``kernels.hvp_operator`` would return it under compile), in
  reverse-over-reverse or forward-over-reverse mode;
- JAXopt: ``custom_root`` + ``solve_cg(maxiter=K)`` under ``jax.jit`` (``peers_jaxopt``): compile
  time = first call less a second one.

Then the time of one hypergradient, all variants interleaved (medians), eager ours too, and every
variant's relative error against the problem's reference (the same mathematics at the same K: the
errors agree to rounding, so the speed ratio is at matched error). Last, the matmul library: one
1024 x 1024 matmul, torch against XLA, at the same thread count.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config

import hypergrad
from experiments.bench import common
from experiments.bench.peers_problems import Spec, cleaning, mlp, relative_error
from hypergrad import kernels, loops
from hypergrad.tree import Tree

KS = (1, 5, 10, 20)
VARIANTS = ("as shipped", "loop-safe HVP", "loop-safe HVP, fwd-over-rev")
"""How our compiled engine takes H v: see the module docstring; the last recomputes each product in
forward-over-reverse mode (``torch.func.jvp`` of ``grad``) instead of reverse-over-reverse."""


@contextlib.contextmanager
def loop_safe_hvp(mode: str = "reverse-over-reverse") -> Iterator[None]:
    """Under compile, ``kernels.hvp_operator`` returns a loop-safe product (HVP recomputed per call).

    The change proposed for ``hypergrad.kernels`` (issue 15 part 4), applied here by patching so that it
    can be measured before it lands; eager calls keep the shipped operator.
    """
    shipped, hvp_mode = kernels.hvp_operator, mode

    def operator(fn: Any, x: Tree, y: Tree, batch: Any, mode: str | None = None) -> Callable[[Tree], Tree]:
        if loops.compiling() and mode in (None, "reverse-over-reverse"):
            return loops.mark_loop_safe(lambda v: kernels.hvp_in_mode(fn, x, y, batch, v, hvp_mode))
        return shipped(fn, x, y, batch, mode)

    kernels.hvp_operator = operator
    try:
        yield
    finally:
        kernels.hvp_operator = shipped


def pure_cleaning(spec: Spec) -> Spec:
    """Digits cleaning with f and g written as plain torch functions of (x, y, batch).

    The problem's own objectives run through ``bilevel``'s module binding, which swaps the tensors into
    the module (``swap_tensors_dict``): a side effect torch 2.13 refuses inside a ``while_loop`` body
    ("HOP: Unsafe side effect"). The same weighted logistic regression written out has none; it is
    checked against the problem's at (x, y).
    """
    import dataclasses
    import inspect

    import torch.nn.functional as F

    from problems.cleaning import DigitsCleaning

    params = inspect.signature(DigitsCleaning.__init__).parameters
    mu, upper_l2 = params["mu"].default, params["upper_l2"].default

    def g(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        inputs, labels, index = batch
        losses = F.cross_entropy(F.linear(inputs, y["weight"], y["bias"]), labels, reduction="none")
        return (torch.sigmoid(x["logits"][index]) * losses).mean() + mu / 2 * (
            y["weight"].square().sum() + y["bias"].square().sum())

    def f(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(F.linear(inputs, y["weight"], y["bias"]), labels) + upper_l2 / 2 * x[
            "logits"].square().sum()

    for mine, theirs, batch in ((g, spec.fns.g, spec.batches[0]), (f, spec.fns.f, spec.batches[1])):
        torch.testing.assert_close(mine(spec.x, spec.y, batch), theirs(spec.x, spec.y, batch), rtol=1e-12, atol=0)
    fns = hypergrad.Functions(f=f, g=g, name="logistic regression (digits cleaning)")
    return dataclasses.replace(spec, fns=fns, name=f"logistic regression: {spec.name}")


def ours(spec: Spec, k: int, variant: str, backend: str) -> dict[str, Any]:
    """Compile time, the compiled and eager closures and whether the solver loop folded."""
    engine = hypergrad.CG(iters=k, tol=0.0, warm_start=False, inner_steps=0)
    state = engine.init(spec.fns, spec.x, spec.y)
    start = time.perf_counter()
    engine.estimate(spec.fns, state, spec.batches)
    eager_once = time.perf_counter() - start
    compiled = hypergrad.compile_engine(engine, fullgraph=True, backend=backend)
    patch = (contextlib.nullcontext() if variant == "as shipped" else
             loop_safe_hvp("forward-over-reverse" if "fwd-over-rev" in variant else "reverse-over-reverse"))
    torch._dynamo.reset()
    folded: list[bool] = []
    shipped_fori = loops.fori_loop

    def watch(n: int, body: Any, carry: Any, *, loop: bool | None = None) -> Any:
        folded.append(bool(loop if loop is not None else loops.folding()) and n > 1)
        return shipped_fori(n, body, carry, loop=loop)

    loops.fori_loop = watch  # type: ignore[assignment]  # counts folded loops while dynamo traces
    try:
        with patch, torch._inductor.config.patch(force_disable_caches=True):
            start = time.perf_counter()
            compiled.estimate(spec.fns, state, spec.batches)
            compile_s = max(time.perf_counter() - start - eager_once, 0.0)
    finally:
        loops.fori_loop = shipped_fori  # type: ignore[assignment]
    return {"compile": compile_s, "folded": any(folded),
            "compiled": lambda: compiled.estimate(spec.fns, state, spec.batches)[1],
            "eager": lambda: engine.estimate(spec.fns, state, spec.batches)[1]}


def jaxopt_cg(spec: Spec, k: int) -> dict[str, Any]:
    """JAXopt's CG hypergradient under jit: compile time (first call less a second) and the closure."""
    from experiments.bench import peers_jaxopt

    run = peers_jaxopt.implicit(spec, k, "cg")
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    return {"compile": max(first - (time.perf_counter() - start), 0.0), "compiled": run}


def matmul_times(threads: int, repeats: int = 20) -> dict[str, float]:
    """Median time of one 1024^2 matmul (float32 and float64) in torch and, if installed, in XLA."""
    out: dict[str, float] = {}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        out[f"torch {str(dtype).removeprefix('torch.')}"] = common.interleaved_medians(
            {"mm": lambda a=a, b=b: a @ b}, torch.device("cpu"), 3, repeats)["mm"]
        if find_spec("jax") is not None:
            from experiments.bench import peers_jaxopt

            jax = peers_jaxopt._jax()
            ja, jb = jax.numpy.asarray(a.numpy()), jax.numpy.asarray(b.numpy())
            mm = jax.jit(lambda u, v: u @ v)
            out[f"XLA {str(dtype).removeprefix('torch.')}"] = common.interleaved_medians(
                {"mm": lambda ja=ja, jb=jb, mm=mm: mm(ja, jb).block_until_ready()}, torch.device("cpu"), 3,
                repeats)["mm"]
    return out


def measure(spec: Spec, ks: list[int], variants: list[str], backend: str, warmup: int,
            repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    have_jax = find_spec("jax") is not None and find_spec("jaxopt") is not None
    for k in ks:
        cases: dict[str, Callable[[], Tree]] = {}
        info: dict[str, dict[str, Any]] = {}
        for variant in variants:
            r = ours(spec, k, variant, backend)
            info[f"ours compiled ({variant})"] = r
            cases[f"ours compiled ({variant})"] = r["compiled"]
            cases["ours eager"] = r["eager"]
            print(f"{spec.name} K={k} ours {variant}: compile {r['compile']:.1f} s, loop folded: {r['folded']}",
                  flush=True)
        info["ours eager"] = {"compile": None, "folded": False}
        if have_jax:
            r = jaxopt_cg(spec, k)
            info["JAXopt CG (jit)"] = {**r, "folded": True}
            cases["JAXopt CG (jit)"] = r["compiled"]
            print(f"{spec.name} K={k} JAXopt: compile {r['compile']:.2f} s", flush=True)
        times = common.interleaved_medians(cases, torch.device("cpu"), warmup, repeats)
        jax_time = times.get("JAXopt CG (jit)")
        for name, fn in cases.items():
            rows.append({"problem": spec.name, "K": k, "method": name, "compile": info[name]["compile"],
                         "folded": info[name]["folded"], "time": times[name],
                         "error": relative_error(fn(), spec.reference),
                         "vs_jax": None if jax_time is None else jax_time / times[name]})
    return rows


def render(rows: list[dict[str, Any]], matmul: dict[str, float], header: str, command: str, backend: str) -> str:
    lines = ["# Compile time against K: our compiled CG against JAXopt under jit", "", header, "",
             f"Regenerate: `{command}`", "",
             f"Ours: `compile_engine(CG(iters=K, tol=0, warm_start=False, inner_steps=0), fullgraph=True, "
             f"backend={backend!r})`, its `estimate`; compile = first call less one eager call, inductor caches "
             "off (cold). 'as shipped': the products H v as `kernels.hvp_operator` returns them under compile; "
             "'loop-safe HVP': recomputed inside each product and marked `loops.mark_loop_safe`, so "
             "`solvers.cg` runs as one `while_loop` op (*folded*). JAXopt: `custom_root` + `solve_cg(maxiter=K)` "
             "under `jax.jit`; compile = first call less a second. *time*: one hypergradient, all rows of a K "
             "interleaved, median; *vs JAXopt* = JAXopt's time / this row's (>= 1: as fast or faster). The errors "
             "(against the problem's reference) agree to rounding: the same mathematics at the same K, so the "
             "ratios are at matched error. The machine is shared: compile times vary by +-30 % run to run, "
             "time ratios within a K less (interleaved).", ""]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        lines += [f"## {problem}", ""]
        table = [[r["K"], r["method"], "-" if r["compile"] is None else f"{r['compile']:.1f}",
                  "yes" if r["folded"] else "no", f"{1e3 * r['time']:.3g}", f"{r['error']:.2e}",
                  "-" if r["vs_jax"] is None else f"{r['vs_jax']:.2f}"]
                 for r in sorted((r for r in rows if r["problem"] == problem), key=lambda r: (r["K"], r["method"]))]
        lines += [common.markdown_table(["K", "method", "compile (s)", "loop folded", "time (ms)", "error",
                                         "vs JAXopt"], table), ""]
    if matmul:
        lines += ["## The matmul library", "",
                  "One 1024 x 1024 matmul, median, same thread count: what part of a gap at large sizes is the "
                  "CPU matmul kernel rather than the framework.", ""]
        lines += [common.markdown_table(["library", "time (ms)"], [[k, f"{1e3 * v:.2f}"] for k, v in matmul.items()]),
                  ""]
        for dtype in ("float32", "float64"):
            if f"XLA {dtype}" in matmul:
                lines.append(f"- {dtype}: torch / XLA = {matmul[f'torch {dtype}'] / matmul[f'XLA {dtype}']:.2f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--out", type=Path, default=common.RESULTS / "speed", help="folder of compile_k.md")
    p.add_argument("--ks", type=int, nargs="*", default=list(KS))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--problems", nargs="*", default=["cleaning", "mlp"], choices=["cleaning", "mlp"])
    p.add_argument("--backend", default="inductor")
    args = p.parse_args(argv)
    device = common.setup(args)
    if args.quick:  # tiny problems, two K, no code generation
        args.ks, args.backend = [1, 3], "aot_eager"
    torch._dynamo.config.recompile_limit = 64
    # A throwaway compile first: the process's first one also pays for loading inductor and its C++
    # toolchain (tens of seconds here), which would land on whichever row came first.
    torch.compile(lambda t: torch.sin(t) + 1, backend=args.backend)(torch.ones(3))
    builders = {"cleaning": lambda quick, device: pure_cleaning(cleaning(quick, device)), "mlp": mlp}
    matmul = matmul_times(torch.get_num_threads())
    command = "PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.compile_k " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compile_k.md"
    rows: list[dict[str, Any]] = []
    for name in args.problems:
        spec = builders[name](args.quick, device)
        repeats = max(3, args.repeats // 3) if name == "mlp" else args.repeats
        rows += measure(spec, args.ks, args.variants, args.backend, min(args.warmup, repeats), repeats)
        # Written after every problem: a long run that is stopped keeps what it measured.
        path.write_text(render(rows, matmul, common.environment(device), command.strip(), args.backend))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
