"""muLO vs SP-LO (Therien et al. 2024) at small scale: meta-train on a task family, evaluate wider, deeper, longer.

    python -m experiments.learned_optimizers                 # the CPU run (about 30 min on 2 quiet cores)
    python -m experiments.learned_optimizers --config gpu    # wider tasks, longer horizons, PES (a GPU)
    python -m experiments.learned_optimizers --quick         # a smoke run with tiny settings

1. Meta-train four arms at equal meta-training compute, each from 3 seeds (the LO's random init and the
   task family's seed): muLO and SP-LO (muLO's optimizer, ``bilevel.learned.adafac``, on muP or SP task
   networks), each at the base width only ("1w") or at the base width and twice it ("mw"). The task family
   (``problems.LOMetaTraining``): MLPs of depth 2 on digits, generated images and teacher networks, a fresh
   task, init and horizon per restart, restarts staggered over the runs, a fresh minibatch per step.
   Compute is equalized in LO coordinate updates per outer step: the multi-width arms train fewer runs.
2. Baselines: each LO before meta-training (its seed's init: the ablation that isolates meta-learning);
   AdamW and MuAdamW tuned on a learning-rate grid at the base width and the evaluation length; AdamW
   tuned per width (the oracle).
3. Evaluate every optimizer at 1x, 4x and 16x the base width (depth 2) and at depth 4 (1x) for 5H steps,
   recording the full training loss at H and 5H, on a held-out dataset
   (mnist1d, never meta-trained on) and on the family (a held-out teacher task), 3 evaluation seeds. On CPU
   the meta-training horizons are log-uniform in [20, 180] and H = 60 is their median, so 5H = 300 steps is
   1.67x the longest horizon any restart saw (``--horizons 20 60`` makes H the longest horizon instead).
4. A coordinate check of every optimizer (mean |activation| per layer after 10 steps, per width).

Writes experiments/results/learned_optimizers.md, a JSON of every number, PNGs, and the meta-trained LOs
(``LearnedOptimizer.save``'s format) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

import bilevel
import hypergrad
from bilevel.learned import LearnedOptimizer
from problems.lo_tasks import evaluation_task
from problems.mulo import CLASSES, INPUTS, LOMetaTraining

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("muLO-1w", "muLO-mw", "SP-LO-1w", "SP-LO-mw")
BASELINES = ("AdamW", "MuAdamW", "AdamW-oracle")


@dataclass(frozen=True)
class Config:
    """One run's settings (``--config`` picks one; ``--quick`` shrinks it)."""

    base_width: int = 16
    datasets: tuple[str, ...] = ("digits", "images", "teacher")
    horizons: tuple[int, int] = (20, 60)
    truncation: int = 10
    runs_single: int = 10  # runs of the single-width arms; the multi-width arms get the same LO work
    meta_steps: int = 120
    engine: str = "unrolled"  # or "pes" (then runs are antithetic pairs)
    sigma: float = 0.01
    outer_lr: float = 3e-3
    outer_clip: float = 1.0
    batch_size: int = 64
    meta_seeds: tuple[int, ...] = (0, 1, 2)
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    eval_datasets: tuple[str, ...] = ("mnist1d", "teacher")
    width_mults: tuple[int, ...] = (1, 4, 16)
    deep: tuple[int, int] = (4, 1)  # depth, width multiplier of the deeper network
    eval_mult: int = 5
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    curve_points: int = 50
    eval_horizon: int | None = None  # H; None: the longest meta-training horizon

    @property
    def horizon(self) -> int:
        """H, the first evaluation mark: ``eval_horizon``, by default the longest meta-training horizon."""
        return self.horizons[1] if self.eval_horizon is None else self.eval_horizon


