"""Kernel cost: time and peak memory of every derivative kernel and of whole engine steps, as gradients.

    python -m experiments.bench.kernels --device cpu      (or --device cuda)

On the per-parameter L2 problems of ``experiments/bench/models.py`` (MLP 784-256-256-10, the small CNN,
one transformer block; batch 64) it times, interleaved, one gradient (``kernels.grad_y`` of g: the unit
of every ratio), the other gradients the engines take, H v in each mode of ``kernels.HVP_MODES``
(standalone, and as one product of ``kernels.hvp_operator``'s kept graph), the mixed VJP, the outer
Adam update, and whole ``engine.step`` calls of CG and Neumann at K in {1, 5, 20} and of F2SA and Penalty.
Each engine step is set against two predictions built from the separately measured kernels:

- the oracle formula: IFT (T + 2) gradients + K HVPs + 1 mixed VJP (ALGORITHMS.md), HVP = the default
  mode's standalone product; F2SA and Penalty 3T + 3 gradients;
- the account of what the step runs eagerly: IFT T (gradient of g + axpy) + grad_xy f + grad_y g recorded
  by torch.autograd in (x, y) + K products through it (CG: K + 1, its warm-start residual) + K iterations
  of the solver's own tree arithmetic + J v through the same graph + the Adam update; F2SA and Penalty T grad_y g at z,
  T (grad_y f + grad_y g) at y, 3T axpys, grad_xy f, 2 grad_xy g and the forward of f for the
  upper_objective metric;
- the same calls made back to back by the benchmark ("kernels in sequence"), timed in the same
  interleaving: measured / sequence is the engine's own overhead, free of the bias that summing
  medians of short calls has on a loaded machine (a long call collects more interruptions).

Modes a model cannot differentiate natively (the fused attention kernels have no forward-mode
derivative and no double backward) are listed as n/a; the transformer is also run with attention
pinned to the math backend, where every mode works (what ``hypergrad.kernels`` falls back to).
On CPU the transformer rows are kernels only (its engine steps would break the 5-minute budget).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.bench import common, models
from hypergrad import CG, F2SA, Functions, Neumann, Penalty, kernels, outer, solvers
from hypergrad import tree as T
from hypergrad.engine import Engine
from hypergrad.tree import Tree

INNER_STEPS = 5
KS = (1, 5, 20)
ARITHMETIC = 20  # iterations of the solvers' arithmetic timed alone
BATCH = 64


@dataclass
class Config:
    """One network as an L2 problem, run under ``context`` (the attention backend)."""

    name: str
    net: Callable[[], torch.nn.Module]
    context: Callable[[], AbstractContextManager] = nullcontext
    engines: bool = True
    notes: list[str] = field(default_factory=list)


def _math_attention() -> AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def configs(device: torch.device, quick: bool) -> list[Config]:
    """The networks: MLP, CNN, transformer with its default attention and with math attention."""
    if quick:  # tiny sizes: a smoke test of the script, not a result
        mlp, cnn = (lambda: models.mlp(width=16)), (lambda: models.cnn(channels=2))
        transformer = lambda: models.TransformerClassifier(d_model=16, heads=2)  # noqa: E731
        names = ("MLP 784-16-16-10", "CNN (2 channels)", "transformer block (d 16)")
    else:
        mlp, cnn, transformer = models.mlp, models.cnn, models.TransformerClassifier
        names = ("MLP 784-256-256-10", "CNN (16 channels)", "transformer block (d 128)")
    on_gpu = device.type == "cuda"
    return [
        Config(names[0], mlp),
        Config(names[1], cnn, engines=not quick),
        Config(names[2], transformer, engines=False),
        Config(f"{names[2]}, math attention", transformer, _math_attention, engines=on_gpu),
    ]


def _within(context: Callable[[], AbstractContextManager], fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with context():
            return fn()
    return run


def native_modes(fns: Functions, x: Tree, y: Tree, batch: Any, v: Tree) -> dict[str, str]:
    """Mode -> "" if the model differentiates it natively, else the reason (PyTorch's error, shortened)."""
    found = {}
    for mode in kernels.HVP_MODES:
        try:
            kernels.hvp_in_mode(fns.g, x, y, batch, v, mode)
            found[mode] = ""
        except (NotImplementedError, RuntimeError) as err:
            found[mode] = "n/a: " + str(err).split("\n")[0].split(" that ")[0][:90]
    return found


def kernel_cases(fns: Functions, x: Tree, y: Tree, batches: tuple[Any, Any], v: Tree,
                 modes: list[str]) -> dict[str, Callable[[], Any]]:
    """Name -> a zero-argument call of one kernel at (x, y)."""
    lower, upper = batches
    pullback = kernels.linearize(fns.g, x, y, lower)
    opt = outer.init("adam", x)
    step = torch.ones((), dtype=torch.int64, device=next(iter(x.values())).device)
    cases: dict[str, Callable[[], Any]] = {
        "forward g": lambda: fns.g(x, y, lower),
        "gradient grad_y g": lambda: kernels.grad_y(fns.g, x, y, lower),
        "gradient grad_y f": lambda: kernels.grad_y(fns.f, x, y, upper),
        "gradient grad_xy f": lambda: kernels.grad_xy(fns.f, x, y, upper),
        "gradient grad_xy g": lambda: kernels.grad_xy(fns.g, x, y, lower),
        "forward f": lambda: fns.f(x, y, upper),
    }
    for mode in modes:
        cases[f"HVP {mode}"] = lambda m=mode: kernels.hvp_in_mode(fns.g, x, y, lower, v, m)
    if "reverse-over-reverse" in modes:
        # The torch.func route (under vmap or compile): a pullback in (x, y), products through it.
        cases["operator graph (linearize)"] = lambda: kernels.linearize(fns.g, x, y, lower)
        cases["operator product (kept graph)"] = lambda: pullback(v)
        # The plain eager route (what engine.step runs here): grad_y g recorded by torch.autograd in (x, y), each
        # product one reverse pass to y, J v one to x through the same graph.
        recorded = kernels.hvp_operator(fns.g, x, y, lower)
        cases["operator graph (recorded in x, y)"] = lambda: kernels.hvp_operator(fns.g, x, y, lower)
        cases["operator product (recorded graph)"] = lambda: recorded(v)
        cases["mixed VJP (recorded graph)"] = lambda: kernels.mixed_vjp(fns.g, x, y, lower, v, operator=recorded)
    cases["mixed VJP"] = lambda: kernels.mixed_vjp(fns.g, x, y, lower, v)
    cases["outer Adam update"] = lambda: outer.update("adam", x, v, opt, 0.01, step)
    cases["tree axpy (an inner step's update)"] = lambda: T.axpy(-0.1, v, y)
    # The solvers' own arithmetic (dots, axpys, masks) with a free matvec: their cost beyond the HVPs.
    cases[f"CG arithmetic, {ARITHMETIC} iterations"] = lambda: _cg_arithmetic(v, ARITHMETIC)
    cases[f"Neumann arithmetic, {ARITHMETIC} terms"] = lambda: _neumann_arithmetic(v, ARITHMETIC)
    return cases


def _cg_arithmetic(v: Tree, iters: int) -> Any:
    return solvers.cg(lambda p: p, v, iters=iters, v0=v)


def _neumann_arithmetic(v: Tree, terms: int) -> Any:
    return solvers.neumann(lambda p: p, v, terms=terms, alpha=0.01)


def engines(quick: bool) -> dict[str, tuple[Engine, int]]:
    """Name -> (engine, K) for the steps timed; K = 0 for the first-order engines."""
    t = 2 if quick else INNER_STEPS
    ks = (1,) if quick else KS
    found: dict[str, tuple[Engine, int]] = {}
    for k in ks:
        found[f"CG K={k}"] = (CG(iters=k, inner_steps=t), k)
    for k in ks:
        found[f"Neumann K={k}"] = (Neumann(terms=k, inner_steps=t, alpha=0.01), k)
    found[f"F2SA T={t}"] = (F2SA(inner_steps=t), 0)
    found[f"Penalty T={t}"] = (Penalty(inner_steps=t), 0)
    return found


def engine_cases(fns: Functions, x: Tree, y: Tree, batches: tuple[Any, Any], v: Tree,
                 chosen: dict[str, tuple[Engine, int]]) -> dict[str, Callable[[], Any]]:
    """Name -> one ``engine.step`` from the same initial state (pure: every call does the same work), and
    "<name> kernels" -> the kernels of its account called in sequence at (x, y) (no engine around them)."""
    cases = {}
    for name, (engine, k) in chosen.items():
        state = engine.init(fns, x, y)
        cases[name] = lambda e=engine, s=state: e.step(fns, s, batches)
        cases[f"{name} kernels"] = lambda e=engine, k_=k: _account_sequence(fns, x, y, batches, v, e, k_)
    return cases


def _account_sequence(fns: Functions, x: Tree, y: Tree, batches: tuple[Any, Any], v: Tree, engine: Engine,
                      k: int) -> None:
    """The oracle calls of ``predictions``' account, one after another, at fixed (x, y)."""
    lower, upper = batches
    for _ in range(engine.inner_steps):
        kernels.grad_y(fns.g, x, y, lower)
        T.axpy(-0.1, v, y)
    if isinstance(engine, (CG, Neumann)):
        kernels.grad_xy(fns.f, x, y, upper)
        operator = kernels.hvp_operator(fns.g, x, y, lower)
        for _ in range(k + 1 if isinstance(engine, CG) else k):
            operator(v)
        _cg_arithmetic(v, k) if isinstance(engine, CG) else _neumann_arithmetic(v, k)
        kernels.mixed_vjp(fns.g, x, y, lower, v, operator=operator)
        step = torch.ones((), dtype=torch.int64, device=next(iter(x.values())).device)
        outer.update("adam", x, v, outer.init("adam", x), 0.01, step)
        return
    for _ in range(engine.inner_steps):
        kernels.grad_y(fns.f, x, y, upper)
        kernels.grad_y(fns.g, x, y, lower)
        T.axpy(-0.1, v, T.axpy(1.0, v, y))
    kernels.grad_xy(fns.f, x, y, upper)
    kernels.grad_xy(fns.g, x, y, lower)
    kernels.grad_xy(fns.g, x, y, lower)
    fns.f(x, y, upper)


def predictions(t: dict[str, float], engine: Engine, k: int, default: str) -> tuple[float, float]:
    """(oracle formula, account of the step) in seconds, from the measured kernel times ``t``."""
    steps, axpy = engine.inner_steps, t["tree axpy (an inner step's update)"]
    if isinstance(engine, (CG, Neumann)):
        formula = (steps + 2) * t["gradient grad_y g"] + k * t[f"HVP {default}"] + t["mixed VJP"]
        cg = isinstance(engine, CG)
        products = k + 1 if cg else k  # CG's warm-start residual; Neumann's residual is its last term's, free
        if default == "reverse-over-reverse":
            solve = (t["operator graph (recorded in x, y)"] + products * t["operator product (recorded graph)"]
                     + t["mixed VJP (recorded graph)"])
        else:
            solve = products * t[f"HVP {default}"] + t["mixed VJP"]
        arithmetic = t[f"CG arithmetic, {ARITHMETIC} iterations" if cg
                       else f"Neumann arithmetic, {ARITHMETIC} terms"] * k / ARITHMETIC
        account = (steps * (t["gradient grad_y g"] + axpy) + t["gradient grad_xy f"] + solve + arithmetic
                   + t["outer Adam update"])
        return formula, account
    formula = (3 * steps + 3) * t["gradient grad_y g"]
    account = (steps * (2 * t["gradient grad_y g"] + t["gradient grad_y f"] + 3 * axpy) + t["gradient grad_xy f"]
               + 2 * t["gradient grad_xy g"] + t["forward f"])
    return formula, account


@dataclass
class Measured:
    """What one network's run found: median seconds and peak bytes per case, and the modes it differentiates."""

    config: Config
    parameters: int
    times: dict[str, float]
    peaks: dict[str, int]
    native: dict[str, str]
    chosen: dict[str, tuple[Engine, int]]

    @property
    def unit(self) -> float:
        return self.times["gradient grad_y g"]

    @property
    def modes(self) -> list[str]:
        return [m for m, why in self.native.items() if not why]

    def ratio(self, name: str) -> float:
        return self.times[name] / self.unit


def measure(config: Config, device: torch.device, args: argparse.Namespace) -> Measured:
    """Time (interleaved) and measure the peak memory of every case of one network."""
    torch.manual_seed(0)
    fns, x, y, batches = models.l2_problem(config.net(), batch_size=8 if args.quick else BATCH, device=device)
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen).to(t) for k, t in y.items()}
    chosen = engines(args.quick) if config.engines else {}
    with config.context():  # the operator's graph is recorded here: on the config's attention backend
        native = native_modes(fns, x, y, batches[0], v)
        modes = [m for m, why in native.items() if not why]
        cases = kernel_cases(fns, x, y, batches, v, modes)
        if "reverse-over-reverse" not in modes:
            chosen = {}  # the accounts need the operator rows
        cases.update(engine_cases(fns, x, y, batches, v, chosen))
    cases = {name: _within(config.context, fn) for name, fn in cases.items()}
    heavy = config.name.startswith("transformer") and device.type == "cpu"
    warmup, repeats = (1, min(args.repeats, 5)) if heavy else (args.warmup, args.repeats)
    times = common.interleaved_medians(cases, device, warmup, repeats)
    peaks = {name: common.peak_bytes(fn, device) for name, fn in cases.items() if not name.endswith(" kernels")}
    return Measured(config, sum(t.numel() for t in y.values()), times, peaks, native, chosen)


