"""Populations: one vmapped engine step over P problems against a Python loop over the same P problems.

    python -m experiments.bench.population --device cpu

Two populations:

(a) per-feature L2 of logistic regression on breast cancer (``problems.hpo.LogisticL2``), P copies
    with different starting log-L2 weights (a hyperparameter sweep); data shared by all members;
    engine CG (conjugate gradient on the lower Hessian, warm-started; the lower level is strongly
    convex);
(b) MAML-style sinusoid regression (Finn, Abbeel, Levine 2017) in the implicit form of iMAML
    (Rajeswaran, Finn, Kakade, Levine 2019): task t has its own amplitude, phase and K support /
    Q query points (buffers that differ per member, stacked by the population); the lower level
    fits an MLP 1-40-40-1 phi to the support points with a proximal term lam/2 |phi - theta|^2,
    the upper level moves the centre theta (the initialization) to lower the query loss of
    phi*(theta); engine Unrolled (MAML's differentiation through the inner steps). CG diverged
    here: with 5 inner steps the lower level is far from its minimizer, where the MLP's Hessian is
    indefinite (measured: NaN within 150 steps at lam = 2 and lam = 10), while Unrolled lowered
    the mean query loss of 8 tasks from 4.56 to 1.40 in 300 steps.

Each timing is one outer step (inner steps, CG solve, outer update) of all P members, interleaved
(vmapped, loop) with medians. Targets at P = 64: >= 5x on CPU, >= 0.5 P on GPU.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
import hypergrad
from experiments.bench.common import RESULTS, environment, interleaved_medians, markdown_table, parser, setup
from problems.hpo import LogisticL2

SIZES = (1, 8, 64, 256)
QUICK_SIZES = (1, 4)


class SinusoidTask(bilevel.BilevelProblem):
    """One sinusoid regression task y = amplitude sin(x - phase), x in [-5, 5] (Finn et al. 2017).

    lower: phi*(theta) = argmin_phi  MSE(net_phi; support) + lam/2 |phi - theta|^2
    upper: min_theta  MSE(net_phi*(theta); query)

    ``lower`` is the MLP 1-hidden-hidden-1 (phi); ``upper`` a copy of it whose parameters are the
    centre theta. ``seed`` draws the task (amplitude in [0.1, 5], phase in [0, pi], the points)
    and the starting theta; phi starts at theta.
    """

    def __init__(self, seed: int, support: int = 10, query: int = 10, hidden: int = 40, lam: float = 2.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        amplitude = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=torch.float64)
        phase = math.pi * torch.rand((), generator=gen, dtype=torch.float64)
        for name, n in (("support", support), ("query", query)):
            points = 10 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 5
            self.register_buffer(f"{name}_x", points.to(dtype), persistent=False)
            self.register_buffer(f"{name}_y", (amplitude * torch.sin(points[:, 0] - phase)).to(dtype), persistent=False)
        self.lam = float(lam)
        net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # LeCun-normal weights and zero biases, drawn from the task's generator
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0 * p)
        self.upper = net.to(dtype)
        self.lower = copy.deepcopy(self.upper)

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(self.lower(inputs).squeeze(-1), targets)

    def lower_objective(self, batch: Any) -> Tensor:
        """MSE on the K support points [K, 1] + lam/2 |phi - theta|^2 (the batch is unused)."""
        proximal = sum(((p - q) ** 2).sum() for p, q in zip(self.lower.parameters(), self.upper.parameters(),
                                                             strict=True))
        return self._loss(self.support_x, self.support_y) + 0.5 * self.lam * proximal

    def upper_objective(self, batch: Any) -> Tensor:
        """MSE on the Q query points [Q, 1] (the batch is unused)."""
        return self._loss(self.query_x, self.query_y)


def logistic_members(size: int, n_train: int | None) -> tuple[list[bilevel.BilevelProblem], hypergrad.Engine, Any]:
    """P LogisticL2 problems on breast cancer starting at log-L2 weights spread over [-6, 0]."""
    base = LogisticL2("breast_cancer", n_train=n_train, n_val=None if n_train is None else n_train // 2,
                      n_test=None if n_train is None else n_train // 2)
    members = []
    for start in torch.linspace(-6.0, 0.0, size, dtype=torch.float64):
        member = copy.deepcopy(base)
        with torch.no_grad():
            member.upper.log_l2.fill_(float(start))
        members.append(member)
    engine = hypergrad.CG(iters=5, inner_steps=5, inner_lr=0.2, outer_lr=0.05)
    return members, engine, base.data()


def sinusoid_members(size: int, hidden: int) -> tuple[list[bilevel.BilevelProblem], hypergrad.Engine, Any]:
    """P sinusoid tasks (seeds 0..P-1), each with its own data and starting centre."""
    members = [SinusoidTask(seed, hidden=hidden) for seed in range(size)]
    engine = hypergrad.Unrolled(inner_steps=5, truncate=5, inner_lr=0.02, outer_lr=1e-3)
    return members, engine, ((), ())


def measure(members: list[bilevel.BilevelProblem], engine: hypergrad.Engine, batches: Any, device: torch.device,
            warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of one vmapped population step and of a loop of P single steps; max |x difference|."""
    members = [m.to(device) for m in members]
    batches = tuple(tuple(t.to(device) for t in b) for b in batches)
    population = bilevel.Population(members)
    state = population.init(engine)
    singles = []
    for m in members:
        fns, x, y = m.to_functions()
        singles.append((fns, engine.init(fns, x, y)))

    def vmapped() -> Any:
        return population.step(engine, state, batches)

    def loop() -> Any:
        return [engine.step(fns, s, batches) for fns, s in singles]

    times = interleaved_medians({"vmapped": vmapped, "loop": loop}, device, warmup=warmup, repeats=repeats)
    stacked, _ = vmapped()
    difference = max(float((stacked["x"][k][i] - s["x"][k]).abs().max())
                     for i, (s, _) in enumerate(loop()) for k in s["x"])
    return {**times, "difference": difference}


