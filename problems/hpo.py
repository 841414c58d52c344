"""Hyperparameter optimization: per-feature L2 regularization of logistic regression.

    lower:  w*(x) = argmin_{w, b}  mean_i log(1 + exp(-s_i (a_i^T w + b))) + 1/2 sum_j exp(x_j) w_j^2
    upper:  F(x)  = mean_{validation} log(1 + exp(-s_i (a_i^T w* + b*))) + upper_l2/2 |x|^2

(s_i = +-1; written with binary cross-entropy on 0/1 labels, the same loss). The scaling is the
convention of Pedregosa (2016) and of benchmark_bilevel (Dagreou, Ablin, Vaiter, Moreau 2022) on
ijcnn1: the MEAN training loss plus 1/2 sum_j exp(x_j) w_j^2, so exp(x_j) = 1 / (C n_train) in
scikit-learn's ``C`` and x is a log-L2 weight per feature. The intercept b is not penalized, as
in scikit-learn; the lower Hessian is (d + 1) x (d + 1).

``upper_l2`` (default 1e-5) is a deviation from the pure validation loss, made on purpose: with
``upper_l2=0`` F need not have a minimizer. Measured on breast_cancer (seed 0, upper_l2 = 0):
gradient descent on the exact F drives some x_j below -13 (features that want no penalty) and
others upward, while |dF/dx| decays only like exp(-|x_j|); the reference search then stops at
|dF/dx| < 1e-8 with x_j between -44 and +27, an infimum approached at infinity rather than a
minimizer, and the Hessian of F is singular there. The ridge makes x* finite (x in [-11.1, 1.2]
on that instance) with a positive definite Hessian of F. 1e-5 rather than DigitsCleaning's 1e-4
because a ridge centred at x = 0 (exp(x) = 1, a heavy penalty) biases x*: at 1e-4 the test loss of
w*(x*) on ijcnn1_synthetic is 0.180, at 1e-5 0.172, the same as the best uniform x.

``reference_optimum()`` computes x* and F* in float64 (L-BFGS on x with exact hypergradients,
then Newton on x with the exact Hessian of F), so runs can plot the suboptimality F(x) - F*.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
from problems.common import breast_cancer, float_dtype, lbfgs

DATASETS = ("breast_cancer", "ijcnn1_synthetic")
_DEFAULT_SIZES = {"breast_cancer": (284, 142, 143), "ijcnn1_synthetic": (50_000, 90_000, 10_000)}
_REFERENCE_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def load_breast_cancer_split(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, Tensor]:
    """scikit-learn's breast-cancer set (569 x 30), permuted by ``RandomState(seed)``, standardized with
    the training mean and standard deviation. Returns float64 inputs [n, 30] and 0/1 labels [n]
    for ``train``, ``val``, ``test``."""
    features, targets = breast_cancer(seed)
    if n_train + n_val + n_test > targets.shape[0]:
        raise ValueError(f"LogisticL2: n_train + n_val + n_test must be <= {targets.shape[0]} for "
                         f"breast_cancer, got {n_train + n_val + n_test}")
    inputs = torch.as_tensor(features, dtype=torch.float64)
    labels = torch.as_tensor(targets, dtype=torch.float64)
    mean, std = inputs[:n_train].mean(0), inputs[:n_train].std(0)
    inputs = (inputs - mean) / std
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    return {k: (inputs[a:b], labels[a:b]) for k, (a, b) in bounds.items()}


def make_ijcnn1_synthetic(n_train: int, n_val: int, n_test: int, seed: int,
                          positive_rate: float = 0.097) -> dict[str, tuple[Tensor, Tensor]]:
    """An ijcnn1-shaped binary task: 22 features in [-1, 1], about 9.7 % positives (ijcnn1: 4853 of 49990).

    Like LIBSVM's ijcnn1, the first 10 features one-hot encode a categorical variable (10 levels of
    unequal frequency) and the other 12 are continuous, scaled to [-1, 1] (tanh of correlated
    Gaussians from a 3-factor model). The label is Bernoulli(sigmoid(s)) with s linear in 9 of the
    12 continuous features (6 strong, 3 weak, 3 irrelevant) and the category, plus an interaction
    and a square, so a linear model is misspecified; the intercept is set by bisection to hit
    ``positive_rate``. All draws from ``numpy.random.default_rng(seed)``. Returns float64 inputs
    [n, 22] and 0/1 labels [n] for ``train``, ``val``, ``test``.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    level_freq = rng.dirichlet(np.full(10, 2.0))
    category = rng.choice(10, size=n, p=level_freq)
    factors = rng.normal(size=(12, 3))
    cov = factors @ factors.T + np.eye(12)
    cov /= np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    continuous = np.tanh(0.8 * rng.multivariate_normal(np.zeros(12), cov, size=n))
    beta = np.concatenate([rng.choice([-1.0, 1.0], 6) * rng.uniform(1.5, 3.0, 6),
                           rng.choice([-1.0, 1.0], 3) * rng.uniform(0.2, 0.5, 3), np.zeros(3)])
    gamma = rng.normal(size=10)
    score = (continuous @ beta + gamma[category] + 1.5 * continuous[:, 0] * continuous[:, 1]
             - 1.0 * continuous[:, 2] ** 2)
    low, high = -30.0, 30.0
    for _ in range(80):  # bisection on the intercept: mean sigmoid(score + b) = positive_rate
        mid = (low + high) / 2
        low, high = (mid, high) if np.mean(1 / (1 + np.exp(-(score + mid)))) < positive_rate else (low, mid)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(score + low)))).astype(np.float64)
    inputs = np.concatenate([np.eye(10)[category], continuous], axis=1)
    x, y = torch.as_tensor(inputs, dtype=torch.float64), torch.as_tensor(labels)
    cuts = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    return {k: (x[a:b], y[a:b]) for k, (a, b) in cuts.items()}


