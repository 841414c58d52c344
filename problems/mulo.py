"""Meta-training a learned optimizer as a bilevel problem (Therien et al. 2024, muLO).

    upper x:  theta, the parameters of the per-parameter MLP ``bilevel.LearnedOptimizerNet``
    lower y:  the weights of task networks (MLP classifiers), trained by the LO through the
              lower-dynamics hook (``lower_step`` = one ``bilevel.lo_step``; ``hypergrad.dynamics``)
    g(x, y):  the tasks' mean training cross-entropy on the lower batch (the LO's gradient signal)
    f(x, y):  the same on a separate training minibatch after the truncation: the meta-loss

The task family: MLP classifiers (``bilevel.mlp``, muP or SP) of given widths on two datasets of
8x8 images with 10 classes, scikit-learn's digits and a generated image-like set (smooth class
templates, randomly shifted, with pixel noise), one network per (dataset, width). The engines
(Unrolled with truncation, or PES) restart the networks at the end of each horizon.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

import bilevel
from bilevel.learned import LearnedOptimizerNet, MuMLP, lo_init_state, lo_step
from problems.common import digits

DATASETS = ("digits", "images")
INPUTS, CLASSES = 64, 10


def load_task_data(dataset: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(inputs [N, 64] float32 standardized per feature, labels int64 [N]) of ``dataset``.

    "digits": scikit-learn's 1797 digits. "images": 2000 generated 8x8 images, 10 classes: each
    class a smooth random template (noise blurred by a 3x3 box filter twice), each image its
    class's template shifted by up to one pixel each way plus N(0, 0.3^2) pixel noise, drawn from
    ``seed``.
    """
    if dataset == "digits":
        pixels, targets = digits()
        inputs = torch.as_tensor(pixels, dtype=torch.float32)
        labels = torch.as_tensor(targets, dtype=torch.int64)
    elif dataset == "images":
        gen = torch.Generator().manual_seed(10_000 + seed)
        templates = torch.randn(CLASSES, 1, 12, 12, generator=gen)
        box = torch.full((1, 1, 3, 3), 1 / 9)
        templates = F.conv2d(F.conv2d(templates, box, padding=1), box, padding=1)[:, 0]
        templates = templates / templates.std(dim=(1, 2), keepdim=True)
        n = 2000
        labels = torch.randint(0, CLASSES, (n,), generator=gen)
        shifts = torch.randint(0, 3, (n, 2), generator=gen)
        rows = shifts[:, :1, None] + 1 + torch.arange(8)[None, :, None]
        cols = shifts[:, 1:, None] + 1 + torch.arange(8)[None, None, :]
        images = templates[labels[:, None, None], rows, cols]
        inputs = (images + 0.3 * torch.randn(images.shape, generator=gen)).reshape(n, INPUTS)
    else:
        raise ValueError(f"load_task_data: dataset must be one of {DATASETS}, got {dataset!r}")
    inputs = (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-6)
    return inputs, labels


class TaskBatches:
    """Minibatches for several tasks at once: each item is {task: (inputs [B, 64], labels [B])}.

    Re-iterable: each pass yields ``length`` batches drawn with replacement from a generator seeded
    from ``seed`` and the pass number, so runs are reproducible.
    """

    def __init__(self, data: dict[str, tuple[Tensor, Tensor]], batch_size: int, seed: int, length: int = 1000) -> None:
        self.data, self.batch_size, self.seed, self.length = data, batch_size, seed, length
        self._passes = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._passes)
        self._passes += 1
        for _ in range(self.length):
            batch = {}
            for task, (inputs, labels) in self.data.items():
                index = torch.randint(0, labels.shape[0], (self.batch_size,), generator=gen)
                batch[task] = (inputs[index], labels[index])
            yield batch


def task_name(dataset: str, width: int) -> str:
    return f"{dataset}_w{width}"


