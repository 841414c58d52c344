"""The learned-optimizer task family (problems.lo_tasks): determinism, staggered log-uniform horizons,
fresh inits and minibatches, a learnable teacher task, and MNIST-1D offline."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bilevel.learned import mlp
from problems import lo_tasks
from problems.lo_tasks import TaskFamily, TaskRuns, evaluation_task, load

SMALL = TaskFamily(datasets=("digits", "images", "teacher"), architectures=((2, 8), (1, 16)), horizons=(20, 60),
                   truncation=5, batch_size=16, seed=3)


def assert_same(a: Any, b: Any) -> None:
    """Recursive exact equality of the nested dicts / lists / tuples of tensors that truncation(i) returns."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_truncation_format() -> None:
    out = TaskRuns(SMALL, runs=3).truncation(0)
    assert out["restart"].dtype == torch.bool and out["restart"].all()
    assert out["t"].dtype == out["horizon"].dtype == torch.int64 and out["t"].shape == (3,)
    assert set(out["init"]) == {f"d2w8.{n}" for n, _ in mlp(64, 10, 32, 8 / 32, 2).named_parameters()} | {
        f"d1w16.{n}" for n, _ in mlp(64, 10, 32, 16 / 32, 1).named_parameters()}
    assert out["init"]["d2w8.hidden.0.weight"].shape == (3, 8, 8)
    for level in ("lower", "upper"):
        assert len(out[level]) == 5
        for batch in out[level]:
            for slot in ("d2w8", "d1w16"):
                x, y = batch[slot]
                assert x.shape == (3, 16, 64) and x.dtype == torch.float32
                assert y.shape == (3, 16) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert len(out["datasets"]) == 3 and all(len(d) == 2 and set(d) <= set(SMALL.datasets) for d in out["datasets"])


def test_deterministic_and_random_access_equals_sequential() -> None:
    sequential = TaskRuns(SMALL, runs=4)
    items = [sequential.truncation(i) for i in range(12)]
    shuffled = TaskRuns(SMALL, runs=4)
    for i in (11, 0, 7, 3, 7):
        assert_same(shuffled.truncation(i), items[i])
    other_seed = TaskRuns(replace(SMALL, seed=4), runs=4).truncation(0)
    assert not torch.equal(other_seed["init"]["d2w8.input.weight"], items[0]["init"]["d2w8.input.weight"])


def test_sampling_tasks_leaves_the_global_generators_alone() -> None:
    state = torch.get_rng_state()
    TaskRuns(SMALL, runs=2).truncation(0)
    assert torch.equal(torch.get_rng_state(), state)


def test_restarts_are_staggered_and_horizons_log_uniform() -> None:
    family = TaskFamily(datasets=("digits",), architectures=((2, 8),), horizons=(50, 500), truncation=10)
    runs = TaskRuns(family, runs=8)
    schedules = [runs.schedule(i) for i in range(60)]
    restarts = torch.stack([s["restart"] for s in schedules])  # [i, R]
    assert restarts[0].all()
    later = restarts[1:]
    assert later.any() and not (later.all(1) | ~later.any(1)).all(), "runs restart in lockstep"
    assert len(set(schedules[0]["t"].tolist())) > 1
    for s, prev in zip(schedules[1:], schedules[:-1], strict=True):
        # t advances by K within a task and is 0 at a restart; the horizon bounds it.
        assert torch.equal(s["t"], torch.where(s["restart"], 0, prev["t"] + 10))
        assert (s["t"] < s["horizon"]).all() and (s["t"] % 10 == 0).all()
    horizons = torch.tensor([runs.task(r, n).horizon for r in range(8) for n in range(250)], dtype=torch.float64)
    assert ((horizons >= 50) & (horizons <= 500) & (horizons % 10 == 0)).all()
    # Log-uniform: median sqrt(50 * 500) = 158 (+5 from rounding up); uniform would give 275.
    assert abs(horizons.median().item() - math.sqrt(50 * 500)) < 20