class LogisticL2(bilevel.BilevelProblem):
    """Per-feature log-L2 weights x (upper, ``upper.log_l2`` [d]) of a logistic regression (lower,
    ``lower.weight`` [d], ``lower.bias`` [1]).

    Args:
        dataset: "breast_cancer" (scikit-learn, 569 x 30, standardized) or "ijcnn1_synthetic"
            (made here, 22 features, see ``make_ijcnn1_synthetic``).
        seed: seeds the split (breast_cancer) or the generator (ijcnn1_synthetic).
        n_train, n_val, n_test: sizes; None = 284 / 142 / 143 (breast_cancer), 50000 / 90000 / 10000
            (ijcnn1_synthetic, the sizes of LIBSVM's ijcnn1 train / test files, rounded).
        upper_l2: ridge on x in the upper objective (see the module docstring for why it is there).
        init_log_l2: the starting x (every entry); w and b start at zero.
        dtype: name of the torch dtype of the model and data; the reference optimum is float64 always.

    Data live in non-persistent buffers; ``data()`` gives full batches ``(inputs [n, d], labels [n])``.
    """

    def __init__(self, dataset: str = "breast_cancer", seed: int = 0, n_train: int | None = None,
                 n_val: int | None = None, n_test: int | None = None, upper_l2: float = 1e-5,
                 init_log_l2: float = -4.0, dtype: str = "float64") -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"LogisticL2: dataset must be one of {DATASETS}, got {dataset!r}")
        defaults = _DEFAULT_SIZES[dataset]
        sizes = tuple(d if s is None else s for s, d in zip((n_train, n_val, n_test), defaults, strict=True))
        for name, size in zip(("n_train", "n_val", "n_test"), sizes, strict=True):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"LogisticL2: {name} must be an integer >= 1, got {size!r}")
        if not (math.isfinite(upper_l2) and upper_l2 >= 0) or not math.isfinite(init_log_l2):
            raise ValueError(f"LogisticL2: need upper_l2 >= 0 and a finite init_log_l2, got {upper_l2}, {init_log_l2}")
        loader = load_breast_cancer_split if dataset == "breast_cancer" else make_ijcnn1_synthetic
        split = loader(*sizes, seed)
        dt = float_dtype(dtype)
        self.dataset, self.seed, self.upper_l2 = dataset, seed, float(upper_l2)
        self._key = (dataset, seed, *sizes, self.upper_l2, dtype)
        for part, (inputs, labels) in split.items():
            self.register_buffer(f"{part}_inputs", inputs.to(dt), persistent=False)
            self.register_buffer(f"{part}_labels", labels.to(dt), persistent=False)
        d = self.train_inputs.shape[1]
        self.lower = bilevel.Hyper(weight=torch.zeros(d, dtype=dt), bias=torch.zeros(1, dtype=dt))
        self.upper = bilevel.Hyper(log_l2=torch.full((d,), float(init_log_l2), dtype=dt))
        self.register_buffer("x_start", self.upper.log_l2.detach().clone(), persistent=False)

    # -- the objectives ------------------------------------------------------------------------

    def _logits(self, inputs: Tensor) -> Tensor:
        return inputs @ self.lower.weight + self.lower.bias

    def lower_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """g: mean logistic loss + 1/2 sum_j exp(x_j) w_j^2; batch = (inputs [B, d], 0/1 labels [B])."""
        inputs, labels = batch
        penalty = 0.5 * torch.sum(torch.exp(self.upper.log_l2) * self.lower.weight**2)
        return F.binary_cross_entropy_with_logits(self._logits(inputs), labels) + penalty

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: mean validation logistic loss + upper_l2/2 |x|^2; batch = (inputs [B, d], 0/1 labels [B])."""
        inputs, labels = batch
        ridge = 0.5 * self.upper_l2 * torch.sum(self.upper.log_l2**2)
        return F.binary_cross_entropy_with_logits(self._logits(inputs), labels) + ridge

    def data(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Full batches: ((train inputs [n_train, d], labels), (val inputs [n_val, d], labels))."""
        return (self.train_inputs, self.train_labels), (self.val_inputs, self.val_labels)

    # -- closed forms (float64) --------------------------------------------------------------------

    def _task(self) -> _Task:
        f64 = torch.float64
        return _Task(_design(self.train_inputs.to(f64)), self.train_labels.to(f64), _design(self.val_inputs.to(f64)),
                     self.val_labels.to(f64), self.upper_l2)

    def _x(self, x: Tensor | None) -> Tensor:
        return (self.upper.log_l2 if x is None else x).detach().to(torch.float64)

    @torch.no_grad()
    def lower_solution(self, x: Tensor | None = None) -> Tensor:
        """(w*, b*) at x (default: the current x) by Newton to machine precision, float64 [d + 1]."""
        return _newton(self._task(), self._x(x))

    @torch.no_grad()
    def lower_to_solution(self) -> LogisticL2:
        """Set the lower variables to w*(x) in place (no autograd) and return the problem."""
        theta = self.lower_solution()
        self.lower.weight.copy_(theta[:-1])
        self.lower.bias.copy_(theta[-1:])
        return self

    @torch.no_grad()
    def value(self, x: Tensor | None = None) -> Tensor:
        """F(x) = f(x, w*(x)), float64 0-d."""
        task, x = self._task(), self._x(x)
        return _upper_value(task, x, _newton(task, x))

    @torch.no_grad()
    def hypergradient(self, x: Tensor | None = None) -> Tensor:
        """dF/dx = -exp(x) * w* * q[:d] + upper_l2 x with q = H^-1 grad_theta f, float64 [d]."""
        task, x = self._task(), self._x(x)
        return _hypergradient(task, x, _newton(task, x))

    def reference_optimum(self, tol: float = 1e-8) -> tuple[Tensor, Tensor]:
        """(x* [d], F*) in float64 with |dF/dx*| <= tol; cached per (dataset, seed, sizes, upper_l2, dtype, tol).

        The search starts from the best uniform x on a grid (not from ``init_log_l2``), so x* does
        not depend on where a run starts. F is not convex in x: x* is the local minimizer found.
        """
        key = (*self._key, tol)
        if key not in _REFERENCE_CACHE:
            _REFERENCE_CACHE[key] = _minimize_value(self._task(), tol)
        x_star, f_star = _REFERENCE_CACHE[key]
        return x_star.clone(), f_star.clone()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test accuracy and loss of the current (w, b) and of w*(x*); F(x) - F* now and at the start; |dF/dx|."""
        x_star, f_star = self.reference_optimum()
        test = self.test_inputs.to(torch.float64)
        at_optimum = _design(test) @ _newton(self._task(), x_star)
        metrics = {}
        for name, logits in (("test", self._logits(self.test_inputs)), ("optimum_test", at_optimum)):
            labels = self.test_labels.to(logits.dtype)
            metrics[f"{name}_accuracy"] = ((logits > 0) == (labels > 0.5)).double().mean().item()
            metrics[f"{name}_loss"] = F.binary_cross_entropy_with_logits(logits, labels).item()
        return {
            **metrics,
            "suboptimality": (self.value() - f_star).item(),
            "initial_suboptimality": (self.value(self.x_start) - f_star).item(),
            "hypergradient_norm": self.hypergradient().norm().item(),
            "optimal_value": f_star.item(),
        }


# -- the closed forms, pure torch in float64 -------------------------------------------------------


class _Task(NamedTuple):
    """Float64 data of one instance: designs carry a trailing column of ones (the intercept)."""

    train: Tensor  # [n, d + 1]
    train_labels: Tensor  # [n], 0/1
    val: Tensor  # [m, d + 1]
    val_labels: Tensor  # [m]
    upper_l2: float


def _design(inputs: Tensor) -> Tensor:
    return torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)


def _penalty(x: Tensor) -> Tensor:
    """exp(x) with a zero for the unpenalized intercept: the diagonal of the ridge, [d + 1]."""
    return torch.cat([torch.exp(x), torch.zeros_like(x[:1])])


def _lower_value(task: _Task, x: Tensor, theta: Tensor) -> Tensor:
    return (F.binary_cross_entropy_with_logits(task.train @ theta, task.train_labels)
            + 0.5 * torch.sum(_penalty(x) * theta**2))


def _lower_derivatives(task: _Task, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(grad [d + 1], Hessian [d + 1, d + 1]) of g in theta = (w, b), from the dense formulas."""
    p = torch.sigmoid(task.train @ theta)
    n = task.train.shape[0]
    reg = _penalty(x)
    grad = task.train.T @ (p - task.train_labels) / n + reg * theta
    hess = (task.train.T * (p * (1 - p))) @ task.train / n + torch.diag(reg)
    return grad, hess


