"""Data parallelism: time per outer step at a fixed global batch on 1 and 2 ranks, with the all-reduces per step.

    python -m experiments.bench.distributed --device cpu --threads 1

For every engine one outer step (``engine.step``: inner steps, estimate, outer update) on the same
global batch, measured twice:

- 1 rank: this process, no process group (the plain path: ``mean_over_ranks`` is the identity), fed
  the whole global batch of each level;
- 2 ranks: two processes (``torch.multiprocessing.spawn``; gloo on CPU, a file store on localhost),
  each fed its half of the same global batch, so that the mean over ranks of every batch-dependent
  quantity is the 1-rank quantity (``hypergrad.distributed``; checked in
  ``tests/test_distributed_engines.py``, and here by the last column: x after all steps on 2 ranks
  against 1 rank).

Each process pins torch to ``--threads`` threads (1 by default: one core per rank). The engines
step in turn within every repetition (interleaved, as ``common.interleaved_medians``) and the state
advances, so periodic work (BO-REP's lower updates, PES's horizon resets) is averaged over the
steps. On 2 ranks every timed step sits between barriers: ranks start it together, each times its
own step, and the table shows rank 0's median and the slowest rank's median; the speed-up is the
1-rank median over the slowest rank's. All-reduces and bytes per step are counted by
``hypergrad.distributed.counting`` (means over the timed steps); one all-reduce of each engine's
mean buffer size is then timed on its own (all-reduces back to back, median), and all-reduces per step
times that gives an estimate of the step's communication.

Problems (float32): a wide per-feature-L2 logistic regression (y = weights and bias, x = log L2 of
every feature; both objectives means over their batch) for every engine, with two batch-mean affine
constraints for LV-HBA (which needs them to be useful); PES runs its own gradient-descent lower
dynamics on it. With ``--mlp``, also the per-parameter L2 problem on an MLP 784-64-64-10
(``experiments.bench.models``, 55k lower variables) for the engines that scale to it.

``--device cuda`` runs 1 rank on cuda:0 and 2 ranks with NCCL on cuda:0 and cuda:1, or, with a
single GPU, gloo with both ranks on cuda:0 (they then share the device: no speed-up is possible).
Writes ``experiments/results/distributed.md`` (``--quick``: tiny sizes and two engines, printed,
written only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

import hypergrad
from experiments.bench.common import RESULTS, environment, markdown_table, parser, setup
from experiments.bench.models import l2_problem, mlp
from hypergrad import Functions, distributed
from hypergrad.tree import Tree

RANKS = 2
DTYPE = torch.float32


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the wide logistic problem's features and global batch, the MLP's width and global batch."""

    features: int
    batch: int
    mlp_width: int
    mlp_batch: int


FULL = Sizes(features=256, batch=8192, mlp_width=128, mlp_batch=2048)
QUICK = Sizes(features=16, batch=256, mlp_width=8, mlp_batch=64)


# -- problems: pure functions, means over the batch, a global batch each rank slices -----------------------

