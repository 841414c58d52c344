"""Batches of tasks (issue 14): MAML, first-order MAML, iMAML and ANIL against hand-written references.

Every reference is a per-task Python loop with ``torch.autograd`` in float64, written from the papers
and sharing no code with the engines: MAML differentiates its inner SGD steps (create_graph), first-order
MAML detaches them, iMAML solves the IFT system with a dense Hessian (``torch.autograd.functional``),
ANIL adapts the head alone. The vmapped task batch (``hypergrad.TaskBatchEngine``) must also equal a
Python loop of the single-problem engine over the tasks; the one task stream must pair each step's
support and query sets where two shuffled streams would not; fit must learn and resume bit for bit.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

import bilevel
import hypergrad
from bilevel.data import TaskStream, as_task_reiterable
from hypergrad.checks import Inconsistent
from problems.fewshot import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    DigitsTasks,
    SinusoidTasks,
    digits_body,
    meta_test,
    mlp,
    stack_tasks,
    task_loader,
)

F64 = torch.float64
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
TOLERANCE = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:.*ignored by both lower_objective and upper_objective")


def relative(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max over leaves of |a - b| / |b|."""
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def sinusoid_batch(tasks: int = 4, shots: int = 5, queries: int = 6, seed: int = 3) -> tuple[Any, Any]:
    return stack_tasks([SinusoidTasks(n_tasks=tasks, shots=shots, queries=queries, seed=seed, dtype=F64)[i]
                        for i in range(tasks)])


def digits_batch(tasks: int = 3) -> tuple[Any, Any]:
    data = DigitsTasks(n_tasks=tasks, ways=3, shots=2, queries=3, seed=5, dtype=F64)
    return stack_tasks([data[i] for i in range(tasks)])