def section(m: Measured, device: torch.device) -> str:
    """The markdown of one network: the kernel table, the HVP verdict, the engine-step table."""
    default = kernels.default_hvp_mode(device)
    rows = [[name, m.times[name] * 1e3, m.ratio(name), common.mib(m.peaks[name])]
            for name in m.peaks if name not in m.chosen]
    rows += [[f"HVP {mode}", why, "n/a", "n/a"] for mode, why in m.native.items() if why]
    lines = [f"### {m.config.name}", "", f"{m.parameters} lower parameters; one gradient = {m.unit * 1e3:.3g} ms; "
             f"HVP modes native here: {', '.join(m.modes) or 'none'}.", ""]
    lines += [common.markdown_table(["kernel", "time (ms)", "x gradient", "peak (MiB)"], rows), ""]
    hvps = {mode: m.ratio(f"HVP {mode}") for mode in m.modes}
    if hvps:
        fastest = min(hvps, key=hvps.get)
        verdict = f"Fastest standalone HVP: {fastest} ({hvps[fastest]:.2f} gradients)."
        if default in hvps:
            verdict += f" The kernels default on {device.type}, {default}: {hvps[default]:.2f} gradients standalone"
            if default == "reverse-over-reverse":
                verdict += (f", {m.ratio('operator product (recorded graph)'):.2f} per product of hvp_operator "
                            f"eagerly ({m.ratio('operator product (kept graph)'):.2f} on torch.func's pullback)")
            verdict += "."
        lines += [verdict, ""]
    if m.chosen:
        rows = []
        for name, (engine, k) in m.chosen.items():
            formula, account = predictions(m.times, engine, k, default)
            step, sequence = m.times[name], m.times[f"{name} kernels"]
            rows.append([name, step * 1e3, step / m.unit, formula / m.unit, step / formula, account / m.unit,
                         step / account, sequence / m.unit, step / sequence, common.mib(m.peaks[name])])
        headers = ["engine step", "time (ms)", "x gradient", "formula (x grad)", "measured / formula",
                   "account (x grad)", "measured / account", "kernels in sequence (x grad)", "measured / sequence",
                   "peak (MiB)"]
        lines += [common.markdown_table(headers, rows), ""]
    return "\n".join(lines)