def logistic(features: int, batch: int, constraints: bool, device: torch.device,
             ) -> tuple[Functions, Tree, Tree, tuple[Any, Any]]:
    """(fns, x, y, global (lower, upper) batches) of per-feature-L2 logistic regression on generated data.

    g(x, y) = mean softplus(-t (X w + b)) + 1/2 sum_j exp(a_j) w_j^2,  f(x, y) = the mean loss on the
    upper batch; with ``constraints`` c(x, y) = [mean(X) . w + 0.01 sum(a) - 0.5, b - 1] <= 0, affine in
    (x, y) and a mean over the lower batch (so its mean over ranks is c on the union).
    """
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(features, generator=gen) / features ** 0.5

    def level() -> tuple[Tensor, Tensor]:
        inputs = torch.randn(batch, features, generator=gen)
        labels = torch.where(torch.rand(batch, generator=gen) < torch.sigmoid(4 * inputs @ truth), 1.0, -1.0)
        return inputs.to(device, DTYPE), labels.to(device, DTYPE)

    def loss(y: Tree, data: tuple[Tensor, Tensor]) -> Tensor:
        inputs, labels = data
        return F.softplus(-labels * (inputs @ y["w"] + y["b"])).mean()

    def g(x: Tree, y: Tree, data: Any) -> Tensor:
        return loss(y, data) + 0.5 * torch.sum(torch.exp(x["a"]) * y["w"] ** 2)

    def f(x: Tree, y: Tree, data: Any) -> Tensor:
        return loss(y, data)

    def c(x: Tree, y: Tree, data: Any) -> Tensor:
        return torch.stack([data[0].mean(0) @ y["w"] + 0.01 * x["a"].sum() - 0.5, y["b"] - 1.0])

    x = {"a": torch.full((features,), -2.0, device=device, dtype=DTYPE)}
    y = {"w": torch.zeros(features, device=device, dtype=DTYPE), "b": torch.zeros((), device=device, dtype=DTYPE)}
    fns = Functions(f=f, g=g, c=c if constraints else None, name=f"Logistic{features}")
    return fns, x, y, (level(), level())


def mlp_l2(width: int, batch: int, device: torch.device) -> tuple[Functions, Tree, Tree, tuple[Any, Any]]:
    """The per-parameter L2 problem of ``experiments.bench.models`` on an MLP 784-width-width-10."""
    torch.manual_seed(0)
    return l2_problem(mlp(width=width), batch_size=batch, device=device, dtype=DTYPE)


# -- the jobs: (problem, engine), configured small but doing real work -------------------------------------

def logistic_engines() -> dict[str, hypergrad.Engine]:
    """Every engine at the step sizes of tests/test_distributed_engines.py, with a few more inner steps."""
    return {
        "Exact": hypergrad.Exact(inner_steps=5, inner_lr=0.5, outer_lr=0.05),
        "Neumann": hypergrad.Neumann(terms=10, inner_steps=5, inner_lr=0.5, outer_lr=0.05),
        "CG": hypergrad.CG(iters=10, inner_steps=5, inner_lr=0.5, outer_lr=0.05),
        "Unrolled": hypergrad.Unrolled(inner_steps=5, truncate=5, inner_lr=0.5, outer_lr=0.05),
        "F2SA": hypergrad.F2SA(inner_steps=5, lr_y=0.02, lr_z=0.2, momentum=True),
        "Penalty": hypergrad.Penalty(inner_steps=5, sigma=0.1, inner_lr=0.2, outer_lr=0.05),
        "BOREP": hypergrad.BOREP(refine_steps=2, period=2, inner_steps=5, terms=10, inner_lr=0.2),
        "LVHBA": hypergrad.LVHBA(alpha=0.05, eta=0.05),
        "PES": hypergrad.PES(particles=4, inner_steps=5, sigma=0.1, horizon=20, inner_lr=0.5, outer_lr=0.05),
    }


MLP_ENGINES = ("CG", "Unrolled", "F2SA")
"""The MLP rows: an IFT, an unrolled and a first-order engine (Exact's dense Hessian of 55k variables is out)."""

QUICK_ENGINES = ("CG", "F2SA")


@dataclass(frozen=True)
class Job:
    """One row: a problem and an engine, built the same way in every process."""

    problem: str
    engine: str

    @property
    def label(self) -> str:
        return f"{self.problem} / {self.engine}"


def jobs(quick: bool, with_mlp: bool) -> list[Job]:
    names = QUICK_ENGINES if quick else tuple(logistic_engines())
    out = [Job("logistic", name) for name in names]
    if with_mlp:
        out += [Job("mlp", name) for name in (QUICK_ENGINES[:1] if quick else MLP_ENGINES)]
    return out


