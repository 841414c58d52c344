"""The markdown report of ``experiments.learned_optimizers``: tables, the targets checked, the coordinate check.

Every number comes from the run's record (its JSON); nothing here is measured.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from experiments.bench.common import environment, markdown_table

ORDER = ("muLO-1w", "muLO-mw", "SP-LO-1w", "SP-LO-mw", "muLO init", "SP-LO init", "AdamW", "MuAdamW", "AdamW-oracle")


def _losses(results: list[dict], label: str, dataset: str, depth: int, mult: int, at: int,
            meta_seed: int | None = None) -> dict[tuple[Any, int], float]:
    """{(meta seed, eval seed): full training loss at step ``at``} of one optimizer in one setting."""
    return {(r.get("meta_seed"), r["seed"]): r["marks"][at] for r in results
            if r["label"] == label and r["dataset"] == dataset and (r["depth"], r["mult"]) == (depth, mult)
            and (meta_seed is None or r.get("meta_seed") == meta_seed)}


def _mean(values: Any) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def _marks(record: dict) -> tuple[int, int]:
    """(H, 5H) of the run's config (``Config.horizon``)."""
    from experiments.learned_optimizers import Config  # not at the top: that module imports this one in main

    h = Config(**record["config"]).horizon
    return h, record["config"]["eval_mult"] * h


def seeds_beating(results: list[dict], label: str, rival: str, dataset: str, mult: int, marks: tuple[int, ...],
                  seeds: Any, per_seed_rival: bool) -> int:
    """How many meta-training seeds of ``label`` have a lower mean loss (over evaluation seeds) than ``rival`` at
    every mark, at depth 2 and width ``mult``; the rival's own seed (its init) or all its runs (a baseline)."""
    return sum(all(_mean(_losses(results, label, dataset, 2, mult, at, seed).values())
                   < _mean(_losses(results, rival, dataset, 2, mult, at, seed if per_seed_rival else None).values())
                   for at in marks) for seed in seeds)


def _horizon_words(h: int, horizons: list[int], end: int) -> str:
    """How H and 5H relate to the meta-training horizons, for the report's prose."""
    low, high = horizons
    if h == high:
        return ", the longest meta-training horizon"
    if h * h == low * high:
        return (f", the median meta-training horizon; the longest is {high}, so {end} steps is "
                f"{end / high:.2f}x the longest horizon seen")
    return f"; meta-training horizons reach {high}"


def setting_table(record: dict, depth: int, mult: int) -> str:
    """Mean full training loss (over meta-training and evaluation seeds) per optimizer, dataset and mark."""
    cfg, results = record["config"], record["results"]
    h, end = _marks(record)
    headers = ["optimizer"] + [f"{d} @ {name}" for d in cfg["eval_datasets"] for name in ("H", "5H")]
    rows = []
    for label in ORDER:
        row: list[Any] = [label]
        for dataset in cfg["eval_datasets"]:
            for at in (h, end):
                row.append(_mean(_losses(results, label, dataset, depth, mult, at).values()))
        rows.append(row)
    return markdown_table(headers, rows)


def targets(record: dict) -> tuple[str, list[str]]:
    """The issue's targets at the widest width: a table of wins per meta-training seed, and sentences."""
    cfg, results = record["config"], record["results"]
    h, end = _marks(record)
    mult = max(cfg["width_mults"])
    rows, lines = [], []
    for variant in ("1w", "mw"):
        mu, sp = f"muLO-{variant}", f"SP-LO-{variant}"
        for dataset in cfg["eval_datasets"]:
            seeds = cfg["meta_seeds"]
            beat_init = seeds_beating(results, mu, "muLO init", dataset, mult, (h, end), seeds, per_seed_rival=True)
            beat_adamw = seeds_beating(results, mu, "AdamW", dataset, mult, (h, end), seeds, per_seed_rival=False)
            pairs = sp_wins = 0
            for at in (h, end):
                mine = _losses(results, mu, dataset, 2, mult, at)
                theirs = _losses(results, sp, dataset, 2, mult, at)
                for key, value in mine.items():
                    pairs += 1
                    sp_wins += value < theirs[key]
            mu_mean = {at: _mean(_losses(results, mu, dataset, 2, mult, at).values()) for at in (h, end)}
            gap = {name: {at: mu_mean[at] / _mean(_losses(results, name, dataset, 2, mult, at).values())
                          for at in (h, end)} for name in ("MuAdamW", "AdamW-oracle")}
            n = len(cfg["meta_seeds"])
            rows.append([mu, dataset, f"{beat_init}/{n}", f"{beat_adamw}/{n}", f"{sp_wins}/{pairs}",
                         gap["MuAdamW"][h], gap["MuAdamW"][end], gap["AdamW-oracle"][h], gap["AdamW-oracle"][end]])
            met = beat_init >= 2 and beat_adamw >= 2 and sp_wins == pairs
            lines.append(f"- {mu} on {dataset} at {mult}x: beats its init on {beat_init}/{n} seeds and base-tuned "
                         f"AdamW on {beat_adamw}/{n} (both at H and 5H), SP-LO on {sp_wins}/{pairs} pairs: "
                         f"target {'met' if met else 'missed'}.")
    headers = ["LO", "data", "< own init (seeds)", "< AdamW (seeds)", "< SP-LO (pairs)",
               "/ MuAdamW @ H", "/ MuAdamW @ 5H", "/ oracle @ H", "/ oracle @ 5H"]
    return markdown_table(headers, rows), lines