def summary(found: list[Measured], device: torch.device) -> str:
    """The targets of the issue, one line per network."""
    default = kernels.default_hvp_mode(device)
    rows = []
    for m in found:
        if default not in m.modes:
            continue
        row = [m.config.name, m.ratio(f"HVP {default}"),
               m.ratio("operator product (recorded graph)") if default == "reverse-over-reverse" else "-"]
        row += _worst_ift_ratios(m, default)
        rows.append(row)
    headers = [f"network ({device.type}, HVP mode {default})", "HVP standalone (x grad; target <= 2.5 on CPU)",
               "HVP in an eager solve (x grad)", "IFT worst measured / formula", "IFT worst measured / account",
               "IFT worst measured / kernels in sequence"]
    return common.markdown_table(headers, rows)


def _worst_ift_ratios(m: Measured, default: str) -> list[float | str]:
    """The largest measured / formula, measured / account and measured / sequence over the IFT steps."""
    ratios = [(m.times[name] / predictions(m.times, engine, k, default)[0],
               m.times[name] / predictions(m.times, engine, k, default)[1],
               m.times[name] / m.times[f"{name} kernels"])
              for name, (engine, k) in m.chosen.items() if isinstance(engine, (CG, Neumann))]
    return [max(column) for column in zip(*ratios, strict=True)] if ratios else ["-", "-", "-"]


