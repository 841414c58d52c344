"""The cost of a checkpoint against an outer step on the default job: what ``checkpoint_every`` is set by.

    python -m experiments.bench.checkpoint --device cpu --threads 1

The default job (``experiments/configs/cleaning_digits.yaml``: DigitsCleaning, its CG) runs through
``bilevel.fit``; after every step a callback times that training step (Lightning's whole step) and
one ``trainer.save_checkpoint`` of the full state (parameters, engine state, data position, run
record). Medians over the steps after warm-up. Writes ``experiments/results/speed/checkpoint.md``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything

import bilevel
import hypergrad
from bilevel.checkpoint import DEFAULT_CHECKPOINT_EVERY
from experiments.bench.common import RESULTS, environment, markdown_table, parser, setup
from problems import DigitsCleaning


class _Timer(Callback):
    """Times each training step and one checkpoint save after it (the file is removed at once)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.steps: list[float] = []
        self.saves: list[float] = []
        self.size = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append(time.perf_counter() - self._start)
        path = os.path.join(self.directory, f"step{trainer.global_step}.ckpt")
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        self.saves.append(time.perf_counter() - start)
        self.size = os.path.getsize(path)
        os.remove(path)


def measure(device: torch.device, steps: int, warmup: int) -> tuple[float, float, int]:
    """(median step seconds, median save seconds, checkpoint bytes) over ``steps`` steps after ``warmup``."""
    seed_everything(0, verbose=False)
    engine = hypergrad.CG(iters=10, tol=1e-3, inner_steps=5, inner_lr=2.0, outer_lr=0.1)
    with tempfile.TemporaryDirectory() as directory:
        timer = _Timer(directory)
        bilevel.fit(DigitsCleaning(seed=0), engine, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, callbacks=[timer], default_root_dir=directory,
                    accelerator=device.type, devices=1)
    return statistics.median(timer.steps[warmup:]), statistics.median(timer.saves[warmup:]), timer.size


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=str(RESULTS / "speed" / "checkpoint.md"))
    args = p.parse_args(argv)
    device = setup(args)
    steps = 4 if args.quick else args.steps
    step, save, size = measure(device, steps, args.warmup)
    every = DEFAULT_CHECKPOINT_EVERY
    table = markdown_table(
        ["training step (ms)", "checkpoint save (ms)", "save / step", "checkpoint (kB)",
         f"share of a run at checkpoint_every={every}"],
        [[step * 1e3, save * 1e3, f"{save / step:.3f}", size / 1e3, f"{100 * save / (every * step):.2f} %"]])
    text = (f"# The cost of a checkpoint\n\n`python -m experiments.bench.checkpoint --device {args.device} "
            f"--threads {args.threads}`; {environment(device)}; medians of {steps} steps after {args.warmup} "
            f"warm-up, the default job (DigitsCleaning, the CG of `experiments/configs/cleaning_digits.yaml`) "
            f"through `bilevel.fit`.\n\n{table}\n\n`checkpoint_every` (default {every}) bounds what a killed run "
            f"loses ({every} steps) at the share of the run above.\n")
    print(text)
    if not args.quick:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