def _newton_step(task: _Task, x: Tensor, theta: Tensor) -> Tensor:
    grad, hess = _lower_derivatives(task, x, theta)
    return theta - torch.linalg.solve(hess, grad)


def _newton(task: _Task, x: Tensor, theta: Tensor | None = None) -> Tensor:
    """w*(x) by damped Newton to machine precision (g is strongly convex in theta), float64 [d + 1]."""
    theta = torch.zeros(task.train.shape[1], dtype=x.dtype) if theta is None else theta
    value = _lower_value(task, x, theta)
    for _ in range(100):
        step = theta - _newton_step(task, x, theta)
        size = 1.0
        for _ in range(30):  # backtracking: pure Newton on a logistic loss can overshoot far from w*
            trial = theta - size * step
            trial_value = _lower_value(task, x, trial)
            if trial_value <= value + 1e-12 * abs(value):
                break
            size /= 2
        theta, value = trial, trial_value
        if step.abs().max() <= 1e-14 * (1 + theta.abs().max()):
            break  # quadratic convergence: the step just taken brought the error to rounding level
    return theta


def _upper_value(task: _Task, x: Tensor, theta: Tensor) -> Tensor:
    ridge = 0.5 * task.upper_l2 * torch.sum(x**2)
    return F.binary_cross_entropy_with_logits(task.val @ theta, task.val_labels) + ridge


