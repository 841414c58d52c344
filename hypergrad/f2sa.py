"""F2SA: fully first-order stochastic approximation (Kwon, Kwon, Wright, Nowak, ICML 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hypergrad import checks, outer, recipe, two_copy
from hypergrad.checks import hyperparameter
from hypergrad.first_order import dtype_of
from hypergrad.two_copy import Penalized, ScheduleEntries, TwoCopy, TwoCopyState

SCHEDULES: dict[str, tuple[float, float]] = {
    "stochastic": (5 / 7, 4 / 7),  # noise in both levels
    "upper-noise": (3 / 5, 2 / 5),  # noise in the upper level only
    "deterministic": (1 / 3, 0.0),
    "constant": (0.0, 0.0),  # no decay: alpha = lr_y, gamma = lr_z, lam = lam0
}
"""Schedule name -> the exponents (a, c) of alpha_k and gamma_k (ALGORITHMS.md section 3)."""


@dataclass(frozen=True, kw_only=True, repr=False)
class F2SA(TwoCopy):
    """Fully first-order bilevel method: a growing multiplier replaces every second derivative.

    Kwon, Kwon, Wright, Nowak, "A fully first-order method for stochastic bilevel optimization",
    ICML 2023. It descends L_lam(x, y) = f(x, y) + lam (g(x, y) - min_z g(x, z)) with two copies of
    the lower variables, z ~ y*(x) = argmin g and y ~ argmin [f + lam g]. Outer step k:

        alpha_k = lr_y / (k + k0)^a,   gamma_k = lr_z / (k + k0)^c,   lam_k = min(lam_max, lam0 (k + k0)^(a - c))
        T times:  z <- z - gamma_k grad_y g(x, z)
                  y <- y - alpha_k (grad_y f(x, y) + lam_k grad_y g(x, y))
        x <- P_X(x - xi alpha_k (grad_x f(x, y) + lam_k (grad_x g(x, y) - grad_x g(x, z))))

    lam_k grows like gamma_k / alpha_k (the paper's coupling; here lam0 sets the constant; the
    defaults have lr_y * lam0 = lr_z, so lam_k = gamma_k / alpha_k until the cap), so alpha_k lam_k
    decays like gamma_k: keep lr_y * lam0 below 2 / (smoothness of g), as lr_z.
    The x-direction differs from dF/dx by O(1/lam); on a quadratic it converges to
    rho x + B^T (A + I/lam)^-1 (y* - y_t). A lower set Y is not supported (use ``Penalty``).

    The two-copy engine (``hypergrad.two_copy``) with F2SA's schedule (``F2SASchedule``) and the
    schedule's x step: ``inner`` runs the T steps of z, ``estimate`` the T steps of y and the
    x-direction, ``outer`` the projected x step and lam_{k+1}.

    Oracle calls per outer step: 3T + 3 gradients (T of g at z, T of f and T of g at y, then
    grad f at y, grad g at y and at z for the direction), zero HVPs, plus one forward of f(x, z) for
    the ``upper_objective`` metric. With ``momentum`` every gradient is taken twice (6T + 6).
    Memory: two copies of y (seven more y-sized and six x-sized trees with ``momentum``). The paper
    draws a fresh sample per oracle call; here all calls of one outer step see that step's two
    batches (g the lower batch, f the upper one), as the Lightning loop draws one batch per level.

    Momentum (the paper's momentum-assisted estimators, STORM): each of the six oracles keeps
    h_k = d(p_k; s) + (1 - eta_k)(h_{k-1} - d(p_{k-1}; s)), the two gradients on the same batch s at
    the current point p_k and at that oracle's previous evaluation point p_{k-1} (the previous inner
    step, or the previous outer step), with eta_k = min(1, momentum_eta ((k + k0) / k0)^(-2a)), i.e.
    eta_k proportional to alpha_k^2 as in STORM. With deterministic gradients it equals the plain method.

    Metrics: the standard four (upper_objective = f(x, z), lower_objective = g(x, z),
    hypergradient_norm = |direction|, lower_stationarity = |grad_y g(x, z)|), ``lam``,
    ``y_z_distance`` |y - z|, ``penalty_gap`` g(x, y) - g(x, z), ``penalty_value`` L_lam at (y, z),
    ``penalized_stationarity`` |grad_y f + lam grad_y g| at y.

    Args:
        lr_y: the step scale of y, alpha_k = lr_y / (k + k0)^a.
        lr_z: the step scale of z, gamma_k = lr_z / (k + k0)^c.
        lr_x_ratio: xi, the x step is xi alpha_k.
        lam0: the multiplier at k = 0 (when k0 = 1); the whole multiplier under ``schedule="constant"``.
        lam_max: a cap on lam_k (>= lam0).
        inner_steps: T, the steps of each copy per outer step (>= 1).
        schedule: "stochastic" (a, c) = (5/7, 4/7), "upper-noise" (3/5, 2/5), "deterministic" (1/3, 0)
            or "constant" (0, 0).
        k0: the offset of the schedules (> 0).
        momentum: STORM estimators for every gradient.
        momentum_eta: eta at k = 0, in (0, 1].
    """

    lr_y: float = hyperparameter(checks.POSITIVE, 0.01)
    lr_z: float = hyperparameter(checks.POSITIVE, 0.1)
    lr_x_ratio: float = hyperparameter(checks.POSITIVE, 1.0)
    lam0: float = hyperparameter(checks.POSITIVE, 10.0)
    lam_max: float = hyperparameter(checks.POSITIVE, 1e4, at_least="lam0")
    inner_steps: int = recipe.inner_steps(10, minimum=1)
    schedule: str = hyperparameter(checks.one_of(tuple(SCHEDULES)), "stochastic")
    k0: float = hyperparameter(checks.POSITIVE, 1.0)
    momentum: bool = two_copy.momentum()
    momentum_eta: float = two_copy.momentum_eta()

    @property
    def penalty_schedule(self) -> F2SASchedule:
        return F2SASchedule(self.lr_y, self.lr_z, self.lr_x_ratio, self.lam0, self.lam_max, SCHEDULES[self.schedule],
                            self.k0, self.momentum_eta)

    def outer_transform(self) -> outer.Transform:
        """x <- x - xi alpha_k d: the schedule's step, not an outer optimizer's."""
        return outer.scheduled_sgd(self.penalty_schedule.x_step)

    def step_sizes(self, step: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """(alpha_k, gamma_k) at outer step k = ``step`` (0-d integer tensor)."""
        return self.penalty_schedule.step_sizes(step, dtype)

    def multiplier(self, step: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """lam_k = min(lam_max, lam0 (k + k0)^(a - c))."""
        return self.penalty_schedule.multiplier(step, dtype)

    def momentum_weight(self, step: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """eta_k = min(1, momentum_eta ((k + k0) / k0)^(-2a)), proportional to alpha_k^2."""
        return self.penalty_schedule.momentum_weight(step, dtype)


@dataclass(frozen=True)
class F2SASchedule:
    """F2SA's schedule (ALGORITHMS.md section 3), as tensors of the 0-d integer outer step k so it runs under vmap.

    alpha_k = lr_y / (k + k0)^a, gamma_k = lr_z / (k + k0)^c, lam_k = min(lam_max, lam0 (k + k0)^(a - c)),
    eta_k = min(1, momentum_eta ((k + k0) / k0)^(-2a)); y descends on f + lam_k g with alpha_k, z with gamma_k.
    """

    lr_y: float
    lr_z: float
    lr_x_ratio: float
    lam0: float
    lam_max: float
    exponents: tuple[float, float]
    k0: float
    momentum_eta: float

    def _k(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        return step.to(dtype) + self.k0

    def step_sizes(self, step: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        a, c = self.exponents
        k = self._k(step, dtype)
        return self.lr_y * k ** (-a), self.lr_z * k ** (-c)

    def multiplier(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        a, c = self.exponents
        return torch.clamp(self.lam0 * self._k(step, dtype) ** (a - c), max=self.lam_max)

    def momentum_weight(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        a, _ = self.exponents
        return torch.clamp(self.momentum_eta * (self._k(step, dtype) / self.k0) ** (-2 * a), max=1.0)

    def x_step(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """xi alpha_k for the outer update number t = k + 1."""
        alpha, _ = self.step_sizes(t - 1, dtype)
        return self.lr_x_ratio * alpha

    # -- hypergrad.two_copy.Schedule ----------------------------------------------------------

    def entries(self, step: Tensor, dtype: torch.dtype) -> ScheduleEntries:
        return {"lam": self.multiplier(step, dtype)}

    def lower_lr(self, state: TwoCopyState) -> Tensor:
        return self.step_sizes(state["step"], dtype_of(state))[1]

    def penalized(self, state: TwoCopyState) -> Penalized:
        alpha, _ = self.step_sizes(state["step"], dtype_of(state))
        lam = state["lam"]
        return Penalized(lr=alpha, w_f=1.0, w_g=lam, lam=lam, metrics={"lam": lam})

    def storm_eta(self, state: TwoCopyState) -> Tensor:
        return self.momentum_weight(state["step"], dtype_of(state))
