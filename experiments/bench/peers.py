"""Peers side by side: our Neumann / CG / Unrolled, eager and compiled, against TorchOpt, higher, Betty and JAXopt.

    python -m experiments.bench.peers --device cpu

On three problems (``peers_problems``: P1 in float64, digits hyper-cleaning, the MLP L2 problem) and
for every oracle budget K (HVPs = Neumann terms = CG iterations = unrolled steps T), each method
computes dF/dx from the same (x, y), and we report:

(a) the relative error against the problem's reference hypergradient, and the distance to our
    estimator of the same kind (a peer's Neumann to our Neumann, its CG to our CG, its unrolled loop to
    our Unrolled: the same mathematics, so a large distance means one of the two is wrong, and the
    error column says which);
(b) the time of one outer step: the hypergradient from (x, y) (Betty's also includes its upper
    optimizer call, a no-op here), interleaved medians;
(c) the peak memory of that step (CUDA allocator peak; on CPU the peak of live tensor storages,
    which misses memory outside tensors).

Then at equal error: for every peer row, our fastest eager and our fastest compiled setting with an
error no larger (1% slack for rounding), and the ratio of the times, against the target of >= 2x the
PyTorch peers and no more memory, and >= 1x JAXopt under ``jax.jit`` for the compiled rows.

JAXopt (``peers_jaxopt``: ``custom_root`` with CG or a Neumann series, and plain JAX unrolling, each one
``jax.jit``-compiled function) runs the same problems transcribed to jax.numpy; its compile happens on the
first call, before the timing, as ours does. Its rows have no peak memory (JAX allocates outside torch).

    PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.peers --device cpu            # full run
    PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.peers --device cpu --quick    # smoke test

The peers are optional (``pip install -e ".[compare]"``, in a separate environment: they are pinned
to old releases); without them only our rows are produced, with a line naming what is missing.
Our engines run as they ship: ``Neumann`` and ``CG`` spend one extra HVP (the residual they log, and
CG's warm start), ``Unrolled`` one extra gradient (the lower stationarity it logs).
"""

from __future__ import annotations

import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

import hypergrad
from experiments.bench import common
from experiments.bench.peers_problems import Spec, problems, relative_error
from hypergrad.tree import Tree

PEERS = {"torchopt": "experiments.bench.peers_torchopt", "higher": "experiments.bench.peers_higher",
         "betty": "experiments.bench.peers_betty", "jaxopt": "experiments.bench.peers_jaxopt"}
"""Import name of each peer -> the adapter module that drives it."""
TORCH_PEERS = ("torchopt", "higher", "betty")
"""The PyTorch peers (target: >= 2x at equal error); JAXopt's target is parity (>= 1x) for our compiled rows."""
INSTALL = ('pip install -e ".[compare]"  # torchopt==0.7.3, higher==0.2.1, betty-ml==0.1.1, '
           'jax==0.10.2, jaxlib==0.10.2, jaxopt==0.8.5')
SLACK = 1.01
"""Equal error: ours counts as reaching a peer's error e when its error is <= SLACK * e."""
SAME_KIND = {"Neumann": "ours Neumann", "neumann": "ours Neumann", "CG": "ours CG", "cg": "ours CG",
             "unrolled": "ours Unrolled"}


def missing_peers() -> list[str]:
    """The peers whose package cannot be imported here."""
    return [name for name in PEERS if find_spec(name) is None]


def ours(spec: Spec, budget: int, compiled: bool = False) -> dict[str, Callable[[], Tree]]:
    """Our three engines at budget K, each a closure returning dF/dx (tree keyed like x).

    CG starts cold (``warm_start=False``), as the peers' solvers do: from v = 0 a warm start's residual
    would be one HVP spent on H 0. With ``compiled``, the same engines also run their estimate through
    ``hypergrad.compile_engine`` (what ``bilevel.fit(compile=True)`` does), as rows "ours ... compiled".
    """
    engines: dict[str, hypergrad.Engine] = {
        "ours Neumann": hypergrad.Neumann(terms=budget, alpha=spec.alpha, inner_steps=0),
        "ours CG": hypergrad.CG(iters=budget, tol=0.0, inner_steps=0, warm_start=False),
        "ours Unrolled": hypergrad.Unrolled(inner_steps=budget, inner_lr=spec.alpha),
    }
    if compiled:
        engines.update({f"{name} compiled": hypergrad.compile_engine(engine, fullgraph=True)
                        for name, engine in list(engines.items())})

    def closure(engine: hypergrad.Engine) -> Callable[[], Tree]:
        state = engine.init(spec.fns, spec.x, spec.y)
        return lambda: engine.estimate(spec.fns, state, spec.batches)[1]

    return {name: closure(engine) for name, engine in engines.items()}


