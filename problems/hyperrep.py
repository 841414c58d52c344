"""Hyper-representation learning on digits (Franceschi et al. 2018; Grazzi et al. 2020).

    lower:  heads*(phi) = argmin_{W, b}  mean_t [ CE(W_t, b_t; phi(train_t)) + ridge/2 (|W_t|^2 + |b_t|^2) ]
    upper:  F(phi)      = mean_t CE(W*_t, b*_t; phi(val_t))

phi is a shared feature trunk (an MLP 64 -> ``hidden`` -> ``width``, tanh after each layer: the
upper variables); each task t has its own linear softmax head W_t [width, ways], b_t [ways], all
heads stacked into one tensor [n_tasks, width, ways] (the lower variables). Given phi the heads
are independent strongly convex problems. Because g is a MEAN over tasks, each head's gradient is
scaled by 1/n_tasks: a gradient step on the lower level needs ``inner_lr`` ~ n_tasks / L_task.

Tasks are cut from scikit-learn's digits: a task draws ``ways`` of the 10 classes at random (in a
random order, which relabels them 0..ways-1) and, per class, ``shots`` training and ``queries``
validation images. The images are split once into a meta-training pool (``train_fraction``) and a
held-out pool, so ``evaluate`` can test the trunk on NEW tasks built from images it never saw.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from problems.cleaning import load_dataset
from problems.common import float_dtype, lbfgs

Batch = tuple[Tensor, Tensor]


def make_tasks(inputs: Tensor, labels: Tensor, n_tasks: int, ways: int, shots: int, queries: int,
               rs: np.random.RandomState) -> tuple[Batch, Batch]:
    """``n_tasks`` few-shot tasks from (inputs [N, d], labels [N]) drawn with ``rs``.

    Returns ((train inputs [T, ways * shots, d], labels [T, ways * shots]),
    (val inputs [T, ways * queries, d], labels [T, ways * queries])), labels in 0..ways-1.
    """
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(10)]
    train_x, train_y, val_x, val_y = [], [], [], []
    for _ in range(n_tasks):
        classes = rs.choice(10, ways, replace=False)
        tr, va = [], []
        for new_label, c in enumerate(classes):
            picked = rs.choice(by_class[c], shots + queries, replace=False)
            tr += [(i, new_label) for i in picked[:shots]]
            va += [(i, new_label) for i in picked[shots:]]
        for rows, xs, ys in ((tr, train_x, train_y), (va, val_x, val_y)):
            index, task_labels = zip(*rows, strict=True)
            xs.append(inputs[list(index)])
            ys.append(torch.tensor(task_labels, dtype=torch.int64))
    return (torch.stack(train_x), torch.stack(train_y)), (torch.stack(val_x), torch.stack(val_y))


def build_trunk(width: int, hidden: int, seed: int, n_inputs: int = 64) -> nn.Sequential:
    """Linear(n_inputs, hidden) -> tanh -> Linear(hidden, width) -> tanh, float64, seeded init (uniform
    +-1/sqrt(fan_in), biases zero)."""
    gen = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(n_inputs, hidden, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(hidden, width, dtype=torch.float64), nn.Tanh())
    with torch.no_grad():
        for layer in (trunk[0], trunk[2]):
            bound = 1.0 / layer.in_features**0.5
            nn.init.uniform_(layer.weight, -bound, bound, generator=gen)
            nn.init.zeros_(layer.bias)
    return trunk


def head_logits(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-task linear heads: features [T, n, h], weight [T, h, k], bias [T, k] -> logits [T, n, k]."""
    return torch.einsum("tnh,thk->tnk", features, weight) + bias[:, None, :]


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over tasks of the mean CE per task: logits [T, n, k], labels [T, n] -> 0-d."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # equal n per task: same mean


def fit_heads(features: Tensor, labels: Tensor, ways: int, ridge: float) -> tuple[Tensor, Tensor]:
    """The lower problem solved for fixed features [T, n, h] by L-BFGS (float64, strongly convex).

    Returns (weight [T, h, ways], bias [T, ways]). The objective is a sum of per-task terms, so the
    tasks are solved jointly without coupling.
    """
    t, _, h = features.shape
    weight = torch.zeros(t, h, ways, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(t, ways, dtype=torch.float64, requires_grad=True)
    feats = features.detach().to(torch.float64)

    def objective() -> Tensor:
        penalty = (weight.square().sum() + bias.square().sum()) / t
        return task_loss(head_logits(feats, weight, bias), labels) + ridge / 2 * penalty

    lbfgs([weight, bias], objective, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12)
    return weight.detach(), bias.detach()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).to(torch.float64).mean().item()