def test_fresh_init_at_every_restart_with_mulp_statistics() -> None:
    runs = TaskRuns(SMALL, runs=4)
    i, r = next((i, r) for i in range(1, 40) for r in range(4) if runs.schedule(i)["restart"][r])
    before, after = runs.networks(i - 1, r), runs.networks(i, r)
    assert not torch.equal(before["d2w8"].input.weight, after["d2w8"].input.weight)
    init = runs.truncation(i)["init"]
    for slot, net in after.items():
        for name, p in net.named_parameters():
            assert torch.equal(init[f"{slot}.{name}"][r], p.detach())
    # muP: zero output layer, zero biases, input weights N(0, 1/fan_in).
    assert (init["d2w8.output.weight"] == 0).all() and (init["d1w16.output.weight"] == 0).all()
    assert (init["d1w16.input.bias"] == 0).all()
    assert abs(init["d1w16.input.weight"].std().item() - 64 ** -0.5) < 0.02
    sp = TaskRuns(replace(SMALL, parametrization="sp"), runs=4).truncation(0)["init"]
    assert abs(sp["d1w16.output.weight"].std().item() - 16 ** -0.5) < 0.06


def test_fresh_minibatch_at_every_step_from_the_current_dataset() -> None:
    runs = TaskRuns(replace(SMALL, datasets=("digits",)), runs=2)
    out = runs.truncation(4)
    lower, upper = out["lower"], out["upper"]
    for j in range(1, 5):
        assert not torch.equal(lower[j]["d2w8"][0], lower[0]["d2w8"][0])
    assert not torch.equal(lower[0]["d2w8"][0], upper[0]["d2w8"][0])
    inputs, labels = load("digits")
    x, y = lower[2]["d1w16"]
    rows = (x[1][:, None, :] == inputs[None]).all(-1)  # [B, N]: which pool rows each example is
    assert rows.any(1).all() and torch.equal(labels[rows.float().argmax(1)], y[1])


def test_teacher_task_is_learnable() -> None:
    inputs, labels = load("teacher", 7)
    assert inputs.shape == (4096, 64) and torch.bincount(labels, minlength=10).min() > 200  # roughly balanced
    assert not torch.equal(load("teacher", 8)[1], labels)
    gen = torch.Generator().manual_seed(0)
    net = mlp(64, 10, 32, 1.0, 2, "mup", gen)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        index = torch.randint(0, 3072, (128,), generator=gen)
        loss = F.cross_entropy(net(inputs[index]), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net(inputs[3072:]).argmax(1) == labels[3072:]).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1; measured 0.6-0.7 held out


def test_bad_arguments_name_what_to_fix() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load("cifar", 0)
    with pytest.raises(ValueError, match="datasets"):
        TaskFamily(datasets=("cifar",), architectures=((2, 8),))
    with pytest.raises(ValueError, match="horizons"):
        TaskFamily(datasets=("digits",), architectures=((2, 8),), horizons=(51, 59), truncation=10)
    with pytest.raises(ValueError, match="duplicates"):
        TaskFamily(datasets=("digits",), architectures=((2, 8), (2, 8)))
    with pytest.raises(ValueError, match="truncation index"):
        TaskRuns(SMALL, runs=1).truncation(-1)


def test_evaluation_task() -> None:
    net, (inputs, labels) = evaluation_task("images", depth=3, width=48, seed=1)
    assert net.width == 48 and len(net.hidden) == 2 and inputs.shape == (2000, 64) and labels.shape == (2000,)
    again, (inputs2, _) = evaluation_task("images", depth=3, width=48, seed=1)
    assert torch.equal(inputs, inputs2) and torch.equal(net.input.weight, again.input.weight)
    assert not torch.equal(evaluation_task("images", 3, 48, seed=2)[1][0], inputs)


def test_mnist1d_absent_raises_an_import_error_naming_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        lo_tasks.mnist1d.__wrapped__(0)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        TaskRuns(TaskFamily(datasets=("mnist1d",), architectures=((2, 8),)), runs=1)


def test_mnist1d_generates_offline_and_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("mnist1d") is None:
        with pytest.raises(ImportError, match="pip install mnist1d"):
            load("mnist1d", 0)
        return
    import mnist1d.data
    import requests

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    defaults = mnist1d.data.get_dataset_args

    def small() -> Any:  # the default arguments but 500 samples, so that the test is quick
        args = defaults()
        args.num_samples = 500
        return args

    monkeypatch.setattr(mnist1d.data, "get_dataset_args", small)
    # The generator reseeds numpy's and Python's global generators: their next draws must be unchanged.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    expected = (np.random.random(), random.random())
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    inputs, labels = lo_tasks.mnist1d.__wrapped__(0)
    assert (np.random.random(), random.random()) == expected
    assert inputs.shape == (500, 64) and inputs.dtype == torch.float32 and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))
    assert torch.allclose(inputs.mean(0), torch.zeros(64), atol=1e-5)
    again = lo_tasks.mnist1d.__wrapped__(0)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(lo_tasks.mnist1d.__wrapped__(1)[0], inputs)
