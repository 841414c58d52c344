"""Soft-margin SVM hyperparameters on breast cancer, with the lower constraints explicit (LV-HBA's SVM).

The formulation of Yao, Yu, Zeng, Zhang (ICLR 2024, "Constrained bi-level optimization: proximal
Lagrangian value function approach and Hessian-free algorithm", the linear-SVM experiment; as in
their official code, SUSTech-Optimization/LV-HBA, "Hyperparameter optimization/Linear SVM"):

    upper:  min_c  F(c) = mean_{j in val} loss(v_j m_j),   m_j = w*^T a_j + b*  (labels v_j in {-1, 1})
    lower:  (w*, b*, xi*) in argmin_{w, b, xi}  1/2 |w|^2 + 1/2 sum_i exp(c_i) xi_i^2
                               s.t.  1 - v_i (w^T a_i + b) - xi_i <= 0     for every training example i

x = c (one log-weight per training example), y = (w, b, xi). The constraints are affine in y, so
the Euclidean projection onto them is well defined (a QP; LV-HBA's code solves it with cvxpy).
The paper's code starts c ~ U(-6, -5); here c starts at the constant ``c0``. Its upper loss is a
smoothed 0-1 loss of the normalized margin, LeakyReLU(2 sigmoid(-5 v m / |w|) - 1)
(``upper_loss="smoothed_01"``); the default is the validation squared hinge max(0, 1 - v m)^2,
which has no |w| in a denominator and so is defined at the feasible start w = 0.

Eliminating xi (the minimizer of exp(c_i) xi_i^2 over xi_i >= 1 - v_i m_i is max(0, 1 - v_i m_i))
gives the same (w*, b*) from an unconstrained, strongly convex (in w) lower level:

    lower (explicit_constraints=False):  min_{w, b}  1/2 |w|^2 + 1/2 sum_i exp(c_i) max(0, 1 - v_i (w^T a_i + b))^2

so both variants share y*(c) in (w, b) and F(c): the squared-hinge variant runs with the IFT engines
and gives the constrained engines (LV-HBA) a comparison on the same hypergradient.

Data: scikit-learn's ``load_breast_cancer`` (569 examples, 30 features), a permutation drawn from
``numpy.random.RandomState(seed)`` split into train / validation / test, features standardized
with the training split's mean and std, labels malignant -> -1, benign -> +1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
from problems.common import breast_cancer

Batch = tuple[Tensor, Tensor, Tensor]
UPPER_LOSSES = ("squared_hinge", "smoothed_01")


def breast_cancer_split(seed: int, n_train: int, n_val: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Standardized train / val / test splits: {split: (inputs [n, 30] default dtype, labels [n] in {-1, +1})}."""
    features, targets = breast_cancer(seed)
    n = targets.shape[0]
    if n_train < 2 or n_val < 1 or n_train + n_val >= n:
        raise ValueError(f"SVMHyperparameters: need n_train >= 2, n_val >= 1 and n_train + n_val < {n} (to leave "
                         f"test examples), got n_train={n_train}, n_val={n_val}")
    index = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    mean, std = features[index["train"]].mean(0), features[index["train"]].std(0)
    dtype = torch.get_default_dtype()
    return {split: (torch.as_tensor((features[i] - mean) / std, dtype=dtype),
                    torch.as_tensor(2.0 * targets[i] - 1.0, dtype=dtype)) for split, i in index.items()}


