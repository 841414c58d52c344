"""Betty 0.1.1 (Choe et al. 2023): ``ImplicitProblem``s wired by an ``Engine``, hypergradient types
"neumann", "cg" and "darts".

The smallest setup that yields Betty's hypergradient for one outer step: an upper problem (module =
x, loss f) and a lower problem (module = y, loss g, ``Config(type=...)`` with K iterations and the
step alpha), linked by ``u2l``/``l2u`` dependencies in an ``Engine``. One outer step is the upper
problem's ``one_step_descent`` on the upper batch, with the lower problem's current batch set: it runs
Betty's backward (direct gradient plus ``betty.hypergradient.<type>``) and then the upper optimizer
step, here a ``custom_optimizer_step`` that records the gradient Betty hands the optimizer. The lower
variables are reset to y before every call (Betty's darts moves them: see ``darts_drift``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from experiments.bench.peers_problems import Spec, TreeModule
from hypergrad import tree as T
from hypergrad.tree import Tree

NAME = "betty"


def _build(spec: Spec, budget: int, kind: str):
    """(upper problem, lower problem, recorded gradients) wired by a Betty ``Engine``."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    fns = spec.fns
    recorded: dict[str, Tree] = {}

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return fns.f(self.module.tree(), self.lower.module.tree(), batch)

        def custom_optimizer_step(self, *args, **kwargs):
            recorded["grad"] = self.module.from_list([p.grad.detach().clone() for p in self.module.parameters()])

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            return fns.g(self.upper.module.tree(), self.module.tree(), batch)

    device = next(iter(spec.x.values())).device
    lower_config = Config(type=kind, neumann_iterations=budget, neumann_alpha=spec.alpha, cg_iterations=budget)
    upper = Upper(name="upper", config=Config(retain_graph=True), module=TreeModule(spec.x), device=device)
    lower = Lower(name="lower", config=lower_config, module=TreeModule(spec.y), device=device)
    logging.disable(logging.INFO)  # Betty's Engine prints the problem graph at INFO level
    try:
        Engine(problems=[upper, lower], config=EngineConfig(train_iters=1, logger_type="none"),
               dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    finally:
        logging.disable(logging.NOTSET)
    return upper, lower, recorded


def hypergradient(spec: Spec, budget: int, kind: str) -> Callable[[], Tree]:
    """dF/dx from one Betty outer step with hypergradient ``kind`` ("neumann", "cg", "darts"), K = ``budget``."""
    upper, lower, recorded = _build(spec, budget, kind)
    lower_batch, upper_batch = spec.batches
    targets = list(lower.module.parameters())
    starts = [spec.y[k] for k in lower.module.names]

    def run() -> Tree:
        with torch.no_grad():
            for p, y0 in zip(targets, starts, strict=True):
                p.copy_(y0)
        lower.cur_batch = lower_batch
        upper.one_step_descent(batch=upper_batch)
        return recorded["grad"]

    return run


def darts_drift(spec: Spec) -> float:
    """|y after one Betty darts outer step - y| / |y|: nonzero means the outer step moved the lower variables."""
    upper, lower, _ = _build(spec, 1, "darts")
    lower.cur_batch = spec.batches[0]
    upper.one_step_descent(batch=spec.batches[1])
    after = {k: p.detach() for k, p in zip(lower.module.names, lower.module.parameters(), strict=True)}
    return (T.norm(T.sub(after, spec.y)) / T.norm(spec.y)).item()


def methods(spec: Spec, budget: int) -> dict[str, Callable[[], Tree]]:
    return {
        "Betty neumann": hypergradient(spec, budget, "neumann"),
        "Betty cg": hypergradient(spec, budget, "cg"),
    }


def fixed_methods(spec: Spec) -> dict[str, Callable[[], Tree]]:
    """Methods with no budget to vary: Betty's darts (one finite difference of grad_x g, radius 0.01)."""
    return {"Betty darts": hypergradient(spec, 1, "darts")}