def build(job: Job, sizes: Sizes, device: torch.device, rank: int | None, reorder: bool = False,
          ) -> tuple[hypergrad.Engine, Functions, Tree, Tree, tuple[Any, Any]]:
    """(engine, fns, x, y, batches): the global batches when ``rank`` is None, else rank's half of them.

    ``reorder``: the global batches' rows in a fixed random order, the same means up to float32 rounding: the
    1-rank reference for how far rounding alone moves the run (the 2-rank run reorders the sums too).
    """
    engine = logistic_engines()[job.engine]
    if job.problem == "logistic":
        fns, x, y, batches = logistic(sizes.features, sizes.batch, job.engine == "LVHBA", device)
    else:
        fns, x, y, batches = mlp_l2(sizes.mlp_width, sizes.mlp_batch, device)
    if reorder:
        order = torch.randperm(batches[0][0].shape[0], generator=torch.Generator().manual_seed(1)).to(device)
        batches = tuple(tuple(t[order] for t in level) for level in batches)
    if rank is not None:
        # Contiguous equal shards: every objective is a mean over its batch, so the mean over ranks is the union's.
        batches = tuple(tuple(t.chunk(RANKS)[rank] for t in level) for level in batches)
    return engine, fns, x, y, batches


# -- the measurement, the same code on 1 rank and on each of 2 ranks ----------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device: torch.device) -> None:
    if distributed.world_size() > 1:
        if device.type == "cuda" and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def measure(job_list: list[Job], sizes: Sizes, device: torch.device, warmup: int, repeats: int,
            rank: int | None, reorder: bool = False) -> dict[str, dict[str, Any]]:
    """label -> {"times": seconds per timed step, "all_reduces", "bytes": per timed step, "x": final x, "x0": the
    start, "f": the last step's upper objective}."""
    built = {job.label: build(job, sizes, device, rank, reorder) for job in job_list}
    states = {label: engine.init(fns, x, y, lower_batch=batches[0])
              for label, (engine, fns, x, y, batches) in built.items()}
    out: dict[str, dict[str, Any]] = {label: {"times": [], "all_reduces": [], "bytes": []} for label in built}
    for rep in range(warmup + repeats):
        for label, (engine, fns, _, _, batches) in built.items():
            _sync(device)
            _barrier(device)  # both ranks start the step together: neither's time includes waiting for the other
            start = time.perf_counter()
            with distributed.counting() as count:
                states[label], metrics = engine.step(fns, states[label], batches)
            _sync(device)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                out[label]["times"].append(elapsed)
                out[label]["all_reduces"].append(count.all_reduces)
                out[label]["bytes"].append(count.bytes)
                out[label]["f"] = float(metrics["upper_objective"])  # read after the clock stopped
    for label, state in states.items():
        out[label]["x"] = {k: v.detach().cpu() for k, v in state["x"].items()}
        out[label]["x0"] = {k: v.detach().cpu() for k, v in built[label][2].items()}
    return out