def _upper_gradient(task: _Task, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_theta f [d + 1], sigmoid(val @ theta) [m])."""
    p = torch.sigmoid(task.val @ theta)
    return task.val.T @ (p - task.val_labels) / task.val.shape[0], p


def _hypergradient(task: _Task, x: Tensor, theta: Tensor) -> Tensor:
    """dF/dx = -exp(x) * w * q[:d] + upper_l2 x, q = H^-1 grad_theta f, at theta = w*(x). [d]"""
    _, hess = _lower_derivatives(task, x, theta)
    q = torch.linalg.solve(hess, _upper_gradient(task, theta)[0])
    return -torch.exp(x) * theta[:-1] * q[:-1] + task.upper_l2 * x


def _value_hessian(task: _Task, x: Tensor, theta: Tensor) -> Tensor:
    """The exact Hessian of F at x, [d, d], given theta = w*(x).

    With E = [diag(exp(x) w); 0] and E_q = [diag(exp(x) q); 0] ((d + 1) x d), dw*/dx = -H^-1 E and
    dq/dx = H^-1 (-T[dw*/dx] q - E_q + grad^2 f dw*/dx), T the third derivative of the training
    loss, so that d/dx_k of dF/dx_j = -exp(x_j) (delta_jk w_j q_j + (dw*/dx)_jk q_j + w_j (dq/dx)_jk)
    + upper_l2 delta_jk. Costs a few passes over the data (no per-coordinate loop).
    """
    d, n = x.shape[0], task.train.shape[0]
    _, hess = _lower_derivatives(task, x, theta)
    grad_f, p_val = _upper_gradient(task, theta)
    q = torch.linalg.solve(hess, grad_f)
    ex, w = torch.exp(x), theta[:-1]
    pad = torch.zeros(1, d, dtype=x.dtype)
    dtheta = -torch.linalg.solve(hess, torch.cat([torch.diag(ex * w), pad]))  # [d + 1, d]
    p = torch.sigmoid(task.train @ theta)
    third = task.train.T @ ((p * (1 - p) * (1 - 2 * p) * (task.train @ q) / n)[:, None] * (task.train @ dtheta))
    curvature = task.val.T @ ((p_val * (1 - p_val) / task.val.shape[0])[:, None] * (task.val @ dtheta))
    dq = torch.linalg.solve(hess, curvature - third - torch.cat([torch.diag(ex * q[:-1]), pad]))
    h = (torch.diag(task.upper_l2 - ex * w * q[:-1]) - (ex * q[:-1])[:, None] * dtheta[:-1]
         - (ex * w)[:, None] * dq[:-1])
    return (h + h.T) / 2


def _minimize_value(task: _Task, tol: float) -> tuple[Tensor, Tensor]:
    """(x*, F*) with |dF/dx*| <= tol: from the best uniform x on a grid, L-BFGS on x to |dF/dx| <= 1e-5,
    then Newton with the exact Hessian.

    Every F and dF/dx comes from a lower solve to machine precision (warm-started Newton) and a
    dense (d + 1) x (d + 1) solve. The Newton phase takes a step only where it lowers |dF/dx|
    (halving it otherwise) and stops at 1e-3 tol or when rounding stops the progress.
    """
    d = task.train.shape[1] - 1
    grid = [torch.full((d,), float(v), dtype=torch.float64) for v in range(-12, 3)]
    values = [_upper_value(task, x, _newton(task, x)) for x in grid]
    x0 = grid[int(torch.stack(values).argmin())]
    warm = {"theta": _newton(task, x0)}
    x = x0.clone().requires_grad_(True)

    def objective() -> Tensor:  # sets the exact hypergradient as x.grad
        theta = warm["theta"] = _newton(task, x.detach(), warm["theta"])
        x.grad = _hypergradient(task, x.detach(), theta)
        return _upper_value(task, x.detach(), theta)

    lbfgs([x], objective, max_iter=1000, tolerance_grad=1e-5, tolerance_change=0.0, backward=False)
    x = x.detach()
    theta = _newton(task, x, warm["theta"])
    grad = _hypergradient(task, x, theta)
    for _ in range(30):
        if grad.norm() <= 1e-3 * tol:
            break
        step, size = torch.linalg.solve(_value_hessian(task, x, theta), grad), 1.0
        for _ in range(10):
            trial = x - size * step
            trial_theta = _newton(task, trial, theta)
            trial_grad = _hypergradient(task, trial, trial_theta)
            if trial_grad.norm() < grad.norm():
                break
            size /= 2
        else:
            break  # no step lowers |dF/dx| any more: rounding level
        x, theta, grad = trial, trial_theta, trial_grad
    if not grad.norm() <= tol:
        raise RuntimeError(f"LogisticL2.reference_optimum: Newton on x stopped at |dF/dx| = {grad.norm():.3g} > "
                           f"tol = {tol:g}; F may have no minimizer (try upper_l2 > 0)")
    return x, _upper_value(task, x, theta)