CONFIGS = {
    # H = 60, the median of log-uniform [20, 180] (sqrt(20 * 180)); 5H = 300 fits the 30-minute CPU budget.
    "cpu": Config(horizons=(20, 180), eval_horizon=60),
    "gpu": Config(base_width=64, horizons=(50, 300), runs_single=16, meta_steps=2000, engine="pes",
                  width_mults=(1, 4, 16, 32), batch_size=128),
}
QUICK = Config(base_width=4, datasets=("digits", "teacher"), horizons=(4, 8), truncation=2, runs_single=4,
               meta_steps=2, meta_seeds=(0,), eval_seeds=(0,), width_mults=(1, 2), deep=(3, 1), eval_mult=2,
               lrs=(1e-3, 1e-2), batch_size=16, curve_points=8)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--meta-steps", type=int, default=None, help="outer steps of meta-training (default: the config's)")
    p.add_argument("--horizons", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="meta-training horizons, log-uniform in [LO, HI] (default: the config's)")
    p.add_argument("--eval-horizon", type=int, default=None, help="H of the evaluation (default: HI)")
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where meta-training and evaluation run")
    return p.parse_args(argv)


# -- meta-training --------------------------------------------------------------------------------

def arm_problem(arm: str, seed: int, cfg: Config) -> LOMetaTraining:
    """The meta-training problem of one arm and seed (equal LO coordinate updates per outer step)."""
    parametrization = "mup" if arm.startswith("muLO") else "sp"
    base = cfg.base_width
    architectures = [(2, base)] if arm.endswith("1w") else [(2, base), (2, 2 * base)]
    single = _coordinates(architectures[:1])
    runs = max(1, round(cfg.runs_single * single / _coordinates(architectures)))
    pairs = max(1, runs // 2) if cfg.engine == "pes" else None
    return LOMetaTraining(optimizer="adafac", parametrization=parametrization, base_width=base,
                          architectures=architectures, datasets=cfg.datasets, horizons=cfg.horizons,
                          truncation=cfg.truncation, runs=runs, pes_pairs=pairs, batch_size=cfg.batch_size, seed=seed)


def _coordinates(architectures: list[tuple[int, int]]) -> int:
    """Parameters of one network per (depth, width): the LO's work per run and step."""
    return sum(INPUTS * w + w + (d - 1) * (w * w + w) + w * CLASSES + CLASSES for d, w in architectures)


class _MetaLoss(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.values.append(float(trainer.callback_metrics["objective/upper"]))


def meta_train(job: tuple[str, int, Config, str, str]) -> dict[str, Any]:
    """Meta-train one arm from one seed; save the LO; (meta-loss curve, CPU seconds, path, runs)."""
    arm, seed, cfg, out, device = job
    torch.set_num_threads(1)
    problem = arm_problem(arm, seed, cfg)
    init_path = Path(out) / f"lo_{arm}_seed{seed}_init.pt"
    LearnedOptimizer([("p", torch.zeros(1))], net=problem.rule).save(init_path)
    if cfg.engine == "pes":
        engine: hypergrad.Engine = hypergrad.PES(
            particles=problem.pes_pairs, sigma=cfg.sigma, inner_steps=cfg.truncation, meta_loss="mean",
            outer_lr=cfg.outer_lr, outer_clip=cfg.outer_clip, seed=seed)
    else:
        engine = hypergrad.Unrolled(inner_steps=cfg.truncation, meta_loss="mean", outer_lr=cfg.outer_lr,
                                    outer_clip=cfg.outer_clip)
    curve = _MetaLoss()
    start = time.process_time()
    bilevel.fit(problem, engine, max_steps=cfg.meta_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[curve],
                accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1)
    problem.to("cpu")
    cpu = time.process_time() - start
    path = Path(out) / f"lo_{arm}_seed{seed}.pt"
    LearnedOptimizer([("p", torch.zeros(1))], net=problem.rule).save(path)
    return {"arm": arm, "seed": seed, "curve": curve.values, "cpu": cpu, "path": str(path), "init": str(init_path),
            "runs": problem.task_runs.runs}


# -- evaluation -----------------------------------------------------------------------------------

def make_optimizer(kind: str, model: bilevel.MuMLP, lo_path: str | None, lr: float | None) -> torch.optim.Optimizer:
    if lo_path is not None:
        lo = LearnedOptimizer.load(lo_path, model.named_parameters(), multipliers=model.multipliers)
        lo.net.to(next(model.parameters()).device)
        return lo
    assert lr is not None
    # AdamW's default decay 0.01, scaled 1/s per group (as Yang et al.'s mup does); plain AdamW has s = 1.
    return torch.optim.AdamW(bilevel.mu_param_groups(model, lr, weight_decay=0.01), lr=lr)


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Train one network with one optimizer for ``steps``: the full training loss at ``marks``, a coarse curve."""
    torch.set_num_threads(1)
    parametrization = job["parametrization"]
    model, (inputs, labels) = evaluation_task(job["dataset"], job["depth"], job["base_width"] * job["mult"],
                                              job["seed"], job["base_width"], parametrization)
    device = torch.device(job["device"])
    model, inputs, labels = model.to(device), inputs.to(device), labels.to(device)
    opt = make_optimizer(job["kind"], model, job.get("lo_path"), job.get("lr"))
    gen = torch.Generator().manual_seed(10_000 + job["seed"])
    marks, curve, every = {}, [], max(1, job["steps"] // job["points"])
    for step in range(1, job["steps"] + 1):
        index = torch.randint(0, labels.shape[0], (job["batch_size"],), generator=gen).to(device)
        loss = F.cross_entropy(model(inputs[index]), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in job["marks"] or step % every == 0:
            with torch.no_grad():
                full = float(F.cross_entropy(model(inputs), labels))
            if step in job["marks"]:
                marks[step] = full if full == full else float("inf")  # a diverged run counts as worst
            if step % every == 0:
                curve.append(full)
    return {**{k: v for k, v in job.items() if k not in ("marks",)}, "marks": marks, "curve": curve}


def coordinate_rows(job: tuple[str, str | None, float | None, Config]) -> list[list]:
    """Mean |activation| per layer after 10 steps on digits, per width, for one optimizer."""
    name, lo_path, lr, cfg = job
    torch.set_num_threads(1)
    _, data = evaluation_task("digits", 2, cfg.base_width, 0, cfg.base_width)
    parametrization = "sp" if name.startswith(("SP", "AdamW")) else "mup"
    widths = [cfg.base_width * m for m in (1, 2, 4, 8, 16) if m <= max(cfg.width_mults)]

    def make(width: int) -> bilevel.MuMLP:
        return bilevel.mlp(INPUTS, CLASSES, cfg.base_width, width / cfg.base_width, 2, parametrization)

    result = bilevel.coordinate_check(make, widths, (data[0][:512], data[1][:512]), 10,
                                      lambda model: make_optimizer("lo" if lo_path else "adamw", model, lo_path, lr))
    return [[name, width, *values] for width, values in result.items()]


# -- the run --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    args = arguments(argv)
    cfg = QUICK if args.quick else CONFIGS[args.config]
    if args.meta_steps is not None:
        cfg = replace(cfg, meta_steps=args.meta_steps)
    if args.horizons is not None:
        cfg = replace(cfg, horizons=tuple(args.horizons))
    if args.eval_horizon is not None:
        cfg = replace(cfg, eval_horizon=args.eval_horizon)
    args.out.mkdir(parents=True, exist_ok=True)
    lo_dir = args.out / "learned_optimizers"
    lo_dir.mkdir(exist_ok=True)
    wall, load = time.perf_counter(), os.getloadavg()[0]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers) as pool:
        meta = pool.map(meta_train, [(arm, s, cfg, str(lo_dir), args.device) for arm in ARMS for s in cfg.meta_seeds])
        lrs, tuning = tune(pool, cfg, args.device)
        results = pool.map(train, evaluation_jobs(cfg, meta, lrs, args.device))
        coordinate_jobs = [(f"{m['arm']}", m["path"], None, cfg) for m in meta if m["seed"] == cfg.meta_seeds[0]]
        coordinate_jobs += [("AdamW", None, lrs[(cfg.eval_datasets[0], "AdamW", 2, 1)], cfg),
                            ("MuAdamW", None, lrs[(cfg.eval_datasets[0], "MuAdamW", 2, 1)], cfg)]
        coords = [row for rows in pool.map(coordinate_rows, coordinate_jobs) for row in rows]
    seconds = time.perf_counter() - wall
    record = {"config": asdict(cfg), "meta": meta, "tuning": tuning, "results": results, "coordinates": coords,
              "wall_seconds": seconds, "load": [load, os.getloadavg()[0]]}
    (args.out / "learned_optimizers.json").write_text(json.dumps(record, indent=0, default=str))
    plot_meta(meta, args.out / "learned_optimizers_meta.png")
    plot_curves(results, cfg, args.out / "learned_optimizers_curves.png")
    path = args.out / "learned_optimizers.md"
    from experiments.learned_optimizers_report import report  # the tables and the analysis' numbers

    path.write_text(report(record, cfg, argv if argv is not None else sys.argv[1:], args.workers))
    return path


def tune(pool: Any, cfg: Config, device: str) -> tuple[dict, list[dict]]:
    """AdamW and MuAdamW tuned at the base width, AdamW per width: lr with the lowest loss at 5H, eval seed 0."""
    steps = cfg.eval_mult * cfg.horizon
    jobs = []
    for dataset in cfg.eval_datasets:
        for depth, mult in settings(cfg):
            for kind in ("AdamW", "MuAdamW"):
                if kind == "MuAdamW" and (depth, mult) != (2, 1):
                    continue
                for lr in cfg.lrs:
                    jobs.append(_job(cfg, kind, dataset, depth, mult, cfg.eval_seeds[0], steps, device, lr=lr))
    done = pool.map(train, jobs)
    best = lowest(done, steps, lambda r: (r["dataset"], r["kind"], r["depth"], r["mult"]))
    return {k: v[0] for k, v in best.items()}, [{k: v for k, v in r.items() if k != "curve"} for r in done]


def lowest(done: list[dict], steps: int, key: Callable[[dict], Any]) -> dict[Any, tuple[float, float]]:
    """{key(run): (lr, loss)} of the run with the lowest full training loss at ``steps`` per key, from a grid."""
    best: dict[Any, tuple[float, float]] = {}
    for r in done:
        k = key(r)
        if k not in best or r["marks"][steps] < best[k][1]:
            best[k] = (r["lr"], r["marks"][steps])
    return best


def settings(cfg: Config) -> list[tuple[int, int]]:
    return [(2, m) for m in cfg.width_mults] + [tuple(cfg.deep)]  # type: ignore[list-item]


def _job(cfg: Config, kind: str, dataset: str, depth: int, mult: int, seed: int, steps: int, device: str,
         **extra: Any) -> dict:
    mup = kind.startswith("muLO") or kind == "MuAdamW"
    return {"kind": kind, "dataset": dataset, "depth": depth, "mult": mult, "seed": seed, "steps": steps,
            "marks": (cfg.horizon, steps), "base_width": cfg.base_width, "batch_size": cfg.batch_size,
            "parametrization": "mup" if mup else "sp", "points": cfg.curve_points, "device": device, **extra}


def evaluation_jobs(cfg: Config, meta: list[dict], lrs: dict, device: str) -> list[dict]:
    steps = cfg.eval_mult * cfg.horizon
    jobs = []
    for dataset in cfg.eval_datasets:
        for depth, mult in settings(cfg):
            for seed in cfg.eval_seeds:
                for m in meta:
                    jobs.append(_job(cfg, m["arm"], dataset, depth, mult, seed, steps, device, lo_path=m["path"],
                                     meta_seed=m["seed"], label=m["arm"]))
                    if m["arm"].endswith("1w"):  # the init of each seed (the same for 1w and mw of an LO)
                        jobs.append(_job(cfg, m["arm"], dataset, depth, mult, seed, steps, device, lo_path=m["init"],
                                         meta_seed=m["seed"], label=m["arm"].replace("-1w", " init")))
                for label, kind, tuned in (("AdamW", "AdamW", (2, 1)), ("MuAdamW", "MuAdamW", (2, 1)),
                                           ("AdamW-oracle", "AdamW", (depth, mult))):
                    jobs.append(_job(cfg, kind, dataset, depth, mult, seed, steps, device,
                                     lr=lrs[(dataset, kind, *tuned)], label=label))
    return jobs


# -- plots ----------------------------------------------------------------------------------------

def plot_meta(meta: list[dict], path: Path) -> None:
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARMS), figsize=(4 * len(ARMS), 3.2), squeeze=False, sharey=True)
    for ax, arm in zip(axes[0], ARMS, strict=True):
        for m in meta:
            if m["arm"] == arm and m["curve"]:
                values = torch.tensor(m["curve"])
                smooth = F.avg_pool1d(values[None, None], min(10, len(values)), 1)[0, 0]
                ax.plot(range(1, len(smooth) + 1), smooth.numpy(), label=f"seed {m['seed']}")
        ax.set_title(arm)
        ax.set_xlabel("outer step")
    axes[0][0].set_ylabel("meta-loss (running mean of 10)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(results: list[dict], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["label"] for r in results})
    fig, axes = plt.subplots(len(cfg.eval_datasets), len(settings(cfg)), figsize=(4 * len(settings(cfg)),
                             3.2 * len(cfg.eval_datasets)), squeeze=False)
    for row, dataset in zip(axes, cfg.eval_datasets, strict=True):
        for ax, (depth, mult) in zip(row, settings(cfg), strict=True):
            for label in labels:
                runs = [r["curve"] for r in results if r["label"] == label and r["dataset"] == dataset
                        and (r["depth"], r["mult"]) == (depth, mult)]
                if runs:
                    mean = torch.tensor(runs).nanmean(0).clamp_max(10)
                    every = max(1, cfg.eval_mult * cfg.horizon // cfg.curve_points)
                    ax.plot([every * (i + 1) for i in range(len(mean))], mean.numpy(), label=label)
            ax.set_yscale("log")
            ax.set_title(f"{dataset}: depth {depth}, {mult}x width")
            ax.axvline(cfg.horizon, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    print(main())
