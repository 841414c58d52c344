"""Hypergradient HPO next to what users pick instead: Optuna's TPE, at the same CPU budget (issue 14, part 5).

    pip install -e ".[experiments]"                   # Optuna (Akiba et al. 2019), pinned
    python -m experiments.hpo_vs_optuna               # 3 seeds -> experiments/results/hpo_vs_optuna{.md,.json,_*.png}
    python -m experiments.hpo_vs_optuna --quick       # smoke run: 1 seed, 2 CPU s per run, into a temp folder

Two problems of the library, each searched over the same hyperparameters by two methods:

- ``ijcnn1``: per-feature L2 of logistic regression on the ijcnn1-shaped synthetic set
  (``problems.hpo.LogisticL2``, 22 log-weights, 50000 train / 90000 validation / 10000 test).
- ``mlp``: per-layer weight decay of a tanh MLP on digits (``problems.nonconvex.LayerwiseWeightDecay``,
  3 log-decays, 1000 train / 300 validation / 497 test).

Methods:

- ``hypergradient``: one run of a ``hypergrad`` engine (a plain ``engine.step`` loop, no Lightning), x and the
  lower weights y trained together, warm-started; the model in hand at time t is (x_t, y_t).
- ``optuna-tpe``: Optuna's ``TPESampler`` (Bergstra et al. 2011) over a box around the same x, the first
  trial enqueued at the hypergradient run's starting x. Each trial trains the lower level from the
  problem's initial weights to (near) convergence with a deterministic full-batch solver (damped Newton to
  machine precision for the logistic regression, the problem's own ``lower_solution``; 200 L-BFGS
  iterations for the MLP) and reports the validation loss; the model in hand is the best trial's.
- ``optuna-tpe-sgd`` (MLP only): the same search, each trial training with the hypergradient run's own
  lower optimizer (minibatch SGD, lr 0.3, batch 100, the problem's loader) for 100 epochs: separates the
  effect of the search from that of the lower solver.

The budget is CPU seconds of this process (``time.process_time()``, one torch thread and one BLAS thread),
not wall time: the machine is shared with other jobs, and CPU time is what they cannot inflate. Everything
a method needs to decide counts (batches, engine steps, Optuna's sampler, trials, the validation loss a
trial reports); the recording (the validation and test loss of the model in hand, computed for the
curves) runs with the clock stopped. A trial that ends after the budget is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
import hypergrad
from bilevel.functional import write_back
from problems.common import lbfgs
from problems.hpo import LogisticL2
from problems.nonconvex import LayerwiseWeightDecay

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
BUDGET_S = {"ijcnn1": 30.0, "mlp": 40.0}  # CPU seconds per run
QUICK_BUDGET_S = 2.0
RECORDS = 80  # points per curve of the hypergradient run (about; time-based)
TARGET_FRACTION = 0.9  # time to target: to this fraction of the best improvement any method made on the seed
INSTALL_HINT = 'Optuna is not installed: pip install -e ".[experiments]" (the optional extra that pins it)'


class CpuClock:
    """CPU seconds of this process spent inside ``with clock:`` blocks only (``time.process_time``)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._start = 0.0

    def __enter__(self) -> CpuClock:
        self._start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed += time.process_time() - self._start


@dataclass
class Curve:
    """What one run reached: at CPU second ``times[i]``, the model in hand had ``val[i]`` and ``test[i]``."""

    times: list[float]
    val: list[float]
    test: list[float]
    iterations: int = 0  # outer steps (hypergradient) or completed trials (Optuna)
    x: list[float] | None = None  # the hyperparameters in hand at the end
    refit_val: float = math.nan  # validation loss at the final x, lower level retrained by the trial solver
    refit_test: float = math.nan

    def at(self, budget: float) -> tuple[float, float]:
        """(val, test) of the last record at or before ``budget`` CPU seconds."""
        i = max(i for i, t in enumerate(self.times) if t <= budget)
        return self.val[i], self.test[i]

    def time_to(self, target: float) -> float:
        """The first CPU second at which the validation loss was <= ``target`` (inf if never)."""
        return next((t for t, v in zip(self.times, self.val, strict=True) if v <= target), math.inf)


