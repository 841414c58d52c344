"""higher 0.2.1 (Grefenstette et al. 2019): unrolled differentiation with ``higher.innerloop_ctx``.

T differentiable ``torch.optim.SGD`` steps (lr = alpha) on g from y through higher's functional
module and differentiable optimizer, then backward of f to x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from experiments.bench.peers_problems import Spec, TreeModule
from hypergrad.tree import Tree

NAME = "higher"


def unrolled(spec: Spec, budget: int) -> Callable[[], Tree]:
    """dF/dx through T = ``budget`` SGD steps in ``higher.innerloop_ctx``."""
    import higher

    lower, upper = spec.batches

    def run() -> Tree:
        x = {k: v.detach().clone().requires_grad_(True) for k, v in spec.x.items()}
        module = TreeModule(spec.y)
        opt = torch.optim.SGD(module.parameters(), lr=spec.alpha)
        with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(budget):
                diffopt.step(spec.fns.g(x, module.from_list(fmodel.fast_params), lower))
            loss = spec.fns.f(x, module.from_list(fmodel.fast_params), upper)
            return dict(zip(x, torch.autograd.grad(loss, list(x.values())), strict=True))

    return run


def methods(spec: Spec, budget: int) -> dict[str, Callable[[], Tree]]:
    return {"higher innerloop_ctx (unrolled)": unrolled(spec, budget)}
