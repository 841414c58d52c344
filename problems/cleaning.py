"""Data hyper-cleaning (Franceschi et al. 2017) on scikit-learn's digits or MNIST: the default job.

    lower:  w*(x) = argmin_w  mean_i sigmoid(x_i) CE(w; a_i, b_i) + mu/2 |w|^2
    upper:  F(x)  = CE on the clean validation set at w*(x) + upper_l2/2 |x|^2

x holds one logit per training example; half the training labels are corrupted, and a good x
switches those examples off (sigmoid(x_i) -> 0). See REFERENCE_PROBLEMS.md, "Data hyper-cleaning".

The model is linear softmax by default (a strongly convex lower level); ``model="mlp"`` swaps in a
one-hidden-layer tanh MLP, whose lower level is NONCONVEX: w*(x) is then a local minimizer, the
implicit-function hypergradient is exact only where the lower Hessian is positive definite
(the ridge mu helps but does not guarantee it), and the baselines depend on the initialization,
which is seeded and shared with them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from problems.common import digits, lbfgs

N_CLASSES = 10
MNIST_TEST_MAX = 10_000


def load_dataset(dataset: str, data_dir: str | None) -> tuple[Tensor, Tensor]:
    """All examples of ``dataset``: (inputs [N, d] default dtype in [0, 1], labels int64 [N])."""
    if dataset == "digits":
        pixels, targets = digits()
        inputs = torch.as_tensor(pixels / 16.0, dtype=torch.get_default_dtype())
        return inputs, torch.as_tensor(targets, dtype=torch.int64)
    from problems.mnist import load_mnist

    return load_mnist(data_dir)


def corrupt_split(labels: Tensor, n_train: int, n_corrupt: int, n_val: int, n_test: int,
                  seed: int) -> dict[str, Tensor]:
    """Index split and corrupted labels, drawn from ``numpy.random.RandomState(seed)``.

    Args:
        labels: int64 [N] true labels.

    Returns a dict of ``train``, ``val``, ``test`` (int64 index tensors [n_train], [n_val], [n_test]
    into the N examples), ``noisy_labels`` (int64 [n_train]) and ``corrupted`` (bool [n_train]).
    """
    # numpy's RandomState: its streams are fixed across versions, and it reproduces the reference
    # prototype's splits (REFERENCE_PROBLEMS.md), baselines included.
    rs = np.random.RandomState(seed)
    perm = torch.from_numpy(rs.permutation(labels.shape[0]))
    train = perm[:n_train]
    val = perm[n_train:n_train + n_val]
    test = perm[n_train + n_val:n_train + n_val + n_test]
    flipped = torch.from_numpy(rs.choice(n_train, n_corrupt, replace=False))
    # A shift in 1..C-1 (mod C) is uniform over the other classes and never the true one.
    shift = torch.from_numpy(rs.randint(1, N_CLASSES, size=n_corrupt)).to(torch.int64)
    noisy = labels[train].clone()
    noisy[flipped] = (noisy[flipped] + shift) % N_CLASSES
    corrupted = torch.zeros(n_train, dtype=torch.bool)
    corrupted[flipped] = True
    return {"train": train, "val": val, "test": test, "noisy_labels": noisy, "corrupted": corrupted}


MODELS = ("linear", "mlp")


def build_model(model: str, n_inputs: int, hidden: int, seed: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The lower model: ``nn.Linear(n_inputs, 10)`` at zero, or Linear -> tanh -> Linear (``hidden`` units).

    The MLP's weights are drawn from ``torch.Generator().manual_seed(seed)`` in float64, uniform in
    +-1/sqrt(fan_in) (PyTorch's default bound), biases zero; then cast to ``dtype``. So the problem
    and its baselines start from the same MLP, whatever the global RNG and dtype.
    """
    if model == "linear":
        layer = nn.Linear(n_inputs, N_CLASSES, dtype=dtype)
        # Zeros: the lower problem is strongly convex, so any start works; zeros makes runs reproducible.
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer
    gen = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(n_inputs, hidden, dtype=torch.float64), nn.Tanh(),
                        nn.Linear(hidden, N_CLASSES, dtype=torch.float64))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            bound = 1.0 / layer.in_features**0.5
            nn.init.uniform_(layer.weight, -bound, bound, generator=gen)
            nn.init.zeros_(layer.bias)
    return mlp.to(dtype or torch.get_default_dtype())


