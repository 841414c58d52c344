"""Unrolled vs implicit memory: peak memory and time per outer step against T (unroll) or K (solver).

    python -m experiments.bench.memory --device cpu --threads 1      (or --device cuda)

On the per-parameter L2 problem of the MLP 784-256-256-10 (``experiments/bench/models.py``, batch 64):

1. Sweep: ``Unrolled(inner_steps=T)`` and ``CG(iters=K)`` / ``Neumann(terms=K)`` (inner_steps 10) for
   T, K in {1, 5, 10, 20, 50, 100}: the peak memory of one ``engine.step`` (``common.peak_bytes``) and
   its median time (interleaved; the T, K >= 50 cases with fewer repetitions).
2. The predicted per-step slope of Unrolled: one parameter copy y_t plus what autograd keeps for one
   differentiated gradient step of g (counted with ``saved_tensors_hooks``: the storages saved by the
   step's forward and backward that are still alive, i.e. reachable from y_{t+1}), against the
   least-squares slope of the measured peaks over T.
3. Time per inner step against its index: a linear fit of the step time over T (the fit on T <= 20
   extrapolated to T = 100), and the wall time of each forward step inside one T = 100 unroll.
4. Back to baseline: the live bytes after each of 200 outer steps of Unrolled(T=10), CG(K=10) and
   Neumann(K=10), in one tracking session spanning the run (on CUDA: ``memory_allocated``).
5. Truncation: ``Unrolled(inner_steps=100, truncate=k)`` for k in {1, 5, 10, 20} against ``Unrolled(T=k)``.
6. Why ``Unrolled`` under a transform (vmap, compile) takes its reverse pass by ``vjp``: the peak of the
   same unroll differentiated by ``torch.func.grad`` (which runs the backward inside its transform with
   create_graph) and by the pullback of ``torch.func.vjp``. On plain eager calls it unrolls on autograd's
   tape and takes one ``autograd.grad`` without create_graph, which records nothing either.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import grad, vjp
from torch.utils._pytree import tree_leaves

from experiments.bench import common, models
from hypergrad import CG, Functions, Neumann, Unrolled, kernels
from hypergrad import tree as T
from hypergrad.engine import Engine
from hypergrad.tree import Tree

STEPS = (1, 5, 10, 20, 50, 100)
TRUNCATIONS = (1, 5, 10, 20)
IFT_INNER_STEPS = 10
LONG_RUN_STEPS = 200
LR = 0.1
BIG = 50  # sweep cases with T or K >= BIG are timed with fewer repetitions (each costs seconds on CPU)


@dataclass
class Sizes:
    """What one run measures (full or --quick)."""

    steps: tuple[int, ...] = STEPS
    truncations: tuple[int, ...] = TRUNCATIONS
    long_run: int = LONG_RUN_STEPS
    long_run_unroll: int = 10
    long_run_k: int = 10
    ift_inner: int = IFT_INNER_STEPS
    width: int = 256
    depth: int = 2

    @property
    def truncate_from(self) -> int:
        return self.steps[-1]


QUICK = Sizes(steps=(1, 2, 4), truncations=(1, 2), long_run=6, long_run_unroll=2, long_run_k=2, ift_inner=2,
              width=16, depth=1)


@dataclass
class Results:
    peaks: dict[tuple[str, int], int] = field(default_factory=dict)
    times: dict[tuple[str, int], float] = field(default_factory=dict)
    saved: dict[str, int] = field(default_factory=dict)
    param_bytes: int = 0
    forward_steps: list[float] = field(default_factory=list)
    forward_faults: list[float] = field(default_factory=list)
    unrolled_clock: dict[int, float] = field(default_factory=dict)
    unrolled_faults: dict[int, float] = field(default_factory=dict)
    backward_total: float = 0.0
    live: dict[str, list[int]] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    truncated: dict[int, int] = field(default_factory=dict)
    grad_vs_vjp: dict[tuple[str, int], int] = field(default_factory=dict)


def make_engine(name: str, n: int, sizes: Sizes, truncate: int | None = None, inner: int | None = None) -> Engine:
    """Unrolled(T=n), CG(K=n) or Neumann(K=n), the IFT ones with ``inner`` (default ``sizes.ift_inner``) inner steps."""
    inner = sizes.ift_inner if inner is None else inner
    if name == "Unrolled":
        return Unrolled(inner_steps=n, inner_lr=LR, truncate=truncate)
    if name == "CG":
        return CG(iters=n, inner_steps=inner, inner_lr=LR)
    return Neumann(terms=n, inner_steps=inner, inner_lr=LR)


ENGINES = ("Unrolled", "CG", "Neumann")


# -- 1. the sweep ------------------------------------------------------------------------------------

def sweep(problem: tuple, sizes: Sizes, device: torch.device, warmup: int, repeats: int, out: Results) -> None:
    """Peak bytes and median time of one outer step for every engine and T or K."""
    fns, x, y, batches = problem
    cases: dict[tuple[str, int], Callable[[], Any]] = {}
    for n in sizes.steps:
        for name in ENGINES:
            engine = make_engine(name, n, sizes)
            state = engine.init(fns, x, y)
            cases[(name, n)] = lambda e=engine, s=state: e.step(fns, s, batches)
    for key, fn in cases.items():
        out.peaks[key] = common.peak_bytes(fn, device)
    small = {f"{k}": fn for k, fn in cases.items() if k[1] < BIG}
    big = {f"{k}": fn for k, fn in cases.items() if k[1] >= BIG}
    times = common.interleaved_medians(small, device, warmup, repeats)
    if big:
        times |= common.interleaved_medians(big, device, min(warmup, 1), max(1, (repeats + 1) // 2))
    out.times = {k: times[f"{k}"] for k in cases}


# -- 2. what autograd keeps per differentiated step ---------------------------------------------------

def saved_per_step(fns: Functions, x: Tree, y: Tree, batch: Any) -> dict[str, int]:
    """Bytes autograd keeps alive for one differentiated step y_{t+1} = y_t - a grad_y g(x, y_t).

    Plain autograd (the formulas ``torch.func`` runs too): one step first, so the measured step starts
    from a non-leaf y_t as inside an unroll; then every storage the second step saves for backward
    (``saved_tensors_hooks``) that did not exist before it and is still alive once the step returns,
    i.e. is held by the graph reachable from y_{t+1}. Returns bytes split into ``parameter-shaped``
    (a saved tensor with the shape and size of a leaf of y) and ``activations`` (the rest: batch-sized
    tensors), and ``y copy``, the bytes of y_{t+1} itself.
    """
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    shapes = {(tuple(v.shape), v.untyped_storage().nbytes()) for v in y.values()}

    def step(yt: Tree) -> Tree:
        gy = torch.autograd.grad(fns.g(xs, yt, batch), list(yt.values()), create_graph=True)
        return {k: v - LR * g for (k, v), g in zip(yt.items(), gy, strict=True)}

    y1 = step({k: v.detach().clone().requires_grad_() for k, v in y.items()})
    before = [t for t in [*xs.values(), *y1.values(), *tree_leaves(batch)] if isinstance(t, torch.Tensor)]
    existing = {t.untyped_storage().data_ptr() for t in before}
    kept: dict[int, tuple[weakref.ref, tuple[int, ...], int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            kept[storage.data_ptr()] = (weakref.ref(storage), tuple(t.shape), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y2 = step(y1)
    gc.collect()
    split = {"parameter-shaped": 0, "activations": 0}
    for ref, shape, nbytes in kept.values():
        if ref() is not None:
            split["parameter-shaped" if (shape, nbytes) in shapes else "activations"] += nbytes
    split["y copy"] = sum(v.untyped_storage().nbytes() for v in y2.values())
    return split


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return slope, my - slope * mx


# -- 3. time of each step inside one unroll ------------------------------------------------------------

def clock(device: torch.device) -> Callable[[], float]:
    """The clock the step-index measurements read: CPU time of the process on CPU, wall time on CUDA.

    On a shared CPU the wall time of a step of a few ms doubles whenever another process takes the
    core; the process's CPU time counts only the work done, which is what could grow with the index.
    """
    if device.type == "cuda":
        def wall() -> float:
            common.synchronize(device)
            return time.perf_counter()
        return wall
    return time.process_time


def unrolled_times(problem: tuple, steps: tuple[int, ...], device: torch.device,
                   repeats: int) -> tuple[dict[int, float], dict[int, float]]:
    """T -> median ``clock`` seconds of one ``Unrolled(inner_steps=T).step``, over ``repeats`` after one warm-up;
    T -> the median count of minor page faults (fresh pages from the OS) during the step."""
    fns, x, y, batches = problem
    now, out, faults = clock(device), {}, {}
    for n in steps:
        engine = Unrolled(inner_steps=n, inner_lr=LR)
        state = engine.init(fns, x, y)
        engine.step(fns, state, batches)
        runs, counts = [], []
        for _ in range(repeats):
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, now()
            engine.step(fns, state, batches)
            runs.append(now() - start)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        out[n], faults[n] = statistics.median(runs), statistics.median(counts)
    return out, faults


def step_times(problem: tuple, steps: int, device: torch.device,
               repeats: int) -> tuple[list[float], list[float], float]:
    """(``clock`` seconds of the forward of steps 1..T-1 of an Unrolled estimate, their minor page faults,
    seconds of step T + f + the reverse pass).

    g is wrapped to stamp the clock (and the process's count of minor page faults: memory the OS
    hands over for the first time) at every call: the unroll calls it once per step, and one more
    stamp follows the reverse pass (the estimate's return), so consecutive stamps bracket the steps.
    Medians per step index over ``repeats`` estimates after one warm-up.
    """
    fns, x, y, batches = problem
    stamps: list[tuple[float, int]] = []
    now = clock(device)

    def g(x_: Tree, y_: Tree, batch: Any) -> torch.Tensor:
        stamps.append((now(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
        return fns.g(x_, y_, batch)

    timed = Functions(f=fns.f, g=g, name=fns.name)
    engine = Unrolled(inner_steps=steps, inner_lr=LR)
    state = engine.init(timed, x, y)
    engine.estimate(timed, state, batches)  # warm-up
    runs, faults = [], []
    for _ in range(repeats):
        stamps.clear()
        engine.estimate(timed, state, batches)
        stamps.append((now(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
        pairs = list(zip(stamps[:steps], stamps[1 : steps + 1], strict=True))
        runs.append([b[0] - a[0] for a, b in pairs])
        faults.append([b[1] - a[1] for a, b in pairs])
    per_index = [statistics.median(column) for column in zip(*runs, strict=True)]
    per_index_faults = [statistics.median(column) for column in zip(*faults, strict=True)]
    return per_index[:-1], per_index_faults[:-1], per_index[-1]


# -- 4. live bytes over a long run ---------------------------------------------------------------------

def state_bytes(state: Any) -> int:
    """Bytes of the distinct storages of the tensors in a state (a pytree)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tree_leaves(state) if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def long_run(problem: tuple, engine: Engine, steps: int, device: torch.device) -> tuple[list[int], int]:
    """(bytes alive after each of ``steps`` outer steps, bytes of the final state).

    CPU: one ``common.LiveBytes`` session spans the run, so the count after a step is every byte made
    during the run and still alive (the state is kept; the metrics are dropped). CUDA: the allocator's
    ``memory_allocated`` above what was allocated before the run.
    """
    fns, x, y, batches = problem
    live: list[int] = []
    if device.type == "cuda":
        common.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        state = engine.init(fns, x, y)
        for _ in range(steps):
            state, _ = engine.step(fns, state, batches)
            common.synchronize(device)
            live.append(torch.cuda.memory_allocated(device) - base)
        return live, state_bytes(state)
    with common.LiveBytes() as mode:
        state = engine.init(fns, x, y)
        for _ in range(steps):
            state, _ = engine.step(fns, state, batches)
            live.append(mode.live)
    return live, state_bytes(state)


# -- 6. grad against vjp for the reverse pass over an unroll -------------------------------------------

def unroll_peak(problem: tuple, steps: int, how: str, device: torch.device) -> int:
    """Peak bytes of d f(x, y_T(x)) / dx over ``steps`` differentiated steps, by ``grad`` or ``vjp``."""
    fns, x, y, (lower, upper) = problem

    def upper_after_unroll(x_: Tree) -> torch.Tensor:
        yt = y
        for _ in range(steps):
            gy, _ = kernels.grad_y(fns.g, x_, yt, lower)
            yt = T.axpy(-LR, gy, yt)
        return fns.f(x_, yt, upper)

    def by_vjp() -> Tree:
        value, pullback = vjp(upper_after_unroll, x)
        return pullback(torch.ones_like(value), retain_graph=False)[0]

    return common.peak_bytes(by_vjp if how == "vjp" else lambda: grad(upper_after_unroll)(x), device)


# -- the run, the report, the plots --------------------------------------------------------------------

def run(sizes: Sizes, device: torch.device, warmup: int, repeats: int) -> Results:
    torch.manual_seed(0)
    problem = models.l2_problem(models.mlp(width=sizes.width, depth=sizes.depth), device=device)
    fns, x, y, batches = problem
    out = Results(param_bytes=state_bytes(y))
    sweep(problem, sizes, device, warmup, repeats, out)
    print("sweep done", flush=True)
    out.saved = saved_per_step(fns, x, y, batches[0])
    fewer = max(1, (repeats + 1) // 2)
    out.forward_steps, out.forward_faults, out.backward_total = step_times(problem, sizes.steps[-1], device, fewer)
    out.unrolled_clock, out.unrolled_faults = unrolled_times(problem, sizes.steps, device, fewer)
    for name in ENGINES:
        # One inner step for the IFT engines: undifferentiated steps keep nothing, and 10 would double the run.
        engine = make_engine(name, sizes.long_run_unroll if name == "Unrolled" else sizes.long_run_k, sizes, inner=1)
        out.live[name], out.state_bytes[name] = long_run(problem, engine, sizes.long_run, device)
    print("long run done", flush=True)
    for k in sizes.truncations:
        engine = make_engine("Unrolled", sizes.truncate_from, sizes, truncate=k)
        state = engine.init(fns, x, y)
        out.truncated[k] = common.peak_bytes(lambda e=engine, s=state: e.step(fns, s, batches), device)
    for n in sizes.steps[1:3]:
        for how in ("grad", "vjp"):
            out.grad_vs_vjp[(how, n)] = unroll_peak(problem, n, how, device)
    return out


def _r2(xs: list[float], ys: list[float], slope: float, intercept: float) -> float:
    my = sum(ys) / len(ys)
    total = sum((b - my) ** 2 for b in ys)
    resid = sum((b - slope * a - intercept) ** 2 for a, b in zip(xs, ys, strict=True))
    return 1.0 - resid / total if total else 1.0


def report(r: Results, sizes: Sizes, device: torch.device, command: str, warmup: int, repeats: int) -> str:
    mib, steps = common.mib, sizes.steps
    lines = ["# Unrolled vs implicit memory", "", common.environment(device), "", f"Regenerate: `{command}`", "",
             f"Per-parameter L2 problem on the MLP 784-{'-'.join([str(sizes.width)] * sizes.depth)}-10 "
             f"(experiments/bench/models.py), batch 64, float32; parameters P = {mib(r.param_bytes):.3f} MiB. "
             f"Unrolled(inner_steps=T, inner_lr={LR}) differentiates all T steps; CG(iters=K) and "
             f"Neumann(terms=K) run {sizes.ift_inner} undifferentiated inner steps. Peak = bytes allocated "
             "during one `engine.step` above what was alive before it (CPU: live tensor storages tracked by "
             "a dispatch mode; CUDA: the allocator). Times: medians of "
             f"{repeats} interleaved repetitions after {warmup} warm-up (T, K >= {BIG}: "
             f"{max(1, (repeats + 1) // 2)} after {min(warmup, 1)}).", "",
             "## Peak memory and time per outer step", ""]
    rows = [[n] + [mib(r.peaks[(e, n)]) for e in ENGINES] + [r.times[(e, n)] * 1e3 for e in ENGINES] for n in steps]
    lines += [common.markdown_table(["T or K"] + [f"{e} peak (MiB)" for e in ENGINES]
                                    + [f"{e} time (ms)" for e in ENGINES], rows), "",
              "CG's and Neumann's peaks are one gradient graph of g (the reverse-over-reverse HVP operator of "
              "hypergrad.kernels keeps it for the whole solve, so each product is one reverse pass) plus a fixed "
              "set of y-sized vectors (v, r, p, H p for CG; the term and the sum for Neumann), whatever K; CG at "
              "K = 1 holds one pair of vectors fewer than from K = 2 on. Unrolled's peak is all T steps' graphs "
              "at once, when its reverse pass starts.", ""]

    # Slope of Unrolled's peak against the prediction.
    xs = [float(n) for n in steps]
    peaks = [float(r.peaks[("Unrolled", n)]) for n in steps]
    slope, intercept = least_squares(xs, peaks)
    s = r.saved
    predicted = s["y copy"] + s["parameter-shaped"] + s["activations"]
    naive = s["y copy"] + s["activations"]
    lines += ["## Unrolled: memory per differentiated step", "",
              common.markdown_table(["quantity", "MiB", "x P"], [
                  ["y_t (one parameter copy)", mib(s["y copy"]), s["y copy"] / r.param_bytes],
                  ["activations kept by one grad step of g", mib(s["activations"]), s["activations"] / r.param_bytes],
                  ["parameter-shaped tensors kept by one grad step", mib(s["parameter-shaped"]),
                   s["parameter-shaped"] / r.param_bytes],
                  ["predicted slope (sum)", mib(predicted), predicted / r.param_bytes],
                  ["measured slope (least squares over T)", mib(int(slope)), slope / r.param_bytes],
              ]), "",
              f"Measured / predicted slope: {slope / predicted:.3f}; R^2 of the linear fit "
              f"{_r2(xs, peaks, slope, intercept):.5f}; "
              f"intercept {mib(int(intercept)):.2f} MiB. The rule of thumb 'one activation set plus one parameter "
              f"copy' gives {mib(naive):.2f} MiB/step: measured / that = {slope / naive:.2f}.", "",
              "Notes: the prediction counts, with `torch.autograd.graph.saved_tensors_hooks`, the storages one "
              "differentiated step y_{t+1} = y_t - a grad_y g(x, y_t) saves (forward and the backward that "
              "computes grad_y g, recorded because the reverse pass over the unroll needs it) and that are still "
              "alive after the step (reachable from y_{t+1}), plus y_{t+1}. On this problem the activations are "
              "small (the MLP has 784x256 weights but a batch of 64 rows), and the dominant term is "
              "parameter-shaped: the decay term 1/2 sum exp(x) y^2 of g keeps, per step, exp(x) (recomputed in "
              "every call of g; x is what the hypergradient differentiates) and the two factors of the decay's "
              "gradient (1/2 exp(x)) * (2 y), which the reverse pass over the step needs - three parameter copies "
              "that a lower objective not coupling x to every weight would not pay. The forward's own y^2 is saved "
              "too, but freed with the value of g, which nothing differentiates. The weight gradients of the "
              "network keep only batch-sized tensors (ReLU outputs and masks, softmax, the backward's "
              "grad-outputs): those are the activations row.", ""]

    # Time per step against the index.
    t_un = [r.unrolled_clock[n] for n in steps]
    tslope, tint = least_squares(xs, t_un)
    small = [i for i, n in enumerate(steps) if n <= 20] or list(range(len(steps)))
    sslope, sint = least_squares([xs[i] for i in small], [t_un[i] for i in small])
    extrapolated = sslope * xs[-1] + sint
    fw = r.forward_steps
    half = max(1, len(fw) // 2)  # halves, not deciles: a burst of load on the shared machine spans several steps
    first, last = statistics.median(fw[:half]), statistics.median(fw[-half:])
    index_slope, _ = least_squares([float(i) for i in range(len(fw))], fw)
    faulted = [i for i, n in enumerate(r.forward_faults) if n > 0]
    clean = [(i, t) for i, t in enumerate(fw) if i not in faulted]
    clean_first = statistics.median([t for i, t in clean if i < half] or [float("nan")])
    clean_last = statistics.median([t for i, t in clean if i >= len(fw) - half] or [float("nan")])
    what = "wall" if device.type == "cuda" else "CPU"
    lines += ["## Time per inner step against the step index", "",
              f"Times in this section are the process's {what} time (see the method below).", "",
              common.markdown_table(["quantity", "value"], [
                  ["Unrolled outer step, least-squares slope over T (ms per inner step)", tslope * 1e3],
                  ["intercept (ms: f, the metric gradient, the outer update)", tint * 1e3],
                  ["R^2 of the linear fit", _r2(xs, t_un, tslope, tint)],
                  [f"T = {steps[-1]}: measured / extrapolated from the fit on T <= 20", t_un[-1] / extrapolated],
                  [f"forward step time in a T = {steps[-1]} unroll, median of steps 1-{half} (ms)", first * 1e3],
                  [f"forward step time, median of the last {half} steps (ms)", last * 1e3],
                  ["last half / first half", last / first],
                  ["least-squares change of the forward step time over the unroll, relative to its mean",
                   index_slope * len(fw) / statistics.mean(fw)],
                  ["forward steps that took fresh pages from the OS (minor page faults)",
                   f"{len(faulted)} of {len(fw)}" + (f", from step {faulted[0] + 1}" if faulted else "")],
                  ["steps without page faults: last half / first half", clean_last / clean_first],
                  ["reverse pass over the unroll (with the last step's forward and f), per step (ms)",
                   r.backward_total / steps[-1] * 1e3],
              ]), "",
              common.markdown_table(["T", "Unrolled outer step (ms)", "per inner step (ms)",
                                     "minor page faults in the step"],
                                    [[n, r.unrolled_clock[n] * 1e3, r.unrolled_clock[n] * 1e3 / n,
                                      int(r.unrolled_faults[n])] for n in steps]), "",
              "Method: if a step cost more the later it came (a graph walked again from the start, a list copied, "
              "a growing Python structure), the step time would grow faster than linearly in T: the fit on "
              "T <= 20 would under-predict T = 100 (ratio > 1) and the forward steps late in one unroll would be "
              "slower than early ones. Unrolled(T).step is timed for each T (medians of "
              f"{max(1, (repeats + 1) // 2)} after one warm-up); the forward steps of one T = {steps[-1]} unroll are "
              "timed by stamping the clock at each call of g (per-index medians over as many unrolls); the "
              "reverse pass, which autograd runs as one call, is timed whole. The clock is the process's CPU "
              "time on CPU: on this shared machine the wall time of a few-ms step doubles whenever another "
              "process takes the core (the sweep's wall times above show it), while CPU time counts the work "
              "done, which is what would grow with the index. On CUDA it is the synchronized wall time. "
              "Page faults: once the unroll holds more memory than the process has held before, each step's "
              "new tensors take fresh pages from the OS, which the kernel zeroes on first touch (a few ms per "
              "step here, counted as the process's system time); that cost follows the process's memory "
              "high-water mark, not the step index, so the steps without faults are compared separately.", ""]

    # Long run.
    rows = []
    for name in ENGINES:
        live = r.live[name]
        growth, _ = least_squares([float(i) for i in range(len(live))], [float(v) for v in live])
        rows.append([name, mib(live[0]), mib(live[min(9, len(live) - 1)]), mib(live[-1]),
                     max(live) - min(live), growth, mib(r.state_bytes[name])])
    lines += [f"## Live memory over {sizes.long_run} outer steps", "",
              f"Unrolled(T={sizes.long_run_unroll}), CG(K={sizes.long_run_k}), Neumann(K={sizes.long_run_k}) "
              "(these two with 1 inner step), "
              "the state carried from step "
              "to step, the metrics dropped. Live = bytes made during the run and still alive after the step "
              "(CPU: one tracking session over the whole run; CUDA: allocated above the start).", "",
              common.markdown_table(["engine", "after step 1 (MiB)", "after step 10 (MiB)",
                                     f"after step {sizes.long_run} (MiB)", "max - min over the run (bytes)",
                                     "least-squares growth (bytes/step)", "the state's own tensors (MiB)"], rows), "",
              "Flat means no growth: max - min = 0 and after every step the live bytes are the state's own "
              "(x, y, the Adam moments, the step count, CG's/Neumann's v); nothing of the step's graph survives it.",
              ""]

    # Truncation.
    rows = [[k, mib(r.truncated[k]), mib(r.peaks[("Unrolled", k)]) if ("Unrolled", k) in r.peaks else "n/a",
             r.truncated[k] / r.peaks[("Unrolled", k)] if ("Unrolled", k) in r.peaks else "n/a"]
            for k in sizes.truncations]
    lines += [f"## Truncation: Unrolled(T={sizes.truncate_from}, truncate=k)", "",
              common.markdown_table(["k", f"peak T={sizes.truncate_from}, truncate=k (MiB)", "peak T=k (MiB)",
                                     "ratio"], rows), "",
              "The difference is the same for every k: "
              + ", ".join(f"{mib(r.truncated[k] - r.peaks[('Unrolled', k)]):.3f}" for k in sizes.truncations
                          if ("Unrolled", k) in r.peaks)
              + f" MiB (P = {mib(r.param_bytes):.3f}): one parameter copy, the y that the undifferentiated steps "
              "of the inner phase leave, where Unrolled(T=k) starts from the y the state already holds. The "
              "T - k undifferentiated steps keep nothing else.", ""]

    # grad against vjp.
    rows = [[n, mib(r.grad_vs_vjp[("grad", n)]), mib(r.grad_vs_vjp[("vjp", n)]),
             r.grad_vs_vjp[("grad", n)] / r.grad_vs_vjp[("vjp", n)]] for n in steps[1:3]]
    lines += ["## Why Unrolled uses vjp for its reverse pass under a transform", "",
              common.markdown_table(["T", "torch.func.grad peak (MiB)", "torch.func.vjp pullback peak (MiB)",
                                     "grad / vjp"], rows), "",
              "`torch.func.grad` runs `autograd.grad(..., create_graph=True)` inside its transform level, so the "
              "backward over the unroll is itself recorded and its intermediates kept (with the forward's saved "
              "tensors they hold) until the transform exits; `vjp`'s pullback runs after the level has exited, so "
              "the backward records nothing and frees each step's saved tensors as it passes them. On plain eager "
              "calls Unrolled records the unroll on autograd's tape instead and takes one `autograd.grad` without "
              "create_graph: the same no-record, free-as-you-go reverse pass (the peaks above are that route's).",
              ""]

    # Targets.
    cg = [r.peaks[("CG", n)] for n in steps]
    ne = [r.peaks[("Neumann", n)] for n in steps]
    trunc = [r.truncated[k] / r.peaks[("Unrolled", k)] for k in sizes.truncations if ("Unrolled", k) in r.peaks]
    growth = {name: max(r.live[name]) - min(r.live[name]) for name in ENGINES}
    lines += ["## Targets", "",
              f"- IFT memory flat in K: CG peak K={steps[-1]} / K={steps[0]} = {cg[-1] / cg[0]:.3f} "
              f"(max / min over K >= {steps[1]}: {max(cg[1:]) / min(cg[1:]):.3f}); Neumann "
              f"{ne[-1] / ne[0]:.3f} ({max(ne[1:]) / min(ne[1:]):.3f}).",
              f"- Unrolled memory linear in T: R^2 {_r2(xs, peaks, slope, intercept):.5f}; slope "
              f"{mib(int(slope)):.3f} MiB/step = {slope / predicted:.3f} x the predicted {mib(predicted):.3f} "
              f"(y_t + what autograd keeps per step), {slope / naive:.2f} x the rule of thumb "
              f"(activations + y_t, {mib(naive):.3f}).",
              f"- Time per inner step constant in the step index: T={steps[-1]} / extrapolation from T <= 20 = "
              f"{t_un[-1] / extrapolated:.2f}; forward steps, median of the second half / the first = "
              f"{last / first:.2f}, without page faults {clean_last / clean_first:.2f} (least-squares "
              f"change over the unroll {index_slope * len(fw) / statistics.mean(fw):+.2f} of the mean); minor page "
              f"faults per outer step at T = {steps[0]}, {steps[-1]}: {int(r.unrolled_faults[steps[0]])}, "
              f"{int(r.unrolled_faults[steps[-1]])}.",
              f"- Back to baseline over {sizes.long_run} outer steps: max - min of the live bytes = "
              + ", ".join(f"{name} {growth[name]} B" for name in ENGINES) + ".",
              f"- truncate=k: peak(T={sizes.truncate_from}, k) / peak(T=k) = "
              + ", ".join(f"{v:.3f}" for v in trunc) + f" for k = {', '.join(map(str, sizes.truncations))}.", ""]
    return "\n".join(lines)


def plot(r: Results, sizes: Sizes, folder: Path) -> None:
    """memory.png: peak vs T or K and live bytes over the long run; memory_time.png: time vs T or K and per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sizes.steps
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ENGINES:
        a.plot(steps, [common.mib(r.peaks[(name, n)]) for n in steps], "o-", label=name)
    a.plot(list(sizes.truncations), [common.mib(r.truncated[k]) for k in sizes.truncations], "kx", markersize=8,
           label=f"Unrolled T={sizes.truncate_from}, truncate=k (at k)")
    a.set_xlabel("T (Unrolled) or K (CG, Neumann)")
    a.set_ylabel("peak memory of one outer step (MiB)")
    a.legend(fontsize=7)
    for name, style in zip(ENGINES, ("-", "--", ":"), strict=True):  # CG and Neumann coincide: dash them apart
        b.plot(range(1, len(r.live[name]) + 1), [common.mib(v) for v in r.live[name]], style, label=name, linewidth=2)
    b.set_xlabel("outer step")
    b.set_ylabel("live memory after the step (MiB)")
    b.set_ylim(bottom=0)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=120)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ENGINES:
        a.plot(steps, [r.times[(name, n)] * 1e3 for n in steps], "o-", label=name)
    a.set_xlabel("T (Unrolled) or K (CG, Neumann)")
    a.set_ylabel("time per outer step (ms)")
    a.legend(fontsize=7)
    b.plot(range(1, len(r.forward_steps) + 1), [t * 1e3 for t in r.forward_steps], ".", markersize=4)
    b.set_xlabel(f"step index in one Unrolled T={steps[-1]} unroll")
    b.set_ylabel("forward time of the step (ms)")
    b.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(folder / "memory_time.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=common.RESULTS / "speed", help="folder for memory.md and the plots")
    p.set_defaults(warmup=1, repeats=5)
    args = p.parse_args(argv)
    device = common.setup(args)
    sizes = QUICK if args.quick else Sizes()
    command = "python -m experiments.bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(sizes, device, args.warmup, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "memory.md"
    path.write_text(report(results, sizes, device, command.strip(), args.warmup, args.repeats))
    plot(results, sizes, args.out)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
