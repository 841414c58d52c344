"""Data parallelism in the engines (issue 11, ALGORITHMS.md section 10): R ranks equal one process.

Two CPU ranks (gloo, a file store) each run ``engine.init`` and ``STEPS`` outer steps on their half of
every batch, in float64; the reference is one process, with no process group, fed at each step the
union of the two halves. The problem is data-dependent at both levels (ridge regression with
per-feature penalties exp(x), a bias, a mean-over-batch affine constraint for LV-HBA, momentum lower
dynamics for Unrolled, a metric of the problem's own), and every objective is a mean over its batch,
so the mean over ranks of a rank's quantity is the union's. Asserted per engine: every tensor of the
final state and of every step's metrics equals the reference to 1e-10 relative, and the two ranks'
are bit-identical. The ranks also count their all-reduces (``hypergrad.distributed.counting``), try a
compiled CG step (backend "aot_eager") for graph breaks, and step a population of two problems.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hypergrad
from hypergrad import Functions, distributed
from hypergrad.compile import graph_breaks

STEPS = 3
DIM, SHARD = 4, 6  # features; examples per rank and batch
RANKS = 2


# -- the problem: pure functions of trees, means over the batch -------------------------------------------

def _mse(y: dict, batch: tuple) -> torch.Tensor:
    features, target = batch
    return 0.5 * torch.mean((torch.tanh(features @ y["w"]) + y["c"] - target) ** 2)


def functions(constraints: bool = False, lower_dynamics: bool = False) -> Functions:
    """x = {"a": (DIM,), "s": ()}, y = {"w": (DIM,), "c": ()}; g and f are means over their batches."""
    def g(x: dict, y: dict, batch: tuple) -> torch.Tensor:
        return _mse(y, batch) + 0.5 * torch.sum(torch.exp(x["a"]) * y["w"] ** 2) + 0.5 * torch.exp(x["s"]) * y["c"] ** 2

    def f(x: dict, y: dict, batch: tuple) -> torch.Tensor:
        return _mse(y, batch) + 0.01 * torch.sum(x["a"] ** 2)

    def c(x: dict, y: dict, batch: tuple) -> torch.Tensor:
        # Affine in (x, y); the first entry is a mean over the lower batch (its features' mean).
        mean_features = batch[0].mean(0)
        return torch.stack([mean_features @ y["w"] + 0.1 * x["a"].sum() - 0.2, y["c"] - 0.5 * x["s"] - 0.3])

    def lower_step(x: dict, y: dict, grad_y: dict, lower: dict, t: torch.Tensor) -> tuple[dict, dict]:
        m = {k: 0.5 * lower[k] + grad_y[k] for k in y}  # heavy ball: the lower state is the momentum
        return {k: y[k] - 0.2 * m[k] for k in y}, m

    def upper_metrics(x: dict, y: dict, batch: tuple) -> dict[str, torch.Tensor]:
        return {"val_abs": torch.mean(torch.abs(batch[0] @ y["w"] + y["c"] - batch[1]))}

    extra: dict[str, Any] = {}
    if constraints:
        extra["c"] = c
    if lower_dynamics:
        extra.update(lower_step=lower_step, init_lower_state=lambda y: {k: torch.zeros_like(v) for k, v in y.items()},
                     upper_metrics=upper_metrics)
    return Functions(f=f, g=g, name="ShardedRidge", **extra)


def engines() -> dict[str, tuple[hypergrad.Engine, dict]]:
    """name -> (engine, options of ``functions``): every engine, small and fast."""
    return {
        "Exact": (hypergrad.Exact(inner_steps=3, inner_lr=0.3, outer_lr=0.05), {}),
        "Neumann": (hypergrad.Neumann(terms=3, inner_steps=3, inner_lr=0.3, outer_lr=0.05), {}),
        "CG": (hypergrad.CG(iters=3, inner_steps=3, inner_lr=0.3, outer_lr=0.05), {}),
        "Unrolled": (hypergrad.Unrolled(inner_steps=4, truncate=3, inner_lr=0.3, outer_lr=0.05), {}),
        "Unrolled-dynamics": (hypergrad.Unrolled(inner_steps=2, horizon=4, outer_lr=0.05), {"lower_dynamics": True}),
        "F2SA": (hypergrad.F2SA(inner_steps=2, lr_y=0.02, lr_z=0.2, momentum=True), {}),
        "Penalty": (hypergrad.Penalty(inner_steps=2, sigma=0.1, inner_lr=0.2, outer_lr=0.05), {}),
        "BOREP": (hypergrad.BOREP(refine_steps=2, period=2, inner_steps=2, terms=3, inner_lr=0.2), {}),
        "BOREP-linear-system": (hypergrad.BOREP(estimator="linear-system", refine_steps=1, inner_steps=2), {}),
        "LVHBA": (hypergrad.LVHBA(alpha=0.05, eta=0.05), {"constraints": True}),
        "PES": (hypergrad.PES(particles=2, inner_steps=2, sigma=0.1, horizon=4, inner_lr=0.3, outer_lr=0.05), {}),
        "PES-dynamics": (hypergrad.PES(particles=2, inner_steps=2, sigma=0.1, horizon=4, meta_loss="mean"),
                         {"lower_dynamics": True}),
    }


def start() -> tuple[dict, dict]:
    x = {"a": torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64), "s": torch.tensor(0.2, dtype=torch.float64)}
    y = {"w": torch.tensor([0.5, -0.5, 0.25, 0.1], dtype=torch.float64), "c": torch.tensor(0.1, dtype=torch.float64)}
    return x, y


def union_batches(step: int) -> tuple[tuple, tuple]:
    """The step's (lower, upper) batches of 2 SHARD examples each: rank r holds rows [r SHARD, (r + 1) SHARD)."""
    gen = torch.Generator().manual_seed(1000 + step)

    def level() -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.randn(RANKS * SHARD, DIM, generator=gen, dtype=torch.float64)
        return features, torch.randn(RANKS * SHARD, generator=gen, dtype=torch.float64)

    return level(), level()


