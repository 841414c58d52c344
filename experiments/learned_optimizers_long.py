"""muLO-1w of ``experiments.learned_optimizers`` at 5x its longest meta-training horizon, at 16x the base width.

    python -m experiments.learned_optimizers_long            # after experiments.learned_optimizers (its LOs)
    python -m experiments.learned_optimizers_long --quick --lo-dir DIR   # on the LOs of a --quick run

The CPU run meta-trains on horizons log-uniform in [20, 180] and evaluates at H = 60 (their median) and
5H = 300 steps. This takes the stricter reading, H = 180 (the longest horizon any restart saw) and
5H = 900 steps, for the arm and width of the targets: the saved muLO-1w LO of every meta-training seed,
each seed's un-meta-trained init (the ablation), AdamW tuned at the base width and AdamW tuned at 16x
(the oracle), each tuned on the learning-rate grid at 5H (evaluation seed 0); mnist1d and teacher
tasks, 3 meta-training x 3 evaluation seeds. Writes experiments/results/learned_optimizers_long.md and
its JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from experiments.bench.common import environment, markdown_table
from experiments.learned_optimizers import CONFIGS, QUICK, RESULTS, Config, _job, lowest, train
from experiments.learned_optimizers_report import _losses, _mean, seeds_beating

ARM = "muLO-1w"
LABELS = (ARM, "muLO init", "AdamW", "AdamW-oracle")


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the --quick config of experiments.learned_optimizers")
    p.add_argument("--lo-dir", type=Path, default=RESULTS / "learned_optimizers",
                   help="the folder of LOs that experiments.learned_optimizers saved")
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def lo_paths(lo_dir: Path, cfg: Config) -> dict[tuple[str, int], Path]:
    """{(label, meta seed): saved LO} of muLO-1w and its init; FileNotFoundError naming what is missing."""
    paths = {(label, seed): lo_dir / f"lo_{ARM}_seed{seed}{suffix}.pt"
             for seed in cfg.meta_seeds for label, suffix in ((ARM, ""), ("muLO init", "_init"))}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"learned_optimizers_long: no saved LO at {', '.join(missing)}; run "
                                "`python -m experiments.learned_optimizers` first (or pass --lo-dir)")
    return paths


def main(argv: list[str] | None = None) -> Path:
    args = arguments(argv)
    base = QUICK if args.quick else CONFIGS["cpu"]
    cfg = replace(base, eval_horizon=base.horizons[1])  # H = the longest meta-training horizon
    steps, mult = cfg.eval_mult * cfg.horizon, max(cfg.width_mults)
    paths = lo_paths(args.lo_dir, cfg)
    wall = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        grid = [_job(cfg, "AdamW", dataset, 2, m, cfg.eval_seeds[0], steps, "cpu", lr=lr)
                for dataset in cfg.eval_datasets for m in (1, mult) for lr in cfg.lrs]
        best = lowest(pool.map(train, grid), steps, lambda r: (r["dataset"], r["mult"]))
        jobs = []
        for dataset in cfg.eval_datasets:
            for seed in cfg.eval_seeds:
                for (label, meta_seed), path in paths.items():
                    jobs.append(_job(cfg, ARM, dataset, 2, mult, seed, steps, "cpu", lo_path=str(path),
                                     meta_seed=meta_seed, label=label))
                for label, tuned in (("AdamW", 1), ("AdamW-oracle", mult)):
                    jobs.append(_job(cfg, "AdamW", dataset, 2, mult, seed, steps, "cpu",
                                     lr=best[(dataset, tuned)][0], label=label))
        results = pool.map(train, jobs)
    record = {"config": asdict(cfg), "lrs": {f"{d} {m}x": lr for (d, m), (lr, _) in best.items()},
              "results": results, "wall_seconds": time.perf_counter() - wall}
    (args.out / "learned_optimizers_long.json").write_text(json.dumps(record, indent=0, default=str))
    path = args.out / "learned_optimizers_long.md"
    path.write_text(report(results, cfg, best, record["wall_seconds"], argv if argv is not None else sys.argv[1:],
                           args.workers))
    return path


def report(results: list[dict], cfg: Config, best: dict, seconds: float, argv: list[str], workers: int) -> str:
    """The table of means at H and 5H and the targets per meta-training seed."""
    h, end, mult = cfg.horizon, cfg.eval_mult * cfg.horizon, max(cfg.width_mults)
    rows = [[label] + [_mean(_losses(results, label, d, 2, mult, at).values()) for d in cfg.eval_datasets
                       for at in (h, end)] for label in LABELS]
    table = markdown_table(["optimizer"] + [f"{d} @ {n}" for d in cfg.eval_datasets for n in ("H", "5H")], rows)
    lines = []
    for dataset in cfg.eval_datasets:
        init = seeds_beating(results, ARM, "muLO init", dataset, mult, (h, end), cfg.meta_seeds, per_seed_rival=True)
        adamw = seeds_beating(results, ARM, "AdamW", dataset, mult, (h, end), cfg.meta_seeds, per_seed_rival=False)
        n = len(cfg.meta_seeds)
        met = init >= 2 and adamw >= 2
        lines.append(f"- {dataset}: {ARM} beats its init on {init}/{n} meta-training seeds and "
                     f"base-tuned AdamW on {adamw}/{n} (both at H and 5H): {'met' if met else 'missed'}.")
    lrs = ", ".join(f"{d} at {m}x {lr:g}" for (d, m), (lr, _) in sorted(best.items()))
    command = " ".join(["python -m experiments.learned_optimizers_long", *argv])
    return "\n".join([
        f"# Learned optimizers at {cfg.eval_mult}x the longest meta-training horizon ({mult}x width)", "",
        environment(torch.device("cpu")), "",
        f"Regenerate: `{command.strip()}` ({workers} worker processes, one torch thread each; the LOs of "
        f"`learned_optimizers.md`). Whole run: {seconds / 60:.1f} min wall ({os.cpu_count()} cores).", "",
        f"H = {h}, the longest meta-training horizon (horizons log-uniform in [{cfg.horizons[0]}, "
        f"{cfg.horizons[1]}]); {cfg.eval_mult}H = {end} steps. Depth 2 at {mult}x the base width "
        f"{cfg.base_width}; full training loss, means over meta-training seeds {list(cfg.meta_seeds)} x "
        f"evaluation seeds {list(cfg.eval_seeds)}. AdamW's learning rate, tuned at {cfg.eval_mult}H (evaluation "
        f"seed 0): {lrs}.", "",
        table, "", *lines, ""])


if __name__ == "__main__":
    main()
