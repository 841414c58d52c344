"""Meta-training a learned optimizer as a bilevel problem over a task family (Therien et al. 2024, muLO).

    upper x:  theta, the learned optimizer's meta-parameters (``bilevel.learned``: muLO's
              ``AdafacLONet`` or the reduced ``LearnedOptimizerNet``)
    lower y:  the weights of R task runs per architecture slot, stacked on a leading run axis
              ({"<slot>.<param>": [R, ...]}, slot "d<depth>w<width>"), trained by the LO through
              the lower-dynamics hook (``lower_step``: one LO update of every run)
    g(x, y):  the runs' mean training cross-entropy on the step's minibatch (the LO's gradient signal)
    f(x, y):  the same on an independent minibatch of the same tasks: the meta-loss

The task family (``problems.lo_tasks``): every run trains one network per slot until its horizon
(drawn log-uniform per restart), then restarts with a fresh task: a new network init, a new
dataset (digits, generated images, a new teacher network, mnist1d), restarts staggered across the
runs. Each outer step is one truncation of K lower steps, served as a ``hypergrad.dynamics.Truncation``:
K fresh minibatches and the restarts, which ``lower_restart`` applies. Meta-gradients by truncated
backprop (``hypergrad.Unrolled(inner_steps=K, meta_loss="mean")``) over R runs, or by PES
(``hypergrad.PES``) with ``pes_pairs=N``: then every antithetic pair is one run with its own tasks,
minibatches and restart times (the data carries a leading pair axis) and y holds one run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call, vmap

import bilevel
from bilevel.learned import MuMLP, mlp
from bilevel.learned.optimizer import make_rule
from hypergrad.dynamics import Truncation
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


class Truncations:
    """One level's data: pass p of it serves truncations p * length, ..., (p + 1) * length - 1 of ``runs``.

    ``set_epoch`` (called by ``bilevel.fit`` with the pass number, as for a distributed sampler) makes a
    resumed run serve the same truncations as the uninterrupted one. With ``pairs`` the runs are PES's
    antithetic pairs: every tensor gets a run axis of 1 after the leading pair axis (y holds one run).
    """

    def __init__(self, runs: Any, level: str, length: int = 1000, pairs: bool = False) -> None:
        self.runs, self.level, self.length, self.pairs, self.epoch = runs, level, length, pairs, 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Truncation]:
        for i in range(self.epoch * self.length, (self.epoch + 1) * self.length):
            yield self.item(i)

    def item(self, i: int) -> Truncation:
        """Truncation i of this level (the lower level's carries the restarts)."""
        data = self.runs.truncation(i, levels=(self.level,))
        steps = data[self.level]
        restart = {"restart": data["restart"], "init": data["init"], "t": data["t"]}
        if self.level == "upper":
            restart = None
        if self.pairs:
            steps = [{slot: (x.unsqueeze(1), y.unsqueeze(1)) for slot, (x, y) in step.items()} for step in steps]
            if restart is not None:
                restart = {"restart": restart["restart"].unsqueeze(1), "t": restart["t"].unsqueeze(1),
                           "init": {k: v.unsqueeze(1) for k, v in restart["init"].items()}}
        return Truncation(steps=steps, restart=restart, pairs=self.pairs,
                          fresh=data["restart"] if self.pairs and restart is not None else None)


def _stacked(template: MuMLP, init: dict[str, Tensor]) -> nn.Module:
    """A copy of ``template`` whose parameters are ``init``'s [R, ...] tensors (the runs' weights, by name)."""
    stack = copy.deepcopy(template)
    for name, _ in list(template.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(stack.get_submodule(owner), leaf, nn.Parameter(init[name].clone()))
    return stack


def _along(flag: Tensor, like: Tensor) -> Tensor:
    """flag [R] shaped to broadcast against like [R, ...]."""
    return flag.reshape(flag.shape + (1,) * (like.dim() - flag.dim()))


class LOMetaTraining(bilevel.BilevelProblem):
    """Meta-train a learned optimizer on a task family (see the module docstring).

    Args:
        optimizer: "adafac" (muLO's optimizer, ``bilevel.learned.adafac``) or "reduced"
            (``bilevel.learned.optimizer``).
        parametrization: "mup" (muLO: muP networks, the LO's update scaled by the muP multipliers)
            or "sp" (SP-LO).
        base_width: the width muP's multipliers are relative to.
        architectures: (depth, width) of the task networks: one slot each, every run trains all.
        datasets: sampled per restart and slot, from ``problems.lo_tasks.DATASETS``.
        horizons: (lo, hi): each task's horizon in LO steps, log-uniform, a multiple of ``truncation``.
        truncation: K, lower steps per outer step (the engine's ``inner_steps`` must equal it).
        runs: R, task runs trained side by side (truncated backprop's meta-batch).
        pes_pairs: N for PES with per-pair data (every pair its own run); then ``runs`` is ignored.
        batch_size: examples per minibatch per run and slot.
        step_mult: the LO's global step scale (None: the LO's own default).
        lo_settings: more constructor arguments of the LO's net (e.g. {"hidden": 32}).
        seed: seed of the LO's random init and of the task family.
    """

    def __init__(self, optimizer: str = "adafac", parametrization: str = "mup", base_width: int = 32,
                 architectures: Sequence[Sequence[int]] = ((2, 32),),
                 datasets: Sequence[str] = ("digits", "images", "teacher"), horizons: Sequence[int] = (50, 500),
                 truncation: int = 10, runs: int = 4, pes_pairs: int | None = None, batch_size: int = 128,
                 step_mult: float | None = None, lo_settings: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        from problems.lo_tasks import TaskFamily, TaskRuns  # lo_tasks imports this module's data loader

        if optimizer not in ("adafac", "reduced"):
            raise ValueError(f"LOMetaTraining: optimizer must be 'adafac' or 'reduced', got {optimizer!r}")
        if pes_pairs is not None and (not isinstance(pes_pairs, int) or pes_pairs < 1):
            raise ValueError(f"LOMetaTraining: pes_pairs must be a positive int or None, got {pes_pairs!r}")
        if step_mult is not None and not step_mult > 0:
            raise ValueError(f"LOMetaTraining: step_mult must be > 0 or None, got {step_mult!r}")
        family = TaskFamily(datasets=tuple(datasets), architectures=tuple(tuple(a) for a in architectures),
                            base_width=base_width, parametrization=parametrization, horizons=tuple(horizons),
                            truncation=truncation, batch_size=batch_size, seed=seed)
        self.family, self.pes_pairs, self.step_mult = family, pes_pairs, step_mult
        self.task_runs = TaskRuns(family, pes_pairs or runs)
        self.rule = make_rule(optimizer, {**(lo_settings or {}), "generator": torch.Generator().manual_seed(seed)})
        self.upper = self.rule.net
        held = 1 if pes_pairs else runs
        init = {k: v[:held] for k, v in self.task_runs.truncation(0, levels=())["init"].items()}
        # Templates (not registered: their parameters are no variables) give the per-run forward to vmap.
        self._templates = {
            f"d{depth}w{width}": mlp(INPUTS, CLASSES, base_width, width / base_width, depth, parametrization)
            for depth, width in family.architectures}
        self.lower = nn.ModuleDict({
            slot: _stacked(net, {name: init[f"{slot}.{name}"] for name, _ in net.named_parameters()})
            for slot, net in self._templates.items()})
        self._names = {slot: [name for name, _ in net.named_parameters()] for slot, net in self._templates.items()}
        # The muP update multipliers, keyed as the lower variables are (slot.parameter).
        self.multipliers = {f"{slot}.{k}": s for slot, net in self._templates.items()
                            for k, s in net.multipliers.items()}

    # -- the two levels ------------------------------------------------------------------------

    def logits(self, slot: str, inputs: Tensor) -> Tensor:
        """The runs' logits [R, B, 10] of inputs [R, B, 64] for one slot: each run's network on its own inputs."""
        module = self.lower[slot]
        params = {name: _attribute(module, name) for name in self._names[slot]}
        template = self._templates[slot]
        return vmap(lambda p, x: functional_call(template, p, (x,)))(params, inputs)

    def task_losses(self, batch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """{slot: mean cross-entropy over its runs and examples} of one minibatch {slot: (inputs, labels)}."""
        out = {}
        for slot, (inputs, labels) in batch.items():
            logits = self.logits(slot, inputs)
            out[slot] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return out

    def lower_objective(self, batch: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack(list(self.task_losses(batch).values())).mean()

    def upper_objective(self, batch: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack(list(self.task_losses(batch).values())).mean()

    def upper_metrics(self, batch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """The meta-loss per slot ("meta_loss/d<depth>w<width>")."""
        return {f"meta_loss/{slot}": loss for slot, loss in self.task_losses(batch).items()}

    # -- the lower dynamics: the learned optimizer -----------------------------------------------

    def init_lower_state(self, y: dict[str, Tensor]) -> dict[str, Tensor]:
        """The LO's state of every run ([R, ...] leaves), the runs' step counts "t" [R] and last update sizes."""
        runs = next(iter(y.values())).shape[0]
        state = vmap(self.rule.init_state)(y)
        state["t"] = torch.zeros(runs, dtype=torch.int64, device=next(iter(y.values())).device)
        return {**state, **{f"update/{k}": torch.zeros_like(v) for k, v in y.items()}}

    def lower_step(self, x: dict[str, Tensor], y: dict[str, Tensor], grad_y: dict[str, Tensor],
                   lower_state: dict[str, Tensor], t: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One LO update of every run, each at its own step count (the engine's ``t`` is not the runs')."""
        state = {k: v for k, v in lower_state.items() if k != "t" and not k.startswith("update/")}

        def one_run(params: dict, grads: dict, own: dict, count: Tensor) -> tuple[dict, dict]:
            return self.rule.step(x, params, grads, own, count, self.multipliers, self.step_mult)

        new_y, new_state = vmap(one_run)(y, grad_y, state, lower_state["t"])
        new_state["t"] = lower_state["t"] + 1
        new_state.update({f"update/{k}": (new_y[k] - y[k]).abs() for k in y})
        return new_y, new_state

    def lower_restart(self, y: dict[str, Tensor], lower_state: dict[str, Tensor],
                      restart: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Where restart["restart"] [R] is True: the run's fresh init, a zero LO state; the data's step counts."""
        flag = restart["restart"]
        fresh = self.init_lower_state(restart["init"])
        new_y = {k: torch.where(_along(flag, v), restart["init"][k].to(v.dtype), v) for k, v in y.items()}
        new_state = {k: torch.where(_along(flag, v), fresh[k].to(v.dtype), v) for k, v in lower_state.items()}
        new_state["t"] = restart["t"].to(lower_state["t"].dtype)
        return new_y, new_state

    # -- data ------------------------------------------------------------------------------------

    def data(self) -> tuple[Truncations, Truncations]:
        """The lower and upper truncations of the task runs (independent minibatches of the same tasks)."""
        pairs = self.pes_pairs is not None
        return Truncations(self.task_runs, "lower", pairs=pairs), Truncations(self.task_runs, "upper", pairs=pairs)


def _attribute(module: nn.Module, dotted: str) -> Tensor:
    """module.<dotted> by attribute access: the tensor in place now, swapped in by ``functional_call`` or not."""
    owner, _, leaf = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


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