def plot(found: list[Measured], path: Path) -> None:
    """Bars of the HVP modes, the operator product and the mixed VJP in gradients, per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"HVP {mode}" for mode in kernels.HVP_MODES] + ["operator product (kept graph)", "mixed VJP"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(found), 1)
    for i, m in enumerate(found):
        heights = [m.ratio(n) if n in m.times else 0.0 for n in names]
        ax.bar([j + i * width for j in range(len(names))], heights, width, label=m.config.name)
    labels = [n.replace("HVP ", "").replace(" (kept graph)", "") for n in names]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], labels, rotation=15, ha="right", fontsize=7)
    ax.axhline(2.5, color="gray", linestyle="--", linewidth=0.8)
    ax.set_ylabel("cost (gradients)")
    ax.set_title("Second-order kernels as multiples of one gradient", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(warmup=1, repeats=7)  # the engine steps are long: the whole CPU run stays under 5 minutes
    p.add_argument("--out", type=Path, help="folder for kernels.md and the plot (default: experiments/results/speed; "
                   "with --quick a fresh temporary folder, so a smoke run never replaces the committed table)")
    args = p.parse_args(argv)
    args.out = args.out or (Path(tempfile.mkdtemp(prefix="kernels_quick_")) if args.quick else common.RESULTS / "speed")
    device = common.setup(args)
    command = "python -m experiments.bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    found = []
    for config in configs(device, args.quick):
        found.append(measure(config, device, args))
        print(section(found[-1], device), flush=True)
    header = [
        "# Kernel cost", "", common.environment(device), "", f"Regenerate: `{command.strip()}`", "",
        f"Per-parameter L2 problems (experiments/bench/models.py), batch {8 if args.quick else BATCH}; medians of "
        f"{args.repeats} interleaved repetitions after {args.warmup} warm-up (the transformer on CPU: at most 5 "
        "after 1). \"x gradient\" = time / one gradient (kernels.grad_y of g). Engine steps: inner_steps "
        f"T = {2 if args.quick else INNER_STEPS}, one engine.step from a fixed state. \"formula\": IFT (T + 2) "
        "gradients + K standalone HVPs + 1 mixed VJP, F2SA/Penalty 3T + 3 gradients. \"account\": what the step "
        "runs eagerly, from the kernel rows: IFT T (gradients + axpy) + grad_xy f + the operator's graph recorded "
        "in (x, y) + K products (CG: K + 1, its warm-start residual) + K iterations of the solver's arithmetic + "
        "J v through the same graph + Adam; "
        "F2SA/Penalty T grad_y g at z + T (grad_y f + grad_y g) at y + 3T axpys + grad_xy f + 2 grad_xy g "
        "+ forward f (a metric). \"kernels in sequence\": "
        "those same calls made back to back by the benchmark, timed in the same interleaving, so measured / "
        "sequence is the engine's own overhead (tree arithmetic, state) free of the bias of summing medians of "
        "short calls on a loaded machine. Peak = memory allocated during the call above what was alive before.", "",
        "## Targets", "", summary(found, device), "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.md"
    path.write_text("\n".join(header + ["## Per network", ""] + [section(m, device) for m in found]))
    plot(found, args.out / "kernels.png")
    return path


if __name__ == "__main__":
    main()
