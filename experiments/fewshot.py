"""Few-shot sinusoid regression and digits classification: MAML, FO-MAML, iMAML, ANIL next to higher and TorchOpt.

    python -m experiments.fewshot            # the full run: 3 seeds x 2 benchmarks x 6 methods (a few CPU-minutes)
    python -m experiments.fewshot --quick    # a smoke run: 1 seed, a few meta-steps, our methods only

Methods (issue 14, part 5):

* ours: ``MAML`` (Finn, Abbeel, Levine 2017), ``FOMAML`` (its first-order variant), ``IMAML``
  (Rajeswaran, Finn, Kakade, Levine 2019; CG on the implicit system) and ``ANIL`` (Raghu, Raghu,
  Bengio, Vinyals 2020; only the last layer adapts) from ``problems.fewshot``, stepped by
  ``bilevel.Tasks`` (one ``torch.func.vmap`` over the tasks of a batch, ``hypergrad.TaskBatchEngine``).
* peers (optional, the ``compare`` extra, in a separate environment): MAML written with ``higher``
  (Grefenstette et al. 2019; ``higher.innerloop_ctx``, a Python loop over the tasks) and with TorchOpt's
  ``MetaSGD`` (Ren et al. 2023; ``extract_state_dict`` / ``recover_state_dict`` around each task).
  Without them the script runs our rows only and names what is missing. The committed results were made
  with the peers in a separate environment, the main one unchanged::

      python3 -m venv /tmp/cmpvenv && /tmp/cmpvenv/bin/pip install torch==2.13.0
      /tmp/cmpvenv/bin/pip install -e ".[compare,experiments]"
      /tmp/cmpvenv/bin/python -m experiments.fewshot

Every method of a seed starts from the same network initialization, meta-trains for the same number
of meta-steps on the same task batches (one precomputed stream per seed), with the same inner SGD
steps and step size and the same meta-optimizer (Adam, same lr), and is meta-tested on the same
held-out tasks by the same function (``problems.fewshot.meta_test``: the same adaptation steps and
step size from the learned initialization; iMAML adapts on its own g, support loss + proximal term).
A float64 check first compares the meta-gradient of our MAML with higher's and TorchOpt's on one task
batch from one initialization.

Time per meta-step: the median over the meta-steps of ``time.process_time()`` (CPU time of this
process) with ``torch.set_num_threads(1)``: the machine's cores are shared with other jobs, so
wall-clock time would measure them too.

Writes experiments/results/fewshot.md, fewshot.json, fewshot_<benchmark>.png (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from problems.fewshot import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    DigitsTasks,
    FewShot,
    SinusoidTasks,
    meta_test,
    mlp,
    stack_tasks,
    task_loader,
)

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("MAML", "FOMAML", "iMAML", "ANIL")
PEERS = ("MAML (higher)", "MAML (TorchOpt)")
PEER_MODULES = {"MAML (higher)": "higher", "MAML (TorchOpt)": "torchopt"}
Batch = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]

# Per benchmark: the task family, the network, the inner loop (meta-training and meta-test alike).
BENCHMARKS: dict[str, dict[str, Any]] = {
    "sinusoid": {"title": "Sinusoid regression, 5-shot (Finn et al. 2017's MLP 1-40-40-1)",
                 "metric": "meta_test_loss", "metric_name": "meta-test MSE", "lower_is_better": True,
                 "loss": "mse", "widths": (1, 40, 40, 1), "inner_steps": 3, "inner_lr": 0.01,
                 "outer_lr": 0.01, "tasks_per_batch": 8, "test_tasks": 200, "lam": 1.0},
    "digits": {"title": "Digits 3-way 1-shot classification on held-out classes 6-9 (MLP 64-64-3)",
               "metric": "meta_test_accuracy", "metric_name": "meta-test accuracy", "lower_is_better": False,
               "loss": "cross_entropy", "widths": (64, 64, 3), "inner_steps": 3, "inner_lr": 0.4,
               "outer_lr": 0.001, "tasks_per_batch": 8, "test_tasks": 200, "lam": 1.0},
}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--methods", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs=2, default=[500, 300], metavar=("SINUSOID", "DIGITS"),
                   help="meta-steps per method and seed, for each benchmark")
    p.add_argument("--evals", type=int, default=10, help="meta-test evaluations along meta-training (for the plot)")
    p.add_argument("--quick", action="store_true", help="1 seed, few meta-steps, small test sets (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.evals = args.seeds[:1], [40, 20], 2
    return args


# -- tasks and networks --------------------------------------------------------------------------------------------


def task_sets(name: str, seed: int, steps: int, test_tasks: int, dtype: torch.dtype = torch.float32,
              ) -> tuple[list[Batch], Batch]:
    """The meta-training stream of a seed (``steps`` task batches, the same for every method) and the held-out
    meta-test tasks (the same for every seed and method)."""
    spec = BENCHMARKS[name]
    count = steps * spec["tasks_per_batch"]
    if name == "sinusoid":
        train = SinusoidTasks(n_tasks=count, shots=5, queries=10, seed=seed, dtype=dtype)
        test = SinusoidTasks(n_tasks=test_tasks, shots=5, queries=10, seed=10_000, dtype=dtype)
    else:
        train = DigitsTasks(n_tasks=count, ways=3, shots=1, queries=5, classes="train", seed=seed, dtype=dtype)
        test = DigitsTasks(n_tasks=test_tasks, ways=3, shots=1, queries=5, classes="test", seed=10_000, dtype=dtype)
    stream = [tuple(tuple(t) for t in b) for b in task_loader(train, spec["tasks_per_batch"], seed=seed)]
    return stream, stack_tasks([test[i] for i in range(len(test))])  # type: ignore[return-value]


def network(name: str, seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The benchmark's MLP, PyTorch's default initialization under ``seed`` (every method starts from it)."""
    return mlp(BENCHMARKS[name]["widths"], seed=seed, dtype=dtype)


