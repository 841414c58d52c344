"""Persistent evolution strategies (PES; Vicol, Metz, Sohl-Dickstein 2021).

An unbiased estimate of the gradient of a long (truncated) lower run's losses with respect to
the upper variables x (e.g. a learned optimizer's parameters) without backpropagation: pairs of
particles run the lower dynamics at x + eps_i and x - eps_i, eps_i ~ N(0, sigma^2 I), for a
truncation of K steps per outer step, and keep their lower state (the task network and the
optimizer's state) from one truncation to the next. Each pair accumulates its perturbations,
xi_i += eps_i, which corrects the bias of plain truncated ES; the estimate is

    g = 1 / (2 N sigma^2) * sum_i xi_i (L(x + eps_i) - L(x - eps_i))

with L the truncation's meta-loss of each particle. At the end of the horizon every particle,
and its xi, restarts (``hypergrad.dynamics``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import vmap

from hypergrad import checks, dynamics, kernels, recipe
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.distributed import mean_over_ranks
from hypergrad.dynamics import DynamicsState
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.outer import OuterState
from hypergrad.recipe import OuterOptimizer
from hypergrad.tree import Tree

META_LOSSES = ("final", "mean")


class PESState(EngineState, DynamicsState):
    """x, y, step, the outer optimizer's state, the unperturbed run's dynamics and the particles."""

    outer: OuterState
    particles: dict[str, Tree]
    """The 2N particles' ``y`` and ``lower`` ([2N, ...] leaves), the pairs' summed perturbations ``xi`` ([N, ...])."""
    rng: Tensor
    """The state of the perturbations' CPU generator (uint8)."""