class HyperRepresentation(bilevel.BilevelProblem):
    """A shared feature trunk (upper, ``upper`` = the trunk MLP) and per-task linear heads (lower,
    ``lower.weight`` [n_tasks, width, ways], ``lower.bias`` [n_tasks, ways]) on digits tasks.

    Args:
        seed: seeds the image split, the tasks and the trunk's initialization.
        n_tasks: meta-training tasks (the lower level holds one head per task).
        n_test_tasks: held-out tasks for ``evaluate``, cut from the held-out images.
        ways: classes per task (k).
        shots: training images per class and task (the lower level's data).
        queries: validation images per class and task (the upper level's data; for held-out tasks,
            the test images).
        width: h, the trunk's output features.
        hidden: the trunk's hidden units.
        ridge: the heads' L2 penalty (makes each head's problem strongly convex).
        train_fraction: share of the 1797 images in the meta-training pool.
        dtype: name of the torch dtype of the trunk, heads and data.
    """

    def __init__(self, seed: int = 0, n_tasks: int = 20, n_test_tasks: int = 20, ways: int = 5, shots: int = 5,
                 queries: int = 15, width: int = 32, hidden: int = 64, ridge: float = 0.1,
                 train_fraction: float = 0.6, dtype: str = "float32") -> None:
        super().__init__()
        for name, value in (("n_tasks", n_tasks), ("n_test_tasks", n_test_tasks), ("shots", shots),
                            ("queries", queries), ("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HyperRepresentation: {name} must be an integer >= 1, got {value!r}")
        if isinstance(ways, bool) or not isinstance(ways, int) or not 2 <= ways <= 10:
            raise ValueError(f"HyperRepresentation: ways must be an integer in [2, 10], got {ways!r}")
        if not ridge > 0 or not 0 < train_fraction < 1:
            raise ValueError(f"HyperRepresentation: need ridge > 0 and 0 < train_fraction < 1, got {ridge}, "
                             f"{train_fraction}")
        dt = float_dtype(dtype)
        inputs, labels = load_dataset("digits", None)
        rs = np.random.RandomState(seed)
        perm = torch.from_numpy(rs.permutation(labels.shape[0]))
        cut = int(train_fraction * labels.shape[0])
        pools = {"meta": perm[:cut], "held_out": perm[cut:]}
        per_class = min(int((labels[idx] == c).sum()) for idx in pools.values() for c in range(10))
        if shots + queries > per_class:
            raise ValueError(f"HyperRepresentation: shots + queries = {shots + queries} exceeds the {per_class} "
                             "images of the rarest class in a pool; lower them or change train_fraction")
        self.ways, self.ridge, self.seed = ways, float(ridge), seed
        for prefix, idx, count in (("", pools["meta"], n_tasks), ("test_", pools["held_out"], n_test_tasks)):
            (tx, ty), (vx, vy) = make_tasks(inputs[idx], labels[idx], count, ways, shots, queries, rs)
            for name, value in (("train_inputs", tx.to(dt)), ("train_labels", ty), ("val_inputs", vx.to(dt)),
                                ("val_labels", vy)):
                self.register_buffer(prefix + name, value, persistent=False)
        self._trunk_args = (width, hidden, seed, inputs.shape[1])
        self.upper = build_trunk(*self._trunk_args).to(dt)
        self.lower = bilevel.Hyper(weight=torch.zeros(n_tasks, width, ways, dtype=dt),
                                   bias=torch.zeros(n_tasks, ways, dtype=dt))

    def lower_objective(self, batch: Batch) -> Tensor:
        """g: mean over tasks of training CE + ridge/2 |W_t, b_t|^2; batch = (inputs [T, n, 64], labels [T, n])."""
        inputs, labels = batch
        weight, bias = self.lower.weight, self.lower.bias
        penalty = (weight.square().sum() + bias.square().sum()) / weight.shape[0]
        return task_loss(head_logits(self.upper(inputs), weight, bias), labels) + self.ridge / 2 * penalty

    def upper_objective(self, batch: Batch) -> Tensor:
        """f: mean over tasks of validation CE; batch = (inputs [T, m, 64], labels [T, m])."""
        inputs, labels = batch
        return task_loss(head_logits(self.upper(inputs), self.lower.weight, self.lower.bias), labels)

    def data(self) -> tuple[Batch, Batch]:
        """Full batches of the meta-training tasks: ((train inputs, labels), (val inputs, labels))."""
        return (self.train_inputs, self.train_labels), (self.val_inputs, self.val_labels)

    @torch.no_grad()
    def _held_out_accuracy(self, trunk: nn.Module, dtype: torch.dtype) -> float:
        """Test accuracy on the held-out tasks of heads fitted (to convergence) on ``trunk``'s features."""
        features = trunk(self.test_train_inputs.to(dtype))
        weight, bias = fit_heads(features, self.test_train_labels, self.ways, self.ridge)
        test_features = trunk(self.test_val_inputs.to(dtype)).to(torch.float64)
        return accuracy(head_logits(test_features, weight, bias), self.test_val_labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out tasks: accuracy with the learned trunk, a random trunk (the initialization) and raw
        pixels (heads on the 64 inputs), heads re-fitted each time; meta-training tasks' validation
        accuracy with the current heads."""
        train_logits = head_logits(self.upper(self.val_inputs), self.lower.weight, self.lower.bias)
        device, f64 = self.val_inputs.device, torch.float64
        random_trunk = build_trunk(*self._trunk_args).to(device)  # the seeded initialization, rebuilt
        return {
            "held_out_accuracy": self._held_out_accuracy(self.upper, self.val_inputs.dtype),
            "random_trunk_accuracy": self._held_out_accuracy(random_trunk, f64),
            "raw_pixels_accuracy": self._held_out_accuracy(nn.Identity(), f64),
            "meta_train_val_accuracy": accuracy(train_logits, self.val_labels),
        }
