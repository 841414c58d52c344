"""Penalty: the first-order penalty method (Kwon, Kwon, Wright, Nowak, ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hypergrad import checks, recipe, two_copy
from hypergrad.checks import hyperparameter
from hypergrad.first_order import dtype_of
from hypergrad.recipe import OuterOptimizer
from hypergrad.two_copy import Penalized, ScheduleEntries, TwoCopy, TwoCopyState


@dataclass(frozen=True, kw_only=True, repr=False)
class Penalty(OuterOptimizer, TwoCopy):
    """Projected first-order method on the penalty function psi_sigma, with closed convex sets X and Y.

    Kwon, Kwon, Wright, Nowak, "On penalty methods for nonconvex bilevel optimization and
    first-order stochastic approximation", ICLR 2024. With sigma > 0 (sigma = 1/lam of F2SA),

        psi_sigma(x) = (min_{y in Y} [sigma f + g](x, y) - min_{y in Y} g(x, y)) / sigma,

    |psi_sigma - F| = O(sigma), and its gradient needs first derivatives only. Outer step k:

        sigma_k = max(sigma_min, sigma (k + 1)^(-sigma_decay))
        T times:  z <- P_Y(z - gamma grad_y g(x, z))
                  y <- P_Y(y - gamma (sigma_k grad_y f(x, y) + grad_y g(x, y)))
        x <- P_X(outer step along  grad_x f(x, y) + (grad_x g(x, y) - grad_x g(x, z)) / sigma_k)

    ``inner_steps=1`` is the paper's single-loop variant. The outer step is projected SGD with
    ``outer_lr`` (the paper), or Adam (``outer_optimizer="adam"``) followed by P_X. The two-copy
    engine (``hypergrad.two_copy``) with this schedule (``SigmaSchedule``): ``inner`` runs the T steps
    of z, ``estimate`` the T steps of y and the direction, ``outer`` the x step and sigma_{k+1}.

    Oracle calls per outer step: 3T + 3 gradients (T of g at z, T of f and T of g at y, then
    grad f at y, grad g at y and at z), zero HVPs, plus one forward of f(x, z) for the
    ``upper_objective`` metric, and 2T + 2 projections onto Y. With ``momentum``, 6T + 6 gradients.

    Momentum (STORM, the paper's single-loop momentum-assisted estimators; here for any T): each of
    the six oracles keeps h_k = d(p_k; s) + (1 - eta)(h_{k-1} - d(p_{k-1}; s)) with the same batch s
    at the current point and at that oracle's previous evaluation point; eta = ``momentum_eta``
    (constant, as the step sizes). With deterministic gradients it equals the plain method.

    Metrics: the standard four (upper_objective = f(x, z), lower_objective = g(x, z),
    hypergradient_norm, lower_stationarity = |z - P_Y(z - gamma grad_y g)| / gamma), ``sigma``,
    ``y_z_distance``, ``penalty_gap`` g(x, y) - g(x, z), ``penalty_value`` the estimate
    f(x, y) + gap / sigma of psi_sigma(x), ``penalized_stationarity`` (of sigma f + g at y).

    Args:
        sigma: the penalty parameter at k = 0 (theory: sigma = O(epsilon) for an epsilon-stationary x).
        sigma_min: the floor of the decreasing schedule (0 <= sigma_min <= sigma).
        sigma_decay: the exponent of the polynomial decrease; 0 keeps sigma fixed.
        inner_steps: T (>= 1); 1 is the single-loop variant.
        inner_lr: gamma, the step of z and y (below 2 / smoothness of sigma f + g).
        outer_lr: alpha, the step of x.
        outer_optimizer: "sgd" (the paper) or "adam".
        momentum: STORM estimators for every gradient.
        momentum_eta: eta in (0, 1].
    """

    supports_lower_set = True

    sigma: float = hyperparameter(checks.POSITIVE, 0.01)
    sigma_min: float = hyperparameter(checks.NONNEGATIVE, 0.0, at_most="sigma")
    sigma_decay: float = hyperparameter(checks.NONNEGATIVE, 0.0)
    inner_steps: int = recipe.inner_steps(10, minimum=1)
    inner_lr: float = recipe.inner_lr()
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer("sgd")
    momentum: bool = two_copy.momentum()
    momentum_eta: float = two_copy.momentum_eta()

    @property
    def penalty_schedule(self) -> SigmaSchedule:
        return SigmaSchedule(self.sigma, self.sigma_min, self.sigma_decay, self.inner_lr, self.momentum_eta)

    def penalty_at(self, step: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """sigma_k = max(sigma_min, sigma (k + 1)^(-sigma_decay)) at outer step k = ``step`` (0-d integer)."""
        return self.penalty_schedule.penalty_at(step, dtype)


@dataclass(frozen=True)
class SigmaSchedule:
    """Penalty's schedule: sigma_k = max(sigma_min, sigma (k + 1)^(-sigma_decay)); y descends on sigma_k f + g.

    Both copies step with gamma = ``inner_lr``, the direction's multiplier is 1 / sigma_k, STORM's eta
    is constant.
    """

    sigma: float
    sigma_min: float
    sigma_decay: float
    inner_lr: float
    momentum_eta: float

    def penalty_at(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.clamp(self.sigma * (step.to(dtype) + 1) ** (-self.sigma_decay), min=self.sigma_min)

    # -- hypergrad.two_copy.Schedule ----------------------------------------------------------

    def entries(self, step: Tensor, dtype: torch.dtype) -> ScheduleEntries:
        return {"sigma": self.penalty_at(step, dtype)}

    def lower_lr(self, state: TwoCopyState) -> float:
        return self.inner_lr

    def penalized(self, state: TwoCopyState) -> Penalized:
        sigma = state["sigma"]
        return Penalized(lr=self.inner_lr, w_f=sigma, w_g=1.0, lam=1 / sigma, metrics={"sigma": sigma})

    def storm_eta(self, state: TwoCopyState) -> Tensor:
        return torch.tensor(self.momentum_eta, dtype=dtype_of(state), device=state["step"].device)
