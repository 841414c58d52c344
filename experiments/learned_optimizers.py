"""muLO vs SP-LO (Therien et al. 2024) at small scale: meta-train at base width, evaluate on wider and deeper MLPs.

    python -m experiments.learned_optimizers            # the full CPU run (about 30 min on 2 quiet cores)
    python -m experiments.learned_optimizers --quick    # a smoke run with tiny settings

1. Meta-train two learned optimizers with the same budget on the task family of
   ``problems.LOMetaTraining`` at the base width (32) only: muLO (muP networks, updates scaled by
   the muP multipliers) and SP-LO (standard networks). Truncated backprop (``hypergrad.Unrolled``)
   through ``--truncation`` LO steps per outer step, networks restarting every ``--horizon`` steps.
2. Tune AdamW's learning rate at the base width (``--horizon`` steps, seed 0), once for SP networks
   (plain AdamW) and once for muP networks (MuAdamW: ``bilevel.mu_param_groups``).
3. Train MLPs at 1x, 4x, 16x the base width (depth 2) and a deeper one (depth 4 at 1x) for
   ``--eval-mult`` times the meta-training horizon, on each seed, with the four optimizers; record
   the full training loss at the horizon and at the end, and minibatch loss curves.
4. A coordinate check of both LOs: mean |activation| per layer after a few steps, per width.

Writes experiments/results/learned_optimizers.md and PNGs (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bilevel
import hypergrad
from bilevel.learned import LearnedOptimizer, LearnedOptimizerNet
from experiments.bench.common import environment, markdown_table
from problems.mulo import CLASSES, INPUTS, LOMetaTraining, load_task_data

RESULTS = Path(__file__).resolve().parent / "results"
BASE_WIDTH = 32
OPTIMIZERS = ("muLO", "SP-LO", "AdamW", "MuAdamW")
PARAMETRIZATION = {"muLO": "mup", "SP-LO": "sp", "AdamW": "sp", "MuAdamW": "mup"}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-steps", type=int, default=200, help="outer steps of meta-training per LO (the budget)")
    p.add_argument("--horizon", type=int, default=50, help="LO steps before the task networks restart")
    p.add_argument("--truncation", type=int, default=10, help="LO steps differentiated per outer step")
    p.add_argument("--engine", choices=["unrolled", "pes"], default="unrolled",
                   help="meta-gradients by truncated backprop or by PES (--particles pairs, --sigma)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=3e-3, help="Adam's step size on the LO parameters")
    p.add_argument("--step-mult", type=float, default=0.01, help="the LOs' global step scale")
    p.add_argument("--eval-mult", type=int, default=5, help="evaluation length in meta-training horizons")
    p.add_argument("--width-mults", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--deep", type=int, nargs=2, default=[4, 1], metavar=("DEPTH", "WIDTH_MULT"),
                   help="the deeper network: hidden layers and width multiplier")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=["digits", "images"])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP threads spin on shared cores)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.meta_steps, args.horizon, args.truncation, args.eval_mult = 2, 4, 2, 2
        args.width_mults, args.deep, args.seeds, args.lrs = [1, 2], [3, 1], [0], [1e-3, 1e-2]
    return args


# -- meta-training -------------------------------------------------------------------------------

def meta_train(parametrization: str, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """Meta-train one LO at the base width: (theta, meta-loss per outer step, CPU seconds)."""
    problem = LOMetaTraining(parametrization=parametrization, base_width=BASE_WIDTH, widths=[BASE_WIDTH],
                             datasets=["digits", "images"], step_mult=args.step_mult, batch_size=args.batch_size)
    if args.engine == "pes":
        engine = hypergrad.PES(particles=args.particles, sigma=args.sigma, inner_steps=args.truncation,
                               horizon=args.horizon, meta_loss="mean", outer_lr=args.outer_lr)
    else:
        engine = hypergrad.Unrolled(inner_steps=args.truncation, horizon=args.horizon, outer_lr=args.outer_lr)
    curve = _Curve()
    start = time.process_time()
    bilevel.fit(problem, engine, max_steps=args.meta_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, callbacks=[curve])
    cpu = time.process_time() - start
    return {k: v.detach().clone() for k, v in problem.upper.named_parameters()}, curve.values, cpu


class _Curve(__import__("lightning").pytorch.Callback):
    """The meta-loss (upper objective) after every outer step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["objective/upper"]))


def save_lo(theta: dict[str, torch.Tensor], step_mult: float, path: Path) -> None:
    """Write a meta-trained LO as ``LearnedOptimizer.save`` does (theta, hidden width, step_mult)."""
    net = LearnedOptimizerNet(init="random")
    net.load_state_dict(theta)
    LearnedOptimizer([("p", torch.zeros(1))], net=net, step_mult=step_mult).save(path)


