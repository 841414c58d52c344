"""A quadratic bilevel problem with a chosen lower Hessian spectrum and closed-form optimum.

    g(x, y) = 1/2 y^T A y - y^T (B x + c),       A = Q diag(eigenvalues) Q^T
    f(x, y) = 1/2 |y - y_t|^2 + rho/2 |x|^2

The form of P1 (shared/REFERENCE_PROBLEMS.md) at any size, with the spectrum of H = A set by the
user: a list of eigenvalues, or ``dim_y`` values log-spaced in [1, condition_number] (strong
convexity mu = 1 and smoothness L = kappa, so ``inner_lr = 1 / kappa`` is the natural gradient step
and gradient descent on the lower level contracts by 1 - 1/kappa per step). Q is a random
orthogonal basis; B, c, y_t are random; all drawn from ``seed``.

Because y*(x) = A^-1 (B x + c) = M x + m is affine in x (M = A^-1 B, m = A^-1 c), F is a strongly
convex quadratic in x when rho > 0, and its minimizer solves (M^T M + rho I) x* = M^T (y_t - m).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from problems.common import float_dtype
from problems.reference import QuadraticP1


def _spectrum(owner: str, dim_y: int, eigenvalues: list[float] | None, condition_number: float) -> Tensor:
    """The eigenvalues of A in float64, shape (dim_y,): the list given, or log-spaced in [1, kappa]."""
    if eigenvalues is not None:
        values = torch.tensor(eigenvalues, dtype=torch.float64)
        if values.shape != (dim_y,):
            raise ValueError(f"{owner}: eigenvalues must have dim_y = {dim_y} entries, got {tuple(values.shape)}")
        if not bool((values > 0).all()) or not bool(torch.isfinite(values).all()):
            raise ValueError(f"{owner}: eigenvalues must be finite and > 0 (a strongly convex lower level)")
        return values
    if not (math.isfinite(condition_number) and condition_number >= 1):
        raise ValueError(f"{owner}: condition_number must be a finite number >= 1, got {condition_number!r}")
    return torch.logspace(0.0, math.log10(condition_number), dim_y, dtype=torch.float64)


class SpectralQuadratic(QuadraticP1):
    """P1's quadratic bilevel problem with ``dim_x`` upper and ``dim_y`` lower variables and a chosen spectrum.

    Inherits from ``QuadraticP1`` every closed form: ``lower_solution()`` y*(x) (dim_y,),
    ``value()`` F(x) (0-d), ``hypergradient()`` dF/dx (dim_x,), ``lower_hessian()`` A
    (dim_y, dim_y), and the truncated engines' forms ``neumann_hypergradient``, ``unrolled``,
    ``penalty_hypergradient``. Adds ``optimum()`` x* (dim_x,) and ``optimal_value()`` F(x*).

    Args:
        dim_x: number of upper variables.
        dim_y: number of lower variables.
        eigenvalues: the eigenvalues of A (dim_y values > 0); None: log-spaced in
            [1, condition_number].
        condition_number: kappa = lambda_max / lambda_min of A when ``eigenvalues`` is None.
        rho: the upper ridge weight (> 0 makes x* unique for any B).
        seed: seeds Q (a Haar-random orthogonal basis), B (entries N(0, 1/dim_x)), c and
            y_t (entries N(0, 1)).
        x0: the starting upper variables (dim_x,); default zeros. y starts at zero.
        dtype: name of the torch dtype of every tensor; the data are drawn in float64 first, so a
            float32 problem is the float64 one rounded.
    """

    def __init__(self, dim_x: int = 10, dim_y: int = 50, eigenvalues: list[float] | None = None,
                 condition_number: float = 100.0, rho: float = 0.1, seed: int = 0, x0: list[float] | None = None,
                 dtype: str = "float64") -> None:
        owner = "SpectralQuadratic"
        for name, value in (("dim_x", dim_x), ("dim_y", dim_y)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"{owner}: rho must be a finite number >= 0, got {rho!r}")
        if rho == 0 and dim_x > dim_y:
            raise ValueError(f"{owner}: rho = 0 needs dim_x <= dim_y for a unique optimum, got {dim_x} > {dim_y}")
        spectrum = _spectrum(owner, dim_y, eigenvalues, condition_number)
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        # QR of a Gaussian matrix, column signs fixed by diag(R) > 0: a Haar-distributed Q.
        q, r = torch.linalg.qr(torch.randn(dim_y, dim_y, generator=gen, dtype=f64))
        q = q * torch.sign(torch.diagonal(r))
        a = (q * spectrum) @ q.T
        a = (a + a.T) / 2  # exactly symmetric, so the dense solves and eigvalsh see the same matrix
        b = torch.randn(dim_y, dim_x, generator=gen, dtype=f64) / math.sqrt(dim_x)
        c = torch.randn(dim_y, generator=gen, dtype=f64)
        y_target = torch.randn(dim_y, generator=gen, dtype=f64)
        start = [0.0] * dim_x if x0 is None else list(x0)
        if len(start) != dim_x:
            raise ValueError(f"{owner}: x0 must have dim_x = {dim_x} entries, got {len(start)}")
        super().__init__(x0=start, A=a, B=b, c=c, y_target=y_target, rho=rho, dtype=dtype)
        self.register_buffer("eigenvalues", spectrum.to(float_dtype(dtype)), persistent=False)
        self.register_buffer("x_start", self.upper.x.detach().clone(), persistent=False)
        self.seed = seed

    @torch.no_grad()
    def optimum(self) -> Tensor:
        """x* = argmin F: (M^T M + rho I) x* = M^T (y_t - m), M = A^-1 B, m = A^-1 c. Shape (dim_x,)."""
        m_mat = torch.linalg.solve(self.A, self.B)
        m_vec = torch.linalg.solve(self.A, self.c)
        eye = torch.eye(self.B.shape[1], dtype=self.A.dtype, device=self.A.device)
        return torch.linalg.solve(m_mat.T @ m_mat + self.rho * eye, m_mat.T @ (self.y_target - m_vec))

    @torch.no_grad()
    def optimal_value(self) -> Tensor:
        """F(x*), a 0-d tensor."""
        x_star = self.optimum()
        y_star = torch.linalg.solve(self.A, self.B @ x_star + self.c)
        return 0.5 * torch.sum((y_star - self.y_target) ** 2) + 0.5 * self.rho * torch.sum(x_star**2)

    @torch.no_grad()
    def value_at(self, x: Tensor) -> Tensor:
        """F at any x (dim_x,), from the closed form; the problem is left unchanged. A 0-d tensor."""
        y_star = torch.linalg.solve(self.A, self.B @ x + self.c)
        return 0.5 * torch.sum((y_star - self.y_target) ** 2) + 0.5 * self.rho * torch.sum(x**2)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Suboptimality F(x) - F* (at the start and now), |dF/dx|, |x - x*| and the lower error |y - y*(x)|."""
        f_star = self.optimal_value()
        return {
            "suboptimality": (self.value() - f_star).item(),
            "initial_suboptimality": (self.value_at(self.x_start) - f_star).item(),
            "hypergradient_norm": self.hypergradient().norm().item(),
            "distance_to_optimum": (self._x - self.optimum()).norm().item(),
            "lower_error": (self.lower.y.detach() - self.lower_solution()).norm().item(),
        }
