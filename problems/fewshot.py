"""Few-shot tasks and the meta-learning problems on them: MAML, first-order MAML, iMAML and ANIL.

Tasks (map-style datasets, seeded and deterministic: task i is a function of (seed, i) alone):

- ``SinusoidTasks``: regression y = A sin(x - phase), A in [0.1, 5], phase in [0, pi], inputs uniform
  in [-5, 5] (Finn, Abbeel, Levine 2017).
- ``DigitsTasks``: N-way K-shot classification cut from scikit-learn's 8x8 digits, meta-training and
  meta-test tasks from disjoint classes (``TRAIN_CLASSES``, ``TEST_CLASSES``).

Item i is one task ``((support inputs, support targets), (query inputs, query targets))``, so
``task_loader(dataset, tasks_per_batch)`` (a shuffled DataLoader with its own generator) yields
task batches ``(support, query)`` with a leading task dimension T: ``bilevel.fit(problem, engine,
tasks=loader)``.

Problems (the problem of ONE task; ``bilevel.Tasks`` runs it over task batches, ALGORITHMS.md section 9):

- ``MAML`` (Finn et al. 2017): x = the network's initialization, y = a task's adapted copy,
  y0 = lower_start(x) = x; ``hypergrad.Unrolled`` differentiates through the inner steps and y0.
- ``FOMAML``: MAML with ``Unrolled(first_order=True)`` (Finn et al. 2017; Nichol, Achiam, Schulman 2018).
- ``IMAML`` (Rajeswaran, Finn, Kakade, Levine 2019): g = L(y; support) + lam/2 |y - x|^2 from y0 = x,
  hypergradient by CG on the IFT system (I + H / lam) v = grad_y f.
- ``ANIL`` (Raghu, Raghu, Bengio, Vinyals 2020): only the head adapts; x = the body and the head's
  initialization, y = the head, y0 = x's head.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, Dataset

import bilevel
import hypergrad
from hypergrad.recipe import gradient_descent
from problems.common import digits

__all__ = ["ANIL", "DigitsTasks", "FOMAML", "IMAML", "MAML", "SinusoidTasks", "digits_body", "mlp",
           "meta_test", "stack_tasks", "task_loader"]

Set = tuple[Tensor, Tensor]
"""One task's (inputs, targets) for the support or the query set."""
Task = tuple[Set, Set]
"""(support, query) of one task; a task batch has the same form with a leading task dimension T."""

TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
"""Digit classes of the meta-training tasks."""
TEST_CLASSES = (6, 7, 8, 9)
"""Digit classes of the meta-test tasks (disjoint from the meta-training ones)."""


# -- tasks -------------------------------------------------------------------------------------------------------


class SinusoidTasks(Dataset):
    """``n_tasks`` sinusoid regression tasks (Finn et al. 2017), each drawn from its own seeded generator.

    Task i: amplitude A ~ U[0.1, 5], phase ~ U[0, pi], ``shots`` support and ``queries`` query inputs
    ~ U[-5, 5], targets A sin(input - phase). Item i: ((inputs [shots, 1], targets [shots, 1]),
    (inputs [queries, 1], targets [queries, 1])). Use another ``seed`` for meta-test tasks.
    """

    def __init__(self, n_tasks: int = 10_000, shots: int = 10, queries: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        if n_tasks < 1 or shots < 1 or queries < 1:
            raise ValueError(f"SinusoidTasks: n_tasks, shots and queries must be >= 1, got {n_tasks}, {shots}, "
                             f"{queries}")
        self.n_tasks, self.shots, self.queries, self.seed, self.dtype = n_tasks, shots, queries, seed, dtype

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.n_tasks:
            raise IndexError(f"SinusoidTasks: task {index} of {self.n_tasks}")
        gen = torch.Generator().manual_seed(self.seed * 2**32 + index)  # task i depends on (seed, i) alone
        amplitude = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=torch.float64)
        phase = math.pi * torch.rand((), generator=gen, dtype=torch.float64)
        inputs = 10 * torch.rand(self.shots + self.queries, 1, generator=gen, dtype=torch.float64) - 5
        targets = amplitude * torch.sin(inputs - phase)
        inputs, targets = inputs.to(self.dtype), targets.to(self.dtype)
        return (inputs[:self.shots], targets[:self.shots]), (inputs[self.shots:], targets[self.shots:])