def shard(batches: tuple, r: int) -> tuple:
    return tuple(tuple(t[r * SHARD:(r + 1) * SHARD] for t in level) for level in batches)


def run(engine: hypergrad.Engine, fns: Functions, r: int | None) -> dict[str, Any]:
    """init and STEPS steps on rank r's shards (the union when r is None): final state, metrics, counts."""
    x, y = start()
    first = union_batches(0)
    first = first if r is None else shard(first, r)
    with distributed.counting() as init_count:
        state = engine.init(fns, x, y, lower_batch=first[0])
    metrics, counts = [], []
    for step in range(STEPS):
        batches = union_batches(step)
        with distributed.counting() as count:
            state, m = engine.step(fns, state, batches if r is None else shard(batches, r))
        metrics.append(m)
        counts.append((count.all_reduces, count.bytes))
    return {"state": state, "metrics": metrics, "counts": counts, "init_count": (init_count.all_reduces,
                                                                                    init_count.bytes)}


# -- the ranks --------------------------------------------------------------------------------------------

def _rank_main(r: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=RANKS)
    try:
        results = {name: run(engine, functions(**options), r) for name, (engine, options) in engines().items()}
        results["_compiled"] = _compiled_cg(r)
        results["_population"] = {name: population_run(name, r) for name in POPULATION_ENGINES}
        torch.save(results, os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def _compiled_cg(r: int) -> dict[str, Any]:
    """A CG step under the process group: its graph breaks, and the compiled step against the eager one."""
    engine, fns = hypergrad.CG(iters=3, inner_steps=3, inner_lr=0.3, outer_lr=0.05), functions()
    x, y = start()
    state = engine.init(fns, x, y)
    batches = shard(union_batches(0), r)
    breaks = graph_breaks(engine, fns, state, batches)
    torch._dynamo.reset()
    compiled = hypergrad.compile_engine(engine, backend="aot_eager", fullgraph=True)
    out = {"breaks": breaks, "compiled": compiled.step(fns, state, batches), "eager": engine.step(fns, state, batches)}
    try:  # Exact reduces inside vmap, which torch.compile gets wrong: refused under ranks
        hypergrad.compile_engine(hypergrad.Exact(), backend="aot_eager").step(fns, engine.init(fns, x, y), batches)
        out["exact_refused"] = ""
    except RuntimeError as err:
        out["exact_refused"] = str(err)
    return out


POPULATION_ENGINES = ("CG", "Unrolled")


def population_run(name: str, r: int | None) -> dict[str, Any]:
    """Two problems (other starts) stepped as one ``torch.func.vmap``ped engine step, shared batches: final state."""
    engine, options = engines()[name]
    fns = functions(**options)
    x, y = start()
    xs = {k: torch.stack([v, v + 0.1]) for k, v in x.items()}
    ys = {k: torch.stack([v, -v]) for k, v in y.items()}
    state = torch.func.vmap(lambda x_, y_: engine.init(fns, x_, y_))(xs, ys)
    for step in range(2):
        batches = union_batches(step) if r is None else shard(union_batches(step), r)
        state, _ = torch.func.vmap(lambda s, b=batches: engine.step(fns, s, b))(state)
    return state


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(str(out / "store"), str(out)), nprocs=RANKS, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


def _leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """name -> tensor for every tensor in a nest of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
        out.update(_leaves(v, f"{prefix}/{k}"))
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300) if a.numel() else 1.0
    return float((a - b).abs().max()) / scale if a.numel() else 0.0


# -- the tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(engines()))
def test_two_ranks_equal_one_process_fed_the_union(ranks: list[dict[str, Any]], name: str) -> None:
    engine, options = engines()[name]
    reference = run(engine, functions(**options), None)
    got = [_leaves({"state": rank[name]["state"], "metrics": rank[name]["metrics"]}) for rank in ranks]
    want = _leaves({"state": reference["state"], "metrics": reference["metrics"]})
    assert set(got[0]) == set(want)
    worst = max((_relative(got[0][k], v) for k, v in want.items() if not k.endswith("solve_residual")), default=0.0)
    per_step = ranks[0][name]["counts"]
    print(f"{name}: max relative difference to one process {worst:.1e}; all-reduces / bytes per step {per_step}")
    for key, value in want.items():
        # Bit-identical ranks: every rank holds the same state and logs the same metrics.
        assert torch.equal(got[0][key], got[1][key]), key
        if key.endswith("solve_residual"):
            # |H v - b| / |b| of an exact solve is rounding alone (1e-16): not comparable relatively.
            assert abs(float(got[0][key]) - float(value)) <= 1e-12, key
        else:
            assert _relative(got[0][key], value) <= 1e-10, (key, got[0][key], value)
    # The data matter: a rank alone (no all-reduce) would follow another path.
    x_alone = run(engine, functions(**options), 0)["state"]["x"]
    assert max(_relative(x_alone[k], reference["state"]["x"][k]) for k in x_alone) > 1e-6
    # Every step reduced something, and the count is the same on both ranks.
    assert all(c[0] > 0 for c in ranks[0][name]["counts"])
    assert ranks[0][name]["counts"] == ranks[1][name]["counts"]


def test_compiled_step_under_two_ranks_has_no_graph_break(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        compiled = rank["_compiled"]
        assert compiled["breaks"] == []
        got, want = _leaves(compiled["compiled"]), _leaves(compiled["eager"])
        for key, value in want.items():
            assert _relative(got[key], value) <= 1e-12, key
    a, b = (_leaves(rank["_compiled"]["compiled"]) for rank in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exact_compiled_is_refused_under_two_ranks(ranks: list[dict[str, Any]]) -> None:
    assert "Exact.step cannot run compiled under 2 ranks" in ranks[0]["_compiled"]["exact_refused"]


@pytest.mark.parametrize("name", POPULATION_ENGINES)
def test_population_under_two_ranks_equals_one_process(ranks: list[dict[str, Any]], name: str) -> None:
    # The population's vmap batches every reduced tensor: one all-reduce serves all members, entry by entry.
    want = _leaves(population_run(name, None))
    got = [_leaves(rank["_population"][name]) for rank in ranks]
    for key, value in want.items():
        assert torch.equal(got[0][key], got[1][key]), key
        assert _relative(got[0][key], value) <= 1e-10, key


def test_without_process_group_nothing_is_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized() and distributed.world_size() == 1
    tree = {"a": torch.ones(3), "b": (torch.zeros(()), torch.arange(2))}
    assert distributed.mean_over_ranks(tree) is tree

    def no_collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective was called without a process group")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    monkeypatch.setattr(distributed.MeanOverRanks, "apply", no_collective)
    for name, (engine, options) in engines().items():
        fns = functions(**options)
        before = run(engine, fns, None)
        # The same steps with every engine module's mean_over_ranks replaced by the identity: bit for bit.
        with monkeypatch.context() as patch:
            for module in ("kernels", "unrolled", "dynamics", "first_order", "lvhba", "pes"):
                patch.setattr(f"hypergrad.{module}.mean_over_ranks", lambda t: t)
            plain = run(engine, fns, None)
        a, b = (_leaves({"s": out["state"], "m": out["metrics"]}) for out in (before, plain))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert before["counts"] == [(0, 0)] * STEPS, name
