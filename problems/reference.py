"""Closed-form reference problems P1-P4 of shared/REFERENCE_PROBLEMS.md.

Each problem is a ``bilevel.BilevelProblem`` whose lower level is a strongly convex quadratic in
the lower variables, so y*(x), F(x) and dF/dx have closed forms. The closed forms are computed
here in torch from the formulas (never copied golden numbers), which lets the tests hold every
engine to them. Defaults are the instances of REFERENCE_PROBLEMS.md, in float64.

The data are constants of the problem (non-persistent buffers) and the objectives ignore the
batch: ``data()`` returns ``((), ())``, an empty full batch for both levels.

Usable from Python and from a YAML config (every ``__init__`` argument is typed)::

    problem = QuadraticP1()                       # x = (0.3, -0.7), y = 0
    problem.hypergradient()                        # tensor([ 2.5634705075, -3.6974348422])
    hypergrad.Exact(inner_steps=0).hypergradient(problem.lower_to_solution(), None, None)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import bilevel
from problems.common import float_dtype

Matrix = Sequence[Sequence[float]]
Vector = Sequence[float]

# The data of P2, shared by P3 (X_tr, y_tr, X_v, y_v) and P4 (A, b, A_v, b_v).
_X_TRAIN = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [2.0, 1.0, 1.0], [0.5, -1.0, 2.0]]
_Y_TRAIN = [1.0, 0.0, 2.0, 3.0, -1.0]
_X_VAL = [[1.0, 1.0, 1.0], [0.0, 2.0, -1.0], [1.0, -1.0, 0.0]]
_Y_VAL = [2.0, 0.5, 0.0]


def _least_squares_gradient(design: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """X^T (X w - y): the gradient of 1/2 |X w - y|^2 in w. Shapes (m, d), (m,), (d,) -> (d,)."""
    return design.T @ (design @ w - target)


class _ClosedFormProblem(bilevel.BilevelProblem):
    """Shared plumbing: constants as buffers, a single lower tensor, the empty full batch."""

    def _constant(self, name: str, value: Any, dtype: torch.dtype) -> Tensor:
        """Register ``value`` as a non-persistent buffer ``name`` (a constant of the problem)."""
        self.register_buffer(name, torch.as_tensor(value, dtype=dtype).clone(), persistent=False)
        return getattr(self, name)

    def data(self) -> tuple[tuple[()], tuple[()]]:
        """The full batch of both levels is empty: the data live inside the problem."""
        return (), ()

    @property
    def lower_variable(self) -> Tensor:
        """The lower variable (a parameter of shape (d,)); every problem here has exactly one."""
        (variable,) = self.lower.parameters()
        return variable

    def lower_solution(self) -> Tensor:
        """y*(x) at the current upper variables, shape of the lower variable (override)."""
        raise NotImplementedError

    @torch.no_grad()
    def lower_to_solution(self) -> _ClosedFormProblem:
        """Set the lower variable to y*(x) in place (no autograd) and return the problem."""
        self.lower_variable.copy_(self.lower_solution())
        return self

    @torch.no_grad()
    def value(self) -> Tensor:
        """F(x) = f(x, y*(x)), a 0-d tensor, from the closed-form lower solution."""
        saved = self.lower_variable.detach().clone()
        try:
            self.lower_to_solution()
            return self.upper_objective(()).detach()
        finally:
            self.lower_variable.copy_(saved)


class QuadraticP1(_ClosedFormProblem):
    """P1: g = 1/2 y^T A y - y^T (B x + c),  f = 1/2 |y - y_t|^2 + rho/2 |x|^2.

    y*(x) = A^-1 (B x + c), H = A, J v = -B^T v. Every truncated engine has a closed form too:
    ``neumann_hypergradient``, ``unrolled`` and ``penalty_hypergradient``.

    Args:
        x0: the upper variables x (2,); default (0.3, -0.7).
        y0: the starting lower variables y (3,); default zeros.
        A: the SPD lower Hessian (3, 3); B: (3, 2); c: (3,); y_target: y_t (3,); rho: the upper
            ridge weight. Defaults: the instance of REFERENCE_PROBLEMS.md.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, x0: list[float] | None = None, y0: list[float] | None = None,
                 A: list[list[float]] | None = None, B: list[list[float]] | None = None,
                 c: list[float] | None = None, y_target: list[float] | None = None, rho: float = 0.1,
                 dtype: str = "float64") -> None:
        super().__init__()
        dt = float_dtype(dtype)
        self.rho = float(rho)
        self._constant("A", A if A is not None else [[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dt)
        self._constant("B", B if B is not None else [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dt)
        self._constant("c", c if c is not None else [0.5, -1.0, 0.25], dt)
        self._constant("y_target", y_target if y_target is not None else [1.0, 0.0, -1.0], dt)
        n_y, n_x = self.B.shape
        x = torch.tensor(x0 if x0 is not None else [0.3, -0.7], dtype=dt)
        y = torch.tensor(y0, dtype=dt) if y0 is not None else torch.zeros(n_y, dtype=dt)
        if self.A.shape != (n_y, n_y) or self.c.shape != (n_y,) or self.y_target.shape != (n_y,):
            raise ValueError(
                f"QuadraticP1: A must be ({n_y}, {n_y}) and c, y_target ({n_y},) to match B {tuple(self.B.shape)}"
            )
        if x.shape != (n_x,) or y.shape != (n_y,):
            raise ValueError(
                f"QuadraticP1: x0 must have {n_x} entries and y0 {n_y}, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        self.upper = bilevel.Hyper(x=x)
        self.lower = bilevel.Hyper(y=y)

    # -- the objectives ------------------------------------------------------------------------

    def lower_objective(self, batch: Any) -> Tensor:
        y, x = self.lower.y, self.upper.x
        return 0.5 * y @ self.A @ y - y @ (self.B @ x + self.c)

    def upper_objective(self, batch: Any) -> Tensor:
        y, x = self.lower.y, self.upper.x
        return 0.5 * torch.sum((y - self.y_target) ** 2) + 0.5 * self.rho * torch.sum(x**2)

    # -- closed forms --------------------------------------------------------------------------

    @property
    def _x(self) -> Tensor:
        return self.upper.x.detach()

    def lower_hessian(self) -> Tensor:
        """H = d_yy g = A, shape (3, 3)."""
        return self.A.clone()

    @torch.no_grad()
    def lower_solution(self) -> Tensor:
        """y*(x) = A^-1 (B x + c), shape (3,)."""
        return torch.linalg.solve(self.A, self.B @ self._x + self.c)

    @torch.no_grad()
    def hypergradient(self) -> Tensor:
        """dF/dx = rho x + B^T A^-1 (y*(x) - y_t), shape (2,)."""
        return self.rho * self._x + self.B.T @ torch.linalg.solve(self.A, self.lower_solution() - self.y_target)

    def _contraction_power(self, alpha: float, power: int) -> Tensor:
        """(I - alpha A)^power, shape (3, 3)."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        return torch.linalg.matrix_power(eye - alpha * self.A, power)

    @torch.no_grad()
    def neumann_hypergradient(self, terms: int, alpha: float) -> Tensor:
        """Neumann with K = ``terms``, step a = ``alpha`` at y = y*(x):
        rho x + B^T A^-1 (I - (I - a A)^(K+1)) (y* - y_t), shape (2,)."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        residual = self.lower_solution() - self.y_target
        truncated = (eye - self._contraction_power(alpha, terms + 1)) @ residual
        return self.rho * self._x + self.B.T @ torch.linalg.solve(self.A, truncated)

    @torch.no_grad()
    def unrolled(self, steps: int, alpha: float, y0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(y_T, dF_T/dx) for T = ``steps`` gradient steps of size a = ``alpha`` from y0 (detached).

        y_T = (I - aA)^T y0 + A^-1 (I - (I - aA)^T)(B x + c),
        grad = rho x + B^T (I - (I - aA)^T) A^-1 (y_T - y_t).
        ``y0`` defaults to the current lower variable. Shapes (3,), (2,).
        """
        start = self.lower.y.detach() if y0 is None else torch.as_tensor(y0, dtype=self.A.dtype)
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        decay = self._contraction_power(alpha, steps)
        y_end = decay @ start + torch.linalg.solve(self.A, (eye - decay) @ (self.B @ self._x + self.c))
        grad = self.rho * self._x + self.B.T @ ((eye - decay) @ torch.linalg.solve(self.A, y_end - self.y_target))
        return y_end, grad

    @torch.no_grad()
    def penalty_hypergradient(self, lam: float) -> Tensor:
        """The F2SA / penalty direction with multiplier lam (= 1/sigma), both inner problems exact:
        rho x + B^T (A + I/lam)^-1 (y* - y_t), shape (2,)."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        residual = self.lower_solution() - self.y_target
        return self.rho * self._x + self.B.T @ torch.linalg.solve(self.A + eye / lam, residual)


class RidgeP2(_ClosedFormProblem):
    """P2: ridge regression with per-feature log-L2 hyperparameters lam.

    g(w, lam) = 1/2 |X_tr w - y_tr|^2 + 1/2 sum_j exp(lam_j) w_j^2,  f(w) = 1/2 |X_v w - y_v|^2,
    H = X_tr^T X_tr + diag(exp(lam)),  dF/dlam = -exp(lam) * w* * q,  q = H^-1 X_v^T (X_v w* - y_v).

    Args:
        lam0: the upper variables lam (d,); default (0, ln 2, -1).
        w0: the starting lower variables w (d,); default zeros.
        X_train, y_train, X_val, y_val: the data; defaults of REFERENCE_PROBLEMS.md.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, lam0: list[float] | None = None, w0: list[float] | None = None,
                 X_train: list[list[float]] | None = None, y_train: list[float] | None = None,
                 X_val: list[list[float]] | None = None, y_val: list[float] | None = None,
                 dtype: str = "float64") -> None:
        super().__init__()
        dt = float_dtype(dtype)
        _register_regression_data(self, X_train, y_train, X_val, y_val, dt)
        d = self.X_train.shape[1]
        lam = torch.tensor(lam0 if lam0 is not None else [0.0, math.log(2.0), -1.0], dtype=dt)
        self.upper = bilevel.Hyper(lam=_check_length("RidgeP2", "lam0", lam, d))
        self.lower = bilevel.Hyper(w=_start("RidgeP2", w0, d, dt))

    def lower_objective(self, batch: Any) -> Tensor:
        w = self.lower.w
        fit = 0.5 * torch.sum((self.X_train @ w - self.y_train) ** 2)
        return fit + 0.5 * torch.sum(torch.exp(self.upper.lam) * w**2)

    def upper_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.X_val @ self.lower.w - self.y_val) ** 2)

    @torch.no_grad()
    def lower_hessian(self) -> Tensor:
        """H = X_tr^T X_tr + diag(exp(lam)), shape (d, d)."""
        return self.X_train.T @ self.X_train + torch.diag(torch.exp(self.upper.lam.detach()))

    @torch.no_grad()
    def lower_solution(self) -> Tensor:
        """w* = H^-1 X_tr^T y_tr, shape (d,)."""
        return torch.linalg.solve(self.lower_hessian(), self.X_train.T @ self.y_train)

    @torch.no_grad()
    def hypergradient(self) -> Tensor:
        """dF/dlam = -exp(lam) * w* * q, shape (d,)."""
        w = self.lower_solution()
        q = torch.linalg.solve(self.lower_hessian(), _least_squares_gradient(self.X_val, self.y_val, w))
        return -torch.exp(self.upper.lam.detach()) * w * q


class BiasedRegularizationP3(_ClosedFormProblem):
    """P3: biased regularization, w*(h) = argmin 1/2 |X_tr w - y_tr|^2 + r/2 |w - h|^2.

    f as in P2; dF/dh = r (X_tr^T X_tr + r I)^-1 X_v^T (X_v w* - y_v).

    Args:
        h0: the upper variables h (d,); default (0.2, -0.1, 0.4).
        w0: the starting lower variables w (d,); default zeros.
        r: the strength of the pull towards h; default 0.5.
        X_train, y_train, X_val, y_val: the data; defaults those of P2.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, h0: list[float] | None = None, w0: list[float] | None = None, r: float = 0.5,
                 X_train: list[list[float]] | None = None, y_train: list[float] | None = None,
                 X_val: list[list[float]] | None = None, y_val: list[float] | None = None,
                 dtype: str = "float64") -> None:
        super().__init__()
        dt = float_dtype(dtype)
        if not r > 0:
            raise ValueError(f"BiasedRegularizationP3: r must be > 0 (a strongly convex lower level), got {r!r}")
        self.r = float(r)
        _register_regression_data(self, X_train, y_train, X_val, y_val, dt)
        d = self.X_train.shape[1]
        h = torch.tensor(h0 if h0 is not None else [0.2, -0.1, 0.4], dtype=dt)
        self.upper = bilevel.Hyper(h=_check_length("BiasedRegularizationP3", "h0", h, d))
        self.lower = bilevel.Hyper(w=_start("BiasedRegularizationP3", w0, d, dt))

    def lower_objective(self, batch: Any) -> Tensor:
        w = self.lower.w
        fit = 0.5 * torch.sum((self.X_train @ w - self.y_train) ** 2)
        return fit + 0.5 * self.r * torch.sum((w - self.upper.h) ** 2)

    def upper_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.X_val @ self.lower.w - self.y_val) ** 2)

    @torch.no_grad()
    def lower_hessian(self) -> Tensor:
        """H = X_tr^T X_tr + r I, shape (d, d)."""
        eye = torch.eye(self.X_train.shape[1], dtype=self.X_train.dtype)
        return self.X_train.T @ self.X_train + self.r * eye

    @torch.no_grad()
    def lower_solution(self) -> Tensor:
        """w* = H^-1 (X_tr^T y_tr + r h), shape (d,)."""
        return torch.linalg.solve(self.lower_hessian(), self.X_train.T @ self.y_train + self.r * self.upper.h.detach())

    @torch.no_grad()
    def hypergradient(self) -> Tensor:
        """dF/dh = r H^-1 X_v^T (X_v w* - y_v), shape (d,)."""
        w = self.lower_solution()
        return self.r * torch.linalg.solve(self.lower_hessian(), _least_squares_gradient(self.X_val, self.y_val, w))


class WeightedLeastSquaresP4(_ClosedFormProblem):
    """P4: weighted least squares hyper-cleaning with per-example weights sigmoid(x_i).

    g = 1/2 sum_i sigmoid(x_i) (a_i^T w - b_i)^2 + mu/2 |w|^2,  f = 1/2 |A_v w - b_v|^2,
    dF/dx_i = -sigmoid'(x_i) r_i a_i^T q,  r = A w* - b,  q = (A^T S A + mu I)^-1 A_v^T (A_v w* - b_v).

    Args:
        x0: the upper variables x (m,), one per training example; default (0, 1, -1, 2, -2).
        w0: the starting lower variables w (d,); default zeros.
        mu: the lower ridge weight; default 0.1.
        A, b, A_val, b_val: the data; defaults those of P2 (X_tr, y_tr, X_v, y_v). Stored as the
            buffers ``X_train``, ``y_train``, ``X_val``, ``y_val`` like P2's.
        dtype: name of the torch dtype of every tensor.
    """

    def __init__(self, x0: list[float] | None = None, w0: list[float] | None = None, mu: float = 0.1,
                 A: list[list[float]] | None = None, b: list[float] | None = None,
                 A_val: list[list[float]] | None = None, b_val: list[float] | None = None,
                 dtype: str = "float64") -> None:
        super().__init__()
        dt = float_dtype(dtype)
        if not mu > 0:
            raise ValueError(f"WeightedLeastSquaresP4: mu must be > 0 (a strongly convex lower level), got {mu!r}")
        self.mu = float(mu)
        _register_regression_data(self, A, b, A_val, b_val, dt)
        m, d = self.X_train.shape
        x = torch.tensor(x0 if x0 is not None else [0.0, 1.0, -1.0, 2.0, -2.0], dtype=dt)
        self.upper = bilevel.Hyper(x=_check_length("WeightedLeastSquaresP4", "x0", x, m))
        self.lower = bilevel.Hyper(w=_start("WeightedLeastSquaresP4", w0, d, dt))

    def lower_objective(self, batch: Any) -> Tensor:
        w = self.lower.w
        residual = self.X_train @ w - self.y_train
        return 0.5 * torch.sum(torch.sigmoid(self.upper.x) * residual**2) + 0.5 * self.mu * torch.sum(w**2)

    def upper_objective(self, batch: Any) -> Tensor:
        return 0.5 * torch.sum((self.X_val @ self.lower.w - self.y_val) ** 2)

    @torch.no_grad()
    def lower_hessian(self) -> Tensor:
        """H = A^T S A + mu I with S = diag(sigmoid(x)), shape (d, d)."""
        weights = torch.sigmoid(self.upper.x.detach())
        eye = torch.eye(self.X_train.shape[1], dtype=self.X_train.dtype)
        return self.X_train.T @ (weights[:, None] * self.X_train) + self.mu * eye

    @torch.no_grad()
    def lower_solution(self) -> Tensor:
        """w* = H^-1 A^T S b, shape (d,)."""
        weights = torch.sigmoid(self.upper.x.detach())
        return torch.linalg.solve(self.lower_hessian(), self.X_train.T @ (weights * self.y_train))

    @torch.no_grad()
    def hypergradient(self) -> Tensor:
        """dF/dx_i = -sigmoid'(x_i) r_i a_i^T q, shape (m,)."""
        w = self.lower_solution()
        q = torch.linalg.solve(self.lower_hessian(), _least_squares_gradient(self.X_val, self.y_val, w))
        s = torch.sigmoid(self.upper.x.detach())
        residual = self.X_train @ w - self.y_train
        return -s * (1 - s) * residual * (self.X_train @ q)


# -- helpers for the regression problems ---------------------------------------------------------


def _register_regression_data(problem: _ClosedFormProblem, X_train: Matrix | None, y_train: Vector | None,
                              X_val: Matrix | None, y_val: Vector | None, dtype: torch.dtype) -> None:
    """Buffers X_train (m, d), y_train (m,), X_val (n, d), y_val (n,), defaults those of P2."""
    name = type(problem).__name__
    X = problem._constant("X_train", X_train if X_train is not None else _X_TRAIN, dtype)
    y = problem._constant("y_train", y_train if y_train is not None else _Y_TRAIN, dtype)
    Xv = problem._constant("X_val", X_val if X_val is not None else _X_VAL, dtype)
    yv = problem._constant("y_val", y_val if y_val is not None else _Y_VAL, dtype)
    if X.dim() != 2 or Xv.dim() != 2 or Xv.shape[1] != X.shape[1]:
        raise ValueError(
            f"{name}: the data matrices must be 2-d with equal widths, got {tuple(X.shape)}, {tuple(Xv.shape)}"
        )
    if y.shape != X.shape[:1] or yv.shape != Xv.shape[:1]:
        raise ValueError(f"{name}: the targets must have one entry per row, got {tuple(y.shape)}, {tuple(yv.shape)}")


def _check_length(owner: str, name: str, value: Tensor, size: int) -> Tensor:
    if value.shape != (size,):
        raise ValueError(f"{owner}: {name} must have {size} entries, got shape {tuple(value.shape)}")
    return value


def _start(owner: str, w0: Vector | None, size: int, dtype: torch.dtype) -> Tensor:
    """The starting lower variables: ``w0`` or zeros, shape (size,)."""
    if w0 is None:
        return torch.zeros(size, dtype=dtype)
    return _check_length(owner, "w0", torch.tensor(w0, dtype=dtype), size)