def same_kind(method: str) -> str | None:
    """Our estimator computing the same mathematics as ``method`` (None for ours and darts)."""
    if method.startswith("ours"):
        return None if not method.endswith(" compiled") else method.removesuffix(" compiled")
    return next((ours_name for word, ours_name in SAME_KIND.items() if word in method), None)


def run_problem(spec: Spec, adapters: list[Any], device: torch.device, warmup: int,
                repeats: int, compiled_up_to: int = 0) -> list[dict[str, Any]]:
    """One row per (method, K): error, distance to our same-kind estimator, median time, peak memory."""
    cases: dict[tuple[str, int | None], Callable[[], Tree]] = {}
    for budget in spec.budgets:
        cases.update({(name, budget): fn for name, fn in ours(spec, budget, budget <= compiled_up_to).items()})
        for adapter in adapters:
            cases.update({(name, budget): fn for name, fn in adapter.methods(spec, budget).items()})
    for adapter in adapters:
        if hasattr(adapter, "fixed_methods"):
            cases.update({(name, None): fn for name, fn in adapter.fixed_methods(spec).items()})
    start = time.perf_counter()
    grads = {key: fn() for key, fn in cases.items()}
    # Inductor's CPU kernels allocate outside the dispatcher, where the CPU tracker cannot see them:
    # compiled rows get no peak on CPU (the CUDA allocator sees everything).
    # JAX allocates outside torch altogether: its rows get no peak either.
    peaks = {key: None if (device.type == "cpu" and key[0].endswith(" compiled")) or is_jax(key[0])
             else common.peak_bytes(fn, device)
             for key, fn in cases.items()}
    checked = time.perf_counter()
    times = common.interleaved_medians({f"{k[0]}|{k[1]}": fn for k, fn in cases.items()}, device, warmup, repeats)
    print(f"{spec.name}: {len(cases)} cases, errors and memory {checked - start:.0f} s, "
          f"timing {time.perf_counter() - checked:.0f} s")
    rows = []
    for (name, budget), h in grads.items():
        kin = same_kind(name)
        reference = grads.get((kin, budget)) if kin else None
        rows.append({
            "problem": spec.name, "method": name, "K": budget, "error": relative_error(h, spec.reference),
            "vs_ours": relative_error(h, reference) if reference is not None else None,
            "time": times[f"{name}|{budget}"], "peak": peaks[(name, budget)],
        })
    return rows