def hypergradient(problem: bilevel.BilevelProblem, engine: hypergrad.Engine, batches: tuple[Any, Any],
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(mean hypergradient, metrics, x after one outer step) of the vmapped task batch."""
    tasks = bilevel.Tasks(problem)
    fns, x, y = tasks.to_functions(batches)
    runner = tasks.engine_for(engine)
    state = runner.inner(fns, runner.init(fns, x, y, lower_batch=batches[0]), batches[0])
    state, hypergrad_, metrics = runner.estimate(fns, state, batches)
    return hypergrad_, metrics, runner.outer(fns, state, hypergrad_)["x"]


def sgd(outer_lr: float, **kw: Any) -> dict[str, Any]:
    return {"outer_lr": outer_lr, "outer_optimizer": "sgd", **kw}


# -- references: per-task loops with torch.autograd ----------------------------------------------------------------


def leaves(module: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone().requires_grad_(True) for k, p in module.named_parameters()}


def maml_reference(net: nn.Module, batches: tuple[Any, Any], steps: int, lr: float, first_order: bool,
                   ) -> dict[str, Tensor]:
    """Finn et al. 2017, Algorithm 2: mean over tasks of d L(query; y_T(x)) / dx, y_0 = x, SGD on the support."""
    (s_in, s_out), (q_in, q_out) = batches
    x = leaves(net)
    total = {k: torch.zeros_like(v) for k, v in x.items()}
    for i in range(s_in.shape[0]):
        y = dict(x)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(net, y, (s_in[i],)), s_out[i])
            grads = torch.autograd.grad(loss, list(y.values()), create_graph=not first_order)
            y = {k: v - lr * (g.detach() if first_order else g) for (k, v), g in zip(y.items(), grads, strict=True)}
        query = F.mse_loss(functional_call(net, y, (q_in[i],)), q_out[i])
        # First order: the gradient at y_T taken for dF/dx (dy_T/dx = I).
        grads = torch.autograd.grad(query, list(y.values()) if first_order else list(x.values()))
        for k, g in zip(x, grads, strict=True):
            total[k] += g / s_in.shape[0]
    return total


def imaml_reference(net: nn.Module, lam: float, batches: tuple[Any, Any], steps: int, lr: float,
                    ) -> dict[str, Tensor]:
    """Rajeswaran et al. 2019: y_T by gradient descent on L(S; y) + lam/2 |y - x|^2 from x, then the IFT with
    the dense Hessian: dF/dx = -d_x <grad_y g(x, y_T), v>, H v = grad_y L(Q; y_T) (checked to be lam v)."""
    (s_in, s_out), (q_in, q_out) = batches
    x = leaves(net)
    names = list(x)
    shapes = [x[k].shape for k in names]
    sizes = [x[k].numel() for k in names]

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        return {k: p.reshape(s) for k, p, s in zip(names, flat.split(sizes), shapes, strict=True)}

    xd = {k: v.detach() for k, v in x.items()}
    total = {k: torch.zeros_like(v) for k, v in x.items()}
    for i in range(s_in.shape[0]):
        def g(x: dict[str, Tensor], y: dict[str, Tensor], i: int = i) -> Tensor:
            proximal = sum((y[k] - x[k]).square().sum() for k in names)
            return F.mse_loss(functional_call(net, y, (s_in[i],)), s_out[i]) + 0.5 * lam * proximal

        y = {k: v.detach().clone() for k, v in x.items()}
        for _ in range(steps):
            yr = {k: v.requires_grad_(True) for k, v in y.items()}
            grads = torch.autograd.grad(g(x, yr), list(yr.values()))
            y = {k: (yr[k] - lr * gr).detach() for k, gr in zip(names, grads, strict=True)}
        flat_y = torch.cat([y[k].reshape(-1) for k in names])
        hessian = torch.autograd.functional.hessian(lambda f: g(xd, unflat(f)), flat_y)
        yq = flat_y.clone().requires_grad_(True)
        (b,) = torch.autograd.grad(F.mse_loss(functional_call(net, unflat(yq), (q_in[i],)), q_out[i]), yq)
        v = torch.linalg.solve(hessian, b)
        yr = {k: t.clone().requires_grad_(True) for k, t in unflat(flat_y).items()}
        gy = torch.autograd.grad(g(x, yr), list(yr.values()), create_graph=True)
        vt = unflat(v)
        jv = torch.autograd.grad(sum((a * vt[k]).sum() for a, k in zip(gy, names, strict=True)), list(x.values()))
        for k, j in zip(names, jv, strict=True):
            torch.testing.assert_close(-j, lam * vt[k], rtol=1e-12, atol=1e-14)  # the iMAML formula
            total[k] += -j / s_in.shape[0]
    return total


def anil_reference(body: nn.Module, head: nn.Module, batches: tuple[Any, Any], steps: int, lr: float,
                   ) -> dict[str, Tensor]:
    """Raghu et al. 2020: only the head adapts (SGD, differentiated), dF/dx for the body and the head's init."""
    (s_in, s_out), (q_in, q_out) = batches
    xb, xh = leaves(body), leaves(head)
    total = {**{f"body.{k}": torch.zeros_like(v) for k, v in xb.items()},
             **{f"head.{k}": torch.zeros_like(v) for k, v in xh.items()}}
    for i in range(s_in.shape[0]):
        y = dict(xh)
        features = functional_call(body, xb, (s_in[i],))
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(head, y, (features,)), s_out[i])
            grads = torch.autograd.grad(loss, list(y.values()), create_graph=True)
            y = {k: v - lr * g for (k, v), g in zip(y.items(), grads, strict=True)}
        query = F.cross_entropy(functional_call(head, y, (functional_call(body, xb, (q_in[i],)),)), q_out[i])
        grads = torch.autograd.grad(query, [*xb.values(), *xh.values()])
        for k, g in zip(total, grads, strict=True):
            total[k] += g / s_in.shape[0]
    return total


# -- MAML, first-order MAML, iMAML, ANIL against the references ----------------------------------------------------


@pytest.mark.parametrize("problem_cls", [MAML, FOMAML], ids=["MAML", "FOMAML"])
def test_maml_and_first_order_maml_equal_the_per_task_autograd_loop(problem_cls: type[MAML]) -> None:
    batches = sinusoid_batch()
    problem = problem_cls(mlp((1, 8, 8, 1), seed=0, dtype=F64))
    engine = problem_cls.engine(inner_steps=3, inner_lr=0.1, outer_lr=0.05, outer_optimizer="sgd")
    assert engine.first_order is problem_cls.first_order
    got, metrics, x_next = hypergradient(problem, engine, batches)
    want = maml_reference(problem.upper, batches, 3, 0.1, first_order=problem_cls.first_order)
    assert relative(got, want) < TOLERANCE
    # One full outer step (SGD): x - lr * the reference's hypergradient.
    x0 = dict(problem.upper.named_parameters())
    assert relative(x_next, {k: x0[k].detach() - 0.05 * want[k] for k in want}) < TOLERANCE
    assert set(metrics) >= {"upper_objective", "lower_objective", "hypergradient_norm"}
    assert all(v.dim() == 0 for v in metrics.values())


