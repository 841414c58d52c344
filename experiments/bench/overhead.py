"""Framework overhead: our engines against the same mathematics written by hand in ``torch.autograd``.

    python -m experiments.bench.overhead --threads 1

A per-parameter L2 problem on an MLP (``experiments/bench/models.py``'s form: y = the weights,
x = log decays with y's shapes, g = CE(lower batch) + 1/2 sum exp(x) y^2, f = CE(upper batch)), built
the way a user builds it (a ``bilevel.BilevelProblem`` whose ``to_functions`` binds the modules), at
three sizes of y. For each of CG (cold start), Neumann and Unrolled with K products / steps, three
calls side by side, interleaved, medians after warm-up, in float64:

- "hand": what a researcher writes with ``torch.autograd``: grad_y f; ``autograd.grad(g, y,
  create_graph=True)``; K HVPs on that graph (CG or the Neumann series on lists of tensors); one
  ``autograd.grad(gy, x, v)`` on the same graph. Unrolled: T steps y <- y - a grad_y g with
  ``create_graph=True`` and one ``autograd.grad(f(y_T), x)``.
- "estimate": ``engine.estimate(fns, state, batches)`` (what the training loop calls every step; it
  also returns the metrics every engine logs: values, norms, the solve's residual).
- "hypergradient()": the one-shot ``engine.hypergradient(problem, lower_batch, upper_batch)`` (binds
  the problem, inits, runs the inner phase (0 steps here) and estimates).

Every call's hypergradient is compared with the hand-written one (max relative difference), so the
rows compute the same numbers. Targets (issue 15): estimate <= 1.0x hand at dim y >= 75k, <= 1.15x at
dim y ~1.6k; hypergradient() <= 1.05x estimate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad
from bilevel import BilevelProblem, Hyper
from experiments.bench.common import RESULTS, environment, interleaved_medians, markdown_table, parser, setup
from hypergrad.tree import Tree

SIZES = {  # name -> (inputs, hidden widths); dim y in the table
    "MLP 64-20-10": (64, (20,)),
    "MLP 784-96-10": (784, (96,)),
    "MLP 784-256-256-10": (784, (256, 256)),
}
K = 10
INNER_LR = 0.05


def network(inputs: int, widths: tuple[int, ...], classes: int = 10) -> nn.Module:
    sizes = (inputs, *widths)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], classes))


class WeightDecay(BilevelProblem):
    """Per-parameter L2 weight decay (Lorraine, Vicol, Duvenaud 2020): x = log decays shaped as y."""

    def __init__(self, net: nn.Module, log_decay: float = 0.0) -> None:
        super().__init__()
        self.lower = net
        self.upper = Hyper(**{k.replace(".", "_"): torch.full_like(p, log_decay) for k, p in net.named_parameters()})

    def lower_objective(self, batch: Any) -> Tensor:
        images, labels = batch
        decay = sum((d.exp() * w.square()).sum() for d, w in zip(self.upper.parameters(), self.lower.parameters(),
                                                                   strict=True))
        return F.cross_entropy(self.lower(images), labels) + 0.5 * decay

    def upper_objective(self, batch: Any) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.lower(images), labels)


# -- the hand-written reference ----------------------------------------------------------------------


def _g(net: nn.Module, decays: list[Tensor], weights: list[Tensor], batch: Any,
       values: dict[str, Tensor] | None = None) -> Tensor:
    """g by hand: the net's own parameters, or ``values`` (by name) through ``functional_call``; ``weights`` as used."""
    images, labels = batch
    logits = net(images) if values is None else torch.func.functional_call(net, values, (images,))
    return F.cross_entropy(logits, labels) + 0.5 * sum((d.exp() * w.square()).sum()
                                                       for d, w in zip(decays, weights, strict=True))


def hand_ift(problem: WeightDecay, batches: Any, method: str) -> list[Tensor]:
    """dF/dx by the IFT with K CG iterations (from 0) or K Neumann terms, all in torch.autograd."""
    lower_batch, upper_batch = batches
    net, weights, decays = problem.lower, list(problem.lower.parameters()), list(problem.upper.parameters())
    images, labels = upper_batch
    fy = torch.autograd.grad(F.cross_entropy(net(images), labels), weights)
    gy = torch.autograd.grad(_g(net, decays, weights, lower_batch), weights, create_graph=True)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        return list(torch.autograd.grad(gy, weights, v, retain_graph=True))

    def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
        return sum((ai * bi).sum() for ai, bi in zip(a, b, strict=True))  # type: ignore[return-value]

    if method == "CG":
        v = [torch.zeros_like(b) for b in fy]
        r = [b.clone() for b in fy]
        p = [b.clone() for b in fy]
        rr = dot(r, r)
        for _ in range(K):
            hp = hvp(p)
            alpha = rr / dot(p, hp)
            torch._foreach_add_(v, torch._foreach_mul(p, alpha))
            torch._foreach_sub_(r, torch._foreach_mul(hp, alpha))
            rr_new = dot(r, r)
            p = torch._foreach_add(r, torch._foreach_mul(p, rr_new / rr))
            rr = rr_new
    else:  # Neumann: v = a sum_{j<=K} (I - a H)^j b
        c = list(fy)
        total = list(fy)
        for _ in range(K):
            c = torch._foreach_sub(c, torch._foreach_mul(hvp(c), INNER_LR))
            torch._foreach_add_(total, c)
        v = torch._foreach_mul(total, INNER_LR)
    jv = torch.autograd.grad(gy, decays, v)
    return [-j for j in jv]