# -- evaluation ----------------------------------------------------------------------------------

def make_optimizer(name: str, model: bilevel.MuMLP, thetas: dict, lrs: dict, step_mult: float):
    if name in ("muLO", "SP-LO"):
        return LearnedOptimizer(model.named_parameters(), net=LearnedOptimizerNet(init="random"), theta=thetas[name],
                                step_mult=step_mult, multipliers=model.multipliers)
    # AdamW's default decay 0.01, scaled 1/s per group (as Yang et al.'s mup does) so that the decay per
    # step lr * weight_decay stays the same at every width; plain AdamW has s = 1 everywhere.
    return torch.optim.AdamW(bilevel.mu_param_groups(model, lrs[name], weight_decay=0.01), lr=lrs[name])


def train(name: str, depth: int, width_mult: int, seed: int, steps: int, data: tuple, thetas: dict, lrs: dict,
          args: argparse.Namespace, checkpoints: tuple[int, ...]) -> tuple[list[float], dict[int, float]]:
    """Train one MLP: (minibatch loss per step, {step: full training loss} at ``checkpoints``)."""
    inputs, labels = data
    gen = torch.Generator().manual_seed(seed)
    model = bilevel.mlp(INPUTS, CLASSES, BASE_WIDTH, width_mult, depth, PARAMETRIZATION[name], generator=gen)
    opt = make_optimizer(name, model, thetas, lrs, args.step_mult)
    curve, marks = [], {}
    for step in range(1, steps + 1):
        index = torch.randint(0, labels.shape[0], (args.batch_size,), generator=gen)
        loss = F.cross_entropy(model(inputs[index]), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if step in checkpoints:
            with torch.no_grad():
                marks[step] = float(F.cross_entropy(model(inputs), labels))
    return curve, marks


def tune_adamw(data: tuple, args: argparse.Namespace) -> tuple[dict[str, float], list[list]]:
    """AdamW's learning rate at the base width: the lowest full training loss after ``horizon`` steps, seed 0."""
    best, rows = {}, []
    for name in ("AdamW", "MuAdamW"):
        losses = {}
        for lr in args.lrs:
            _, marks = train(name, 2, 1, 0, args.horizon, data, {}, {name: lr}, args, (args.horizon,))
            losses[lr] = marks[args.horizon]
        finite = {lr: v for lr, v in losses.items() if v == v}
        best[name] = min(finite, key=finite.get)
        rows.append([name, *[losses[lr] for lr in args.lrs], best[name]])
    return best, rows


def coordinate_check(thetas: dict, data: tuple, args: argparse.Namespace) -> list[list]:
    """Mean |activation| per layer after 10 LO steps on the full data, widths 1x to the largest multiplier."""
    rows = []
    widths = sorted({BASE_WIDTH * m for m in (1, 2, 4, 8, 16) if m <= max(args.width_mults)})
    inputs, labels = data
    for name in ("muLO", "SP-LO"):
        def make(width: int, name: str = name) -> bilevel.MuMLP:
            return bilevel.mlp(INPUTS, CLASSES, BASE_WIDTH, width / BASE_WIDTH, 2, PARAMETRIZATION[name])

        def optimizer(model: bilevel.MuMLP, name: str = name):
            return make_optimizer(name, model, thetas, {}, args.step_mult)

        result = bilevel.coordinate_check(make, widths, (inputs[:512], labels[:512]), 10, optimizer)
        rows += [[name, width, *values] for width, values in result.items()]
    return rows


# -- the report ----------------------------------------------------------------------------------

def plot(curves: dict, settings: list, dataset: str, path: Path) -> None:
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), squeeze=False)
    for ax, (depth, mult) in zip(axes[0], settings, strict=True):
        for name in OPTIMIZERS:
            runs = torch.tensor([curves[(dataset, depth, mult, name, s)] for s in sorted(
                {key[4] for key in curves if key[:4] == (dataset, depth, mult, name)})])
            mean = runs.nanmean(0)
            # a running mean over 10 steps: minibatch losses are noisy
            smooth = torch.nn.functional.avg_pool1d(mean[None, None], 10, 1, 0)[0, 0] if mean.numel() >= 10 else mean
            ax.plot(range(1, smooth.numel() + 1), smooth.numpy(), label=name)
        ax.set_yscale("log")
        ax.set_title(f"{dataset}: width {BASE_WIDTH * mult} ({mult}x), depth {depth}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (minibatch, mean over seeds)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_meta(meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, (_, values, _) in meta.items():
        ax.plot(range(1, len(values) + 1), values, label=name, alpha=0.8)
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss (after each truncation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    wall, load = time.perf_counter(), os.getloadavg()[0]
    meta = {name: meta_train(PARAMETRIZATION[name], args) for name in ("muLO", "SP-LO")}
    thetas = {name: theta for name, (theta, _, _) in meta.items()}
    for name, theta in thetas.items():  # in LearnedOptimizer.save's format: LearnedOptimizer.load reads it
        save_lo(theta, args.step_mult, args.out / f"learned_optimizers_{name}.pt")
    steps = args.eval_mult * args.horizon
    checkpoints = (args.horizon, steps)
    settings = [(2, m) for m in args.width_mults] + [tuple(args.deep)]
    curves, rows, tuning, coords = {}, [], {}, {}
    for dataset in args.datasets:
        data = load_task_data(dataset)
        lrs, tuning[dataset] = tune_adamw(data, args)
        for depth, mult in settings:
            for seed in args.seeds:
                marks = {}
                for name in OPTIMIZERS:
                    curves[(dataset, depth, mult, name, seed)], marks[name] = train(
                        name, depth, mult, seed, steps, data, thetas, lrs, args, checkpoints)
                for at in checkpoints:
                    rows.append([dataset, BASE_WIDTH * mult, f"{mult}x", depth, seed, at,
                                 *[marks[name][at] for name in OPTIMIZERS]])
        plot(curves, settings, dataset, args.out / f"learned_optimizers_{dataset}.png")
        coords[dataset] = coordinate_check(thetas, data, args)
    plot_meta(meta, args.out / "learned_optimizers_meta.png")
    path = args.out / "learned_optimizers.md"
    loads = (load, os.getloadavg()[0])
    path.write_text(report(args, meta, rows, tuning, coords, time.perf_counter() - wall, argv, loads))
    (args.out / "learned_optimizers.json").write_text(json.dumps({"rows": rows}, indent=0))
    return path


def report(args, meta, rows, tuning, coords, wall, argv, loads) -> str:
    command = "python -m experiments.learned_optimizers " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = [(2, m) for m in args.width_mults] + [tuple(args.deep)]
    lines = [
        "# Learned optimizers: muLO vs SP-LO across widths",
        "",
        environment(torch.device("cpu")),
        "",
        f"Regenerate: `{command.strip()}`",
        "",
        f"Meta-training (each LO, same budget): {args.meta_steps} outer steps of "
        + ("truncated backprop (`hypergrad.Unrolled`" if args.engine == "unrolled" else
           f"PES (`hypergrad.PES`, {args.particles} antithetic pairs, sigma {args.sigma}")
        + f", {args.truncation} LO steps per truncation, horizon {args.horizon} steps, Adam "
        f"{args.outer_lr}) on MLPs of width {BASE_WIDTH} (depth 2) on digits and generated images, step_mult "
        f"{args.step_mult}. CPU time: " + ", ".join(f"{n} {cpu / 60:.1f} CPU min" for n, (_, _, cpu) in meta.items())
        + f". Whole run: {wall / 60:.1f} min wall; 1-minute load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end ({os.cpu_count()} cores; above 2 means the machine was shared and times are "
        "inflated).",
        "",
        "## Final training loss (full training set) at the meta-training horizon and at the end",
        "",
    ]
    lines.append(markdown_table(["data", "width", "mult", "depth", "seed", "step", *OPTIMIZERS], rows))
    lines += ["", "## Summary: muLO vs SP-LO (muLO's loss lower on every seed?)", ""]
    summary = []
    for dataset in args.datasets:
        for depth, mult in settings:
            for at in (args.horizon, args.eval_mult * args.horizon):
                sel = [r for r in rows if r[0] == dataset and r[3] == depth and r[2] == f"{mult}x" and r[5] == at]
                wins = sum(r[6] < r[7] for r in sel)
                mean = [sum(r[6 + i] for r in sel) / len(sel) for i in range(len(OPTIMIZERS))]
                summary.append([dataset, f"{mult}x", depth, at, f"{wins}/{len(sel)}", *mean])
    lines.append(markdown_table(["data", "mult", "depth", "step", "muLO < SP-LO", *[f"mean {n}" for n in OPTIMIZERS]],
                                summary))
    lines += ["", "## AdamW learning rate tuned at the base width", ""]
    for dataset, table in tuning.items():
        lines.append(markdown_table([f"{dataset}: optimizer", *[f"lr {lr:g}" for lr in args.lrs], "chosen"], table))
        lines.append("")
    lines += ["## Coordinate check of the learned optimizers (mean |activation| per layer after 10 steps)", ""]
    for dataset, table in coords.items():
        depth_layers = len(table[0]) - 2
        headers = [f"{dataset}: LO", "width", *[f"layer {i + 1}" for i in range(depth_layers - 1)], "logits"]
        lines.append(markdown_table(headers, table))
        lines.append("")
    lines += [f"![loss curves](learned_optimizers_{d}.png)" for d in args.datasets]
    lines += ["", "![meta-training](learned_optimizers_meta.png)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
