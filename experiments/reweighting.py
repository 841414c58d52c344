"""Meta-Weight-Net (Shu et al. 2019) against training on everything: noisy, class-imbalanced digits (issue 14, part 5).

    python -m experiments.reweighting            # 3 seeds -> experiments/results/reweighting{.md,.json,_*.png}
    python -m experiments.reweighting --quick    # smoke run: 1 seed, 60 steps, into a temp folder

Problem: ``problems.reweighting.MetaWeightNet`` at its defaults (450 training digits, imbalance 10 from 110
down to 11 per class, 40 % of the labels wrong, a clean balanced meta set of 100, a balanced test set of
500; a two-convolution CNN with BatchNorm). Methods, all from the same initial CNN, with the same lower
optimizer (plain SGD, lr ``LR``, batch 32, weight decay ``mu`` in the objective) for the same number of
lower steps ``STEPS``:

- ``mwn``: ``bilevel.fit`` with ``hypergrad.Unrolled(inner_steps=1, inner_lr=LR, outer_lr=1e-3, adam)``,
  the paper's one-step look-ahead and its meta step size: one lower step per outer step.
- ``uniform``: the same CNN trained on everything with uniform weights (the baseline of the issue).
- ``uniform+meta``: uniform weights on everything plus the 100 clean meta examples (the data MWN sees).
- ``clean oracle``: uniform weights on the training examples whose label is right (knows the noise: a
  reference point, not a method).

BatchNorm's running statistics: ``bilevel.fit`` refreshes them by one forward of g per outer step; the
baselines' training forward updates them once per step. Test metrics use the running statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import bilevel
import hypergrad
from problems.reweighting import MetaWeightNet

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
STEPS = 3000  # lower SGD steps (about 210 passes over the 450 training examples at batch 32)
QUICK_STEPS = 60
EVAL_EVERY = 100
LR = 0.1
META_LR = 1e-3
METHODS = ("mwn", "uniform", "uniform+meta", "clean oracle")
LOSS_GRID = torch.logspace(-4, 1, 201)  # where the learned weight function is tabulated (losses 1e-4 .. 10)


def engine() -> hypergrad.Unrolled:
    """The paper's algorithm: one differentiated SGD step per outer step, Adam on theta at 1e-3."""
    return hypergrad.Unrolled(inner_steps=1, inner_lr=LR, outer_lr=META_LR, outer_optimizer="adam")


def _snapshot(problem: MetaWeightNet, step: int) -> dict[str, float]:
    metrics = problem.evaluate()
    return {"step": step, **{k: metrics[k] for k in ("validation_loss", "test_accuracy", "rare_accuracy", "test_loss",
                                                       "weight_clean", "weight_corrupted")}}


class Recorder(Callback):
    """``evaluate()``'s headline metrics after step 1, every ``every`` outer steps and after step ``last``."""

    def __init__(self, problem: MetaWeightNet, every: int, last: int) -> None:
        self.problem, self.every, self.last = problem, every, last
        self.trace: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == 1 or step % self.every == 0 or step == self.last:
            self.trace.append(_snapshot(self.problem, step))


def run_mwn(seed: int, steps: int) -> dict[str, Any]:
    """``bilevel.fit`` of ``MetaWeightNet(seed)`` for ``steps`` outer steps; final metrics, trace, weights."""
    torch.manual_seed(seed)
    problem = MetaWeightNet(seed=seed)
    recorder = Recorder(problem, EVAL_EVERY, steps)
    start = time.process_time()
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        bilevel.fit(problem, engine(), *problem.data(), max_steps=steps, log_histograms_every=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1, default_root_dir=root, callbacks=[recorder])
    cpu = time.process_time() - start
    losses, weights = problem.training_weights()
    return {"method": "mwn", "seed": seed, "cpu_s": cpu, "final": problem.evaluate(), "trace": recorder.trace,
            "loss_grid": LOSS_GRID.tolist(), "weight_function": problem.weight_function(LOSS_GRID).tolist(),
            "train_losses": losses.tolist(), "train_weights": weights.tolist(),
            "corrupted": problem.corrupted.tolist()}


def _training_set(problem: MetaWeightNet, method: str) -> tuple[Tensor, Tensor]:
    """(images [n, 1, 8, 8], labels [n]) a baseline trains on."""
    if method == "uniform":
        return problem.train_images, problem.train_labels
    if method == "uniform+meta":
        return (torch.cat([problem.train_images, problem.meta_images]),
                torch.cat([problem.train_labels, problem.meta_labels]))
    if method == "clean oracle":
        keep = ~problem.corrupted
        return problem.train_images[keep], problem.train_labels[keep]
    raise ValueError(f"unknown baseline {method!r}")