def squared_hinge_svm(inputs: Tensor, labels: Tensor, weights: Tensor, iters: int = 50,
                      tol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """(w*, b*) of min 1/2 |w|^2 + 1/2 sum_i weights_i max(0, 1 - labels_i (w^T a_i + b))^2, by Newton's method.

    The objective is piecewise quadratic, so (semismooth) Newton steps reach the minimizer exactly
    once the set of margin violators settles; a backtracking line search keeps every step a descent.
    Stops after ``iters`` steps or once |gradient| <= ``tol``. Not a pure function (it branches on
    values): it serves baselines and tests, never an engine.
    Shapes: inputs [n, d], labels [n], weights [n] (> 0) -> w [d], b [].
    """
    n, d = inputs.shape
    aug = torch.cat([inputs, inputs.new_ones(n, 1)], dim=1)  # [n, d + 1], the last coordinate is b
    reg = torch.ones(d + 1, dtype=inputs.dtype, device=inputs.device)
    reg[-1] = 0.0

    def objective(v: Tensor) -> Tensor:
        return 0.5 * (reg * v * v).sum() + 0.5 * (weights * F.relu(1 - labels * (aug @ v)).square()).sum()

    v = inputs.new_zeros(d + 1)
    for _ in range(iters):
        slack = F.relu(1 - labels * (aug @ v))
        grad = reg * v - aug.T @ (weights * slack * labels)
        active = (slack > 0).to(inputs.dtype) * weights
        hess = torch.diag(reg) + (aug.T * active) @ aug + 1e-12 * torch.eye(d + 1, dtype=v.dtype, device=v.device)
        if float(grad.norm()) <= tol:
            break
        step, value, t = torch.linalg.solve(hess, grad), objective(v), 1.0
        while objective(v - t * step) > value - 1e-4 * t * (grad @ step) and t > 1e-8:
            t /= 2
        v = v - t * step
    return v[:-1], v[-1]


class SVMHyperparameters(bilevel.BilevelProblem):
    """Per-example soft-margin weights exp(c_i) of a linear SVM, tuned on validation data.

    Args:
        seed: seeds the train / val / test permutation (no other randomness).
        n_train, n_val: training (lower) and validation (upper) examples; the rest (569 in all) is test.
        c0: the initial log-weight of every training example (the paper's code: U(-6, -5)).
        explicit_constraints: True keeps the slacks xi as lower variables with the constraints
            1 - v_i (w^T a_i + b) - xi_i <= 0 (``lower_constraints``; engines that honour constraints
            only); False eliminates xi (the squared-hinge lower level; every engine runs it).
        upper_loss: "squared_hinge" (mean max(0, 1 - v m)^2 on validation) or "smoothed_01"
            (the paper code's mean LeakyReLU(2 sigmoid(-5 v m / |w|) - 1)).
        c_bounds: None (the paper: c free) or (low, high), a box every engine keeps c in (a search
            range). A bound on c bounds the lower level's curvature 1 + sum_i exp(c_i) |a_i|^2, so a
            fixed inner step size stays stable however far the outer steps push c.

    Lower variables: ``w`` [30], ``b`` [1] and, with explicit constraints, ``xi`` [n_train]; they
    start at w = 0, b = 0, xi = 1, a feasible point (every constraint is 1 - 0 - 1 = 0 <= 0).
    Batches: lower (inputs [B, 30], labels [B], index [B] into the training split), upper (inputs, labels).
    """

    def __init__(self, seed: int = 0, n_train: int = 300, n_val: int = 100, c0: float = -6.0,
                 explicit_constraints: bool = True, upper_loss: str = "squared_hinge",
                 c_bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        if upper_loss not in UPPER_LOSSES:
            raise ValueError(f"SVMHyperparameters: upper_loss must be one of {UPPER_LOSSES}, got {upper_loss!r}")
        splits = breast_cancer_split(seed, n_train, n_val)
        for split, (inputs, labels) in splits.items():
            self.register_buffer(f"{split}_inputs", inputs, persistent=False)
            self.register_buffer(f"{split}_labels", labels, persistent=False)
        self.seed, self.c0 = seed, float(c0)
        self.explicit_constraints, self.upper_loss = explicit_constraints, upper_loss
        d = self.train_inputs.shape[1]
        lower = {"w": torch.zeros(d), "b": torch.zeros(1)}  # b as [1], not []: flat views of y stay simple
        if explicit_constraints:
            lower["xi"] = torch.ones(n_train)
        self.lower = bilevel.Hyper(**lower)
        self.upper = bilevel.Hyper(c=torch.full((n_train,), float(c0)))
        if c_bounds is not None:
            low, high = c_bounds
            if not low <= c0 <= high:
                raise ValueError(f"SVMHyperparameters: c0 = {c0} lies outside c_bounds = {tuple(c_bounds)}")
            self.upper_sets = {"c": bilevel.Box(float(low), float(high))}
        self._baselines: dict[str, float] | None = None

    @property
    def has_constraints(self) -> bool:
        """Whether ``lower_constraints`` applies: only with ``explicit_constraints=True``."""
        return self.explicit_constraints

    def margins(self, inputs: Tensor) -> Tensor:
        """w^T a + b for inputs [B, 30] -> [B]."""
        return inputs @ self.lower.w + self.lower.b

    def lower_objective(self, batch: Batch) -> Tensor:
        """g. Explicit: 1/2 |w|^2 + 1/2 sum_i exp(c_i) xi_i^2 over all training slacks (the batch is unused).

        Squared hinge: 1/2 |w|^2 + n/(2B) sum_{i in batch} exp(c_i) max(0, 1 - v_i m_i)^2, an unbiased
        estimate of the full sum (equal to it on the full batch).
        """
        w2 = 0.5 * self.lower.w.square().sum()
        if self.explicit_constraints:
            return w2 + 0.5 * (self.upper.c.exp() * self.lower.xi.square()).sum()
        inputs, labels, index = self._lower_batch(batch)
        hinge = F.relu(1 - labels * self.margins(inputs)).square()
        scale = self.upper.c.shape[0] / labels.shape[0]
        return w2 + 0.5 * scale * (self.upper.c[index].exp() * hinge).sum()

    def lower_constraints(self, batch: Batch) -> Tensor:
        """c(x, y) = 1 - v_i (w^T a_i + b) - xi_i for i in the batch (None: all), shape [B]; feasible where <= 0.

        Affine in (w, b, xi) and independent of the upper variables.
        """
        if not self.explicit_constraints:
            raise RuntimeError("SVMHyperparameters(explicit_constraints=False) has no lower constraints: the slacks "
                               "are eliminated into the squared hinge")
        inputs, labels, index = self._lower_batch(batch)
        return 1 - labels * self.margins(inputs) - self.lower.xi[index]

    def _lower_batch(self, batch: Batch | None) -> Batch:
        # None stands for the full training split: engines that size their multipliers before the
        # first batch arrives (LV-HBA's init) evaluate the constraints on None.
        return self.data()[0] if batch is None else batch

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: the mean validation loss of the margins; batch = (inputs [B, 30], labels [B])."""
        inputs, labels = batch
        signed = labels * self.margins(inputs)
        if self.upper_loss == "squared_hinge":
            return F.relu(1 - signed).square().mean()
        # The paper code's loss on the normalized margin; the tiny floor keeps w = 0 finite.
        norm = (self.lower.w.square().sum() + 1e-12).sqrt()
        return F.leaky_relu(2 * torch.sigmoid(-5.0 * signed / norm) - 1).mean()

    def data(self) -> tuple[Batch, tuple[Tensor, Tensor]]:
        """Full batches: ((train inputs, labels, arange(n_train)), (val inputs, labels))."""
        index = torch.arange(self.train_labels.shape[0], device=self.train_labels.device)
        return (self.train_inputs, self.train_labels, index), (self.val_inputs, self.val_labels)

    @torch.no_grad()
    def lower_solution(self) -> dict[str, Tensor]:
        """y*(c) at the current c, solved by Newton's method: {"w", "b"} (+ "xi" = max(0, 1 - v m*) when explicit)."""
        inputs, labels = self.train_inputs, self.train_labels
        w, b = squared_hinge_svm(inputs, labels, self.upper.c.exp())
        solution = {"w": w, "b": b}
        if self.explicit_constraints:
            solution["xi"] = F.relu(1 - labels * (inputs @ w + b))
        return solution

    @torch.no_grad()
    def lower_to_solution(self) -> SVMHyperparameters:
        """Set the lower variables to y*(c) in place and return the problem."""
        for name, value in self.lower_solution().items():
            getattr(self.lower, name).copy_(value.reshape(getattr(self.lower, name).shape))
        return self

    @torch.no_grad()
    def accuracy(self, split: str) -> float:
        """Fraction of ``split`` ("train", "val", "test") with sign(w^T a + b) equal to the label."""
        inputs, labels = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_labels")
        return (self.margins(inputs) * labels > 0).double().mean().item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracies, the validation loss, the largest constraint violation (explicit), and the grid baseline."""
        metrics = {"test_accuracy": self.accuracy("test"), "val_accuracy": self.accuracy("val"),
                   "train_accuracy": self.accuracy("train"),
                   "upper_objective": self.upper_objective((self.val_inputs, self.val_labels)).item()}
        if self.explicit_constraints:
            metrics["max_constraint_violation"] = self.lower_constraints(self.data()[0]).clamp_min(0).max().item()
        return {**metrics, **self.baselines()}

    def baselines(self) -> dict[str, float]:
        """Reference SVMs, each solved exactly (Newton, float64) with one c shared by every example (cached).

        ``baseline_c0_*``: at the initial c0 (what tuning starts from); ``baseline_grid_*``: at the
        c in {-10, -9, ..., 4} with the least validation loss (this problem's upper loss).
        """
        if self._baselines is None:
            results = {c: self._shared_c_svm(float(c)) for c in range(-10, 5)}
            c_best = min(results, key=lambda c: results[c][0])
            self._baselines = {"baseline_grid_c": float(c_best)}
            for name, (_, val_acc, test_acc) in (("c0", self._shared_c_svm(self.c0)), ("grid", results[c_best])):
                self._baselines[f"baseline_{name}_val_accuracy"] = val_acc
                self._baselines[f"baseline_{name}_test_accuracy"] = test_acc
        return dict(self._baselines)

    def _shared_c_svm(self, c: float) -> tuple[float, float, float]:
        """(validation loss, validation accuracy, test accuracy) of the SVM solved with every c_i = c."""
        f64 = torch.float64
        train, val, test = ((getattr(self, f"{s}_inputs").to(f64), getattr(self, f"{s}_labels").to(f64))
                            for s in ("train", "val", "test"))
        w, b = squared_hinge_svm(*train, torch.full_like(train[1], float(np.exp(c))))
        signed = val[1] * (val[0] @ w + b)
        if self.upper_loss == "squared_hinge":
            loss = F.relu(1 - signed).square().mean().item()
        else:
            loss = F.leaky_relu(2 * torch.sigmoid(-5.0 * signed / w.norm()) - 1).mean().item()
        test_acc = (test[1] * (test[0] @ w + b) > 0).double().mean().item()
        return loss, (signed > 0).double().mean().item(), test_acc