def hand_unrolled(problem: WeightDecay, batches: Any) -> list[Tensor]:
    """dF/dx through K differentiated gradient steps on g, in torch.autograd."""
    lower_batch, upper_batch = batches
    net, decays = problem.lower, list(problem.upper.parameters())
    names = [k for k, _ in net.named_parameters()]
    weights = [w.detach().requires_grad_() for w in net.parameters()]
    for _ in range(K):
        values = dict(zip(names, weights, strict=True))
        loss = _g(net, decays, weights, lower_batch, values)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        weights = [w - INNER_LR * gw for w, gw in zip(weights, grads, strict=True)]
    images, labels = upper_batch
    f_value = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, weights, strict=True)), (images,)),
                              labels)
    return list(torch.autograd.grad(f_value, decays))


# -- the benchmark -----------------------------------------------------------------------------------


def engine_for(method: str) -> hypergrad.Engine:
    if method == "CG":
        return hypergrad.CG(iters=K, warm_start=False, tol=0.0, inner_steps=0, inner_lr=INNER_LR)
    if method == "Neumann":
        return hypergrad.Neumann(terms=K, inner_steps=0, inner_lr=INNER_LR)
    return hypergrad.Unrolled(inner_steps=K, inner_lr=INNER_LR)


def max_relative(ours: Tree, hand: list[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ours.values(), hand, strict=True):
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)))
    return worst


def measure(name: str, method: str, device: torch.device, warmup: int, repeats: int) -> list[Any]:
    inputs, widths = SIZES[name]
    torch.manual_seed(0)
    problem = WeightDecay(network(inputs, widths)).to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    batches = tuple((torch.randn(256, inputs, generator=gen, dtype=torch.float64).to(device),
                     torch.randint(0, 10, (256,), generator=gen).to(device)) for _ in range(2))
    engine = engine_for(method)
    fns, x, y = problem.to_functions(batches)
    state = engine.init(fns, x, y)
    dim_y = sum(v.numel() for v in y.values())

    def hand() -> list[Tensor]:
        return hand_unrolled(problem, batches) if method == "Unrolled" else hand_ift(problem, batches, method)

    def estimate() -> Tree:
        return engine.estimate(fns, state, batches)[1]

    def one_shot() -> Tree:
        return engine.hypergradient(problem, *batches)

    reference = hand()
    diffs = [max_relative(estimate(), reference), max_relative(one_shot(), reference)]
    times = interleaved_medians({"hand": hand, "estimate": estimate, "one_shot": one_shot}, device, warmup, repeats)
    return [name, dim_y, method, times["hand"] * 1e3, times["estimate"] * 1e3, times["one_shot"] * 1e3,
            times["estimate"] / times["hand"], times["one_shot"] / times["estimate"], max(diffs)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=["CG", "Neumann", "Unrolled"])
    args = p.parse_args()
    device = setup(args)
    rows = [measure(name, method, device, args.warmup, args.repeats) for name in args.sizes for method in args.methods]
    headers = ["network", "dim y", "engine", "hand (ms)", "estimate (ms)", "hypergradient() (ms)",
               "estimate / hand", "hypergradient() / estimate", "max rel diff"]
    table = markdown_table(headers, rows)
    print(table)
    if args.quick:
        return
    text = (f"# Overhead over the same mathematics by hand\n\n{environment(device)}\n\n"
            f"Regenerate: `python -m experiments.bench.overhead --threads {args.threads}`\n\n"
            f"{__doc__.split(chr(10), 3)[3].strip()}\n\nK = {K} (CG iterations from 0, Neumann terms, unrolled "
            f"steps), batch 256, float64, tanh MLPs; medians of {args.repeats} interleaved repetitions after "
            f"{args.warmup} warm-up.\n\n{table}\n")
    (RESULTS / "speed" / "overhead.md").write_text(text)


if __name__ == "__main__":
    main()