# -- the two problems ------------------------------------------------------------------------------------------


class Workload:
    """A problem of the library with what both methods need: its engine, a search box, a trial solver.

    Subclasses define ``make``, ``engine``, ``box``, ``fit_lower`` (train the lower level at x from the
    problem's initial weights, in place) and ``losses`` ((validation, test) loss of the model in hand).
    """

    name: str
    title: str
    engine_label: str

    def make(self, seed: int) -> bilevel.BilevelProblem:
        raise NotImplementedError

    def engine(self) -> hypergrad.Engine:
        raise NotImplementedError

    def box(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        raise NotImplementedError

    def x_of(self, problem: bilevel.BilevelProblem) -> Tensor:
        """The problem's upper variable x (its only one here), [d]."""
        (x,) = problem.upper.parameters()
        return x

    def fit_lower(self, problem: bilevel.BilevelProblem, x: Tensor) -> None:
        raise NotImplementedError

    def val_loss(self, problem: bilevel.BilevelProblem) -> float:
        return self.losses(problem)[0]

    def losses(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        raise NotImplementedError


class Ijcnn1(Workload):
    """Per-feature L2 of logistic regression, ijcnn1-shaped (``LogisticL2``).

    Validation loss = the problem's upper objective f: mean validation BCE + upper_l2/2 |x|^2 (upper_l2 = 1e-5,
    0.002-0.004 at the x reached), so that both methods minimize the same function; test loss = mean test BCE.

    Engine: the config ``experiments/configs/hpo_ijcnn1.yaml`` (CG(10), 10 full-batch inner steps of size 1)
    with the outer step of ``experiments/specs.py`` (Adam, 0.2), the pair that won on this problem in
    ``experiments/results/problems.md``. Box: x_j in [-12, 2], the range of the reference optimum's grid.
    """

    name, title = "ijcnn1", "per-feature L2, logistic regression, ijcnn1-shaped (22 hyperparameters)"
    engine_label = "CG(iters=10, tol=1e-10, inner_steps=10, inner_lr=1.0, outer_lr=0.2, adam)"

    def make(self, seed: int) -> LogisticL2:
        return LogisticL2(dataset="ijcnn1_synthetic", seed=seed)

    def engine(self) -> hypergrad.Engine:
        return hypergrad.CG(iters=10, tol=1e-10, inner_steps=10, inner_lr=1.0, outer_lr=0.2, outer_optimizer="adam")

    def box(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        return -12.0, 2.0

    @torch.no_grad()
    def fit_lower(self, problem: bilevel.BilevelProblem, x: Tensor) -> None:
        assert isinstance(problem, LogisticL2)
        problem.upper.log_l2.copy_(x)
        problem.lower_to_solution()  # damped Newton from w = 0 to machine precision

    @torch.no_grad()
    def val_loss(self, problem: bilevel.BilevelProblem) -> float:
        assert isinstance(problem, LogisticL2)
        return _bce(problem, "val") + 0.5 * problem.upper_l2 * problem.upper.log_l2.square().sum().item()

    @torch.no_grad()
    def losses(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        return self.val_loss(problem), _bce(problem, "test")


def _bce(problem: bilevel.BilevelProblem, part: str) -> float:
    """Mean logistic loss of ``LogisticL2``'s current (w, b) on its ``part`` split."""
    inputs, labels = getattr(problem, f"{part}_inputs"), getattr(problem, f"{part}_labels")
    logits = inputs @ problem.lower.weight + problem.lower.bias
    return F.binary_cross_entropy_with_logits(logits, labels).item()


class Mlp(Workload):
    """Per-layer weight decay of a tanh MLP on digits (``LayerwiseWeightDecay``); validation loss = CE.

    Engine: ``Unrolled(inner_steps=10, inner_lr=0.3, outer_lr=0.1)``: the outer step of the control that did
    best on this problem in ``experiments/results/nonconvex.md``, with inner_lr 0.3 instead of 0.1 (on seed 0
    at 30 CPU s: validation loss 0.130 vs 0.136, refit 0.075 vs 0.112; ``CG(normal=True)`` 0.135, refit 0.084).
    Box: each decay in [1e-6, 1] (x = log decay in [-13.8, 0]); the problem starts at 1e-3.
    """

    INNER_LR = 0.3
    name, title = "mlp", "per-layer weight decay, tanh MLP 64-32-32-10, digits (3 hyperparameters)"
    engine_label = "Unrolled(inner_steps=10, inner_lr=0.3, outer_lr=0.1, adam)"

    def __init__(self, solver: str = "lbfgs", sgd_epochs: int = 100) -> None:
        self.solver, self.sgd_epochs = solver, sgd_epochs

    def make(self, seed: int) -> LayerwiseWeightDecay:
        problem = LayerwiseWeightDecay(seed=seed)
        problem.initial_lower = copy.deepcopy(problem.lower.state_dict())  # every trial starts from these weights
        return problem

    def engine(self) -> hypergrad.Engine:
        return hypergrad.Unrolled(inner_steps=10, inner_lr=self.INNER_LR, outer_lr=0.1, outer_optimizer="adam")

    def box(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        return math.log(1e-6), 0.0

    def fit_lower(self, problem: bilevel.BilevelProblem, x: Tensor) -> None:
        assert isinstance(problem, LayerwiseWeightDecay)
        with torch.no_grad():
            problem.upper.log_decay.copy_(x)
        problem.lower.load_state_dict(problem.initial_lower)
        problem.upper.requires_grad_(False)  # no gradient for x during a trial
        try:
            if self.solver == "lbfgs":
                full = (problem.train_inputs, problem.train_labels)
                lbfgs(list(problem.lower.parameters()), lambda: problem.lower_objective(full), max_iter=200,
                      tolerance_grad=1e-7, tolerance_change=0.0)
            else:  # the hypergradient run's own lower optimizer: minibatch SGD, its inner_lr, the problem's loader
                opt = torch.optim.SGD(problem.lower.parameters(), lr=self.INNER_LR)
                loader, _ = problem.data()
                for _ in range(self.sgd_epochs):
                    for batch in loader:
                        opt.zero_grad()
                        problem.lower_objective(batch).backward()
                        opt.step()
        finally:
            problem.upper.requires_grad_(True)

    @torch.no_grad()
    def val_loss(self, problem: bilevel.BilevelProblem) -> float:
        return F.cross_entropy(problem.lower(problem.val_inputs), problem.val_labels).item()

    @torch.no_grad()
    def losses(self, problem: bilevel.BilevelProblem) -> tuple[float, float]:
        test = F.cross_entropy(problem.lower(problem.test_inputs), problem.test_labels).item()
        return self.val_loss(problem), test


WORKLOADS: dict[str, Callable[[], Workload]] = {"ijcnn1": Ijcnn1, "mlp": Mlp}
# (method, problem) pairs run; optuna-tpe-sgd only where the trial solver differs from the engine's inner loop.
METHODS = {"ijcnn1": ("hypergradient", "optuna-tpe"), "mlp": ("hypergradient", "optuna-tpe", "optuna-tpe-sgd")}


# -- the two methods -------------------------------------------------------------------------------------------


def _forever(data: Any) -> Iterator[Any]:
    """A level's batches without end: a full-batch tuple every time, or the DataLoader pass after pass
    (reshuffled each pass by its own generator, unlike ``itertools.cycle``, which would replay the first)."""
    while True:
        if isinstance(data, tuple):
            yield data
        else:
            yield from data


def run_hypergradient(workload: Workload, seed: int, budget: float, max_steps: int | None = None) -> Curve:
    """One engine run from the problem's start until ``budget`` CPU seconds (or ``max_steps`` outer steps, for
    tests that must not depend on the machine's speed); records about ``RECORDS`` points.

    After the budget, the final x is also scored with the lower level retrained by the trial solver
    (``refit_val``, ``refit_test``): the quality of the hyperparameters found, apart from the model in hand.
    """
    torch.manual_seed(seed)
    problem = workload.make(seed)
    clock = CpuClock()
    val, test = workload.losses(problem)
    curve = Curve(times=[0.0], val=[val], test=[test])
    engine = workload.engine()
    with clock:
        lower_data, upper_data = problem.data()
        lower, upper = _forever(lower_data), _forever(upper_data)
        first = (next(lower), next(upper))
        fns, x, y = problem.to_functions(first)
        state = engine.init(fns, x, y, lower_batch=first[0])
    batches, recorded, done = first, 0.0, 0.0
    while max_steps is None or curve.iterations < max_steps:
        with clock:
            stepped, _ = engine.step(fns, state, batches)
            batches = (next(lower), next(upper))
        if clock.elapsed > budget:
            break  # finished too late: not counted, as an Optuna trial would not be
        state, done = stepped, clock.elapsed
        curve.iterations += 1
        if done - recorded >= budget / RECORDS:
            recorded = done
            _record(workload, problem, engine, state, curve, done)
    if curve.times[-1] < done:
        _record(workload, problem, engine, state, curve, done)
    x_final = workload.x_of(problem).detach().clone()
    curve.x = x_final.tolist()
    workload.fit_lower(problem, x_final)
    curve.refit_val, curve.refit_test = workload.losses(problem)
    return curve


def _record(workload: Workload, problem: bilevel.BilevelProblem, engine: hypergrad.Engine, state: Any, curve: Curve,
            time_s: float) -> None:
    """Write the engine state into the problem and append the model's (validation, test) loss at ``time_s``."""
    write_back(problem, state["x"], engine.lower_solution(state))
    val, test = workload.losses(problem)
    curve.times.append(time_s)
    curve.val.append(val)
    curve.test.append(test)


def run_optuna(workload: Workload, seed: int, budget: float) -> Curve:
    """Optuna's TPE, one trial after another, until ``budget`` CPU seconds; a record after every trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.manual_seed(seed)
    problem = workload.make(seed)
    x0 = workload.x_of(problem).detach().clone()
    low, high = workload.box(problem)
    names = [f"x{j}" for j in range(x0.shape[0])]
    val, test = workload.losses(problem)  # the untrained model: the same start as the hypergradient curve
    curve = Curve(times=[0.0], val=[val], test=[test])
    clock = CpuClock()
    with clock:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({n: float(v) for n, v in zip(names, x0.clip(low, high), strict=True)})
    best, best_x = math.inf, x0
    while clock.elapsed < budget:
        with clock:
            trial = study.ask()
            x = torch.tensor([trial.suggest_float(n, low, high) for n in names], dtype=x0.dtype)
            workload.fit_lower(problem, x)
            val = workload.val_loss(problem)
            study.tell(trial, val)
        if clock.elapsed > budget:
            break  # finished too late: not counted
        curve.iterations += 1
        if val < best:
            best, best_x = val, x
            test = workload.losses(problem)[1]
        curve.times.append(clock.elapsed)
        curve.val.append(best)
        curve.test.append(test)
    curve.x = best_x.tolist()
    curve.refit_val, curve.refit_test = (curve.val[-1], curve.test[-1]) if curve.iterations else (math.nan, math.nan)
    return curve


def run(problem_name: str, method: str, seed: int, budget: float, quick: bool = False) -> Curve:
    """One (problem, method, seed) run at ``budget`` CPU seconds (``quick``: SGD trials of 10 epochs, not 100)."""
    if method == "hypergradient":
        return run_hypergradient(WORKLOADS[problem_name](), seed, budget)
    workload = Mlp("sgd", 10 if quick else 100) if method == "optuna-tpe-sgd" else WORKLOADS[problem_name]()
    return run_optuna(workload, seed, budget)


# -- the report ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float], digits: int = 4) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.{digits}f} +- {std:.{digits}f}"


def _targets(runs: dict[str, dict[str, list[Curve]]], problem: str, budget: float) -> list[float]:
    """Per seed: the starting hyperparameters' validation loss (Optuna's first, enqueued trial) minus
    ``TARGET_FRACTION`` of the largest improvement over it that any method reached within the budget."""
    by_method = runs[problem]
    out = []
    for i in range(len(by_method["optuna-tpe"])):
        start = by_method["optuna-tpe"][i].val[1] if len(by_method["optuna-tpe"][i].val) > 1 else math.nan
        best = min(curves[i].at(budget)[0] for curves in by_method.values())
        out.append(start - TARGET_FRACTION * (start - best))
    return out


def table(runs: dict[str, dict[str, list[Curve]]], budgets: dict[str, float]) -> str:
    """The results table, one row per (problem, method), mean +- std over seeds."""
    head = ("| problem | method | validation loss at budget | test loss at budget | iterations | "
            f"CPU s to {TARGET_FRACTION:.0%} of best improvement (seeds reaching) | refit validation | refit test |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [head]
    for problem, by_method in runs.items():
        targets = _targets(runs, problem, budgets[problem])
        for method, curves in by_method.items():
            at = [c.at(budgets[problem]) for c in curves]
            times = [c.time_to(tg) for c, tg in zip(curves, targets, strict=True)]
            reached = [t for t in times if math.isfinite(t)]
            time_cell = f"{_mean_std(reached, 1) if reached else 'never'} ({len(reached)}/{len(curves)})"
            rows.append(f"| {problem} | {method} | {_mean_std([a[0] for a in at])} | {_mean_std([a[1] for a in at])} "
                        f"| {_mean_std([float(c.iterations) for c in curves], 0)} | {time_cell} "
                        f"| {_mean_std([c.refit_val for c in curves])} | {_mean_std([c.refit_test for c in curves])} |")
    return "\n".join(rows)


def per_seed_table(runs: dict[str, dict[str, list[Curve]]], budgets: dict[str, float], seeds: tuple[int, ...],
                   optimum: dict[str, list[float]]) -> str:
    """Validation / test loss at the budget per seed (the seeds differ more than the methods: compare in pairs),
    the starting hyperparameters' values and, for ijcnn1, the reference optimum F* of ``LogisticL2``."""
    methods = list(dict.fromkeys(m for by in runs.values() for m in by))
    rows = ["| problem | seed | start x, trial solver | " + " | ".join(methods) + " | reference F* |",
            "|---|---|---|" + "---|" * (len(methods) + 1)]
    for problem, by_method in runs.items():
        for i, seed in enumerate(seeds):
            first = by_method["optuna-tpe"][i]
            cells = [f"{first.val[1]:.4f} / {first.test[1]:.4f}" if len(first.val) > 1 else "-"]
            for method in methods:
                curves = by_method.get(method)
                cells.append("-" if curves is None else "{:.4f} / {:.4f}".format(*curves[i].at(budgets[problem])))
            reference = optimum.get(problem)
            cells.append(f"{reference[i]:.4f}" if reference else "-")
            rows.append(f"| {problem} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def reference_optima(raw: dict[str, Any]) -> dict[str, list[float]]:
    """F* = min_x f(x, w*(x)) of ``LogisticL2`` per seed (its float64 reference search, a few CPU s each), for the
    ijcnn1 runs in ``raw``; cached in ``raw["reference_optimum"]``."""
    if "ijcnn1" in raw["runs"] and "reference_optimum" not in raw:
        raw["reference_optimum"] = {"ijcnn1": [float(Ijcnn1().make(seed).reference_optimum()[1])
                                               for seed in raw["seeds"]]}
    return raw.get("reference_optimum", {})


def plot(problem: str, by_method: dict[str, list[Curve]], budget: float, path: Path,
         optimum: list[float] | None = None) -> None:
    """Validation (left) and test (right) loss of the model in hand against CPU seconds, every seed; the
    reference optimum F* per seed as thin grey lines where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hypergradient": "tab:blue", "optuna-tpe": "tab:orange", "optuna-tpe-sgd": "tab:green"}
    styles = ("-", "--", ":")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, curves in by_method.items():
        for seed, curve in enumerate(curves):
            for ax, values, refit in zip(axes, (curve.val, curve.test), (curve.refit_val, curve.refit_test),
                                         strict=True):
                # Held flat to the budget: the model in hand does not change after the last record.
                ax.step([*curve.times, budget], [*values, values[-1]], styles[seed % 3], where="post",
                        color=colors[method], linewidth=1.2, label=f"{method} seed {seed}")
                if method == "hypergradient":  # the final x with the lower level retrained by the trial solver
                    ax.plot([budget], [refit], "x", color=colors[method], markersize=8, clip_on=False,
                            label="hypergradient: final x, refit" if seed == 0 else None)
    for seed, value in enumerate(optimum or []):
        axes[0].axhline(value, color="gray", linestyle=styles[seed % 3], linewidth=0.8,
                        label="reference optimum F*" if seed == 0 else None)
    curves = [c for cs in by_method.values() for c in cs]
    for k, (ax, name) in enumerate(zip(axes, ("validation loss", "test loss"), strict=True)):
        values = [v for c in curves for v in (c.val, c.test)[k]] + [(c.refit_val, c.refit_test)[k] for c in curves]
        # Zoomed to where the methods differ: from below the best value to above the starting
        # hyperparameters' value (Optuna's first trial); the untrained model's loss is far above.
        starts = [(c.val, c.test)[k][1] for c in by_method["optuna-tpe"] if len(c.val) > 1]
        low = min(v for v in values if math.isfinite(v))
        finals = [(c.val, c.test)[k][-1] for c in curves]
        ax.set_ylim(0.9 * low, max(1.6 * max(starts), 1.2 * max(finals)) if starts else None)
        ax.set_yscale("log")
        ax.set_xlabel("CPU seconds (process_time, 1 thread)")
        ax.set_ylabel(name)
        ax.set_xlim(0, budget * 1.02)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"{problem}: validation loss of the model in hand")
    axes[1].set_title(f"{problem}: test loss of the same model")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _limit_threads() -> contextlib.AbstractContextManager:
    """One torch thread and one BLAS thread (numpy's, used by Optuna): CPU time then equals one core's work."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return contextlib.nullcontext()
    return threadpool_limits(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_BUDGET_S} CPU s per run, temp folder")
    parser.add_argument("--problems", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="CPU seconds per run (default: per problem)")
    parser.add_argument("--out-dir", default=None, help="default: experiments/results (a temp folder with --quick)")
    parser.add_argument("--report", action="store_true", help="rewrite the md and PNGs from the out dir's JSON only")
    args = parser.parse_args(argv)
    if args.report:  # no Optuna needed
        out = Path(args.out_dir) if args.out_dir else RESULTS
        write(out, json.loads((out / "hpo_vs_optuna.json").read_text()))
        return 0
    try:
        import optuna
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    out = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or ((0,) if args.quick else SEEDS)
    budgets = {p: args.budget or (QUICK_BUDGET_S if args.quick else BUDGET_S[p]) for p in args.problems}
    runs: dict[str, dict[str, list[Curve]]] = {}
    start_cpu = time.process_time()
    with _limit_threads():
        for problem in args.problems:
            runs[problem] = {}
            for method in METHODS[problem]:
                runs[problem][method] = []
                for seed in seeds:
                    curve = run(problem, method, seed, budgets[problem], args.quick)
                    runs[problem][method].append(curve)
                    print(f"{problem:7s} {method:15s} seed {seed}: {curve.iterations:4d} iterations, "
                          f"val {curve.val[0]:.4f} -> {curve.val[-1]:.4f}, test {curve.test[-1]:.4f}, "
                          f"refit val {curve.refit_val:.4f}", flush=True)
    command = "python -m experiments.hpo_vs_optuna " + " ".join(argv if argv is not None else sys.argv[1:])
    write(out, {"command": command.strip(), "budgets_cpu_s": budgets, "seeds": list(seeds),
                "total_cpu_s": time.process_time() - start_cpu, "optuna": optuna.__version__,
                "torch": torch.__version__, "python": platform.python_version(),
                "runs": {p: {m: [vars(c) for c in cs] for m, cs in by.items()} for p, by in runs.items()}})
    return 0


def write(out: Path, raw: dict[str, Any]) -> None:
    """hpo_vs_optuna.json (``raw``: every curve), hpo_vs_optuna_<problem>.png and hpo_vs_optuna.md into ``out``."""
    optimum = reference_optima(raw)
    (out / "hpo_vs_optuna.json").write_text(json.dumps(raw, separators=(",", ":")))
    runs = {p: {m: [Curve(**c) for c in cs] for m, cs in by.items()} for p, by in raw["runs"].items()}
    budgets = raw["budgets_cpu_s"]
    for problem, by_method in runs.items():
        plot(problem, by_method, budgets[problem], out / f"hpo_vs_optuna_{problem}.png", optimum.get(problem))
    text = report(runs, budgets, tuple(raw["seeds"]), raw["total_cpu_s"], raw["command"], raw["optuna"], optimum)
    (out / "hpo_vs_optuna.md").write_text(text + (ANALYSIS if set(runs) == set(WORKLOADS) else ""))
    print(f"wrote {out / 'hpo_vs_optuna.md'} (total CPU {raw['total_cpu_s']:.0f} s)")


def report(runs: dict[str, dict[str, list[Curve]]], budgets: dict[str, float], seeds: tuple[int, ...],
           total_cpu: float, command: str, optuna_version: str, optimum: dict[str, list[float]]) -> str:
    """The markdown report (the analysis paragraphs are written by hand below the generated part)."""
    engines = "\n".join(f"- `{p}`: {WORKLOADS[p]().title}; hypergradient engine `{WORKLOADS[p]().engine_label}`, "
                        f"budget {budgets[p]:g} CPU s per run" for p in runs)
    plots = "\n".join(f"![{p}](hpo_vs_optuna_{p}.png)" for p in runs)
    return f"""# Hypergradient HPO vs Optuna's TPE at the same CPU budget

Regenerate: `pip install -e ".[experiments]" && {command}` (Optuna {optuna_version}, torch {torch.__version__},
Python {platform.python_version()}; seeds {', '.join(map(str, seeds))}; the whole run took {total_cpu:.0f} CPU s).

{engines}

Methods. `hypergradient`: one engine run (a plain `engine.step` loop), x and the lower weights y trained
together, y warm-started; the model in hand is (x_t, y_t). `optuna-tpe`: Optuna's `TPESampler` (Bergstra et
al. 2011; Akiba et al. 2019) at its defaults, seeded, with the starting x enqueued as the first trial, in the
box x_j in [-12, 2] (ijcnn1) or decays in [1e-6, 1] (MLP); each trial retrains the lower level from the
problem's initial weights, by damped Newton to machine precision (ijcnn1, `LogisticL2.lower_to_solution`) or
200 full-batch L-BFGS iterations (MLP), and reports its validation loss; the model in hand is the best
trial's. `optuna-tpe-sgd` (MLP only): the same search with trials trained by the hypergradient run's own lower
optimizer (minibatch SGD, lr 0.3, batch 100) for 100 epochs.

Budget and clock: CPU seconds of the process (`time.process_time()`), torch and BLAS pinned to one
thread, so that other jobs on the shared 2-core machine do not distort it; the recording of the curves
runs with the clock stopped. "At budget" = the model in hand at the budget: for the hypergradient run
its current (x, y), for Optuna the best trial's model (the trial reported its validation loss). The
time-to-target column: CPU seconds until the validation loss is below start - {TARGET_FRACTION} (start - best),
start = the validation loss of the starting hyperparameters trained by the trial solver (Optuna's first,
enqueued trial), best = the lowest validation loss any method reached on that seed. "Refit": the final
hyperparameters with the lower level retrained from its initial weights by the trial solver (the same
as "at budget" for Optuna's full-batch runs): the quality of x apart from how well y was trained.

{table(runs, budgets)}

Per seed, validation / test loss at the budget (for ijcnn1 the validation loss includes the 1e-5/2 |x|^2
ridge of `LogisticL2`, so it is F(x) and comparable with the reference optimum F* of the problem's float64
search, `LogisticL2.reference_optimum()`):

{per_seed_table(runs, budgets, seeds, optimum)}

{plots}
"""


# The reading of the committed results (python -m experiments.hpo_vs_optuna): static text, checked against the
# table above when it was generated.
ANALYSIS = """

## Reading

**ijcnn1 (22 hyperparameters, a convex lower level solved exactly per trial).** The hypergradient run reaches
a lower validation objective than TPE on every seed (F at the budget 0.1762 / 0.1871 / 0.2114 against 0.1778 /
0.1896 / 0.2136), equal to the problem's reference optimum F* to four digits on seeds 1 and 2 (7e-4 above it
on seed 0), and gets to 90 % of the best improvement in 5.0-5.5 CPU s against 2.8, 18.1 and 12.0 s for TPE.
The test loss does not tell them apart (0.1724 / 0.1833 / 0.2000 against 0.1722 / 0.1833 / 0.2007): what
separates them, 1e-3 to 2.5e-3 in validation loss, is below what 10000 test examples resolve. TPE is close
because this objective is forgiving: the start (every x_j = -4, a strong penalty) is far from x*, and a random
point of the box, whose penalties are mostly weaker, already removes most of the gap (TPE's 10 random start-up
trials take about 1.3 CPU s); what remains is a slow, coordinated descent in 22 dimensions, which is where the
gradient wins. Both methods cost about the same per iteration (0.11 CPU s per outer step: 10 full-batch
gradient steps and 10 CG products over 50000 / 90000 examples; 0.13 s per trial: a damped Newton solve to
machine precision, the validation loss and TPE's sampling).

**MLP (3 hyperparameters, a nonconvex lower level).** Here Optuna with full-batch L-BFGS trials wins on the
model in hand: validation 0.021 +- 0.022 and test 0.094 +- 0.035 against 0.064 +- 0.049 and 0.135 +- 0.059 for
the hypergradient run. The difference is mostly the lower solver, not the search: the hypergradient run's
network is trained by warm-started minibatch SGD (about 10000 steps in 40 CPU s), which at any fixed x is far
from the L-BFGS solution (at the starting decays, 4000 SGD steps at lr 0.1 reach validation 0.136 on seed 0,
200 L-BFGS iterations 0.075). Retrained by L-BFGS at its final x ("refit"), the hypergradient's
hyperparameters give test 0.100 +- 0.031, near TPE's 0.094; against TPE whose trials use the same SGD (optuna-
tpe-sgd, 100 epochs each, 23 trials) the hypergradient run is better on validation (0.064 against 0.086) and
equal on test (0.135 against 0.137). With three hyperparameters the search itself is easy for TPE (70 trials);
the hypergradient's advantage, a cost independent of the number of hyperparameters, does not come into play.

**Both methods overfit the validation set on the MLP.** On seeds 1 and 2 both methods drive the decays from
1e-3 down to 2e-6 - 5e-5 (all but one layer of one run; TPE near the bottom of its box, 1e-6) and the
validation loss falls to 0.005-0.05 while the test loss does not improve on the starting decays 1e-3 (start,
L-BFGS: test 0.115 and 0.102; TPE 0.110 and 0.118; hypergradient refit 0.123 and 0.112). The validation set
has 300 examples: TPE picks the best of about 70 noisy trials, and the hypergradient run follows the
validation gradient for about 1000 outer steps while the weights train, so x acts as a schedule with many more
degrees of freedom than three numbers. Only seed 0 gains on test (0.067 at the start; 0.053 TPE, 0.064
hypergradient refit). A larger validation set, or early stopping of the outer loop on a second held-out set,
is what this needs; neither method is protected.

**Caveats.** `time.process_time()` is not immune to a loaded machine: with a load average of 3-9 on the 2
cores during these runs, the same work per outer step gave 867, 964 and 1105 MLP steps in 40 CPU s and 255-300
ijcnn1 steps in 30 CPU s, so CPU-second comparisons carry about +-10 %. The MLP engine's inner_lr (0.3) was
picked on seed 0 among three settings (a small advantage to the hypergradient side); TPE runs at Optuna's
defaults (independent per-parameter densities, 10 random start-up trials, no pruning) in a box we chose (x_j
in [-12, 2] for ijcnn1, decays in [1e-6, 1] for the MLP), with the start enqueued as its first trial.
"""


if __name__ == "__main__":
    sys.exit(main())