def problem_for(method: str, net: nn.Sequential, spec: dict[str, Any], test: Batch) -> FewShot:
    """Our problem of ``method`` on a copy of ``net``; ANIL splits it into body (all but the last layer) and head."""
    net = copy.deepcopy(net)
    options = {"loss": spec["loss"], "test_tasks": test, "adapt_steps": spec["inner_steps"],
               "adapt_lr": spec["inner_lr"]}
    if method == "ANIL":
        return ANIL(net[:-1], net[-1], **options)
    if method == "iMAML":
        return IMAML(net, lam=spec["lam"], **options)
    return (FOMAML if method == "FOMAML" else MAML)(net, **options)


def engine_for(method: str, spec: dict[str, Any]) -> Any:
    common = {"inner_steps": spec["inner_steps"], "inner_lr": spec["inner_lr"], "outer_lr": spec["outer_lr"],
              "outer_optimizer": "adam"}
    return {"MAML": MAML, "FOMAML": FOMAML, "iMAML": IMAML, "ANIL": ANIL}[method].engine(**common)


def task_loss(spec: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    return F.mse_loss if spec["loss"] == "mse" else F.cross_entropy


# -- the peers: MAML as their documented examples write it ---------------------------------------------------------


def higher_step(net: nn.Module, meta_opt: torch.optim.Optimizer, batch: Batch, spec: dict[str, Any]) -> None:
    """One meta-step of MAML with higher (its MAML example): per task, ``innerloop_ctx`` over SGD, the inner
    steps as ``diffopt.step(loss)``, the query loss / T backpropagated into the initialization; then Adam."""
    higher = importlib.import_module("higher")
    loss = task_loss(spec)
    (s_in, s_out), (q_in, q_out) = batch
    inner_opt = torch.optim.SGD(net.parameters(), lr=spec["inner_lr"])
    meta_opt.zero_grad()
    count = s_in.shape[0]
    for i in range(count):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(spec["inner_steps"]):
                diffopt.step(loss(fnet(s_in[i]), s_out[i]))
            (loss(fnet(q_in[i]), q_out[i]) / count).backward()
    meta_opt.step()


def torchopt_step(net: nn.Module, meta_opt: torch.optim.Optimizer, batch: Batch, spec: dict[str, Any]) -> None:
    """One meta-step of MAML with TorchOpt (its MAML example): ``MetaSGD`` steps the module in place,
    differentiably; the query loss / T backpropagated; the initialization restored with ``recover_state_dict``."""
    torchopt = importlib.import_module("torchopt")
    loss = task_loss(spec)
    (s_in, s_out), (q_in, q_out) = batch
    inner_opt = torchopt.MetaSGD(net, lr=spec["inner_lr"])
    net_state = torchopt.extract_state_dict(net)
    opt_state = torchopt.extract_state_dict(inner_opt)
    meta_opt.zero_grad()
    count = s_in.shape[0]
    for i in range(count):
        for _ in range(spec["inner_steps"]):
            inner_opt.step(loss(net(s_in[i]), s_out[i]))
        (loss(net(q_in[i]), q_out[i]) / count).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    meta_opt.step()


PEER_STEPS = {"MAML (higher)": higher_step, "MAML (TorchOpt)": torchopt_step}


def available_peers() -> tuple[list[str], list[str]]:
    """(peers whose library imports, messages naming those that do not)."""
    ok, missing = [], []
    for method, module in PEER_MODULES.items():
        try:
            importlib.import_module(module)
            ok.append(method)
        except Exception as error:  # noqa: BLE001 -- any failure to import means: run without this peer
            missing.append(f"{method}: `import {module}` failed ({type(error).__name__}: {error})")
    return ok, missing


# -- meta-training ---------------------------------------------------------------------------------------------------


def evaluate(net: nn.Module, spec: dict[str, Any], test: Batch) -> dict[str, float]:
    """``meta_test`` of MAML from ``net`` as the initialization (how the peers' and the init's rows are scored)."""
    return meta_test(MAML(copy.deepcopy(net), loss=spec["loss"]), test, spec["inner_steps"], spec["inner_lr"])


def checkpoints(steps: int, evals: int) -> set[int]:
    return {round(steps * k / evals) for k in range(1, evals + 1)}


def train_ours(method: str, net: nn.Module, spec: dict[str, Any], stream: list[Batch], test: Batch,
               evals: int) -> dict[str, Any]:
    problem = problem_for(method, net, spec, test)
    engine = engine_for(method, spec)
    tasks = bilevel.Tasks(problem)
    state = tasks.init(engine, stream[0][0])
    times, curve = [], []
    marks = checkpoints(len(stream), evals)
    for step, batch in enumerate(stream, start=1):
        start = time.process_time()
        state, metrics = tasks.step(engine, state, batch)
        torch.utils._pytree.tree_map(lambda t: t.item() if isinstance(t, Tensor) and t.dim() == 0 else t,
                                     metrics)  # force the step's values, as a loop that logs them would
        times.append(time.process_time() - start)
        if step in marks:
            tasks.write_back(engine, state)
            curve.append((step, problem.evaluate()))
    return {"times": times, "curve": curve, "final": curve[-1][1]}


def train_peer(method: str, net: nn.Module, spec: dict[str, Any], stream: list[Batch], test: Batch,
               evals: int) -> dict[str, Any]:
    net = copy.deepcopy(net)
    meta_opt = torch.optim.Adam(net.parameters(), lr=spec["outer_lr"])
    step_fn = PEER_STEPS[method]
    times, curve = [], []
    marks = checkpoints(len(stream), evals)
    for step, batch in enumerate(stream, start=1):
        start = time.process_time()
        step_fn(net, meta_opt, batch, spec)
        times.append(time.process_time() - start)
        if step in marks:
            curve.append((step, evaluate(net, spec, test)))
    return {"times": times, "curve": curve, "final": curve[-1][1]}


# -- the meta-gradient check -----------------------------------------------------------------------------------------


def meta_gradient_agreement(name: str, peers: list[str], dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Relative difference (max over parameters of |a - b| / |b|) between the meta-gradient of our MAML and each
    peer's, on one task batch from one initialization (the peers' optimizer does not step)."""
    spec = BENCHMARKS[name]
    stream, _ = task_sets(name, seed=0, steps=1, test_tasks=1, dtype=dtype)
    batch = stream[0]
    net = network(name, seed=0, dtype=dtype)
    problem = problem_for("MAML", net, spec, batch)
    tasks = bilevel.Tasks(problem)
    grads = {}
    for method in ("MAML", "FOMAML"):  # FOMAML: a control that the check tells meta-gradients apart
        engine = engine_for(method, spec)
        fns, x, y = tasks.to_functions(batch)
        runner = tasks.engine_for(engine)
        state = runner.inner(fns, runner.init(fns, x, y, lower_batch=batch[0]), batch[0])
        _, grads[method], _ = runner.estimate(fns, state, batch)
    ours = grads["MAML"]
    result = {}
    for method in peers:
        peer_net = copy.deepcopy(net)

        class Frozen(torch.optim.Optimizer):  # keeps the accumulated .grad: the meta-gradient
            def __init__(self, params: Any) -> None:
                super().__init__(params, {})

            def step(self, closure: Any = None) -> None:
                return None

        PEER_STEPS[method](peer_net, Frozen(peer_net.parameters()), batch, spec)
        theirs = dict((k, p.grad) for k, p in peer_net.named_parameters())
        result[method] = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
        first = grads["FOMAML"]
        result[f"control: our FOMAML vs {method}"] = max(((first[k] - theirs[k]).norm() / theirs[k].norm()).item()
                                                        for k in theirs)
    return result


# -- the run -----------------------------------------------------------------------------------------------------------


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    peers, missing = available_peers()
    methods = [m for m in args.methods if m in OURS or m in peers]
    for line in missing:
        if any(m == line.split(":")[0] for m in args.methods):
            print(f"not run: {line}", flush=True)
    out: dict[str, Any] = {"settings": {"seeds": args.seeds, "steps": dict(zip(BENCHMARKS, args.steps, strict=True)),
                                        "evals": args.evals, "quick": args.quick, "threads": 1,
                                        "torch": torch.__version__, "methods": methods},
                           "missing": [line for line in missing if line.split(":")[0] in args.methods],
                           "benchmarks": {}}
    started = time.time()
    for name, steps in zip(BENCHMARKS, args.steps, strict=True):
        if name not in args.benchmarks:
            continue
        spec = BENCHMARKS[name]
        test_count = 40 if args.quick else spec["test_tasks"]
        agreement = {str(dtype).removeprefix("torch."): meta_gradient_agreement(
            name, [m for m in methods if m in PEERS], dtype) for dtype in (torch.float64, torch.float32)}
        for dtype, values in agreement.items():
            for method, value in values.items():
                label = method if method.startswith("control") else f"our MAML vs {method}"
                print(f"[{name}] meta-gradient, {dtype}, {label}: relative difference {value:.2e}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ["init", *methods]}
        for seed in args.seeds:
            stream, test = task_sets(name, seed, steps, test_count)
            net = network(name, seed)
            runs["init"].append({"final": evaluate(net, spec, test), "times": [], "curve": []})
            for method in methods:
                train = train_ours if method in OURS else train_peer
                result = train(method, net, spec, stream, test, args.evals)
                result["seed"] = seed
                runs[method].append(result)
                print(f"[{name}] seed {seed} {method:16s} {spec['metric_name']} {result['final'][spec['metric']]:.4f}"
                      f"  {1e3 * statistics.median(result['times']):.1f} ms/meta-step"
                      f"  ({time.time() - started:.0f} s)", flush=True)
        out["benchmarks"][name] = {"spec": {k: v for k, v in spec.items() if k != "widths"} | {
            "widths": list(spec["widths"]), "meta_steps": steps, "test_tasks": test_count},
            "agreement": agreement, "runs": runs}
    out["wall_seconds"] = time.time() - started
    return out


def report(out: dict[str, Any], argv: list[str]) -> str:
    settings = out["settings"]
    lines = [
        "# Few-shot learning: MAML, FO-MAML, iMAML, ANIL next to MAML in higher and TorchOpt",
        "",
        "Regenerate: `python -m experiments.fewshot" + (" " + " ".join(argv) if argv else "") + "` "
        "(the peers need the `compare` extra, installed in a separate environment; see the script's docstring).",
        "",
        "Methods: MAML (Finn, Abbeel, Levine 2017), first-order MAML (ibid.), iMAML (Rajeswaran, Finn, Kakade, "
        "Levine 2019; CG, 5 iterations, lam = 1), ANIL (Raghu, Raghu, Bengio, Vinyals 2020) from "
        "`problems.fewshot`, stepped by `bilevel.Tasks` (the tasks of a batch under one `torch.func.vmap`); "
        "MAML written with higher (Grefenstette et al. 2019; `higher.innerloop_ctx`, a loop over the tasks) and "
        "with TorchOpt's `MetaSGD` (Ren et al. 2023; `extract_state_dict` / `recover_state_dict`).",
        "",
        "Protocol: per seed, every method starts from the same initialization, meta-trains for the same number "
        "of meta-steps on the same task batches with the same inner SGD (steps, step size), the same "
        "meta-optimizer (Adam, same lr) and is meta-tested on the same held-out tasks by the same function "
        "(`problems.fewshot.meta_test`: the same adaptation steps and step size from the learned initialization; "
        "iMAML adapts on its own inner objective, support loss + lam/2 |y - x|^2). `init` is the untrained "
        "initialization adapted the same way. Mean +- std over seeds "
        f"{settings['seeds']}.",
        "",
        "Time per meta-step: median over the meta-steps of CPU time (`time.process_time()`), "
        "`torch.set_num_threads(1)`, float32. CPU time rather than wall-clock because the machine's 2 cores are "
        "shared with other jobs; it excludes the meta-test evaluations. torch " + settings["torch"] + ".",
        "",
    ]
    if out["missing"]:
        lines += ["Not run: " + "; ".join(out["missing"]), ""]
    for bench in out["benchmarks"].values():
        spec = bench["spec"]
        metric = spec["metric"]
        lines += [f"## {spec['title']}", "",
                  f"{bench['spec']['meta_steps']} meta-steps of {spec['tasks_per_batch']} tasks, {spec['inner_steps']} "
                  f"inner SGD steps of {spec['inner_lr']} (meta-training and meta-test), Adam lr {spec['outer_lr']}, "
                  f"{spec['test_tasks']} held-out tasks.", ""]
        if bench["agreement"]["float64"]:
            lines += ["Meta-gradient agreement with our MAML (one task batch, one initialization; max over parameters "
                      "of |a - b| / |b|, b the peer's; the control compares our first-order MAML, which must differ):",
                      ""]
            for dtype, values in bench["agreement"].items():
                lines.append(f"- {dtype}: " + ", ".join(f"{m}: {v:.1e}" for m, v in values.items()))
            lines.append("")
        lines += [f"| method | {spec['metric_name']} | loss before adaptation | CPU ms / meta-step (median) |",
                  "|---|---|---|---|"]
        for method, runs in bench["runs"].items():
            mean, std = summarize([r["final"][metric] for r in runs])
            before = summarize([r["final"]["meta_test_loss_unadapted"] for r in runs])
            ms = (f"{1e3 * statistics.median([statistics.median(r['times']) for r in runs]):.1f}"
                  if runs[0]["times"] else "-")
            lines.append(f"| {method} | {mean:.4f} +- {std:.4f} | {before[0]:.3f} +- {before[1]:.3f} | {ms} |")
        lines.append("")
    lines += [f"Wall-clock of the whole run: {out['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(out: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, bench in out["benchmarks"].items():
        spec = bench["spec"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, runs in bench["runs"].items():
            if method == "init":
                ax.axhline(statistics.fmean(r["final"][spec["metric"]] for r in runs), color="gray", ls=":",
                           label="init (adapted)")
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            values = [[r["curve"][j][1][spec["metric"]] for r in runs] for j in range(len(steps))]
            ax.plot(steps, [statistics.fmean(v) for v in values], marker="o", ms=3,
                    ls="--" if method in PEERS else "-", label=method)
        ax.set_xlabel("meta-steps")
        ax.set_ylabel(spec["metric_name"] + f" (mean over {len(out['settings']['seeds'])} seeds)")
        ax.set_title(spec["title"], fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"fewshot_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = arguments(argv)
    out = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fewshot.json").write_text(json.dumps(out, indent=1))
    (args.out / "fewshot.md").write_text(report(out, argv))
    if not args.no_plots:
        plot(out, args.out)
    print(f"wrote {args.out / 'fewshot.md'}")
    return out


if __name__ == "__main__":
    main()