def _sum_of_squares(model: nn.Module) -> Tensor:
    """|theta|^2 over every parameter of ``model`` (W and b of the linear model, in that order)."""
    return sum(p.square().sum() for p in model.parameters())


def _ridge_softmax(model: nn.Module, inputs: Tensor, labels: Tensor, mu: float) -> nn.Module:
    """Fit ``model`` in place to mean CE + mu/2 |theta|^2 with full-batch L-BFGS (strong Wolfe).

    For the MLP this is a local minimizer from the model's initialization (the objective is nonconvex).
    """
    def objective() -> Tensor:
        penalty = _sum_of_squares(model)
        return F.cross_entropy(model(inputs), labels) + mu / 2 * penalty

    lbfgs(model.parameters(), objective, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12)
    return model


def _accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    return (model(inputs).argmax(dim=-1) == labels).to(torch.float64).mean().item()


class DigitsCleaning(bilevel.BilevelProblem):
    """Hyper-cleaning of a softmax classifier (linear or MLP) with one weight logit per training example.

    Args:
        seed: seeds the split, the corruption and the MLP's initialization (the linear model starts at zero).
        dataset: "digits" (scikit-learn, 1797 8x8 images) or "mnist" (IDX files under ``data_dir``).
        data_dir: folder holding torchvision's MNIST files; needed for "mnist" only.
        n_train: training examples (the lower level's data).
        n_corrupt: training examples whose label is replaced by a different random class.
        n_val: clean validation examples (the upper level's data).
        mu: L2 penalty on the weight and bias of the lower model.
        upper_l2: L2 penalty on the logits x; it keeps x from overfitting the validation set.
        model: "linear" (softmax regression, W [10, d] and b [10] at zero: a strongly convex lower
            level) or "mlp" (d -> ``hidden`` tanh units -> 10, seeded init: a nonconvex lower level).
        hidden: width of the MLP's hidden layer (``model="mlp"`` only).

    The examples after train and validation are the test set (at most 10000 for MNIST). Data lives
    in non-persistent buffers: ``.double()`` converts it with the model, checkpoints stay small.
    """

    def __init__(self, seed: int = 0, dataset: str = "digits", data_dir: str | None = None, n_train: int = 1000,
                 n_corrupt: int = 500, n_val: int = 100, mu: float = 2e-3, upper_l2: float = 1e-4,
                 model: str = "linear", hidden: int = 64) -> None:
        super().__init__()
        if dataset not in ("digits", "mnist"):
            raise ValueError(f"DigitsCleaning: dataset must be 'digits' or 'mnist', got {dataset!r}")
        if dataset == "mnist" and data_dir is None:
            raise ValueError("DigitsCleaning: dataset='mnist' needs data_dir, the folder holding torchvision's "
                             "MNIST files")
        if n_train < 1 or n_val < 1:
            raise ValueError(f"DigitsCleaning: n_train and n_val must be >= 1, got n_train={n_train}, n_val={n_val}")
        if not 0 <= n_corrupt <= n_train:
            raise ValueError(f"DigitsCleaning: n_corrupt must be in [0, n_train={n_train}], got {n_corrupt}")
        if mu <= 0 or upper_l2 < 0:
            raise ValueError(f"DigitsCleaning: need mu > 0 and upper_l2 >= 0, got mu={mu}, upper_l2={upper_l2}")
        if model not in MODELS:
            raise ValueError(f"DigitsCleaning: model must be 'linear' or 'mlp', got {model!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"DigitsCleaning: hidden must be an integer >= 1, got {hidden!r}")
        inputs, labels = load_dataset(dataset, data_dir)
        n = inputs.shape[0]
        if n_train + n_val >= n:
            raise ValueError(f"DigitsCleaning: n_train + n_val = {n_train + n_val} leaves no test examples "
                             f"out of {n} in {dataset!r}; lower n_train or n_val")
        n_test = n - n_train - n_val if dataset == "digits" else min(n - n_train - n_val, MNIST_TEST_MAX)
        split = corrupt_split(labels, n_train, n_corrupt, n_val, n_test, seed)
        self.seed, self.dataset, self.mu, self.upper_l2 = seed, dataset, mu, upper_l2
        self.model, self.hidden = model, hidden
        for name, value in (("train_inputs", inputs[split["train"]]), ("train_labels", split["noisy_labels"]),
                            ("true_train_labels", labels[split["train"]]), ("corrupted", split["corrupted"]),
                            ("val_inputs", inputs[split["val"]]), ("val_labels", labels[split["val"]]),
                            ("test_inputs", inputs[split["test"]]), ("test_labels", labels[split["test"]])):
            self.register_buffer(name, value, persistent=False)
        self.lower = build_model(model, inputs.shape[1], hidden, seed)
        self.upper = bilevel.Hyper(logits=torch.zeros(n_train))
        self._baselines: dict[str, float] | None = None

    def _l2(self) -> Tensor:
        return _sum_of_squares(self.lower)

    def lower_objective(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """g: weighted training CE + mu/2 |w|^2; batch = (inputs [B, d], labels [B], index [B] into train)."""
        inputs, labels, index = batch
        weights = torch.sigmoid(self.upper.logits[index])
        losses = F.cross_entropy(self.lower(inputs), labels, reduction="none")
        return (weights * losses).mean() + self.mu / 2 * self._l2()

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: validation CE + upper_l2/2 |x|^2; batch = (inputs [B, d], labels [B])."""
        inputs, labels = batch
        logits = self.upper.logits
        return F.cross_entropy(self.lower(inputs), labels) + self.upper_l2 / 2 * logits.square().sum()

    def data(self) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Full batches every step.

        Returns ((train inputs [n_train, d], noisy labels [n_train], arange(n_train)),
        (val inputs [n_val, d], val labels [n_val])).
        """
        index = torch.arange(self.train_labels.shape[0], device=self.train_labels.device)
        return (self.train_inputs, self.train_labels, index), (self.val_inputs, self.val_labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test accuracy, cleaning precision/recall/F1 of "logits < 0" vs the corruption mask, baselines."""
        flagged = self.upper.logits < 0
        hits = (flagged & self.corrupted).sum().item()
        precision = hits / max(flagged.sum().item(), 1)
        recall = hits / max(self.corrupted.sum().item(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {
            "test_accuracy": _accuracy(self.lower, self.test_inputs, self.test_labels),
            "cleaning_precision": precision,
            "cleaning_recall": recall,
            "cleaning_f1": f1,
            **self.baselines(),
        }

    def baselines(self) -> dict[str, float]:
        """Test accuracies of the same model and mu trained on all data, validation only, clean only (cached).

        Solved in float64 whatever the model's dtype: at mu = 2e-3 the problem is ill-conditioned and
        float32 L-BFGS stops early enough to move the accuracy by a few test examples. The MLP
        baselines start from the problem's own (seeded) initialization and stop at a local minimum.
        """
        if self._baselines is None:
            f64 = torch.float64
            train, val, test = self.train_inputs.to(f64), self.val_inputs.to(f64), self.test_inputs.to(f64)
            clean = ~self.corrupted
            sets = {
                "baseline_all_accuracy": (torch.cat([train, val]), torch.cat([self.train_labels, self.val_labels])),
                "baseline_val_only_accuracy": (val, self.val_labels),
                "baseline_oracle_accuracy": (torch.cat([train[clean], val]),
                                             torch.cat([self.train_labels[clean], self.val_labels])),
            }
            self._baselines = {}
            for name, (inputs, labels) in sets.items():
                model = build_model(self.model, inputs.shape[1], self.hidden, self.seed, f64).to(inputs.device)
                _ridge_softmax(model, inputs, labels, self.mu)
                self._baselines[name] = _accuracy(model, test, self.test_labels)
        return dict(self._baselines)