@dataclass(frozen=True, kw_only=True, repr=False)
class PES(OuterOptimizer, Engine[PESState]):
    """Persistent evolution strategies with antithetic pairs; the particles run under ``torch.func.vmap``.

    The lower variables follow the problem's lower dynamics (``Functions.lower_step``, a learned
    optimizer, say) or, without them, gradient descent on g with ``inner_lr``. Besides the 2N
    particles the state keeps one unperturbed trajectory at x (``y``, ``lower``): it gives the
    logged objectives and the lower solution written back into the problem.

    Randomness: the perturbations are drawn outside the vmapped truncation from a CPU
    ``torch.Generator`` whose state (``rng``, a uint8 tensor) lives in the engine state, so a run
    is reproducible from ``seed`` and resumes exactly from a checkpoint. The particles are the
    population here, so a PES step does not itself run under an outer vmap.

    Data parallelism: every rank draws the same perturbations (the generator's state is in the state);
    each lower step of the particles uses the mean over ranks of grad_y g (one all-reduce of the 2N
    particles' gradients together, through vmap), and the particles' losses are averaged once.

    Oracle calls per outer step: (2N + 1) K gradients of g (the particles and the unperturbed
    run), 2N + 1 values of f (2N K + 1 with ``meta_loss="mean"``), 1 more gradient of g for the
    stationarity metric; no second derivatives, no backpropagation through the run.

    Args:
        particles: N, the number of antithetic pairs (2N lower runs).
        sigma: standard deviation of the perturbations of x.
        inner_steps: K, lower steps per truncation (one outer step).
        horizon: lower steps before every run restarts from its initial y; None = never.
        meta_loss: "final": L = f after the truncation's last step; "mean": the mean of f after each step.
        seed: seed of the perturbations' generator.
        inner_lr: step size of gradient descent on g when the problem has no lower dynamics.
        outer_lr, outer_optimizer: see ``hypergrad.recipe``.
    """

    supports_lower_step = True

    particles: int = hyperparameter(checks.POSITIVE_INT, 8)
    sigma: float = hyperparameter(checks.POSITIVE, 0.01)
    inner_steps: int = recipe.inner_steps(50, minimum=1)
    horizon: int | None = hyperparameter(checks.OrNone(checks.POSITIVE_INT), None, at_least="inner_steps")
    meta_loss: str = hyperparameter(checks.one_of(META_LOSSES), "final")
    seed: int = hyperparameter(checks.NONNEGATIVE_INT, 0)
    inner_lr: float = recipe.inner_lr()
    outer_lr: float = recipe.outer_lr()
    outer_optimizer: str = recipe.outer_optimizer()

    # -- the protocol ------------------------------------------------------------------------

    def init(self, fns: Functions, x: Tree, y: Tree, lower_batch: Any = None) -> PESState:
        """The unperturbed run at (x, y) and 2N particles at y, xi = 0, the generator seeded with ``seed``."""
        start = self.start(fns, x, y)
        lower = dynamics.init(self._dynamics(fns), start["y"], "PES")
        pairs, x = self.particles, start["x"]
        return {
            "x": x, "y": start["y"], "outer": self.outer_transform().init(x), "step": start["step"],
            **lower,
            "particles": {
                "y": _repeat(lower["y0"], 2 * pairs),
                "lower": _repeat(lower["lower0"], 2 * pairs),
                "xi": {k: torch.zeros((pairs, *v.shape), dtype=v.dtype, device=v.device) for k, v in x.items()},
            },
            "rng": torch.Generator().manual_seed(self.seed).get_state(),
        }

    def inner(self, fns: Functions, state: PESState, lower_batch: Any) -> PESState:
        """Restart every run at the horizon, then advance the unperturbed run by K steps at x.

        ``t`` still counts the steps before this truncation: ``estimate`` advances the particles from it.
        """
        fns = self._dynamics(fns)
        flag = dynamics.reset_due(state["t"], self.horizon)
        y, lower, t = dynamics.reset(state, self.horizon)
        particles = state["particles"]
        particles = {
            "y": dynamics.where(flag, state["y0"], particles["y"]),
            "lower": dynamics.where(flag, state["lower0"], particles["lower"]),
            "xi": {k: torch.where(flag, torch.zeros_like(v), v) for k, v in particles["xi"].items()},
        }
        y, lower, _ = dynamics.run(fns, state["x"], y, lower, t, lower_batch, self.inner_steps)
        return {**state, "y": y, "lower": lower, "t": t, "particles": particles}

    def estimate(self, fns: Functions, state: PESState, batches: Batches) -> tuple[PESState, Tree, Metrics]:
        """The mean over the pairs of ``pair_estimates``."""
        state, pair_estimates, metrics = self.pair_estimates(fns, state, batches)
        hypergrad = {k: v.mean(0) for k, v in pair_estimates.items()}
        metrics["hypergradient_norm"] = T.norm(hypergrad)
        return state, hypergrad, metrics

    # -- PES ---------------------------------------------------------------------------------

    def pair_estimates(self, fns: Functions, state: PESState, batches: Batches) -> tuple[PESState, Tree, Metrics]:
        """One truncation of every particle: (new state, per-pair estimates, metrics).

        The per-pair estimates xi_i (L(x + eps_i) - L(x - eps_i)) / (2 sigma^2) have shapes
        [N, *x[k].shape]; their mean over the pairs is the PES hypergradient (they are independent
        and identically distributed, which is what the tests of unbiasedness use).
        """
        fns = self._dynamics(fns)
        lower_batch, upper_batch = batches
        x, t, pairs, sigma = state["x"], state["t"], self.particles, self.sigma
        generator = torch.Generator()
        generator.set_state(state["rng"].cpu())
        # Drawn outside the vmapped truncation, from the generator in the state: reproducible and resumable.
        eps = {k: sigma * torch.randn((pairs, *v.shape), generator=generator, dtype=v.dtype).to(v.device)
               for k, v in x.items()}
        xi = T.add(state["particles"]["xi"], eps)
        thetas = {k: torch.cat([x[k] + eps[k], x[k] - eps[k]]) for k in x}

        def truncation(theta: Tree, y: Tree, lower: Tree) -> tuple[Tree, Tree, Tensor]:
            if self.meta_loss == "final":
                y, lower, _ = dynamics.run(fns, theta, y, lower, t, lower_batch, self.inner_steps)
                return y, lower, fns.f(theta, y, upper_batch)
            total: Tensor | float = 0.0
            step = t
            for _ in range(self.inner_steps):
                y, lower, step = dynamics.run(fns, theta, y, lower, step, lower_batch, 1)
                total = total + fns.f(theta, y, upper_batch)
            return y, lower, cast(Tensor, total) / self.inner_steps  # a tensor: inner_steps >= 1

        particles = state["particles"]
        y_p, lower_p, losses = vmap(truncation, randomness="error")(thetas, particles["y"], particles["lower"])
        # The particles' losses [2N], f at x and the problem's metrics saw this rank's upper batch: one
        # all-reduce averages them all (the lower steps inside were averaged by kernels.grad_y).
        f_value = fns.f(x, state["y"], upper_batch).detach()
        problem_metrics = dynamics.upper_metrics(fns, x, state["y"], upper_batch, reduce=False)
        losses, f_value, problem_metrics = mean_over_ranks((losses.detach(), f_value, problem_metrics))
        gap = losses[:pairs] - losses[pairs:]
        estimates = {k: v * _along(gap, v) / (2 * sigma**2) for k, v in xi.items()}

        gy, g_value = kernels.grad_y(fns.g, x, state["y"], lower_batch)
        metrics = {
            "upper_objective": f_value,
            "lower_objective": g_value,
            "lower_stationarity": T.norm(gy),
            "pes/particle_loss": losses.mean(),
            "pes/antithetic_gap": gap.abs().mean(),
            **problem_metrics,
        }
        new_state: PESState = {
            **state,
            "t": t + self.inner_steps,
            "particles": {"y": T.detach(y_p), "lower": T.detach(lower_p), "xi": xi},
            "rng": generator.get_state(),
        }
        return new_state, estimates, metrics

    def _dynamics(self, fns: Functions) -> Functions:
        """The problem's lower dynamics, or gradient descent on g with ``inner_lr`` (no lower state)."""
        if fns.lower_step is not None:
            return fns
        lr = self.inner_lr

        def gradient_step(x: Tree, y: Tree, grad_y: Tree, lower: Tree, t: Tensor) -> tuple[Tree, Tree]:
            return T.axpy(-lr, grad_y, y), lower

        return dataclasses.replace(fns, lower_step=gradient_step, init_lower_state=lambda y: {})


def _repeat(tree: Tree, n: int) -> Tree:
    """Each leaf stacked n times along a new leading dimension (copies)."""
    return {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in tree.items()}


def _along(weights: Tensor, like: Tensor) -> Tensor:
    """weights [N] shaped to broadcast against like [N, ...]."""
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))