def time_all_reduce(numel: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one all-reduce (SUM) of ``numel`` entries of DTYPE, issued back to back by both ranks.

    Back to back after one barrier, not a barrier before each: a barrier's exit reaches the two ranks at
    different moments (a scheduler wake-up on loaded cores, measured 0.4-3 ms here), which would be
    charged to the all-reduce; inside a step the ranks meet at every all-reduce and leave it together.
    """
    buffer = torch.ones(max(numel, 1), device=device, dtype=DTYPE)
    times = []
    _sync(device)
    _barrier(device)
    for rep in range(warmup + 4 * repeats):  # cheap: more samples steady the median of a ~1 ms event
        start = time.perf_counter()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        _sync(device)
        if rep >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(rank: int, config: dict[str, Any]) -> None:
    """One of the RANKS processes: join the group, measure every job on this rank's shards, save the result."""
    torch.set_num_threads(config["threads"])  # a spawned process starts with torch's default: pin it again
    device = torch.device(config["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank if config["backend"] == "nccl" else 0)
        torch.cuda.set_device(device)
    if not config["group"]:
        # The compute bound: each process steps on its half with no group (no all-reduce, no barrier), both at once.
        result = measure(config["jobs"], config["sizes"], device, config["warmup"], config["repeats"], rank)
        torch.save(result, os.path.join(config["out"], f"rank{rank}.pt"))
        return
    dist.init_process_group(config["backend"], init_method=f"file://{config['store']}", rank=rank,
                            world_size=RANKS)
    try:
        result = measure(config["jobs"], config["sizes"], device, config["warmup"], config["repeats"], rank)
        for row in result.values():
            # The mean buffer of this job's all-reduces (entries of DTYPE), timed alone: the communication's cost.
            calls = sum(row["all_reduces"])
            numel = round(sum(row["bytes"]) / calls / DTYPE.itemsize) if calls else 0
            row["all_reduce_time"] = time_all_reduce(numel, device, config["warmup"], config["repeats"])
        torch.save(result, os.path.join(config["out"], f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def two_ranks(job_list: list[Job], sizes: Sizes, device: torch.device, threads: int, warmup: int,
              repeats: int, group: bool = True) -> list[dict[str, dict[str, Any]]]:
    """Spawn RANKS processes on localhost and return each one's ``measure`` result (with all-reduce times).

    ``group=False``: the same processes on the same shards without a process group, so the ranks never
    communicate (their x differ): what the 2-rank step would cost if communication and waiting were free.
    """
    backend = "gloo"
    if device.type == "cuda" and torch.cuda.device_count() >= RANKS:
        backend = "nccl"  # one GPU per rank; with one GPU NCCL refuses two ranks on a device, gloo does not
    with tempfile.TemporaryDirectory() as tmp:
        config = {"jobs": job_list, "sizes": sizes, "device": device.type, "threads": threads, "warmup": warmup,
                  "repeats": repeats, "backend": backend, "group": group, "store": os.path.join(tmp, "store"),
                  "out": tmp}
        mp.spawn(_rank_main, args=(config,), nprocs=RANKS, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(RANKS)]
    for result in results:
        result["_backend"] = backend
    return results


# -- the report ---------------------------------------------------------------------------------------------

def _relative_difference(a: Tree, b: Tree, start: Tree) -> float:
    """max |a - b| / max |b - start|: the 2-rank x's distance from the 1-rank x, relative to how far x moved."""
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    return max(float((a[k] - b[k]).abs().max()) for k in b) / moved if moved else float("nan")


def rows(job_list: list[Job], single: dict[str, dict[str, Any]], ranks: list[dict[str, dict[str, Any]]],
         alone: list[dict[str, dict[str, Any]]], reordered: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One table row per job (times in ms)."""
    table = []
    for job in job_list:
        one = statistics.median(single[job.label]["times"])
        per_rank = [statistics.median(r[job.label]["times"]) for r in ranks]
        slowest = max(per_rank)
        uncoupled = max(statistics.median(r[job.label]["times"]) for r in alone)
        row0 = ranks[0][job.label]
        reduces = statistics.mean(row0["all_reduces"])
        nbytes = statistics.mean(row0["bytes"])
        reduce_time = max(r[job.label]["all_reduce_time"] for r in ranks)
        communication = reduces * reduce_time
        table.append([job.label, 1e3 * one, 1e3 * per_rank[0], 1e3 * slowest, f"{one / slowest:.2f}x",
                      1e3 * uncoupled, f"{reduces:g}", f"{nbytes / 1024:.1f}", 1e3 * reduce_time,
                      1e3 * communication, f"{100 * communication / slowest:.0f} %",
                      _gap(row0["x"], single[job.label]), _gap(reordered[job.label]["x"], single[job.label]),
                      f"{abs(row0['f'] - single[job.label]['f']) / abs(single[job.label]['f']):.1e}"])
    return table


HEADERS = ["problem / engine", "1 rank (ms)", "2 ranks: rank 0 (ms)", "2 ranks: slowest (ms)", "speed-up",
           "2 procs, no group (ms)", "all-reduces / step", "KiB / step", "one all-reduce (ms)", "est. comm (ms)",
           "comm / step", "x: 2 vs 1 rank", "x: 1 rank reordered", "f: 2 vs 1 rank"]


def _gap(x: Tree, reference: dict[str, Any]) -> str:
    gap = _relative_difference(x, reference["x"], reference["x0"])
    return "x did not move" if gap != gap else f"{gap:.1e}"


def report(job_list: list[Job], single: dict[str, dict[str, Any]], ranks: list[dict[str, dict[str, Any]]],
           alone: list[dict[str, dict[str, Any]]], reordered: dict[str, dict[str, Any]],
           sizes: Sizes, device: torch.device, args: argparse.Namespace, command: str, runtime: float,
           load: tuple[float, float]) -> str:
    table = markdown_table(HEADERS, rows(job_list, single, ranks, alone, reordered))
    backend = ranks[0]["_backend"]
    mlp_line = (f"- `mlp`: the per-parameter L2 problem of `experiments/bench/models.py` on an MLP "
                f"784-{sizes.mlp_width}-{sizes.mlp_width}-10 (x = log decays, y = weights), global batch "
                f"{sizes.mlp_batch} per level.\n") if any(j.problem == "mlp" for j in job_list) else ""
    engines = logistic_engines()
    configs = "\n".join(f"- {name}: `{type(e).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(e).items())})`"
                        for name, e in engines.items() if any(j.engine == name for j in job_list))
    lines = [
        "# Data parallelism: time per outer step on 1 and 2 ranks", "",
        f"Regenerate: `{command}` ({runtime:.0f} s). {environment(device)}; every process pinned to "
        f"{args.threads} thread(s); 2 ranks: `torch.multiprocessing.spawn`, backend {backend}, file store on "
        f"localhost. Medians of {args.repeats} repetitions after {args.warmup} warm-up, engines interleaved, "
        f"state advancing. Load average (1 min) of the machine at the start and the end: {load[0]:.1f}, "
        f"{load[1]:.1f}.", "",
        "Problems, float32, the same global batch on 1 and 2 ranks (each rank its contiguous half):", "",
        f"- `logistic`: per-feature-L2 logistic regression, {sizes.features} features (y = weights and bias, "
        f"x = {sizes.features} log L2 weights), global batch {sizes.batch} rows per level; LV-HBA with two "
        "batch-mean affine constraints.",
        mlp_line.rstrip("\n"), "",
        table, "",
        "Columns: *1 rank*: no process group (the plain path, `mean_over_ranks` is the identity). *2 ranks*: "
        "each rank times its own step between barriers; *speed-up* = 1 rank / slowest rank. *2 procs, no group*: "
        "the same two processes on the same halves with no process group (no all-reduce, no barrier; their x "
        "differ), slowest process: the 2-rank step's compute alone, under the same contention for the cores. "
        "*all-reduces / step* "
        "and *KiB / step*: `hypergrad.distributed.counting()` on rank 0 (the same on rank 1), means over the timed "
        "steps (BO-REP's lower update every second step makes its count a mean). *one all-reduce*: the median "
        "of one all-reduce of the mean buffer size, timed alone back to back (slowest rank); *est. comm* = "
        "all-reduces / step x one all-reduce, *comm / step* its share of the slowest rank's step. *x: 2 vs 1 "
        "rank*: max |x_2 - x_1| / max |x_1 - x_0| after all the steps (x_0 the start, x_2 rank 0's), relative to "
        "how far x moved; *x: 1 rank reordered*: the same for 1 rank fed the global batch's rows in another "
        "order (the same means up to float32 rounding): the floor that rounding alone sets, since 2 ranks also "
        "reorder the sums. Where the hypergradient is tiny (the MLP's log decays start at -6) Adam's "
        "normalized step turns rounding-level differences into full steps of outer_lr, so both x columns are "
        "large there; *f: 2 vs 1 rank*, the relative difference of the last step's upper objective, shows the "
        "runs still agree. tests/test_distributed_engines.py checks every engine to 1e-10 in float64.", "",
        "Engines:", "", configs, "",
        "## Reading it", "",
    ]
    if device.type == "cpu":
        # The reading is computed from this run: on shared cores the numbers move from run to run.
        bound = statistics.median(statistics.median(single[j.label]["times"])
                                  / max(statistics.median(r[j.label]["times"]) for r in alone) for j in job_list)
        reduce_ms = [1e3 * max(r[j.label]["all_reduce_time"] for r in ranks) for j in job_list]
        lines += [
            f"- This machine has {os.cpu_count()} CPU core(s), shared with other work (the load averages above). "
            f"1 rank uses {args.threads} thread(s) and each of the 2 ranks {args.threads}, so 2 ranks ask for "
            "twice the cores of 1 rank: the speed-up is bounded by 2, and below that by the cores the other work "
            "leaves. *2 procs, no group* measures that bound: 1 rank / that column has a median of "
            f"{bound:.2f} over the rows here (2 on idle cores), so this run's speed-ups are about the "
            "contention for the cores before they are about communication. It is not a comparison with 1 "
            "process on 2 threads.",
            "- Every buffer is small (a gradient, a Hessian-vector product or a hypergradient of a few to a few "
            "hundred KiB), so an all-reduce costs its latency, not its bytes: one took "
            f"{min(reduce_ms):.2f}-{max(reduce_ms):.2f} ms here through gloo on localhost, whatever its size. "
            "Steps that issue many all-reduces per unit of compute (F2SA's and Penalty's per-inner-step "
            "reductions, the HVPs of Neumann and CG on a small problem) are latency-bound and gain least; "
            "compute-heavy steps (Exact's dense Hessian, PES's particles, the MLP) gain most.",
            "- *est. comm* counts the all-reduces alone, both ranks ready. The rest of the gap between *2 ranks* "
            "and *2 procs, no group* is waiting: at every all-reduce the earlier rank waits for the later one, "
            "and on oversubscribed cores a rank that is descheduled makes the other wait a scheduler time slice; "
            "the barrier before each timed step also releases the ranks up to a millisecond apart.",
        ]
    lines += [
        "- GPU: `--device cuda` runs 1 rank on cuda:0 and 2 ranks with NCCL on two GPUs (or gloo with both "
        "ranks on cuda:0 when only one GPU is visible, which shares the device and cannot speed up). "
        + ("This table is a GPU measurement." if device.type == "cuda" else
           "Unmeasured: no GPU was lent to the session that wrote this table."),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)  # one core per rank: 2 ranks on the 2 cores of the machine this was written on
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="also the MLP per-parameter L2 problem (CG, Unrolled, F2SA)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"the markdown file (default {RESULTS / 'distributed.md'}; --quick: printed only)")
    args = p.parse_args(argv)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]  # the cores are shared: the table says how busy they were
    device = setup(args)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    sizes = QUICK if args.quick else FULL
    job_list = jobs(args.quick, args.mlp)
    single = measure(job_list, sizes, device, args.warmup, args.repeats, rank=None)
    for label, row in single.items():
        print(f"1 rank  {label}: {1e3 * statistics.median(row['times']):.2f} ms", flush=True)
    ranks = two_ranks(job_list, sizes, device, args.threads, args.warmup, args.repeats)
    for label in single:
        print(f"2 ranks {label}: {1e3 * max(statistics.median(r[label]['times']) for r in ranks):.2f} ms", flush=True)
    command = "python -m experiments.bench.distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    alone = two_ranks(job_list, sizes, device, args.threads, args.warmup, args.repeats, group=False)
    # Its times are not used: only its final x (the rounding floor of the x columns).
    reordered = measure(job_list, sizes, device, 0, args.repeats + args.warmup, rank=None, reorder=True)
    text = report(job_list, single, ranks, alone, reordered, sizes, device, args, command.strip(),
                  time.perf_counter() - began, (load_before, os.getloadavg()[0]))
    print(text)
    out = args.out if args.out is not None or args.quick else RESULTS / "distributed.md"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


if __name__ == "__main__":
    main()
