"""TorchOpt 0.7.3 (Ren et al. 2023): implicit differentiation (``custom_root``) and unrolled ``MetaSGD``.

Each builder returns a closure computing dF/dx from the ``Spec``'s (x, y) with TorchOpt's documented API:

- implicit: ``torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=...)`` around a solver that
  returns the given y (it already is y*(x)); the optimality condition is grad_y g = 0; the linear solves
  are ``torchopt.linear_solve.solve_cg(maxiter=K, rtol=1e-12)`` and ``solve_inv(ns=True, maxiter=K, alpha=a)``
  (the Neumann series). Backward of f(x, y*(x)) then gives dF/dx.
- unrolled: ``torchopt.MetaSGD(module, lr=a)``, T differentiable steps on g, backward of f.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from experiments.bench.peers_problems import Spec, TreeModule
from hypergrad.tree import Tree

NAME = "torchopt"
RTOL = 1e-12
"""TorchOpt's CG stops at |r| <= RTOL |b| (its loop is data-dependent): with rtol=0 it raises
ZeroDivisionError once the residual reaches exactly zero (p^T A p = 0), as on digits cleaning at K=100."""


def _leaves(spec: Spec) -> Tree:
    return {k: v.detach().clone().requires_grad_(True) for k, v in spec.x.items()}


def implicit(spec: Spec, budget: int, solver: str) -> Callable[[], Tree]:
    """dF/dx by TorchOpt's implicit differentiation; ``solver`` "cg" or "neumann", K = ``budget``."""
    import torchopt

    keys_x, keys_y = list(spec.x), list(spec.y)
    lower, upper = spec.batches
    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=budget, rtol=RTOL, atol=0.0)
    else:
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=budget, alpha=spec.alpha)

    def optimality(y_flat: tuple, x_flat: tuple) -> tuple:
        # Called under torch.func (vjp) by TorchOpt: grad_y g with torch.func keeps it composable.
        x, y = dict(zip(keys_x, x_flat, strict=True)), dict(zip(keys_y, y_flat, strict=True))
        gy = torch.func.grad(spec.fns.g, argnums=1)(x, y, lower)
        return tuple(gy[k] for k in keys_y)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver_fn(y_flat: tuple, x_flat: tuple) -> tuple:
        return tuple(t.detach() for t in y_flat)  # y is already the lower solution

    y0 = tuple(spec.y[k] for k in keys_y)

    def run() -> Tree:
        x = _leaves(spec)
        y_star = dict(zip(keys_y, solver_fn(y0, tuple(x.values())), strict=True))
        loss = spec.fns.f(x, y_star, upper)
        return dict(zip(x, torch.autograd.grad(loss, list(x.values())), strict=True))

    return run


def meta_sgd(spec: Spec, budget: int) -> Callable[[], Tree]:
    """dF/dx through T = ``budget`` steps of ``torchopt.MetaSGD`` (lr = alpha) from y."""
    import torchopt

    lower, upper = spec.batches

    def run() -> Tree:
        x = _leaves(spec)
        module = TreeModule(spec.y)
        opt = torchopt.MetaSGD(module, lr=spec.alpha)
        for _ in range(budget):
            opt.step(spec.fns.g(x, module.tree(), lower))
        loss = spec.fns.f(x, module.tree(), upper)
        return dict(zip(x, torch.autograd.grad(loss, list(x.values())), strict=True))

    return run


def methods(spec: Spec, budget: int) -> dict[str, Callable[[], Tree]]:
    return {
        "TorchOpt implicit CG": implicit(spec, budget, "cg"),
        "TorchOpt implicit Neumann": implicit(spec, budget, "neumann"),
        "TorchOpt MetaSGD (unrolled)": meta_sgd(spec, budget),
    }
