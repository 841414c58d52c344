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
from torch.utils._pytree import tree_leaves, tree_map

from hypergrad import checks, dynamics, kernels, recipe
from hypergrad import tree as T
from hypergrad.checks import hyperparameter
from hypergrad.distributed import mean_over_ranks
from hypergrad.dynamics import DynamicsState
from hypergrad.engine import Batches, Engine, EngineState, Functions, Metrics
from hypergrad.outer import OuterState
from hypergrad.recipe import OuterOptimizer
from hypergrad.tree import Tree

META_LOSSES = dynamics.META_LOSSES


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
        outer_lr, outer_optimizer, outer_clip: see ``hypergrad.recipe`` (outer_clip: the global norm the
            meta-gradient is clipped to; None: not clipped).
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
    outer_clip: float | None = recipe.outer_clip()

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
        """Restart every run at the horizon or where the data restarts it, then advance the unperturbed run by K
        steps at x (on pair 0's data when the data is per pair).

        ``t`` still counts the steps before this truncation: ``estimate`` advances the particles from it.
        """
        fns = self._dynamics(fns)
        flag = dynamics.reset_due(state["t"], self.horizon)
        y, lower, t = dynamics.reset(state, self.horizon)
        particles = state["particles"]
        y_p = dynamics.where(flag, state["y0"], particles["y"])
        lower_p = dynamics.where(flag, state["lower0"], particles["lower"])
        xi = {k: torch.where(flag, torch.zeros_like(v), v) for k, v in particles["xi"].items()}
        if isinstance(lower_batch, dynamics.Truncation) and lower_batch.restart is not None:
            y_p, lower_p, xi = self._restart_particles(fns, y_p, lower_p, xi, lower_batch)
        own = dynamics.pair(lower_batch, 0)
        y, lower = dynamics.begin(fns, y, lower, own, self.horizon, "PES", self.inner_steps)
        y, lower, _ = dynamics.run(fns, state["x"], y, lower, t, own, self.inner_steps)
        return {**state, "y": y, "lower": lower, "t": t, "particles": {"y": y_p, "lower": lower_p, "xi": xi}}

    def _restart_particles(self, fns: Functions, y: Tree, lower: Tree, xi: Tree,
                           batch: dynamics.Truncation) -> tuple[Tree, Tree, Tree]:
        """The data's restarts applied to the 2N particles (pair i's to particles i and N + i); xi reset where fresh."""
        if batch.fresh is None:
            raise ValueError("PES: the data's Truncation restarts runs but says not which (fresh=None); PES must reset "
                             "the accumulated perturbations of exactly those pairs: set fresh (bool [pairs] or 0-d)")
        fresh = batch.fresh.to(torch.bool)
        if batch.pairs and fresh.shape != (self.particles,):
            raise ValueError(f"PES(particles={self.particles}): the data's Truncation has fresh of shape "
                             f"{tuple(fresh.shape)}; per-pair data needs one flag per pair ({self.particles},)")

        def restart(y: Tree, lower: Tree, payload: Any) -> tuple[Tree, Tree]:
            restart = dynamics.Truncation(steps=batch.steps, restart=payload)
            return dynamics.begin(fns, y, lower, restart, self.horizon, "PES", self.inner_steps)

        if batch.pairs:
            y, lower = vmap(restart, randomness="error")(y, lower, _both_signs(batch.restart))
        else:
            y, lower = vmap(restart, in_dims=(0, 0, None), randomness="error")(y, lower, batch.restart)
        xi = {k: torch.where(_along(fresh.expand(self.particles), v), torch.zeros_like(v), v) for k, v in xi.items()}
        return y, lower, xi

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

        paired = isinstance(lower_batch, dynamics.Truncation) and lower_batch.pairs
        if paired != (isinstance(upper_batch, dynamics.Truncation) and upper_batch.pairs):
            raise ValueError("PES: per-pair data (Truncation(pairs=True)) must be given at both levels or at neither")
        # Per-pair data enters the vmap as the steps' minibatches, pair i's for particles i and N + i.
        steps = tuple(_steps(b, self.inner_steps, pairs) for b in batches)

        def truncation(theta: Tree, y: Tree, lower: Tree, lower_steps: Any, upper_steps: Any
                       ) -> tuple[Tree, Tree, Tensor]:
            lower_b = dynamics.Truncation(steps=lower_steps) if paired else lower_batch
            upper_b = dynamics.Truncation(steps=upper_steps) if paired else upper_batch
            if self.meta_loss == "final":
                y, lower, _ = dynamics.run(fns, theta, y, lower, t, lower_b, self.inner_steps)
                return y, lower, fns.f(theta, y, dynamics.last(upper_b))
            total: Tensor | float = 0.0
            step = t
            for k in range(self.inner_steps):
                y, lower, step = dynamics.run(fns, theta, y, lower, step, lower_b, 1, first=k)
                total = total + fns.f(theta, y, dynamics.at(upper_b, k))
            return y, lower, cast(Tensor, total) / self.inner_steps  # a tensor: inner_steps >= 1

        particles = state["particles"]
        in_dims = (0, 0, 0, 0, 0) if paired else (0, 0, 0, None, None)
        y_p, lower_p, losses = vmap(truncation, in_dims=in_dims, randomness="error")(
            thetas, particles["y"], particles["lower"], *steps)
        lower_batch, upper_batch = (dynamics.last(dynamics.pair(b, 0)) for b in batches)
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


def _steps(batch: Any, k: int, pairs: int) -> Any:
    """What the particles' vmap takes of a level's batch: per-pair steps repeated for both signs, else None."""
    if not (isinstance(batch, dynamics.Truncation) and batch.pairs):
        return None
    dynamics.check_length(batch, k, "PES")
    width = {v.shape[0] for v in tree_leaves(list(batch.steps)) if isinstance(v, Tensor)}
    if width != {pairs}:
        raise ValueError(f"PES(particles={pairs}): per-pair data must have {pairs} pairs on the leading axis of every "
                         f"tensor, got leading sizes {sorted(width)}")
    return _both_signs(list(batch.steps))


def _both_signs(tree: Any) -> Any:
    """Per-pair leaves [N, ...] repeated for the particles at x + eps and x - eps: [2N, ...] (pair i at i, N + i)."""
    return tree_map(lambda v: torch.cat([v, v]) if isinstance(v, Tensor) else v, tree)


def _repeat(tree: Tree, n: int) -> Tree:
    """Each leaf stacked n times along a new leading dimension (copies)."""
    return {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in tree.items()}


def _along(weights: Tensor, like: Tensor) -> Tensor:
    """weights [N] shaped to broadcast against like [N, ...]."""
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))