def test_first_order_maml_differs_from_maml() -> None:
    batches = sinusoid_batch()
    net = mlp((1, 8, 8, 1), seed=0, dtype=F64)
    full, _, _ = hypergradient(MAML(net), MAML.engine(inner_steps=3, inner_lr=0.1), batches)
    first, _, _ = hypergradient(FOMAML(net), FOMAML.engine(inner_steps=3, inner_lr=0.1), batches)
    assert relative(first, full) > 1e-3  # the second-order terms are not negligible here


# lam = 10 keeps g strongly convex on these tasks (at lam = 2 CG met negative curvature, and gradient descent at
# step 0.1-0.2 was at the edge of stability, amplifying rounding to 1e-9 between two exact implementations).
@pytest.mark.parametrize("engine", [hypergrad.Exact(**sgd(0.05, inner_steps=30, inner_lr=0.03)),
                                    hypergrad.CG(**sgd(0.05, inner_steps=30, inner_lr=0.03, iters=60, tol=1e-14))],
                         ids=["Exact", "CG"])
def test_imaml_equals_the_dense_ift_reference(engine: hypergrad.Engine) -> None:
    batches = sinusoid_batch()
    problem = IMAML(mlp((1, 8, 8, 1), seed=1, dtype=F64), lam=10.0)
    got, metrics, x_next = hypergradient(problem, engine, batches)
    want = imaml_reference(problem.upper, 10.0, batches, steps=30, lr=0.03)
    assert relative(got, want) < TOLERANCE
    x0 = dict(problem.upper.named_parameters())
    assert relative(x_next, {k: x0[k].detach() - 0.05 * want[k] for k in want}) < TOLERANCE
    assert metrics["solve_residual"] < 1e-10


def test_anil_on_digits_tasks_equals_the_head_only_reference() -> None:
    batches = digits_batch()
    body, head = digits_body(hidden=8, seed=2, dtype=F64), nn.Linear(8, 3, dtype=F64)
    problem = ANIL(body, head, loss="cross_entropy")
    engine = ANIL.engine(inner_steps=3, inner_lr=0.5, outer_lr=0.05, outer_optimizer="sgd")
    got, _, x_next = hypergradient(problem, engine, batches)
    want = anil_reference(problem.upper["body"], problem.upper["head"], batches, 3, 0.5)
    assert relative(got, want) < TOLERANCE
    x0 = dict(problem.upper.named_parameters())
    assert relative(x_next, {k: x0[k].detach() - 0.05 * want[k] for k in want}) < TOLERANCE