def run(name: str, build: Callable[[int], tuple], sizes: tuple[int, ...], device: torch.device, warmup: int,
        repeats: int) -> list[dict[str, float]]:
    rows = []
    for size in sizes:
        # The loop at P >= 64 takes seconds a repetition: fewer repetitions there keep the run short.
        reps = repeats if size <= 8 else 5 if size <= 64 else 3
        reps = min(reps, repeats)
        members, engine, batches = build(size)
        result = measure(members, engine, batches, device, warmup=min(warmup, 1 if size > 8 else warmup),
                         repeats=reps)
        rows.append({"P": size, "repeats": reps, **result})
        print(f"{name} P={size}: vmapped {1e3 * result['vmapped']:.2f} ms, loop {1e3 * result['loop']:.2f} ms, "
              f"speed-up {result['loop'] / result['vmapped']:.1f}x", flush=True)
    return rows


def plot(results: dict[str, list[dict[str, float]]], device: torch.device, path: Path) -> None:
    import matplotlib  # lazy: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        ax.plot([r["P"] for r in rows], [r["loop"] / r["vmapped"] for r in rows], marker="o", label=name)
    sizes = sorted({r["P"] for rows in results.values() for r in rows})
    if device.type == "cuda":
        ax.plot(sizes, [0.5 * s for s in sizes], "k--", linewidth=1, label="target 0.5 P (GPU)")
    else:
        ax.axhline(5.0, color="k", linestyle="--", linewidth=1, label="target 5x at P = 64 (CPU)")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("population size P")
    ax.set_ylabel("speed-up: loop time / vmapped time")
    ax.set_title(f"One vmapped engine step over P problems ({device.type})")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict[str, list[dict[str, float]]], device: torch.device, command: str) -> str:
    target = "0.5 P" if device.type == "cuda" else "5x"
    lines = ["# Populations: one vmapped step vs a Python loop over P problems", "", environment(device), "",
             f"Regenerate: `{command}`", "",
             "Engines: CG(iters=5, inner_steps=5) for LogisticL2, Unrolled(inner_steps=5, truncate=5) for the "
             "sinusoid tasks (CG diverges on the nonconvex MLP lower level, see the script's docstring); "
             "Adam outer steps. "
             "Times are medians of interleaved repetitions of one outer step of all P members; "
             "max |dx| compares the vmapped x with the loop's after one step.", ""]
    for name, rows in results.items():
        lines += [f"## {name}", ""]
        table = [[r["P"], 1e3 * r["vmapped"], 1e3 * r["loop"], 1e3 * r["vmapped"] / r["P"], r["loop"] / r["vmapped"],
                  f"{r['difference']:.1e}", r["repeats"]] for r in rows]
        lines += [markdown_table(["P", "vmapped step (ms)", "loop of P steps (ms)", "vmapped per member (ms)",
                                  "speed-up", "max abs dx", "repeats"], table), ""]
    lines += ["## Target at P = 64", ""]
    for name, rows in results.items():
        for r in rows:
            if r["P"] == 64:
                ratio = r["loop"] / r["vmapped"]
                goal = 0.5 * 64 if device.type == "cuda" else 5.0
                lines.append(f"- {name}: {ratio:.1f}x (target {target} = {goal:g}x): "
                             f"{'met' if ratio >= goal else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "speed", help="directory of the table and plot")
    args = p.parse_args(argv)
    device = setup(args)
    sizes = QUICK_SIZES if args.quick else SIZES
    n_train, hidden = (40, 8) if args.quick else (None, 40)
    results = {
        "LogisticL2 breast cancer, different log-L2 starts, CG (float64)":
            run("logistic (CG)", lambda s: logistic_members(s, n_train), sizes, device, args.warmup, args.repeats),
        f"Sinusoid tasks, iMAML-style proximal MLP 1-{hidden}-{hidden}-1, Unrolled (float32)":
            run("sinusoid (Unrolled)", lambda s: sinusoid_members(s, hidden), sizes, device, args.warmup, args.repeats),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.bench.population " + " ".join(argv if argv is not None else sys.argv[1:])
    path = args.out / "population.md"
    path.write_text(report(results, device, command.strip()))
    plot(results, device, args.out / "population.png")
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
