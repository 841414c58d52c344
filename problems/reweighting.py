"""Meta-Weight-Net (Shu et al. 2019): a small network maps each example's loss to its weight, learned on clean data.

    lower:  w*(theta) = argmin_w  sum_i V(l_i; theta) l_i(w) / sum_i V(l_i; theta) + mu/2 |w|^2
    upper:  min_theta  CE(w*(theta); a small clean, class-balanced meta set)

l_i(w) is the cross-entropy of a small CNN with BatchNorm on training example i of a minibatch, whose
label may be wrong and whose class may be rare; V is a 1-hidden-layer MLP (100 units, ReLU, sigmoid
output) of the loss VALUE: its input is l_i detached, as in the authors' code (``vnet(cost_v.data)``),
so the lower gradient is sum_i V_i grad l_i / sum_i V_i and V only reweights, it never changes the
loss being descended. The weights are normalized by their sum over the batch, as in the version of
the authors' code with ``norm_c``: the step size then does not depend on V's scale, and a constant V
is exactly training on everything with uniform weights (``normalize=False`` gives the plain mean
sum_i V_i l_i / B of their other versions).

The paper's algorithm is one-step unrolled differentiation: ``hypergrad.Unrolled(inner_steps=1, ...)``
takes one SGD step on the lower minibatch per outer step and differentiates the meta loss through it.
One difference: the paper takes the real lower step with the UPDATED theta, ``Unrolled`` with the theta
before the update (the step it differentiated); with a small outer step size the two are close.

Data (scikit-learn's digits, 8x8 images, no download): per class, ``meta_per_class`` clean examples for
the meta set and ``test_per_class`` for a balanced test set are drawn first; the training set then
keeps round(n_max * imbalance^(-r / 9)) examples of the class of rarity rank r (r = 0 the most
frequent, 9 the rarest; which digit gets which rank is drawn from the seed, so rarity is not tied to
one digit's difficulty), and exactly round(noise * n_train) training labels are replaced by a label
drawn uniformly from the nine OTHER classes (symmetric noise; every flipped label is wrong).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from problems.cleaning import N_CLASSES, load_dataset
from problems.common import float_dtype, statistics_kept

__all__ = ["MetaWeightNet", "WeightNet", "BatchNormCNN", "noisy_imbalanced_digits"]


def noisy_imbalanced_digits(seed: int, imbalance: float, noise: float, n_max: int, meta_per_class: int,
                            test_per_class: int) -> dict[str, Tensor]:
    """The split of ``MetaWeightNet``, drawn from ``numpy.random.RandomState(seed)``.

    Returns int64 index tensors into the 1797 digits: ``train`` [n_train], ``meta`` [10 meta_per_class],
    ``test`` [10 test_per_class]; ``noisy_labels`` (int64 [n_train], the labels the lower level sees),
    ``corrupted`` (bool [n_train]), ``class_order`` (int64 [10]: the digit of rarity rank r at position r)
    and ``class_counts`` (int64 [10]: training examples per rarity rank).
    """
    _, labels = load_dataset("digits", None)
    if imbalance < 1:
        raise ValueError(f"MetaWeightNet: imbalance must be >= 1 (n_max / n_min), got {imbalance}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"MetaWeightNet: noise must be in [0, 1), got {noise}")
    rs = np.random.RandomState(seed)
    class_order = rs.permutation(N_CLASSES)
    counts = [int(round(n_max * imbalance ** (-r / (N_CLASSES - 1)))) for r in range(N_CLASSES)]
    train, meta, test = [], [], []
    for rank, digit in enumerate(class_order):
        members = rs.permutation(np.flatnonzero(labels.numpy() == digit))
        need = meta_per_class + test_per_class + counts[rank]
        if need > members.shape[0]:
            raise ValueError(f"MetaWeightNet: digit {digit} has {members.shape[0]} examples, fewer than "
                             f"meta + test + train = {need}; lower n_max, meta_per_class or test_per_class")
        meta.append(members[:meta_per_class])
        test.append(members[meta_per_class:meta_per_class + test_per_class])
        train.append(members[meta_per_class + test_per_class:need])
    train_index = torch.from_numpy(np.concatenate(train))
    n_train = train_index.shape[0]
    flipped = torch.from_numpy(rs.choice(n_train, int(round(noise * n_train)), replace=False))
    shift = torch.from_numpy(rs.randint(1, N_CLASSES, size=flipped.shape[0])).to(torch.int64)
    noisy = labels[train_index].clone()
    noisy[flipped] = (noisy[flipped] + shift) % N_CLASSES  # a shift in 1..9: uniform over the other classes
    corrupted = torch.zeros(n_train, dtype=torch.bool)
    corrupted[flipped] = True
    return {"train": train_index, "meta": torch.from_numpy(np.concatenate(meta)),
            "test": torch.from_numpy(np.concatenate(test)), "noisy_labels": noisy, "corrupted": corrupted,
            "class_order": torch.from_numpy(class_order).to(torch.int64),
            "class_counts": torch.tensor(counts, dtype=torch.int64)}


class BatchNormCNN(nn.Sequential):
    """A small CNN with BatchNorm: images [B, 1, 8, 8] -> logits [B, 10].

    conv3x3 (``channels``) -> BN -> ReLU -> conv3x3 stride 2 (2 ``channels``) -> BN -> ReLU -> linear.
    """

    def __init__(self, channels: int = 8) -> None:
        super().__init__(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.BatchNorm2d(2 * channels),
                         nn.ReLU(), nn.Flatten(), nn.Linear(2 * channels * 16, N_CLASSES))


class WeightNet(nn.Sequential):
    """V(loss; theta): losses [B] -> weights [B] in (0, 1).

    Linear(1, hidden) -> ReLU -> Linear(hidden, 1) -> sigmoid, the paper's architecture at hidden = 100.
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(losses[:, None])[:, 0]