class MetaSGD(bilevel.BilevelProblem):
    """Lower dynamics with a restart: x = (init w0, log step size); y_0 = w0; y <- y - exp(log_lr) grad (Li et al.
    2017's Meta-SGD with one step size), on least squares; Unrolled differentiates through the steps and y_0."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.upper = bilevel.Hyper(w0=torch.randn(3, generator=gen, dtype=F64),
                                   log_lr=torch.tensor(-1.5, dtype=F64))
        self.lower = bilevel.Hyper(w=torch.zeros(3, dtype=F64))

    def loss(self, batch: Any) -> Tensor:
        inputs, targets = batch
        return (inputs @ self.lower.w - targets).square().mean()

    lower_objective = upper_objective = loss

    def lower_start(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"w": x["w0"]}

    def lower_step(self, x: dict[str, Tensor], y: dict[str, Tensor], grad: dict[str, Tensor],
                   state: dict[str, Tensor], t: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return {"w": y["w"] - x["log_lr"].exp() * grad["w"]}, {"steps": state["steps"] + 1}

    def init_lower_state(self, y: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"steps": torch.zeros((), dtype=F64)}


def test_restarted_lower_dynamics_equal_the_per_task_loop() -> None:
    gen = torch.Generator().manual_seed(6)
    batches = tuple((torch.randn(4, 5, 3, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen, dtype=F64))
                    for _ in range(2))
    got, _, _ = hypergradient(MetaSGD(), hypergrad.Unrolled(inner_steps=3), batches)
    (s_in, s_out), (q_in, q_out) = batches
    x = leaves(MetaSGD().upper)
    want = {k: torch.zeros_like(v) for k, v in x.items()}
    for i in range(4):
        w = x["w0"]
        for _ in range(3):
            (g,) = torch.autograd.grad((s_in[i] @ w - s_out[i]).square().mean(), w, create_graph=True)
            w = w - x["log_lr"].exp() * g
        grads = torch.autograd.grad((q_in[i] @ w - q_out[i]).square().mean(), [x["w0"], x["log_lr"]])
        for k, g in zip(("w0", "log_lr"), grads, strict=True):
            want[k] += g / 4
    assert relative(got, want) < TOLERANCE


# -- the vmapped task batch against a Python loop over the tasks ---------------------------------------------------


CASES = {
    "MAML": (lambda: MAML(mlp((1, 8, 8, 1), seed=0, dtype=F64)), lambda: MAML.engine(inner_steps=3, inner_lr=0.1),
             sinusoid_batch),
    "FOMAML": (lambda: FOMAML(mlp((1, 8, 8, 1), seed=0, dtype=F64)),
               lambda: FOMAML.engine(inner_steps=3, inner_lr=0.1), sinusoid_batch),
    "iMAML": (lambda: IMAML(mlp((1, 8, 8, 1), seed=1, dtype=F64), lam=10.0),
              lambda: IMAML.engine(inner_steps=10, inner_lr=0.03, iters=5), sinusoid_batch),
    "ANIL": (lambda: ANIL(digits_body(hidden=8, seed=2, dtype=F64), nn.Linear(8, 3, dtype=F64),
                          loss="cross_entropy"), lambda: ANIL.engine(inner_steps=3, inner_lr=0.5), digits_batch),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vmapped_task_batch_equals_a_python_loop_over_the_tasks(case: str) -> None:
    make_problem, make_engine, make_batches = CASES[case]
    batches = make_batches()
    problem, engine = make_problem(), make_engine()
    tasks = bilevel.Tasks(problem)
    fns, x, y = tasks.to_functions(batches)
    runner = tasks.engine_for(engine)
    state = runner.init(fns, x, y, lower_batch=batches[0])
    for _ in range(2):  # two outer steps: the second starts from the first's x and outer state
        before = state
        state = runner.inner(fns, state, batches[0])
        state, got, metrics = runner.estimate(fns, state, batches)
        state = runner.outer(fns, state, got)
        # The loop: the single-problem engine on each task, from the task engine's x and outer state.
        count = batches[0][0].shape[0]
        grads, values = [], []
        for i in range(count):
            task = tuple(tuple(t[i] for t in part) for part in batches)
            one = {**engine.init(fns, before["x"], y), "outer": before["outer"], "step": before["step"]}
            one = engine.inner(fns, one, task[0])
            _, g, m = engine.estimate(fns, one, task)
            grads.append(g)
            values.append(m)
        want = {k: sum(g[k] for g in grads) / count for k in got}
        assert relative(got, want) < 1e-12
        for name, value in metrics.items():
            torch.testing.assert_close(value, sum(m[name] for m in values) / count, rtol=1e-12, atol=1e-14)
        stepped = engine.outer(fns, {**engine.init(fns, before["x"], y), "outer": before["outer"],
                                     "step": before["step"]}, want)
        assert relative(state["x"], stepped["x"]) < 1e-12
    # Between steps the state holds x, the outer state, the step and y = lower_start(x) (no task dimension).
    assert set(state) == {"x", "y", "outer", "step"}
    assert relative(state["y"], fns.lower_start(state["x"])) == 0  # type: ignore[misc]


class FixedHeads(bilevel.BilevelProblem):
    """Warm-started tasks: per-task ridge heads w_i (lower) on shared features scaled by exp(x) (upper)."""

    def __init__(self) -> None:
        super().__init__()
        self.upper = bilevel.Hyper(log_scale=torch.zeros(4, dtype=F64))
        self.lower = bilevel.Hyper(w=torch.zeros(4, dtype=F64))

    def fit_loss(self, batch: Any) -> Tensor:
        inputs, targets = batch
        return (inputs @ (self.upper.log_scale.exp() * self.lower.w) - targets).square().mean()

    def lower_objective(self, batch: Any) -> Tensor:
        return self.fit_loss(batch) + 0.1 * self.lower.w.square().sum()

    upper_objective = fit_loss


def test_warm_started_tasks_keep_their_own_lower_variables_like_a_loop() -> None:
    gen = torch.Generator().manual_seed(7)
    batches = tuple((torch.randn(3, 6, 4, generator=gen, dtype=F64), torch.randn(3, 6, generator=gen, dtype=F64))
                    for _ in range(2))
    engine = hypergrad.CG(inner_steps=2, inner_lr=0.1, iters=3, outer_lr=0.1)
    tasks = bilevel.Tasks(FixedHeads())
    state = tasks.init(engine, batches[0])
    assert state["y"]["w"].shape == (3, 4) and state["v"]["w"].shape == (3, 4)
    fns, x, y = FixedHeads().to_functions()
    singles = [engine.init(fns, x, y) for _ in range(3)]
    for _ in range(3):
        state, metrics = tasks.step(engine, state, batches)
        grads = []
        for i, single in enumerate(singles):
            task = tuple(tuple(t[i] for t in part) for part in batches)
            single = engine.inner(fns, single, task[0])
            singles[i], g, _ = engine.estimate(fns, single, task)
            grads.append(g)
        mean = {k: sum(g[k] for g in grads) / 3 for k in grads[0]}
        shared = engine.outer(fns, singles[0], mean)
        singles = [{**s, "x": shared["x"], "outer": shared["outer"], "step": shared["step"]} for s in singles]
        assert relative(state["x"], shared["x"]) < 1e-12
        for i, single in enumerate(singles):
            assert relative({"w": state["y"]["w"][i]}, single["y"]) < 1e-12


# -- one stream: support and query of a step are the same tasks ----------------------------------------------------


class Tagged(Dataset):
    """Task i's support and query inputs are filled with i, so a batch shows which tasks it holds."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        tag = torch.full((3, 1), float(i), dtype=F64)
        return (tag, torch.sin(tag)), (tag.clone(), torch.sin(tag))


