"""The three problems the peer comparison runs on, each with its reference hypergradient.

Every method, ours and the peers', starts from the same (x, y) of a ``Spec`` and returns dF/dx at x:

- implicit methods (Neumann, CG, Betty's darts) apply the IFT formula at that y, with K HVPs;
- unrolled methods differentiate T = K gradient steps of size ``alpha`` on g started (detached) at y.

y is (close to) y*(x), so both kinds estimate the same dF/dx and are held to one reference:

- P1 (float64): y = y*(x) in closed form, reference = ``QuadraticP1.hypergradient()``. From y*,
  T unrolled steps equal K = T - 1 Neumann terms exactly.
- digits hyper-cleaning (linear model, float64): y* from Newton steps with the dense Hessian to
  |grad_y g| < 1e-10, reference = ``hypergrad.Exact`` (dense solve) at y*.
- MLP 784-256-256-10 per-parameter L2 (float32): y from a few hundred Adam steps on g (not an exact
  minimizer: the lower problem is nonconvex), reference = ``hypergrad.CG`` with 500 iterations in
  float64 at the same (x, y); its relative residual is reported with the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import hypergrad
from experiments.bench import models
from hypergrad import kernels, solvers
from hypergrad import tree as T
from hypergrad.engine import Functions
from hypergrad.recipe import gradient_descent
from hypergrad.tree import Tree


@dataclass
class Spec:
    """One problem as every method sees it.

    Attributes:
        name: the problem's name in the tables.
        fns: pure f(x, y, batch), g(x, y, batch).
        x, y: the upper variables and the lower point every method starts from (trees).
        batches: (lower_batch, upper_batch).
        alpha: the Neumann step / unrolled step size, below 2 / lambda_max(d_yy g).
        budgets: the K (HVPs, Neumann terms, CG iterations) = T (unrolled steps) compared.
        reference: dF/dx to compare against (tree keyed like x).
        note: how the reference was obtained.
    """

    name: str
    fns: Functions
    x: Tree
    y: Tree
    batches: tuple[Any, Any]
    alpha: float
    budgets: list[int]
    reference: Tree
    note: str


def relative_error(h: Tree, reference: Tree) -> float:
    """|h - reference| / |reference| over the whole tree (float64)."""
    diff = T.tree_map(lambda a, b: a.to(torch.float64) - b.to(torch.float64), h, reference)
    return (T.norm(diff) / T.norm(T.tree_map(lambda a: a.to(torch.float64), reference))).item()


def largest_eigenvalue(fns: Functions, x: Tree, y: Tree, batch: Any, iters: int = 50) -> float:
    """lambda_max(d_yy g) by power iteration on HVPs (seeded start)."""
    gen = torch.Generator().manual_seed(0)
    v = T.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device), y)
    lam = torch.zeros(())
    for _ in range(iters):
        v = T.scale(v, 1.0 / T.norm(v))
        hv = kernels.hvp(fns.g, x, y, batch, v)
        lam = T.dot(v, hv)
        v = hv
    return float(lam)


def p1(quick: bool, device: torch.device) -> Spec:
    from problems.reference import QuadraticP1

    problem = QuadraticP1().to(device).lower_to_solution()
    batches = problem.data()
    fns, x, y = problem.to_functions(batches)
    (key,) = x
    return Spec("P1 (float64)", fns, x, y, batches, alpha=0.2, budgets=[1, 2, 3, 10] if quick else [1, 2, 3, 5, 10, 20],
                reference={key: problem.hypergradient()}, note="closed form rho x + B^T A^-1 (y* - y_t), y = y*(x)")


def cleaning(quick: bool, device: torch.device) -> Spec:
    from problems.cleaning import DigitsCleaning

    n_train = 200 if quick else 1000
    problem = DigitsCleaning(n_train=n_train, n_corrupt=n_train // 2).double().to(device)
    batches = problem.data()
    fns, x, y = problem.to_functions(batches)
    # x: a fixed non-uniform point, so that the examples' weights differ as they do during training.
    gen = torch.Generator().manual_seed(0)
    x = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(device) for k, v in x.items()}
    lower = batches[0]
    for _ in range(30):  # Newton on the strongly convex lower level; converges quadratically
        gy, _ = kernels.grad_y(fns.g, x, y, lower)
        if T.norm(gy) < 1e-10:
            break
        step, _ = solvers.dense(kernels.hvp_operator(fns.g, x, y, lower), gy)
        y = T.sub(y, step)
    engine = hypergrad.Exact(inner_steps=0)
    _, reference, _ = engine.estimate(fns, engine.init(fns, x, y), batches)
    alpha = 1.0 / largest_eigenvalue(fns, x, y, lower)
    budgets = [1, 5] if quick else [1, 5, 20, 50, 100]
    return Spec(f"digits cleaning (n={n_train}, float64)", fns, x, y, batches, alpha=alpha, budgets=budgets,
                reference=reference, note="hypergrad.Exact (dense Hessian solve) at y* from Newton, |grad_y g| < 1e-10")


LOG_DECAY = -1.0


def mlp(quick: bool, device: torch.device) -> Spec:
    torch.manual_seed(0)
    net = models.mlp(width=32 if quick else 256)
    # log decay -1: at l2_problem's default (-6), and at -2, d_yy g is indefinite at the point Adam
    # reaches (CG's residual stays above 1 after 200 iterations), so no IFT reference exists there.
    fns, x, y, batches = models.l2_problem(net, batch_size=16 if quick else 64, log_decay=LOG_DECAY,
                                         device=device)
    lower = batches[0]
    y = _adam(fns, x, y, lower, steps=30 if quick else 200)
    alpha = 1.0 / largest_eigenvalue(fns, x, y, lower)
    y = gradient_descent(fns.g, x, y, lower, 10 if quick else 100, alpha)
    # Reference in float64 at the same point: the float32 methods cannot be held closer than their rounding.
    x64, y64 = T.tree_map(lambda t: t.double(), x), T.tree_map(lambda t: t.double(), y)
    b64 = tuple((images.double(), labels) for images, labels in batches)
    iters = 20 if quick else 200
    engine = hypergrad.CG(iters=iters, tol=1e-13, inner_steps=0)
    _, reference, metrics = engine.estimate(fns, engine.init(fns, x64, y64), b64)
    residual, stationarity = metrics["solve_residual"].item(), metrics["lower_stationarity"].item()
    budgets = [1, 5] if quick else [1, 5, 20]
    return Spec(f"MLP {'784-32-32-10' if quick else '784-256-256-10'} L2 (float32)", fns, x, y, batches,
                alpha=alpha, budgets=budgets, reference=reference,
                note=f"hypergrad.CG, {iters} iterations in float64 (relative residual {residual:.1e}) at y from "
                     f"Adam then gradient steps on g (|grad_y g| = {stationarity:.1e}); log decay {LOG_DECAY}")


def _adam(fns: Functions, x: Tree, y: Tree, batch: Any, steps: int, lr: float = 1e-3) -> Tree:
    """``steps`` Adam steps on g(x, .) from y: brings y near a lower stationary point."""
    params = {k: v.clone().requires_grad_(True) for k, v in y.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        fns.g(x, params, batch).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def problems(quick: bool = False, device: torch.device | str = "cpu") -> list[Spec]:
    """P1, digits cleaning and the MLP, built on ``device``; ``quick``: tiny sizes for a smoke test."""
    device = torch.device(device)
    return [p1(quick, device), cleaning(quick, device), mlp(quick, device)]


class TreeModule(nn.Module):
    """A tree of tensors held as the parameters of an nn.Module, for the peers' module-based APIs.

    Parameter names are the tree's keys with dots replaced (nn.Module forbids dots); ``tree()`` reads
    them back through ``getattr``, so a peer that swaps a parameter for a non-leaf tensor (TorchOpt's
    MetaSGD) is seen.
    """

    def __init__(self, tree: Tree) -> None:
        super().__init__()
        self.names = {k: k.replace(".", "__") for k in tree}
        for key, safe in self.names.items():
            self.register_parameter(safe, nn.Parameter(tree[key].detach().clone()))

    def tree(self) -> Tree:
        return {key: getattr(self, safe) for key, safe in self.names.items()}

    def from_list(self, tensors: list[Tensor]) -> Tree:
        """The tree of ``tensors`` given in ``parameters()`` order."""
        return dict(zip(self.names, tensors, strict=True))
