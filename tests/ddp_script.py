"""One ``bilevel.fit`` on several CPU processes (gloo), run by tests/test_ddp.py in a subprocess.

Lightning's "ddp" relaunches this script for every rank but 0 and "ddp_spawn" / "ddp_fork" start their
ranks with ``torch.multiprocessing`` (fresh interpreters / forks of this one), so none may run inside the
pytest process. The multiprocessing launchers take several fits in one invocation (each fit starts and
ends its own ranks); "ddp" takes one, as its relaunched ranks run the whole script again. Every rank writes what
it trained on and where it ended (``Record``) to ``<out>/<tag>-rank<r>.pt``; the test compares the
ranks with each other and with one process fed the union of their batches.

    python tests/ddp_script.py OUT --strategy ddp --engines CG [--steps 3] [--devices 2] [--save-at 2]
        [--ckpt-path PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import bilevel
import hypergrad

torch.set_num_threads(1)  # here, not under __main__: ddp_spawn's processes import this file without running main

DIM = 4
N_LOWER, N_UPPER = 16, 12  # examples; the lower level in minibatches of BATCH per rank, the upper as one full batch
BATCH = 4


def make_data(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Features and targets of a noisy linear model, float64: (lower tensors, upper tensors)."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(DIM, generator=gen, dtype=torch.float64)
    out = []
    for n in (N_LOWER, N_UPPER):
        features = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        out.append((features, features @ truth + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)))
    return out[0], out[1]


def lower_loader(seed: int = 0) -> DataLoader:
    """The lower level's shuffled minibatches, with their own generator (exact resumes)."""
    lower, _ = make_data(seed)
    return DataLoader(TensorDataset(*lower), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


class Ridge(bilevel.BilevelProblem):
    """Ridge regression with a learned per-feature L2 penalty exp(x); both objectives are means over the batch."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 1)
        self.lower = bilevel.Hyper(w=torch.randn(DIM, generator=gen, dtype=torch.float64),
                                   c=torch.zeros((), dtype=torch.float64))
        self.upper = bilevel.Hyper(log_l2=torch.full((DIM,), -1.0, dtype=torch.float64))
        self.seed = seed

    def _mse(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        features, target = batch
        return 0.5 * torch.mean((torch.tanh(features @ self.lower.w) + self.lower.c - target) ** 2)

    def lower_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._mse(batch) + 0.5 * torch.sum(torch.exp(self.upper.log_l2) * self.lower.w ** 2)

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._mse(batch)

    def data(self) -> tuple[Any, Any]:
        return lower_loader(self.seed), make_data(self.seed)[1]


class ConstrainedRidge(Ridge):
    """Ridge with affine lower constraints for LV-HBA: the first a mean over the lower batch, the second
    batch-independent, so c has one shape on every shard (a per-example constraint, one entry per row, would
    change shape under sharding and is not supported on several processes)."""

    def lower_constraints(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        features, _ = batch
        return torch.stack([features.mean(0) @ self.lower.w + 0.1 * self.upper.log_l2.sum() - 0.2,
                            self.lower.c - 0.3])


class DynamicRidge(Ridge):
    """Ridge with lower dynamics for PES: heavy-ball descent on g, the lower state being the momentum."""

    def lower_step(self, x: dict, y: dict, grad_y: dict, lower: dict, t: Tensor) -> tuple[dict, dict]:
        momentum = {k: 0.5 * lower[k] + grad_y[k] for k in y}
        return {k: y[k] - 0.2 * momentum[k] for k in y}, momentum

    def init_lower_state(self, y: dict) -> dict:
        return {k: torch.zeros_like(v) for k, v in y.items()}


ENGINES = {
    "CG": lambda: hypergrad.CG(iters=3, inner_steps=3, inner_lr=0.3, outer_lr=0.05),
    "Unrolled": lambda: hypergrad.Unrolled(inner_steps=4, truncate=3, inner_lr=0.3, outer_lr=0.05),
    "Exact": lambda: hypergrad.Exact(inner_steps=3, inner_lr=0.3, outer_lr=0.05),
    "Neumann": lambda: hypergrad.Neumann(terms=3, inner_steps=3, inner_lr=0.3, outer_lr=0.05),
    "F2SA": lambda: hypergrad.F2SA(inner_steps=2, lr_y=0.02, lr_z=0.2, momentum=True),
    "Penalty": lambda: hypergrad.Penalty(inner_steps=2, sigma=0.1, inner_lr=0.2, outer_lr=0.05),
    "BOREP": lambda: hypergrad.BOREP(refine_steps=2, period=2, inner_steps=2, terms=3, inner_lr=0.2),
    "LVHBA": lambda: hypergrad.LVHBA(alpha=0.05, eta=0.05),
    "PES": lambda: hypergrad.PES(particles=2, inner_steps=2, sigma=0.1, horizon=4, meta_loss="mean"),
}
PROBLEMS: dict[str, type[Ridge]] = {"LVHBA": ConstrainedRidge, "PES": DynamicRidge}  # Ridge for every other engine


def problem_for(engine: str) -> Ridge:
    return PROBLEMS.get(engine, Ridge)()


class Record(Callback):
    """Each step's batches and logged engine metrics, the final x, y and engine state: to ``<out>/<tag>-rank<r>.pt``.

    ``save_at``: also write a checkpoint of that step to ``<out>/<tag>-step<k>.ckpt`` (every rank
    calls ``save_checkpoint``; Lightning's strategy writes it on rank 0) and record the state there.
    """

    def __init__(self, out: str, tag: str, save_at: int = 0) -> None:
        self.out, self.tag, self.save_at = Path(out), tag, save_at
        self.batches: list[Any] = []
        self.metrics: list[dict[str, Tensor]] = []
        self.at_save: dict[str, Any] = {}
        self.loaded: Any = None

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.loaded = _copy(module.state)  # the engine state a resumed run starts from (None otherwise)

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append(_copy(batch))

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # time/* are each rank's own wall times; every other metric is the engine's, global after the reduction.
        self.metrics.append({k: v.clone() for k, v in trainer.callback_metrics.items() if not k.startswith("time/")})
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.out / f"{self.tag}-step{self.save_at}.ckpt")
            self.at_save = _copy({"state": module.state, "passes": _passes(trainer)})

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        problem = module.problem
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "step": trainer.global_step,
                    "x": _copy(dict(problem.upper.named_parameters())),
                    "y": _copy(dict(problem.lower.named_parameters())),
                    "state": _copy(module.state), "batches": self.batches, "metrics": self.metrics,
                    "at_save": self.at_save, "loaded": self.loaded},
                   self.out / f"{self.tag}-rank{trainer.global_rank}.pt")


def _copy(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, tree)


def _passes(trainer: Trainer) -> dict[str, int]:
    stream = trainer.train_dataloader
    return {name: level.passes for name, level in stream.levels.items()}


def run(out: str, strategy: str, engine: str, steps: int, devices: int, save_at: int, ckpt_path: str | None,
        tag: str | None = None) -> None:
    """One fit of ``engine`` (on Ridge or its variant in PROBLEMS) on ``devices`` CPU processes; every rank records
    to ``out`` as ``tag``."""
    tag = tag or f"{strategy}-{engine}"
    lower, upper = lower_loader(), make_data()[1]
    bilevel.fit(problem_for(engine), ENGINES[engine](), lower, upper, max_steps=steps, accelerator="cpu",
                devices=devices, strategy=strategy, logger=False, enable_progress_bar=False, default_root_dir=out,
                checkpoint_every=100, callbacks=[Record(out, tag, save_at)], ckpt_path=ckpt_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--engines", default="CG", help="comma-separated; one fit each (one only with 'ddp')")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--ckpt-path", default=None)
    args = parser.parse_args()
    for engine in args.engines.split(","):
        run(args.out, args.strategy, engine, args.steps, args.devices, args.save_at, args.ckpt_path)


if __name__ == "__main__":
    main()