def test_one_task_stream_keeps_support_and_query_aligned_where_two_streams_do_not() -> None:
    def loader(seed: int) -> DataLoader:
        return DataLoader(Tagged(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))

    # Two streams, one per level, each shuffled by its own generator: the supports and queries of a step
    # come from different tasks.
    support_ids = [item[0][0][:, 0, 0] for item in loader(1)]
    query_ids = [item[1][0][:, 0, 0] for item in loader(2)]
    assert any(not torch.equal(s, q) for s, q in zip(support_ids, query_ids, strict=True))
    # One stream: both halves of every step come from one item, over several epochs.
    stream = TaskStream(as_task_reiterable(loader(1)))
    steps = 0
    for _ in range(3):
        for batch in stream:
            assert torch.equal(batch["lower"][0][:, 0, 0], batch["upper"][0][:, 0, 0])
            steps += 1
    assert steps == 9
    with pytest.raises(TypeError, match=r"pair \(support, query\)"):
        next(iter(TaskStream(as_task_reiterable([(torch.zeros(2, 1),)]))))


class Record(Callback):
    """The task ids of the support and query batches of every step."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.pairs.append((batch["lower"][0][:, 0, 0].clone(), batch["upper"][0][:, 0, 0].clone()))


def test_fit_on_a_shuffled_task_loader_trains_each_step_on_matching_support_and_query() -> None:
    record = Record()
    problem = FOMAML(mlp((1, 4, 1), seed=0, dtype=F64))
    loader = DataLoader(Tagged(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    bilevel.fit(problem, FOMAML.engine(inner_steps=1), tasks=loader, max_steps=5, callbacks=[record],
                enable_checkpointing=False, **QUIET)
    assert len(record.pairs) == 5
    assert all(torch.equal(s, q) for s, q in record.pairs)


# -- bilevel.fit over task batches -------------------------------------------------------------------------------


def test_fit_maml_on_sinusoid_tasks_reduces_the_meta_test_loss() -> None:
    test_tasks = stack_tasks([SinusoidTasks(n_tasks=32, seed=99, dtype=F64)[i] for i in range(32)])
    problem = MAML(mlp((1, 40, 40, 1), seed=0, dtype=F64), test_tasks=test_tasks, adapt_steps=3, adapt_lr=0.01)
    before = problem.evaluate()
    loader = task_loader(SinusoidTasks(n_tasks=400, seed=0, dtype=F64), tasks_per_batch=8)
    trainer = bilevel.fit(problem, MAML.engine(inner_steps=3, inner_lr=0.01, outer_lr=0.01), tasks=loader,
                          max_steps=60, enable_checkpointing=False, **QUIET)
    after = problem.evaluate()
    # Measured: 4.49 -> 2.42 on the held-out tasks after 3 adaptation steps; 2.4 s on one CPU thread.
    assert after["meta_test_loss"] < 0.7 * before["meta_test_loss"]
    # What the few adaptation steps gain grew: the initialization was learned for adapting, not only fitting.
    gain = {name: run["meta_test_loss_unadapted"] - run["meta_test_loss"]
            for name, run in (("before", before), ("after", after))}
    assert gain["after"] > 2 * gain["before"]
    assert trainer.lightning_module.final_metrics["meta_test_loss"] == pytest.approx(after["meta_test_loss"])
    # What fit writes back: x into upper and y = lower_start(x) = x into lower (the meta-learned initialization).
    for (_, u), (_, w) in zip(problem.upper.named_parameters(), problem.lower.named_parameters(), strict=True):
        assert torch.equal(u, w)


def test_meta_test_reports_accuracy_for_classification() -> None:
    problem = ANIL(digits_body(hidden=8, seed=2, dtype=F64), nn.Linear(8, 3, dtype=F64), loss="cross_entropy")
    result = meta_test(problem, digits_batch(4), steps=2, lr=0.5)
    assert set(result) == {"meta_test_loss", "meta_test_loss_unadapted", "meta_test_accuracy"}
    assert 0 <= result["meta_test_accuracy"] <= 1


def test_fit_refuses_mixed_data_forms_and_tasks_without_a_stream() -> None:
    problem = MAML(mlp((1, 4, 1), seed=0, dtype=F64))
    batch = sinusoid_batch()
    with pytest.raises(ValueError, match="tasks .* or lower_data and upper_data, not both"):
        bilevel.fit(problem, MAML.engine(), batch[0], batch[1], tasks=[batch], max_steps=1, **QUIET)
    with pytest.raises(ValueError, match=r"tasks=loader"):
        bilevel.fit(bilevel.Tasks(problem), MAML.engine(), max_steps=1, **QUIET)


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [hypergrad.F2SA(), hypergrad.Penalty(), hypergrad.BOREP(), hypergrad.LVHBA(),
                                    hypergrad.PES()], ids=lambda e: type(e).__name__)
def test_engines_that_cannot_restart_the_lower_level_refuse_naming_those_that_can(engine: hypergrad.Engine) -> None:
    fns, x, y = MAML(mlp((1, 4, 1), seed=0, dtype=F64)).to_functions()
    name = type(engine).__name__
    with pytest.raises(ValueError, match=rf"MAML defines lower_start .*, but {name} cannot honour a lower level "
                                         r"restarted from a function of x; engines that can: ") as refused:
        engine.init(fns, x, y)
    able = str(refused.value).split("engines that can: ")[1].split(". Remove")[0].split(", ")
    # Subclasses other tests define may join the list; the library's own are these four.
    assert {"CG", "Exact", "Neumann", "Unrolled"} <= set(able) and name not in able


def test_fit_refuses_an_engine_that_cannot_restart_before_any_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="F2SA cannot honour a lower level restarted"):
        bilevel.fit(MAML(mlp((1, 4, 1), seed=0, dtype=F64)), hypergrad.F2SA(), tasks=[sinusoid_batch()],
                    max_steps=2, default_root_dir=tmp_path, **QUIET)


def test_unrolled_options_that_contradict_a_restart_are_refused() -> None:
    fns, x, y = MAML(mlp((1, 4, 1), seed=0, dtype=F64)).to_functions()
    with pytest.raises(ValueError, match="restarts the lower level at every outer step.*drop horizon"):
        hypergrad.Unrolled(horizon=20).init(fns, x, y)
    with pytest.raises(Inconsistent, match="first_order=True differentiates no inner step"):
        hypergrad.Unrolled(first_order=True, truncate=2)
    plain, px, py = FixedHeads().to_functions()
    with pytest.raises(ValueError, match=r"first_order=True.*FixedHeads defines no lower_start"):
        hypergrad.Unrolled(first_order=True).init(plain, px, py)


def test_a_lower_start_of_the_wrong_shape_is_refused_naming_the_entry() -> None:
    class Wrong(MAML):
        def lower_start(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
            return {**x, "0.weight": x["0.weight"].T}

    fns, x, y = Wrong(mlp((1, 4, 1), seed=0, dtype=F64)).to_functions()
    with pytest.raises(ValueError, match=r"Wrong.lower_start\(x\)\['0.weight'\] must have the shape \(4, 1\)"):
        hypergrad.CG().init(fns, x, y)


def test_task_engine_refuses_an_engine_whose_outer_step_reads_y() -> None:
    with pytest.raises(ValueError, match="LVHBA overrides the outer step"):
        hypergrad.TaskBatchEngine(hypergrad.LVHBA())


def test_task_batches_must_share_one_task_dimension() -> None:
    support, query = sinusoid_batch(tasks=4)
    short = tuple(t[:3] for t in query)
    with pytest.raises(ValueError, match="support batch has 4 tasks and the query batch 3"):
        bilevel.Tasks(MAML(mlp((1, 4, 1), seed=0, dtype=F64))).to_functions((support, short))


# -- resume --------------------------------------------------------------------------------------------------------


class _Died(Exception):
    pass


class _Die(Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.after:
            raise _Died


def _run(root: Path, steps: int, **kwargs: Any) -> tuple[MAML, Any]:
    problem = MAML(mlp((1, 6, 1), seed=0, dtype=F64))
    loader = task_loader(SinusoidTasks(n_tasks=20, shots=4, queries=4, seed=0, dtype=F64), tasks_per_batch=4)
    trainer = bilevel.fit(problem, MAML.engine(inner_steps=2, inner_lr=0.05, outer_lr=0.01), tasks=loader,
                          max_steps=steps, default_root_dir=root, checkpoint_every=1, **QUIET, **kwargs)
    return problem, trainer


def test_resume_of_a_task_run_is_bit_exact(tmp_path: Path) -> None:
    steps = 8  # 1.6 passes over the 5 task batches: the resume lands mid-pass and crosses a pass boundary
    full, full_trainer = _run(tmp_path / "full", steps)
    with pytest.raises(_Died):
        _run(tmp_path / "part", steps, callbacks=[_Die(3)])
    (ckpt,) = glob.glob(str(tmp_path / "part" / "**" / "*.ckpt"), recursive=True)
    resumed, resumed_trainer = _run(tmp_path / "part", steps, ckpt_path=ckpt)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state_a, state_b = full_trainer.lightning_module.state, resumed_trainer.lightning_module.state
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        flat_a = torch.utils._pytree.tree_leaves(state_a[key])
        flat_b = torch.utils._pytree.tree_leaves(state_b[key])
        assert all(torch.equal(u, v) for u, v in zip(flat_a, flat_b, strict=True)), key


# -- the README's section runs as written ----------------------------------------------------------------------------


def _readme_blocks() -> list[str]:
    """The indented code blocks of the README's "Meta-learning over tasks" section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Meta-learning over tasks", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_readme_meta_learning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example, custom = _readme_blocks()
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ into the working directory
    # The same code, sized for a test: 3 steps of 4 tasks, 8 held-out tasks.
    small = example.replace("max_steps=1000", "max_steps=3, enable_progress_bar=False").replace(
        "tasks_per_batch=25", "tasks_per_batch=4").replace("range(100)", "range(8)")
    assert small != example
    namespace: dict[str, Any] = {}
    exec(compile(small, "README.md", "exec"), namespace)
    assert set(namespace["problem"].evaluate()) == {"meta_test_loss", "meta_test_loss_unadapted"}
    # The hand-written MAML of the README is problems.fewshot.MAML.
    import copy

    exec(compile(custom, "README.md", "exec"), scope := {"bilevel": bilevel, "copy": copy, "F": F})
    net = mlp((1, 8, 1), seed=0, dtype=F64)
    batches, engine = sinusoid_batch(), MAML.engine(inner_steps=2, inner_lr=0.1)
    theirs, _, _ = hypergradient(scope["MyMAML"](copy.deepcopy(net)), engine, batches)
    ours, _, _ = hypergradient(MAML(net), engine, batches)
    assert relative(theirs, ours) == 0


def test_the_maml_config_runs_from_the_command_line(tmp_path, capsys):
    """A problem with ``task_data()`` is run as a batch of tasks by ``bilevel fit`` (no tasks= argument there)."""
    from bilevel.cli import main

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "maml_sinusoid.yaml"
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--model.problem.init_args.test_tasks", "10"])
    out = capsys.readouterr().out
    assert "Tasks of SinusoidMAML: final metrics" in out and "meta_test_loss" in out
    assert next(tmp_path.rglob("*.ckpt")).is_file()