def run_baseline(method: str, seed: int, steps: int) -> dict[str, Any]:
    """Plain SGD (lr ``LR``) on the mean cross-entropy + mu/2 |w|^2 of ``_training_set``, ``steps`` steps."""
    torch.manual_seed(seed)
    problem = MetaWeightNet(seed=seed)  # the same initial CNN as the MWN run
    images, labels = _training_set(problem, method)
    loader = DataLoader(TensorDataset(images, labels), batch_size=problem.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(problem.lower.parameters(), lr=LR)
    problem.lower.train()
    trace, step = [], 0
    start = time.process_time()
    while step < steps:
        for batch in loader:
            optimizer.zero_grad()
            problem.uniform_objective(batch).backward()
            optimizer.step()
            step += 1
            if step == 1 or step % EVAL_EVERY == 0 or step == steps:
                trace.append(_snapshot(problem, step))
            if step == steps:
                break
    cpu = time.process_time() - start
    return {"method": method, "seed": seed, "cpu_s": cpu, "final": problem.evaluate(), "trace": trace}


def run(method: str, seed: int, steps: int) -> dict[str, Any]:
    return run_mwn(seed, steps) if method == "mwn" else run_baseline(method, seed, steps)


# -- the report ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {std:.{digits}f}"


def _by_method(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def tables(runs: list[dict[str, Any]]) -> str:
    """The headline table, the per-rarity-rank accuracies and MWN's weights of clean and noisy examples."""
    by = _by_method(runs)
    lines = ["| method | test accuracy | accuracy, 3 rarest classes | test loss | CPU s per run |",
             "|---|---|---|---|---|"]
    rows = {m: ([r["final"] for r in rs], statistics.mean(r["cpu_s"] for r in rs)) for m, rs in by.items()}
    if "uniform" in by:  # model selection by the meta set: the snapshot of lowest meta loss (every 100 steps)
        rows["uniform, early-stopped on the meta set"] = (
            [min(r["trace"], key=lambda row: row["validation_loss"]) for r in by["uniform"]], rows["uniform"][1])
    for method, (finals, cpu) in rows.items():
        cells = [_mean_std([f[k] for f in finals]) for k in ("test_accuracy", "rare_accuracy", "test_loss")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {cpu:.0f} |")
    counts = MetaWeightNet(seed=0).class_counts.tolist()
    lines += ["", "Test accuracy by rarity rank (0 = most frequent; training examples per class in brackets), "
              "mean over seeds:", "",
              "| method | " + " | ".join(f"rank {r} ({c})" for r, c in enumerate(counts)) + " |",
              "|---|" + "---|" * len(counts)]
    for method, rs in by.items():
        cells = [statistics.mean(r["final"][f"accuracy_rank_{k}"] for r in rs) for k in range(len(counts))]
        lines.append(f"| {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", "MWN's learned weights V(l_i) of the training examples at the end (CNN in evaluation mode):", "",
              "| seed | mean weight, clean labels | mean weight, wrong labels | ratio | weight at loss 0.1 / 2 / 6 |",
              "|---|---|---|---|---|"]
    for r in by.get("mwn", []):
        f, grid, w = r["final"], torch.tensor(r["loss_grid"]), r["weight_function"]
        at = [w[int((grid - v).abs().argmin())] for v in (0.1, 2.0, 6.0)]
        lines.append(f"| {r['seed']} | {f['weight_clean']:.4f} | {f['weight_corrupted']:.4f} "
                     f"| {f['weight_clean'] / f['weight_corrupted']:.3f} | {' / '.join(f'{a:.4f}' for a in at)} |")
    if "mwn" in by:
        lines += ["", "MWN's mean weight of the CLEAN training examples by the rarity rank of their class, next to the "
                  "mean weight of the wrongly labelled ones (mean over seeds):", "",
                  "| | " + " | ".join(f"rank {r}" for r in range(len(counts))) + " | wrong labels |",
                  "|---|" + "---|" * (len(counts) + 1)]
        by_rank = torch.stack([_clean_weight_by_rank(r) for r in by["mwn"]]).mean(0)
        wrong = statistics.mean(r["final"]["weight_corrupted"] for r in by["mwn"])
        lines.append("| mean weight | " + " | ".join(f"{w:.3f}" for w in by_rank.tolist()) + f" | {wrong:.3f} |")
    return "\n".join(lines)


def _clean_weight_by_rank(run: dict[str, Any]) -> Tensor:
    """Mean final weight of the clean training examples of each rarity rank, [10], from an MWN run's record
    (the split is rebuilt from the seed: it is deterministic)."""
    problem = MetaWeightNet(seed=run["seed"])
    ranks = problem.rank_of_digit[problem.true_train_labels]
    weights, clean = torch.tensor(run["train_weights"]), ~torch.tensor(run["corrupted"])
    return torch.stack([weights[clean & (ranks == r)].mean() for r in range(len(problem.class_counts))])


def plot(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """reweighting_accuracy.png (test accuracy, rare-class accuracy vs step) and reweighting_weights.png
    (MWN's weight function and the training examples' weights, clean vs noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_method(runs)
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:gray"), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, rs in by.items():
        steps = [row["step"] for row in rs[0]["trace"]]
        for ax, key in zip(axes, ("test_accuracy", "rare_accuracy"), strict=True):
            values = torch.tensor([[row[key] for row in r["trace"]] for r in rs])
            mean, std = values.mean(0), values.std(0) if len(rs) > 1 else torch.zeros(len(steps))
            ax.plot(steps, mean, color=colors[method], label=method)
            ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.15)
    for ax, title in zip(axes, ("test accuracy (balanced test set)", "test accuracy, 3 rarest classes"), strict=True):
        ax.set_xlabel("lower SGD step")
        ax.set_title(title + f", mean +- std over {len(next(iter(by.values())))} seeds")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "reweighting_accuracy.png", dpi=110)
    plt.close(fig)

    mwn = by.get("mwn", [])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in mwn:
        axes[0].plot(r["loss_grid"], r["weight_function"], label=f"V(loss), seed {r['seed']}")
    if mwn:
        r = mwn[0]
        corrupted = torch.tensor(r["corrupted"])
        losses, weights = torch.tensor(r["train_losses"]), torch.tensor(r["train_weights"])
        for mask, name, color in ((~corrupted, "clean label", "tab:green"), (corrupted, "wrong label", "tab:red")):
            axes[0].scatter(losses[mask].clamp(1e-4, 10), weights[mask], s=6, alpha=0.5, color=color,
                            label=f"training examples, {name} (seed {r['seed']})")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("cross-entropy of the example under its (possibly wrong) label (clipped to [1e-4, 10])")
    axes[0].set_ylabel("weight V(loss)")
    axes[0].set_title("learned weighting function at the end")
    axes[0].legend(fontsize=7)
    for r in mwn:
        steps = [row["step"] for row in r["trace"]]
        axes[1].plot(steps, [row["weight_clean"] for row in r["trace"]], color="tab:green",
                     label="clean labels" if r is mwn[0] else None)
        axes[1].plot(steps, [row["weight_corrupted"] for row in r["trace"]], color="tab:red",
                     label="wrong labels" if r is mwn[0] else None)
    axes[1].set_xlabel("outer step (= lower SGD step)")
    axes[1].set_ylabel("mean weight over the training set")
    axes[1].set_title("MWN: mean weight, clean vs wrong labels (each seed)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reweighting_weights.png", dpi=110)
    plt.close(fig)
    return ["reweighting_accuracy.png", "reweighting_weights.png"]


def report(runs: list[dict[str, Any]], steps: int, seeds: tuple[int, ...], total_cpu: float, command: str,
           images: list[str]) -> str:
    problem = MetaWeightNet(seed=0)
    n, noisy = problem.train_labels.shape[0], int(problem.corrupted.sum())
    pictures = "\n".join(f"![{name}]({name})" for name in images)
    return f"""# Meta-Weight-Net vs training on everything: noisy, class-imbalanced digits

Regenerate: `{command}` (torch {torch.__version__}, Python {platform.python_version()}, one torch thread;
seeds {', '.join(map(str, seeds))}; {total_cpu:.0f} CPU s in all). One run from the command line:
`bilevel fit --config experiments/configs/reweighting_digits.yaml`.

Setup (`problems.reweighting.MetaWeightNet`, Shu et al. 2019): {n} training digits, {noisy} of them
({noisy / n:.0%}) with a wrong label drawn uniformly from the other nine classes; class sizes
{problem.class_counts.tolist()} by rarity rank (imbalance 10; which digit gets which rank is drawn from
the seed); a clean, balanced meta set of {problem.meta_labels.shape[0]}; a balanced test set of
{problem.test_labels.shape[0]}. CNN: conv 8 -> BN -> ReLU -> conv 16 stride 2 -> BN -> ReLU -> linear.
V: 1 -> 100 -> 1 MLP with sigmoid output on the detached loss; weights normalized by their batch sum.
Every method: {steps} plain SGD steps at lr {LR}, batch 32, weight decay 5e-4 in the objective, the same
initial CNN. MWN: `hypergrad.Unrolled(inner_steps=1, inner_lr={LR}, outer_lr={META_LR}, outer_optimizer="adam")`
through `bilevel.fit`. "3 rarest classes": the mean of the test accuracies of rarity ranks 7, 8, 9
(18, 14 and 11 training examples before the noise).

{tables(runs)}

{pictures}
"""


def write(out: Path, result: dict[str, Any]) -> None:
    """reweighting.json (every run), the PNGs and reweighting.md into ``out``, from ``result``."""
    (out / "reweighting.json").write_text(json.dumps(result, separators=(",", ":")))
    images = plot(result["runs"], out)
    text = report(result["runs"], result["steps"], tuple(result["seeds"]), result["total_cpu_s"], result["command"],
                  images)
    (out / "reweighting.md").write_text(text + ANALYSIS)
    print(f"wrote {out / 'reweighting.md'} ({result['total_cpu_s']:.0f} CPU s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_STEPS} steps, temp folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out-dir", default=None, help="default: experiments/results (a temp folder with --quick)")
    parser.add_argument("--report", action="store_true", help="rewrite the md and PNGs from the out dir's JSON only")
    args = parser.parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write(out, json.loads((out / "reweighting.json").read_text()))
        return 0
    seeds = tuple(args.seeds or ((0,) if args.quick else SEEDS))
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    torch.set_num_threads(1)
    start, runs = time.process_time(), []
    for method in args.methods:
        for seed in seeds:
            record = run(method, seed, steps)
            runs.append(record)
            f = record["final"]
            print(f"{method:13s} seed {seed}: test acc {f['test_accuracy']:.3f} rare {f['rare_accuracy']:.3f} "
                  f"loss {f['test_loss']:.3f} weights clean/wrong {f['weight_clean']:.3f}/{f['weight_corrupted']:.3f}"
                  f" ({record['cpu_s']:.0f} CPU s)", flush=True)
    command = ("python -m experiments.reweighting " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    write(out, {"command": command, "steps": steps, "seeds": list(seeds), "total_cpu_s": time.process_time() - start,
                "torch": torch.__version__, "runs": runs})
    return 0 if all(math.isfinite(r["final"]["test_loss"]) for r in runs) else 1


# The reading of the committed results (python -m experiments.reweighting): static text, checked against the
# tables above when they were generated.
ANALYSIS = """
## Reading

**MWN beats training on everything, by a wide margin.** Test accuracy 0.829 +- 0.028 against 0.545 +- 0.062
for the same CNN trained on everything with uniform weights (3000 identical SGD steps), and against 0.661 +-
0.014 for that baseline stopped at its lowest meta loss; the test loss is 0.68 against 2.23. Uniform training
peaks at 0.65-0.68 after 200-300 steps and then memorizes the wrong labels; MWN reaches 0.81-0.86 by step 200
steps and stays within three points of its peak for the remaining 2800, so it needs no early stopping. Adding
the 100 clean meta examples to the training set (uniform+meta) gives 0.679 at the end: the clean data MWN sees
are not what makes the difference, the reweighting is (uniform+meta does peak at 0.85-0.87 after 100 steps,
but with the clean examples inside the training set there is nothing left to stop on). The oracle that trains
on the clean 60 % only reaches 0.924: MWN closes about three quarters of the gap between uniform training and
the oracle.

**What V learned.** A monotonically decreasing function of the loss on every seed, the shape the paper reports
under label noise: V(0.1) = 0.17-0.38, V(2) <= 0.015, V(6) ~ 0. At the end the wrongly labelled examples get a
mean weight of 0.04-0.07 and the clean ones 0.25-0.43 (5.4-8.3 times more; with the weights normalized per
batch only the ratio matters), and the separation is there from the first few hundred steps (the right plot).
Clean examples are weighted alike whatever the rarity of their class (0.339-0.341 from the most frequent to
the rarest rank): a network that fits every clean example drives all their losses near zero, and V sees
nothing else.

**What it did not fix: the imbalance.** On the three rarest classes MWN reaches 0.633 +- 0.121 (uniform 0.429,
oracle 0.840), below uniform+meta's 0.671, with the largest spread over seeds (0.51-0.75). A weight that
depends only on the loss cannot rebalance classes: it removes most of the noise, but the clean rarest class
still has about 7 training examples against 66 for the most frequent one (40 % of 11 and of 110 relabelled),
so the imbalance of 10 stays as it is. uniform+meta's 10 extra clean examples per class more than double the
rarest classes' clean data, which is why it wins there. The paper's own experiments treat noise and imbalance
separately (V then learns a decreasing and an increasing function respectively); with 40 % noise and imbalance
together, V follows the noise.

**Cost and caveats.** MWN costs about 9 times the baseline's CPU time (80 against 8-10 CPU s per run: each
outer step differentiates one SGD step in reverse mode, through `bilevel.fit`, plus an evaluation every 100
steps). `Unrolled` takes the real lower step with theta before its update, the paper with theta after it (see
`problems/reweighting.py`); the lower optimizer is plain SGD at a constant step size, not the paper's momentum
SGD with step decay, for every method alike. Three seeds; each seed also draws which digit is rare, so the
per-rank numbers mix digits.
"""


if __name__ == "__main__":
    sys.exit(main())