class DigitsTasks(Dataset):
    """``n_tasks`` N-way K-shot classification tasks from scikit-learn's digits, each drawn from its own seed.

    Task i picks ``ways`` classes of ``classes`` in random order (relabelled 0..ways-1) and, per
    class, ``shots`` support and ``queries`` query images (distinct). Item i: ((pixels [ways * shots,
    64] in [0, 1], labels [ways * shots] int64), (pixels [ways * queries, 64], labels [ways * queries])).
    ``classes="train"`` draws from ``TRAIN_CLASSES``, ``"test"`` from ``TEST_CLASSES`` (disjoint).
    """

    def __init__(self, n_tasks: int = 10_000, ways: int = 3, shots: int = 5, queries: int = 10,
                 classes: str = "train", seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if classes not in ("train", "test"):
            raise ValueError(f"DigitsTasks: classes must be 'train' or 'test', got {classes!r}")
        self.classes = TRAIN_CLASSES if classes == "train" else TEST_CLASSES
        if not 2 <= ways <= len(self.classes) or n_tasks < 1 or shots < 1 or queries < 1:
            raise ValueError(f"DigitsTasks: need 2 <= ways <= {len(self.classes)} ({classes} classes) and n_tasks, "
                             f"shots, queries >= 1; got ways={ways}, n_tasks={n_tasks}, shots={shots}, "
                             f"queries={queries}")
        pixels, labels = digits()
        self.pixels = torch.from_numpy(pixels / 16.0).to(dtype)
        self.by_class = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.n_tasks, self.ways, self.shots, self.queries, self.seed = n_tasks, ways, shots, queries, seed

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.n_tasks:
            raise IndexError(f"DigitsTasks: task {index} of {self.n_tasks}")
        rng = np.random.default_rng([self.seed, index])  # task i depends on (seed, i) alone
        chosen = rng.choice(len(self.classes), self.ways, replace=False)
        support, query = [], []
        for label, c in enumerate(chosen):
            picked = rng.choice(self.by_class[self.classes[c]], self.shots + self.queries, replace=False)
            support += [(i, label) for i in picked[:self.shots]]
            query += [(i, label) for i in picked[self.shots:]]
        return self._set(support), self._set(query)

    def _set(self, rows: list[tuple[int, int]]) -> Set:
        index, labels = zip(*rows, strict=True)
        return self.pixels[list(index)], torch.tensor(labels, dtype=torch.int64)


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """A task batch from tasks: every tensor stacked along a new leading task dimension T."""
    return tuple(tuple(torch.stack([task[s][k] for task in tasks]) for k in range(2))  # type: ignore[return-value]
                 for s in range(2))


def task_loader(tasks: Dataset, tasks_per_batch: int, seed: int = 0) -> DataLoader:
    """Shuffled task batches of ``tasks_per_batch`` tasks (the last partial batch dropped), own generator:
    resumable exactly from a checkpoint. Items: (support, query), each [inputs, targets] [T, ...]."""
    return DataLoader(tasks, batch_size=tasks_per_batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


# -- networks ----------------------------------------------------------------------------------------------------


def mlp(widths: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear layers of ``widths`` (e.g. (1, 40, 40, 1), Finn et al.'s sinusoid network) with ReLU between,
    PyTorch's default initialization drawn under ``seed`` (the global random state is left as it was)."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.Linear(fan_in, fan_out, dtype=dtype)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def digits_body(hidden: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """ANIL's body for digits: Linear(64, hidden) -> ReLU."""
    return nn.Sequential(*mlp((64, hidden), seed, dtype), nn.ReLU())


# -- problems ----------------------------------------------------------------------------------------------------


class FewShot(bilevel.BilevelProblem):
    """What the four problems share: a task model ``self(inputs)``, its loss on the support set (g) and
    on the query set (f), and ``evaluate`` on held-out tasks (``meta_test``).

    Args (of every problem):
        loss: "mse" (regression) or "cross_entropy" (classification).
        test_tasks: a task batch (support, query) for ``evaluate`` (e.g. ``stack_tasks`` of a meta-test set).
        adapt_steps, adapt_lr: ``evaluate``'s adaptation: gradient steps on g from lower_start(x).
    """

    def __init__(self, loss: str = "mse", test_tasks: Task | None = None, adapt_steps: int = 5,
                 adapt_lr: float = 0.01) -> None:
        super().__init__()
        if loss not in ("mse", "cross_entropy"):
            raise ValueError(f"{type(self).__name__}: loss must be 'mse' or 'cross_entropy', got {loss!r}")
        self.loss_name, self.test_tasks, self.adapt_steps, self.adapt_lr = loss, test_tasks, adapt_steps, adapt_lr

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets) if self.loss_name == "mse" else F.cross_entropy(outputs, targets)

    def lower_objective(self, batch: Set) -> Tensor:
        """g: the loss of the adapted model on one task's support set (inputs [K, ...], targets [K, ...])."""
        inputs, targets = batch
        return self.loss(self(inputs), targets)

    def upper_objective(self, batch: Set) -> Tensor:
        """f: the loss of the adapted model on one task's query set."""
        inputs, targets = batch
        return self.loss(self(inputs), targets)

    def evaluate(self) -> dict[str, float]:
        if self.test_tasks is None:
            return {}
        return meta_test(self, self.test_tasks, self.adapt_steps, self.adapt_lr)


class MAML(FewShot):
    """MAML (Finn, Abbeel, Levine 2017): y0 = x, T gradient steps on the support loss, the query loss after them.

    ``net``: the task model; x = its initialization (``upper``), y = a task's adapted copy (``lower``).
    Engine: ``MAML.engine(...)``, ``hypergrad.Unrolled`` without truncation (exact second-order terms).
    """

    first_order = False

    def __init__(self, net: nn.Module, **options: Any) -> None:
        super().__init__(**options)
        self.upper = net
        self.lower = copy.deepcopy(net)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.lower(inputs)

    def lower_start(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(x)  # every task starts at the initialization

    @classmethod
    def engine(cls, inner_steps: int = 5, inner_lr: float = 0.01, outer_lr: float = 1e-3,
               outer_optimizer: str = "adam") -> hypergrad.Unrolled:
        """The paper's engine: ``inner_steps`` differentiated SGD steps (first-order for ``FOMAML``), Adam on x."""
        return hypergrad.Unrolled(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr,
                                  outer_optimizer=outer_optimizer, first_order=cls.first_order)


class SinusoidMAML(MAML):
    """MAML on few-shot sinusoid regression with everything built from plain arguments (for the CLI).

    A ``mlp((1, hidden, hidden, 1))`` task model; meta-training tasks from ``SinusoidTasks(seed=seed)``
    in batches of ``tasks_per_batch`` (``task_data``, which makes ``bilevel fit`` run it as a batch of
    tasks); ``evaluate`` on ``test_tasks`` held-out tasks drawn with seed ``seed + 1``.
    Config: ``experiments/configs/maml_sinusoid.yaml``.
    """

    def __init__(self, seed: int = 0, shots: int = 5, queries: int = 10, hidden: int = 40,
                 tasks_per_batch: int = 8, test_tasks: int = 100, adapt_steps: int = 3,
                 adapt_lr: float = 0.01) -> None:
        held_out = SinusoidTasks(n_tasks=test_tasks, shots=shots, queries=queries, seed=seed + 1)
        super().__init__(mlp((1, hidden, hidden, 1), seed=seed),
                         test_tasks=stack_tasks([held_out[i] for i in range(test_tasks)]),
                         adapt_steps=adapt_steps, adapt_lr=adapt_lr)
        self.seed, self.shots, self.queries, self.tasks_per_batch = seed, shots, queries, tasks_per_batch

    def task_data(self) -> DataLoader:
        """Meta-training task batches (support, query), each tensor [tasks_per_batch, ...]."""
        tasks = SinusoidTasks(shots=self.shots, queries=self.queries, seed=self.seed)
        return task_loader(tasks, self.tasks_per_batch, seed=self.seed)


class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017; Nichol, Achiam, Schulman 2018): MAML with dy_T/dy0 taken as I,
    i.e. dF/dx = grad_y L(query; y_T). The problem is MAML's; ``FOMAML.engine`` is ``Unrolled(first_order=True)``."""

    first_order = True


class IMAML(MAML):
    """iMAML (Rajeswaran, Finn, Kakade, Levine 2019): g = L(y; support) + lam/2 |y - x|^2 from y0 = x.

    Engine: ``IMAML.engine(...)``, CG on (H + lam I) v = grad_y f (H the Hessian of the support loss),
    so dF/dx = lam v = (I + H / lam)^-1 grad_y f.
    """

    def __init__(self, net: nn.Module, lam: float = 1.0, **options: Any) -> None:
        super().__init__(net, **options)
        if lam <= 0:
            raise ValueError(f"IMAML: lam must be > 0, got {lam}")
        self.lam = float(lam)

    def lower_objective(self, batch: Set) -> Tensor:
        pairs = zip(self.lower.parameters(), self.upper.parameters(), strict=True)
        proximal = sum((p - q).square().sum() for p, q in pairs)
        return super().lower_objective(batch) + 0.5 * self.lam * proximal

    @classmethod
    def engine(cls, inner_steps: int = 20, inner_lr: float = 0.01, outer_lr: float = 1e-3,  # type: ignore[override]
               outer_optimizer: str = "adam", iters: int = 5) -> hypergrad.CG:
        """The paper's engine: ``inner_steps`` gradient steps on g from y0 = x, ``iters`` CG iterations."""
        return hypergrad.CG(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr,
                            outer_optimizer=outer_optimizer, iters=iters)


class ANIL(FewShot):
    """ANIL (Raghu, Raghu, Bengio, Vinyals 2020): only the head adapts to a task.

    x = the body and the head's initialization (``upper.body``, ``upper.head``), y = a task's head,
    y0 = x's head. Engine: ``ANIL.engine(...)``, ``hypergrad.Unrolled`` (through the head's steps).
    """

    def __init__(self, body: nn.Module, head: nn.Module, **options: Any) -> None:
        super().__init__(**options)
        self.upper = nn.ModuleDict({"body": body, "head": head})
        self.lower = copy.deepcopy(head)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.lower(self.upper["body"](inputs))

    def lower_start(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k.removeprefix("head."): v for k, v in x.items() if k.startswith("head.")}

    @classmethod
    def engine(cls, inner_steps: int = 5, inner_lr: float = 0.01, outer_lr: float = 1e-3,
               outer_optimizer: str = "adam") -> hypergrad.Unrolled:
        """``hypergrad.Unrolled`` through ``inner_steps`` differentiated steps of the head, Adam on x."""
        return hypergrad.Unrolled(inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr,
                                  outer_optimizer=outer_optimizer)


def meta_test(problem: FewShot, tasks: Task, steps: int, lr: float) -> dict[str, float]:
    """Mean query loss (and accuracy, for classification) over a task batch before and after adaptation.

    Each task starts at y0 = lower_start(x) and takes ``steps`` gradient steps of size ``lr`` on g
    (its support loss; iMAML's with the proximal term), all tasks under one ``torch.func.vmap``.

    Args:
        tasks: (support, query), every tensor [T, ...].

    Returns ``meta_test_loss`` (after), ``meta_test_loss_unadapted`` and, for cross-entropy,
    ``meta_test_accuracy``.
    """
    fns, x, _ = problem.to_functions()
    if fns.lower_start is None:
        raise ValueError(f"meta_test: {type(problem).__name__} defines no lower_start")
    start = fns.lower_start
    param = next(problem.parameters())
    support, query = (tuple(t.to(param.device) if not t.is_floating_point() else t.to(param)
                            for t in part) for part in tasks)

    def one(support: Set, query: Set) -> tuple[Tensor, Tensor, Tensor]:
        y0 = start(x)
        y = gradient_descent(fns.g, x, y0, support, steps, lr)
        outputs = functional_call(problem, {**{f"upper.{k}": v for k, v in x.items()},
                                            **{f"lower.{k}": v for k, v in y.items()}}, (query[0],))
        correct = (outputs.argmax(-1) == query[1]).double().mean() if problem.loss_name != "mse" else outputs.sum()
        return fns.f(x, y0, query), fns.f(x, y, query), correct

    with torch.enable_grad():
        before, after, correct = vmap(one)(support, query)
    result = {"meta_test_loss": after.mean().item(), "meta_test_loss_unadapted": before.mean().item()}
    if problem.loss_name != "mse":
        result["meta_test_accuracy"] = correct.mean().item()
    return result