class LOMetaTraining(bilevel.BilevelProblem):
    """Meta-train a learned optimizer on MLP tasks (see the module docstring).

    Args:
        parametrization: "mup" (muLO: muP networks and the LO's update scaled by the muP
            multipliers s_p) or "sp" (SP-LO: standard networks, s_p = 1).
        base_width: the width muP's multipliers are relative to.
        widths: hidden widths of the task networks (one network per dataset and width).
        datasets: subset of ("digits", "images").
        depth: hidden layers of the task networks.
        step_mult: the LO's global step scale.
        batch_size: examples per task per batch.
        lo_init: "adam" (start at Adam's direction) or "random"; see ``LearnedOptimizerNet``.
        seed: seed of the task networks' init, the LO's init and the batches.
    """

    def __init__(self, parametrization: str = "mup", base_width: int = 32, widths: Sequence[int] = (32,),
                 datasets: Sequence[str] = DATASETS, depth: int = 2, step_mult: float = 0.01,
                 batch_size: int = 128, lo_init: str = "adam", seed: int = 0) -> None:
        super().__init__()
        if parametrization not in ("mup", "sp"):
            raise ValueError(f"LOMetaTraining: parametrization must be 'mup' or 'sp', got {parametrization!r}")
        unknown = sorted(set(datasets) - set(DATASETS))
        if unknown or not datasets:
            raise ValueError(f"LOMetaTraining: datasets must be a non-empty subset of {DATASETS}, got {datasets!r}")
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"LOMetaTraining: widths must be positive ints, got {widths!r}")
        if not step_mult > 0:
            raise ValueError(f"LOMetaTraining: step_mult must be > 0, got {step_mult!r}")
        self.parametrization, self.step_mult, self.batch_size, self.seed = parametrization, step_mult, batch_size, seed
        gen = torch.Generator().manual_seed(seed)
        self.upper = LearnedOptimizerNet(init=lo_init, generator=gen)
        nets: dict[str, MuMLP] = {}
        for dataset in datasets:
            for width in widths:
                nets[task_name(dataset, width)] = bilevel.mlp(INPUTS, CLASSES, base_width, width / base_width, depth,
                                                              parametrization, generator=gen)
        self.lower = nn.ModuleDict(nets)
        # The muP update multipliers, keyed as the lower variables are (task.parameter).
        self.multipliers = {f"{task}.{k}": s for task, net in nets.items() for k, s in net.multipliers.items()}
        self.widths = {task: net.width for task, net in nets.items()}
        self._data = {dataset: load_task_data(dataset, seed) for dataset in datasets}

    # -- the two levels ------------------------------------------------------------------------

    def task_losses(self, batch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """{task: mean cross-entropy of its network on its part of the batch}."""
        return {task: F.cross_entropy(net(batch[task][0]), batch[task][1]) for task, net in self.lower.items()}

    def lower_objective(self, batch: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack(list(self.task_losses(batch).values())).mean()

    def upper_objective(self, batch: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack(list(self.task_losses(batch).values())).mean()

    def upper_metrics(self, batch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """The meta-loss per task network ("meta_loss/<dataset>_w<width>") and per width ("meta_loss/w<width>")."""
        losses = self.task_losses(batch)
        metrics = {f"meta_loss/{task}": loss for task, loss in losses.items()}
        for width in sorted(set(self.widths.values())):
            same = [loss for task, loss in losses.items() if self.widths[task] == width]
            metrics[f"meta_loss/w{width}"] = torch.stack(same).mean()
        return metrics

    # -- the lower dynamics: the learned optimizer -----------------------------------------------

    def init_lower_state(self, y: dict[str, Tensor]) -> dict[str, Tensor]:
        """The LO's state (momenta, RMS, row/column factors) and the last update's magnitude per parameter."""
        return {**lo_init_state(y), **{f"update/{k}": torch.zeros_like(v) for k, v in y.items()}}

    def lower_step(self, x: dict[str, Tensor], y: dict[str, Tensor], grad_y: dict[str, Tensor],
                   lower_state: dict[str, Tensor], t: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One LO update of every task network: theta = x, the muP multipliers s_p, ``step_mult``."""
        new_y, new_state = lo_step(x, self.upper, y, grad_y, lower_state, t, self.multipliers, self.step_mult)
        new_state.update({f"update/{k}": (new_y[k] - y[k]).abs() for k in y})
        return new_y, new_state

    # -- data ------------------------------------------------------------------------------------

    def data(self) -> tuple[TaskBatches, TaskBatches]:
        """Lower and upper minibatches from the same training pools, from independent streams."""
        pools = {task: self._data[task.rsplit("_w", 1)[0]] for task in self.lower}
        return (TaskBatches(pools, self.batch_size, 2 * self.seed),
                TaskBatches(pools, self.batch_size, 2 * self.seed + 1))


class UpdateHistograms(Callback):
    """TensorBoard histograms of log10 |update| of the learned optimizer's last step, per task network.

    Reads the engine state's lower dynamics state (``update/<parameter>``), so it works with any
    engine that runs them (Unrolled, PES). Add it with ``trainer.callbacks`` in a config or
    ``bilevel.fit(..., callbacks=[UpdateHistograms()])``.

    Args:
        every: steps between histograms.
    """

    def __init__(self, every: int = 10) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"UpdateHistograms: every must be >= 1, got {every}")
        self.every = every

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        state = getattr(pl_module, "state", None)
        step = trainer.global_step
        if state is None or "lower" not in state or step % self.every or not isinstance(
                trainer.logger, TensorBoardLogger):
            return
        tasks: dict[str, list[Tensor]] = {}
        for key, value in state["lower"].items():
            if key.startswith("update/"):
                tasks.setdefault(key[len("update/"):].split(".", 1)[0], []).append(value.reshape(-1))
        for task, values in tasks.items():
            magnitudes = torch.log10(torch.cat(values).float().clamp_min(1e-12))
            trainer.logger.experiment.add_histogram(f"update_log10_abs/{task}", magnitudes, step)