def _init_uniform(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default bound +-1/sqrt(fan_in) for weights and biases, drawn from ``gen`` (seeded, whatever
    the global RNG)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                bound = layer.weight[0].numel() ** -0.5
                nn.init.uniform_(layer.weight, -bound, bound, generator=gen)
                nn.init.uniform_(layer.bias, -bound, bound, generator=gen)


class MetaWeightNet(bilevel.BilevelProblem):
    """Meta-Weight-Net reweighting of a BatchNorm CNN on noisy, class-imbalanced digits (Shu et al. 2019).

    Args:
        seed: seeds the split, the class ranks, the noise, both networks' initialization and the minibatch order.
        imbalance: n_max / n_min over the training classes (counts decay geometrically with the rank).
        noise: fraction of training labels replaced by a wrong one (symmetric over the other classes).
        n_max: training examples of the most frequent class.
        meta_per_class: clean meta (upper) examples per class; the meta set is one full batch.
        test_per_class: balanced test examples per class.
        batch_size: lower minibatch size (shuffled by the loader's own generator, last partial batch dropped).
        mu: L2 on the CNN's parameters (a usual weight decay).
        channels: of the first convolution (the second has twice as many).
        hidden: width of the weighting network's hidden layer (the paper: 100).
        normalize: divide by the batch's sum of weights (see the module docstring).
        dtype: name of the torch dtype of the parameters and images ("float64" for checking).

    x = ``upper`` (the weighting network V, 301 parameters at hidden 100); y = the CNN's parameters,
    whose BatchNorm running statistics ``bilevel.fit`` refreshes once per outer step. f and
    ``evaluate()["validation_loss"]`` normalize with the batch's own statistics (training mode);
    test metrics use the running statistics.
    """

    def __init__(self, seed: int = 0, imbalance: float = 10.0, noise: float = 0.4, n_max: int = 110,
                 meta_per_class: int = 10, test_per_class: int = 50, batch_size: int = 32, mu: float = 5e-4,
                 channels: int = 8, hidden: int = 100, normalize: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__()
        split = noisy_imbalanced_digits(seed, imbalance, noise, n_max, meta_per_class, test_per_class)
        if not 1 <= batch_size <= split["train"].shape[0]:
            raise ValueError(f"MetaWeightNet: batch_size must be in [1, n_train={split['train'].shape[0]}], "
                             f"got {batch_size}")
        inputs, labels = load_dataset("digits", None)
        dt = float_dtype(dtype)
        images = inputs.reshape(-1, 1, 8, 8).to(dt)
        self.seed, self.batch_size, self.mu, self.normalize = seed, batch_size, mu, normalize
        rank_of_digit = torch.empty(N_CLASSES, dtype=torch.int64)
        rank_of_digit[split["class_order"]] = torch.arange(N_CLASSES)
        for name, value in (("train_images", images[split["train"]]), ("train_labels", split["noisy_labels"]),
                            ("true_train_labels", labels[split["train"]]), ("corrupted", split["corrupted"]),
                            ("meta_images", images[split["meta"]]), ("meta_labels", labels[split["meta"]]),
                            ("test_images", images[split["test"]]), ("test_labels", labels[split["test"]]),
                            ("class_order", split["class_order"]), ("class_counts", split["class_counts"]),
                            ("rank_of_digit", rank_of_digit)):
            self.register_buffer(name, value, persistent=False)
        gen = torch.Generator().manual_seed(seed)
        self.lower = BatchNormCNN(channels)
        self.upper = WeightNet(hidden)
        _init_uniform(self.lower, gen)
        _init_uniform(self.upper, gen)
        self.lower.to(dt)
        self.upper.to(dt)

    # -- the objectives ------------------------------------------------------------------------------------------

    def losses(self, images: Tensor, labels: Tensor) -> Tensor:
        """Per-example cross-entropy of the CNN, [B], for images [B, 1, 8, 8] and labels [B]."""
        return F.cross_entropy(self.lower(images), labels, reduction="none")

    def weighted_loss(self, losses: Tensor, weights: Tensor) -> Tensor:
        """sum_i w_i l_i / sum_i w_i (``normalize``) or sum_i w_i l_i / B; losses and weights [B] -> 0-d."""
        total = (weights * losses).sum()
        return total / weights.sum() if self.normalize else total / losses.shape[0]

    def ridge(self) -> Tensor:
        """mu/2 |w|^2 over every CNN parameter (BatchNorm's affine ones too, as SGD's weight_decay would)."""
        return 0.5 * self.mu * sum(p.square().sum() for p in self.lower.parameters())

    def lower_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """g: sum_i V(l_i) l_i / sum_i V(l_i) + mu/2 |w|^2, V's input detached; batch = (images [B, 1, 8, 8],
        noisy labels [B])."""
        images, labels = batch
        losses = self.losses(images, labels)
        return self.weighted_loss(losses, self.upper(losses.detach())) + self.ridge()

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: mean CE on the clean, balanced meta set; batch = (images [M, 1, 8, 8], labels [M])."""
        images, labels = batch
        return F.cross_entropy(self.lower(images), labels)

    def uniform_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The baseline's g: plain mean CE + mu/2 |w|^2 (what g is for any constant V when ``normalize``)."""
        images, labels = batch
        return self.losses(images, labels).mean() + self.ridge()

    def data(self) -> tuple[DataLoader, tuple[Tensor, Tensor]]:
        """(shuffled train minibatches (images [B, 1, 8, 8], noisy labels [B]), full meta set (images [M, 1, 8, 8],
        labels [M])); a fresh loader whose generator is seeded at ``seed`` on every call (same order every run)."""
        lower = DataLoader(TensorDataset(self.train_images, self.train_labels), batch_size=self.batch_size,
                           shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(self.seed))
        return lower, (self.meta_images, self.meta_labels)

    # -- evaluation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def weight_function(self, losses: Tensor) -> Tensor:
        """V on given loss values: losses [N] -> weights [N] in (0, 1)."""
        return self.upper(losses.to(self.meta_images.dtype))

    @torch.no_grad()
    def training_weights(self) -> tuple[Tensor, Tensor]:
        """(losses [n_train], weights [n_train]) of every training example under its noisy label, the CNN in
        evaluation mode (running statistics)."""
        was_training = self.lower.training
        self.lower.eval()
        try:
            losses = self.losses(self.train_images, self.train_labels)
        finally:
            self.lower.train(was_training)
        return losses, self.upper(losses)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Meta loss as f sees it; test loss and accuracy (running statistics), per rarity rank and on the three
        rarest classes; the mean weight V(l_i) of clean and of corrupted training examples."""
        with statistics_kept(self.lower):
            self.lower.train()
            validation = F.cross_entropy(self.lower(self.meta_images), self.meta_labels).item()
            self.lower.eval()
            logits = self.lower(self.test_images)
        correct = (logits.argmax(-1) == self.test_labels).double()
        ranks = self.rank_of_digit[self.test_labels]
        per_rank = [correct[ranks == r].mean().item() for r in range(N_CLASSES)]
        _, weights = self.training_weights()
        metrics = {
            "validation_loss": validation,
            "test_loss": F.cross_entropy(logits, self.test_labels).item(),
            "test_accuracy": correct.mean().item(),
            "rare_accuracy": float(np.mean(per_rank[-3:])),
            "weight_clean": weights[~self.corrupted].mean().item(),
            "weight_corrupted": weights[self.corrupted].mean().item(),
        }
        metrics.update({f"accuracy_rank_{r}": acc for r, acc in enumerate(per_rank)})
        return metrics
