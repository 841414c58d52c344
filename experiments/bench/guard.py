"""The step guard's cost: ``StepGuard.accept`` (a norm per output leaf, one read-back) against one engine step.

    python -m experiments.bench.guard --device cpu --threads 1

Problems: the default job (``experiments/configs/cleaning_digits.yaml``: DigitsCleaning, its CG),
and the MLP 784-256-256-10 per-parameter L2 problem of ``experiments/bench/models.py`` (269k lower
variables, where checking every entry costs the most). Interleaved repetitions, medians after
warm-up. The step is the engine alone (no Lightning), so the ratio is an upper bound on the
guard's share of a training step. Writes ``experiments/results/speed/guard.md``.
"""

from __future__ import annotations

from typing import Any

import torch

import hypergrad
from bilevel.guard import StepGuard, step_quantities
from experiments.bench.common import RESULTS, environment, interleaved_medians, markdown_table, parser, setup
from experiments.bench.models import l2_problem, mlp
from problems import DigitsCleaning

TARGET = 0.01
"""Issue 10: the guard must cost under 1 % of a step on the default job."""


def default_job(device: torch.device) -> tuple[hypergrad.Engine, hypergrad.Functions, Any, Any, Any]:
    """(engine, fns, x, y, batches) of the default job, configured as its YAML."""
    problem = DigitsCleaning(seed=0).to(device)
    lower, upper = problem.data()
    batches = (lower, upper)
    fns, x, y = problem.to_functions(batches)
    engine = hypergrad.CG(iters=10, tol=1e-3, inner_steps=5, inner_lr=2.0, outer_lr=0.1)
    return engine, fns, x, y, batches


def mlp_job(device: torch.device, quick: bool) -> tuple[hypergrad.Engine, hypergrad.Functions, Any, Any, Any]:
    torch.manual_seed(0)
    fns, x, y, batches = l2_problem(mlp(width=32 if quick else 256), batch_size=64, device=device)
    return hypergrad.CG(iters=10, inner_steps=5), fns, x, y, batches


def measure(engine: hypergrad.Engine, fns: hypergrad.Functions, x: Any, y: Any, batches: Any,
            device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds of one engine step, median seconds of the guard on its outputs)."""
    state = engine.init(fns, x, y, lower_batch=batches[0])
    state = engine.inner(fns, state, batches[0])
    after, hypergrad_, metrics = engine.estimate(fns, state, batches)
    after = engine.outer(fns, after, hypergrad_)
    guard = StepGuard()
    times = interleaved_medians({
        "step": lambda: engine.step(fns, state, batches),
        # What the loop runs after every step: gather the outputs, check them, read back once.
        "guard": lambda: guard.accept(1, step_quantities(after, hypergrad_, metrics), metrics),
    }, device, warmup, repeats)
    return times["step"], times["guard"]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "speed" / "guard.md"))
    args = p.parse_args(argv)
    device = setup(args)
    rows = []
    for name, job in (("default job (cleaning digits, CG)", default_job(device)),
                      ("MLP 784-256-256-10 L2 (CG)" if not args.quick else "MLP (quick)", mlp_job(device, args.quick))):
        step, guard = measure(*job, device=device, warmup=args.warmup, repeats=args.repeats)
        ratio = guard / step
        rows.append([name, step * 1e3, guard * 1e3, f"{100 * ratio:.3f} %",
                     ("met" if ratio < TARGET else "NOT met") if name.startswith("default") else "-"])
    table = markdown_table(["problem", "engine step (ms)", "guard (ms)", "guard / step", "< 1 % target"], rows)
    text = (f"# The step guard's cost\n\n`python -m experiments.bench.guard --device {args.device} "
            f"--threads {args.threads}`; {environment(device)}; medians of {args.repeats} interleaved repetitions "
            f"after {args.warmup} warm-up.\n\n{table}\n\nThe guard is `bilevel.guard.StepGuard.accept`: "
            "`hypergrad.finite.leaf_norms` (one fused `torch._foreach_norm`) over every output of the step (x, y, the "
            "hypergradient, every metric, the engine's extra state and outer moments) and one read-back of those "
            "norms with the watched scalars; the exact per-leaf check runs only when a norm is non-finite. "
            "The step is `engine.step` alone, without Lightning's own per-step work, so the share of a training "
            "step is smaller still.\n")
    print(text)
    if not args.quick:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