def equal_error(rows: list[dict[str, Any]], wrong: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each peer row: the fastest peer row, and our fastest eager and fastest compiled rows, with error
    <= SLACK * its error, and the time / memory ratios. Peer methods in ``wrong`` ((problem, method) pairs)
    are left out. The fastest peer is taken among peers of the same family (PyTorch peers, or JAX)."""
    out = []
    right = [r for r in rows if (r["problem"], r["method"]) not in wrong]
    for peer in (r for r in right if not r["method"].startswith("ours")):
        level = peer["error"] * SLACK
        same = [r for r in right if r["problem"] == peer["problem"] and r["error"] <= level]
        family = is_jax(peer["method"])
        faster_peers = [r for r in same if not r["method"].startswith("ours") and is_jax(r["method"]) == family]
        fastest_peer = min(faster_peers, key=lambda r: r["time"])
        entry: dict[str, Any] = {"peer": peer, "fastest_peer": fastest_peer}
        for kind in ("eager", "compiled"):
            reaching = [r for r in same if r["method"].startswith("ours")
                        and r["method"].endswith(" compiled") == (kind == "compiled")]
            best = min(reaching, key=lambda r: r["time"]) if reaching else None
            entry[f"ours_{kind}"] = best
            entry[f"speedup_{kind}"] = fastest_peer["time"] / best["time"] if best else None
            entry[f"memory_{kind}"] = (best["peak"] / max(fastest_peer["peak"], 1)
                                       if best and best["peak"] is not None and fastest_peer["peak"] else None)
        out.append(entry)
    return out


def is_jax(method: str) -> bool:
    """Whether a row is JAXopt's / JAX's."""
    return method.startswith("JAX")


def _fmt_k(budget: int | None) -> str:
    return "-" if budget is None else str(budget)


def _fmt(v: float | None, spec: str = ".2e") -> str:
    return "-" if v is None else format(v, spec)


def render(specs: list[Spec], rows: list[dict[str, Any]], matches: list[dict[str, Any]], missing: list[str],
           checks: list[str], wrong: set[tuple[str, str]], header: str, command: str) -> str:
    """The markdown report."""
    lines = ["# Peers side by side: hypergradient error, time and memory per outer step", "", header, "",
             f"Regenerate: `{command}`", ""]
    if missing:
        lines += [f"**Peers not installed: {', '.join(missing)}** (only their rows are missing). "
                  f"Install them in a separate environment with `{INSTALL}`.", ""]
    lines += ["Every method computes dF/dx from the same (x, y) with budget K (HVPs = Neumann terms = CG iterations "
              "= unrolled steps T of size alpha, the Neumann step). *error* = |h - reference| / |reference|; "
              "*vs ours* = |h - h_ours| / |h_ours| with h_ours our estimator of the same kind at the same K "
              "(same mathematics); *time* = median of one outer step, interleaved; *peak* = peak live tensor "
              "bytes of that step (CPU: tensor storages only). Every method calls the same pure f and g; the peers "
              "receive them as autograd functions of tensors held in nn.Modules. Rows '... compiled' are our same "
              "engines through `hypergrad.compile_engine` (`bilevel.fit(compile=True)`), timed after compilation; "
              "their peak is not measured on CPU (inductor allocates outside the dispatcher).", ""]
    for spec in specs:
        mine = [r for r in rows if r["problem"] == spec.name]
        lines += [f"## {spec.name}", "", f"Reference: {spec.note}. alpha = {spec.alpha:.4g}.", ""]
        table = [[r["method"], _fmt_k(r["K"]), _fmt(r["error"]), _fmt(r["vs_ours"]), r["time"] * 1e3,
                  "-" if r["peak"] is None else common.mib(r["peak"])]
                 for r in sorted(mine, key=lambda r: (r["method"], r["K"] or 0))]
        lines += [common.markdown_table(["method", "K", "error", "vs ours", "time (ms)", "peak (MiB)"], table), ""]
    if matches:
        lines += ["## At equal error", "",
                  f"For each peer row (error e): the fastest peer setting of the same family (PyTorch peers, or "
                  f"JAX) with error <= {SLACK} e, and our fastest eager and our fastest compiled setting with error "
                  f"<= {SLACK} e; speedup = peer time / our time, memory = our peak / the peer's. Targets: >= 2 "
                  "against the PyTorch peers (eager and compiled each stated), >= 1 for our compiled rows against "
                  "JAXopt under jit, memory <= 1. Peer methods found wrong below are left out: "
                  + (", ".join(f"{m} on {p}" for p, m in sorted(wrong)) or "none") + ".", ""]
        table = []
        for m in matches:
            p, f = m["peer"], m["fastest_peer"]
            row = [p["problem"], f"{p['method']} K={_fmt_k(p['K'])}", _fmt(p["error"]),
                   f"{f['method']} K={_fmt_k(f['K'])}", f["time"] * 1e3]
            for kind in ("eager", "compiled"):
                o = m[f"ours_{kind}"]
                row += [f"{o['method']} K={_fmt_k(o['K'])}" if o else "none reaches it",
                        o["time"] * 1e3 if o else "-", _fmt(m[f"speedup_{kind}"], ".2f")]
            row.append(_fmt(m["memory_eager"], ".2f"))
            table.append(row)
        lines += [common.markdown_table(["problem", "peer row", "its error", "fastest peer at that error",
                                         "its time (ms)", "ours eager", "time (ms)", "speedup eager",
                                         "ours compiled", "time (ms)", "speedup compiled", "memory (eager)"],
                                        table), ""]
        lines += summary(specs, matches) + [""]
    if checks:
        lines += ["## Where a peer gets the hypergradient wrong", ""] + [f"- {c}" for c in checks] + [""]
    return "\n".join(lines)


def summary(specs: list[Spec], matches: list[dict[str, Any]]) -> list[str]:
    """Per problem, per family of peers and per kind of ours (eager, compiled): the smallest and median
    speedup at equal error against that family's target, and the largest memory ratio."""
    lines = []
    for spec in specs:
        for family, target in (("PyTorch peers", 2.0), ("JAXopt", 1.0)):
            fam = [m for m in matches if m["peer"]["problem"] == spec.name
                   and is_jax(m["peer"]["method"]) == (family == "JAXopt")]
            if not fam:
                continue
            parts = []
            for kind in ("eager", "compiled"):
                speedups = [m[f"speedup_{kind}"] for m in fam if m[f"speedup_{kind}"] is not None]
                unmatched = sum(1 for m in fam if m[f"speedup_{kind}"] is None)
                if not speedups:
                    parts.append(f"{kind}: no row of ours reaches these errors" if unmatched else f"{kind}: no rows")
                    continue
                parts.append(f"{kind} speedup min {min(speedups):.2f}, median {statistics.median(speedups):.2f} "
                             f"(target >= {target:g}: {'met' if min(speedups) >= target else 'NOT met'}"
                             + (f"; {unmatched} peer row(s) more accurate than all of ours" if unmatched else "")
                             + ")")
            measured = [m["memory_eager"] for m in fam if m["memory_eager"] is not None]
            if measured and family != "JAXopt":  # JAX's memory is not seen by the tensor tracker
                parts.append(f"memory ratio (eager) max {max(measured):.2f} "
                             f"(target <= 1: {'met' if max(measured) <= 1 else 'NOT met'})")
            lines.append(f"- {spec.name}, against {family}: " + "; ".join(parts))
    return lines


def peer_checks(specs: list[Spec], rows: list[dict[str, Any]],
                adapters: list[Any]) -> tuple[list[str], set[tuple[str, str]]]:
    """Facts that show a peer's hypergradient is wrong, with the numbers, and the (problem, method) pairs
    found wrong: those whose estimate differs from ours of the same kind (whose error is the smaller)."""
    out, wrong = [], set()
    for spec in specs:
        mine = [r for r in rows if r["problem"] == spec.name]
        tol = 1e-6 if next(iter(spec.x.values())).dtype == torch.float64 else 1e-3
        for method in sorted({r["method"] for r in mine if r["vs_ours"] is not None}):
            series = sorted((r for r in mine if r["method"] == method), key=lambda r: r["K"])
            off = [r for r in series if r["vs_ours"] > tol]
            if off:
                wrong.add((spec.name, method))
                errs = ", ".join(f"K={r['K']}: {r['error']:.2e}" for r in series)
                ours_name = same_kind(method)
                ours_errs = ", ".join(f"{r['error']:.2e}" for r in sorted(
                    (r for r in mine if r["method"] == ours_name), key=lambda r: r["K"]))
                out.append(f"{spec.name}, {method}: differs from {ours_name} by up to "
                           f"{max(r['vs_ours'] for r in off):.2e} (relative); its error by K is {errs}, "
                           f"{ours_name}'s is {ours_errs}.")
    if any(a.NAME == "betty" for a in adapters):
        betty = next(a for a in adapters if a.NAME == "betty")
        p1 = specs[0]
        h = betty.fixed_methods(p1)["Betty darts"]()
        plain = hypergrad.Neumann(terms=0, alpha=1.0, inner_steps=0)
        unit = plain.estimate(p1.fns, plain.init(p1.fns, p1.x, p1.y), p1.batches)[1]
        scaled = hypergrad.Neumann(terms=0, alpha=p1.alpha, inner_steps=0)
        step = scaled.estimate(p1.fns, scaled.init(p1.fns, p1.x, p1.y), p1.batches)[1]
        out.append(f"{p1.name}, Betty darts: |h - (grad_x f - J grad_y f)| / |.| = {relative_error(h, unit):.1e}, "
                   f"|h - (grad_x f - alpha J grad_y f)| / |.| = {relative_error(h, step):.1e} (alpha = {p1.alpha}): "
                   "it takes H^-1 ~ I whatever the lower step size, where DARTS (Liu et al. 2019) scales the "
                   "second-order term by the lower learning rate.")
        out.append(f"{p1.name}, Betty darts leaves the lower variables moved: |y after - y| / |y| = "
                   f"{betty.darts_drift(p1):.2e} after one outer step (its restoring `p.data.add` is not in place).")
    return out, wrong


def plot(specs: list[Spec], rows: list[dict[str, Any]], path: Path) -> None:
    """Error against time per outer step, one panel per problem, one line per method over K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5))
    for ax, spec in zip(axes, specs, strict=True):
        mine = [r for r in rows if r["problem"] == spec.name]
        for method in sorted({r["method"] for r in mine}):
            series = sorted((r for r in mine if r["method"] == method), key=lambda r: r["K"] or 0)
            style = "-o" if method.startswith("ours") else "--x"
            ax.plot([r["time"] * 1e3 for r in series], [max(r["error"], 1e-17) for r in series], style,
                    label=method, markersize=4)
        ax.set(xscale="log", yscale="log", xlabel="time per outer step (ms)", ylabel="relative error",
               title=spec.name)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=common.RESULTS / "speed", help="folder for peers.md and peers.png")
    # One thread by default: on a shared 2-core machine, more threads than free cores slow every case
    # by an order of magnitude and make the timings noise.
    p.set_defaults(threads=1)
    p.add_argument("--compiled-up-to", type=int, default=None,
                   help="also time our engines compiled (rows '... compiled') at budgets K <= this (on the MLP each "
                        "graph takes 30-300 s to compile on CPU); 0: none. Default 20, and 0 with --quick")
    args = p.parse_args(argv)
    # TorchOpt 0.7.3 calls functorch.vjp, deprecated since torch 2.0: one warning per call otherwise.
    warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)
    device = common.setup(args)
    # One compiled graph per (engine, K): more variants of Engine.estimate than dynamo's default limit (8).
    torch._dynamo.config.recompile_limit = 64
    missing = missing_peers()
    adapters = [importlib.import_module(PEERS[name]) for name in PEERS if name not in missing]
    if missing:
        print(f"peers not installed: {', '.join(missing)}; install with: {INSTALL}")
    start = time.perf_counter()
    specs = problems(args.quick, device)
    print(f"problems built in {time.perf_counter() - start:.0f} s")
    rows: list[dict[str, Any]] = []
    for spec in specs:
        # Cleaning's and the MLP's steps are 10-100x longer than P1's: fewer repetitions keep the run
        # within minutes.
        repeats = args.repeats if spec.name.startswith("P1") else max(3, args.repeats // 3)
        compiled_up_to = args.compiled_up_to if args.compiled_up_to is not None else (0 if args.quick else 20)
        rows += run_problem(spec, adapters, device, min(args.warmup, repeats), repeats, compiled_up_to)
    checks, wrong = peer_checks(specs, rows, adapters) if adapters else ([], set())
    matches = equal_error(rows, wrong) if adapters else []
    command = "PYTHONPATH=. /tmp/cmpvenv/bin/python -m experiments.bench.peers --device " + args.device + (
        " --quick" if args.quick else "") + ("" if args.compiled_up_to is None else
                                             f" --compiled-up-to {args.compiled_up_to}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(specs, rows, matches, missing, checks, wrong, common.environment(device), command)
    (args.out / "peers.md").write_text(text)
    plot(specs, rows, args.out / "peers.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