def report(record: dict, cfg: Any, argv: list[str], workers: int) -> str:
    c, meta = record["config"], record["meta"]
    h, end = _marks(record)
    command = "python -m experiments.learned_optimizers " + " ".join(argv)
    cpu = {arm: _mean(m["cpu"] for m in meta if m["arm"] == arm) / 60 for arm in dict.fromkeys(m["arm"] for m in meta)}
    runs = {m["arm"]: m["runs"] for m in meta}
    table, sentences = targets(record)
    lines = [
        "# Learned optimizers: muLO vs SP-LO, meta-trained on a task family",
        "",
        environment(torch.device("cpu")),
        "",
        f"Regenerate: `{command.strip()}` ({workers} worker processes, one torch thread each). Whole run: "
        f"{record['wall_seconds'] / 60:.1f} min wall; 1-minute load average {record['load'][0]:.1f} at the start, "
        f"{record['load'][1]:.1f} at the end ({os.cpu_count()} cores).",
        "",
        f"Meta-training ({c['engine']}, {c['meta_steps']} outer steps of {c['truncation']} LO steps, meta-loss the "
        f"mean over the truncation, Adam {c['outer_lr']:g}, meta-gradient clipped to norm {c['outer_clip']:g}): "
        f"muLO's optimizer (`bilevel.learned.adafac`, random init) on MLP tasks of depth 2 at base width "
        f"{c['base_width']} (1w) or at {c['base_width']} and {2 * c['base_width']} (mw), datasets "
        f"{', '.join(c['datasets'])}, horizons log-uniform in [{c['horizons'][0]}, {c['horizons'][1]}], batch "
        f"{c['batch_size']}. Runs per arm (equal LO work per step): "
        + ", ".join(f"{a} {r}" for a, r in runs.items()) + ". CPU minutes per meta-training (mean over seeds): "
        + ", ".join(f"{a} {m:.1f}" for a, m in cpu.items()) + ".",
        "",
        f"Evaluation: {c['eval_mult']}H = {end} steps (H = {h}"
        + _horizon_words(h, c["horizons"], end) + "), full training "
        f"loss at H and 5H, meta-training seeds {list(c['meta_seeds'])} x evaluation seeds {list(c['eval_seeds'])}; "
        f"datasets {', '.join(c['eval_datasets'])} (held-out tasks: mnist1d is never meta-trained on, the teacher "
        "tasks are new teachers). Means over all seeds below.",
        "",
        f"## At {max(c['width_mults'])}x the base width (depth 2): the targets",
        "",
        table,
        "",
        *sentences,
        "",
    ]
    for depth, mult in [(2, m) for m in c["width_mults"]] + [tuple(c["deep"])]:
        lines += [f"## Depth {depth}, {mult}x width ({c['base_width'] * mult})", "",
                  setting_table(record, depth, mult), ""]
    lines += ["## Learning rates tuned at 5H (evaluation seed 0)", ""]
    tuning_rows = sorted({(r["dataset"], r["kind"], r["depth"], r["mult"]) for r in record["tuning"]})
    lrs = sorted({r["lr"] for r in record["tuning"]})
    rows = []
    for dataset, kind, depth, mult in tuning_rows:
        values = {r["lr"]: r["marks"][end] for r in record["tuning"]
                  if (r["dataset"], r["kind"], r["depth"], r["mult"]) == (dataset, kind, depth, mult)}
        rows.append([dataset, kind, depth, f"{mult}x", *[values.get(lr, float("nan")) for lr in lrs]])
    lines += [markdown_table(["data", "optimizer", "depth", "width", *[f"lr {lr:g}" for lr in lrs]], rows), ""]
    lines += ["## Meta-loss (mean of the first and last 10 outer steps)", ""]
    rows = [[m["arm"], m["seed"], _mean(m["curve"][:10]), _mean(m["curve"][-10:]), m["cpu"] / 60] for m in meta]
    lines += [markdown_table(["arm", "seed", "first 10", "last 10", "CPU min"], rows), ""]
    lines += ["## Coordinate check (mean |activation| per layer after 10 steps on digits, seed-0 LOs)", ""]
    coords = record["coordinates"]
    layers = len(coords[0]) - 2 if coords else 0
    lines += [markdown_table(["optimizer", "width", *[f"layer {i + 1}" for i in range(layers - 1)], "logits"], coords),
              ""]
    lines += ["![meta-loss](learned_optimizers_meta.png)", "", "![loss curves](learned_optimizers_curves.png)", ""]
    return "\n".join(lines) + "\n"
