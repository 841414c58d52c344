"""Engines as data plus one step: the one hyperparameter check, the outer transforms, the shared two-copy engine.

- Every hyperparameter is a field of a frozen dataclass whose metadata declares its kind; one check path
  (``Engine.__post_init__`` -> ``hypergrad.checks.check``) refuses each kind of fault with its own error
  type, naming the engine and the argument.
- Outer updates are pure ``(init, update)`` transforms (``hypergrad.outer``) that compose with ``chain``.
- F2SA and Penalty are one engine (``hypergrad.two_copy.TwoCopy``) with two schedules.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import hypergrad
from hypergrad import checks, outer
from hypergrad.engine import RECIPE, Engine, Functions
from hypergrad.recipe import OuterOptimizer
from hypergrad.two_copy import TwoCopy

F64 = torch.float64
A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]], dtype=F64)
B = torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.0, -0.5]], dtype=F64)
Y_T = torch.tensor([0.5, -1.0, 0.25], dtype=F64)
NO_DATA = ((), ())


def quadratic(project_x: Callable | None = None) -> Functions:
    """g = 1/2 y'Ay - y'Bx, f = 1/2 |y - y_t|^2 + 0.05 |x|^2 (P1's shape, float64)."""
    return Functions(f=lambda x, y, b: 0.5 * torch.sum((y["y"] - Y_T) ** 2) + 0.05 * torch.sum(x["x"] ** 2),
                     g=lambda x, y, b: 0.5 * y["y"] @ A @ y["y"] - y["y"] @ B @ x["x"],
                     project_x=project_x, name="Quadratic")


def start() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return {"x": torch.tensor([0.3, -0.7], dtype=F64)}, {"y": torch.zeros(3, dtype=F64)}


# -- 1. one check path, one error type per kind of fault ---------------------------------------------

FAULTS: list[tuple[str, Callable[[], Any], type[checks.HyperparameterError], str]] = [
    ("float for an int", lambda: hypergrad.CG(iters=2.0), checks.WrongType,
     r"CG: iters must be an integer >= 0, got 2\.0"),
    ("string for a number", lambda: hypergrad.Exact(inner_lr="0.1"), checks.WrongType,
     r"Exact: inner_lr must be a finite number > 0, got '0\.1'"),
    ("1 for a bool", lambda: hypergrad.BOREP(average=1), checks.WrongType, r"BOREP: average must be True or False"),
    ("non-callable", lambda: hypergrad.LVHBA(projection="qp"), checks.WrongType,
     r"LVHBA: projection must be None or a callable"),
    ("non-string choice", lambda: hypergrad.F2SA(schedule=3), checks.WrongType, r"F2SA: schedule must be one of"),
    ("negative", lambda: hypergrad.Neumann(outer_lr=-1.0), checks.OutOfRange, r"Neumann: outer_lr must be a finite"),
    ("nan", lambda: hypergrad.Penalty(sigma=float("nan")), checks.OutOfRange, r"Penalty: sigma must be a finite"),
    ("below an integer minimum", lambda: hypergrad.PES(particles=0), checks.OutOfRange,
     r"PES: particles must be an integer >= 1, got 0"),
    ("outside an interval", lambda: hypergrad.BOREP(beta=1.0), checks.OutOfRange, r"BOREP: beta must be in \[0, 1\)"),
    ("outside an engine rule", lambda: hypergrad.LVHBA(p=0.5), checks.OutOfRange, r"LVHBA: p must lie in \(0, 1/2\)"),
    ("unknown choice", lambda: hypergrad.Unrolled(outer_optimizer="rmsprop"), checks.UnknownChoice,
     r"Unrolled: outer_optimizer must be one of 'sgd', 'adam', got 'rmsprop'"),
    ("unknown optional choice", lambda: hypergrad.Neumann(hvp_mode="forward"), checks.UnknownChoice,
     r"Neumann: hvp_mode must be one of"),
    ("at_least bound", lambda: hypergrad.F2SA(lam0=10.0, lam_max=5.0), checks.Inconsistent,
     r"F2SA: lam_max must be >= lam0 \(10\.0\), got 5\.0"),
    ("at_most bound", lambda: hypergrad.Penalty(sigma=0.1, sigma_min=0.2), checks.Inconsistent,
     r"Penalty: sigma_min must be <= sigma \(0\.1\), got 0\.2"),
    ("optional bound", lambda: hypergrad.PES(inner_steps=10, horizon=5), checks.Inconsistent,
     r"PES: horizon must be >= inner_steps \(10\), got 5"),
]


@pytest.mark.parametrize(("make", "error", "message"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_each_kind_of_fault_has_its_error_type_and_names_engine_and_argument(
        make: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as excinfo:
        make()
    assert type(excinfo.value) is error
    assert isinstance(excinfo.value, ValueError)  # every refusal of an argument is a ValueError
    assert isinstance(excinfo.value, TypeError) == (error is checks.WrongType)  # a wrong type is also a TypeError


def _declared(engine: type[Engine]) -> list[dataclasses.Field]:
    assert dataclasses.is_dataclass(engine), engine
    return list(dataclasses.fields(engine))


@pytest.mark.parametrize("engine", hypergrad.ENGINES, ids=lambda e: e.__name__)
def test_every_hyperparameter_is_a_declared_field_of_a_frozen_dataclass(engine: type[Engine]) -> None:
    fields = _declared(engine)
    assert all(checks.SPEC in f.metadata for f in fields), [f.name for f in fields if checks.SPEC not in f.metadata]
    assert [f.name for f in fields] == list(inspect.signature(engine).parameters)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(engine).parameters.values())
    instance = engine()
    # vars: what checkpoints record (every field, nothing more), the recipe's hyperparameters first as before
    recipe = [name for name in RECIPE if name in {f.name for f in fields}]
    assert list(vars(instance)) == recipe + [f.name for f in fields if f.name not in recipe]
    with pytest.raises(dataclasses.FrozenInstanceError):
        instance.inner_steps = 3  # type: ignore[misc]
    assert instance == engine() and hash(instance) == hash(engine())


@pytest.mark.parametrize("engine", hypergrad.ENGINES, ids=lambda e: e.__name__)
def test_booleans_are_checked_one_way(engine: type[Engine]) -> None:
    booleans = [f.name for f in _declared(engine) if isinstance(f.metadata[checks.SPEC].kind, checks.Boolean)]
    for name in booleans:
        for value in (1, "yes", None):
            with pytest.raises(checks.WrongType, match=rf"{engine.__name__}: {name} must be True or False"):
                engine(**{name: value})


@pytest.mark.parametrize("engine", hypergrad.ENGINES, ids=lambda e: e.__name__)
def test_repr_shows_every_hyperparameter_and_rebuilds_the_engine(engine: type[Engine]) -> None:
    instance = engine()
    text = repr(instance)
    assert text.startswith(f"{engine.__name__}(")
    for f in _declared(engine):
        assert f"{f.name}={getattr(instance, f.name)!r}" in text
    assert eval(text, vars(hypergrad)) == instance


def test_numbers_are_normalized_and_derived_defaults_filled() -> None:
    cg = hypergrad.CG(inner_lr=1, outer_lr=2, tol=0)
    assert (type(cg.inner_lr), type(cg.outer_lr), type(cg.tol)) == (float, float, float)
    assert hypergrad.Neumann(inner_lr=0.3).alpha == 0.3 and hypergrad.Neumann(inner_lr=0.3, alpha=0.1).alpha == 0.1
    assert hypergrad.BOREP(inner_lr=0.25).hessian_scale == 4.0


def test_the_protocol_base_has_no_recipe() -> None:
    for name in ("inner_steps", "inner_lr", "outer_lr", "outer_optimizer", "descend"):
        assert not hasattr(Engine, name), name
    for engine in hypergrad.ENGINES:  # an engine has the outer optimizer as a hyperparameter, or not at all
        declared = {f.name for f in _declared(engine)}
        assert ("outer_optimizer" in declared) == hasattr(engine, "outer_optimizer"), engine.__name__
        assert ("outer_optimizer" in declared) == issubclass(engine, OuterOptimizer), engine.__name__


# -- 2. outer transforms --------------------------------------------------------------------------


def _tree(*values: float) -> dict[str, Tensor]:
    return {"x": torch.tensor(values, dtype=F64)}


def test_chained_transforms_update_in_turn_and_keep_their_states() -> None:
    x, h, t = _tree(1.0, -2.0), _tree(0.5, 4.0), torch.tensor(1)
    both = outer.chain(outer.sgd(0.1), outer.adam(0.01))
    state = both.init(x)
    assert state[0] == {} and set(state[1]) == {"m", "s"}
    got, new = both.update(x, h, state, t)
    after_sgd, _ = outer.sgd(0.1).update(x, h, {}, t)
    expected, adam_state = outer.adam(0.01).update(after_sgd, h, outer.adam(0.01).init(x), t)
    assert torch.equal(got["x"], expected["x"]) and torch.equal(new[1]["m"]["x"], adam_state["m"]["x"])
    assert torch.equal(x["x"], torch.tensor([1.0, -2.0], dtype=F64))  # inputs untouched: pure


def test_engine_outer_is_its_transform_chained_with_the_projection_onto_x() -> None:
    box = lambda tree: {k: torch.clamp(v, -0.2, 0.2) for k, v in tree.items()}  # noqa: E731
    fns = quadratic(project_x=box)
    for engine in (hypergrad.CG(iters=3, inner_steps=2, outer_lr=0.3),
                   hypergrad.Penalty(inner_steps=2, outer_lr=0.3, outer_optimizer="adam"),
                   hypergrad.F2SA(inner_steps=2, lr_x_ratio=30.0),
                   hypergrad.BOREP(refine_steps=1, inner_steps=2, outer_lr=0.3)):
        state = engine.init(fns, *start())
        state = engine.inner(fns, state, None)
        state, h, _ = engine.estimate(fns, state, NO_DATA)
        composed = outer.chain(engine.outer_transform(), outer.project(box))
        x, (own, _) = composed.update(state["x"], h, (state[engine.outer_state_key], {}), state["step"] + 1)
        new = engine.outer(fns, state, h)
        assert torch.equal(new["x"]["x"], x["x"]), type(engine).__name__
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(new[engine.outer_state_key]),
                                                      torch.utils._pytree.tree_leaves(own), strict=True))
        assert new["step"] == state["step"] + 1


def test_normalized_momentum_steps_outer_lr_and_not_at_zero() -> None:
    transform = outer.normalized_momentum(0.3, 0.5)
    x, t = _tree(1.0, 1.0), torch.tensor(1)
    moved, m = transform.update(x, _tree(3.0, -4.0), transform.init(x), t)
    torch.testing.assert_close(torch.linalg.norm(moved["x"] - x["x"]), torch.tensor(0.3, dtype=F64), rtol=1e-15,
                               atol=0.0)
    torch.testing.assert_close(m["x"], torch.tensor([1.5, -2.0], dtype=F64))
    still, m0 = transform.update(x, _tree(0.0, 0.0), transform.init(x), t)
    assert torch.equal(still["x"], x["x"]) and torch.equal(m0["x"], torch.zeros(2, dtype=F64))


def test_scheduled_sgd_reads_the_update_number_and_runs_under_vmap() -> None:
    transform = outer.scheduled_sgd(lambda t, dtype: 1.0 / t.to(dtype))
    xs, hs, ts = torch.ones(4, 2, dtype=F64), torch.ones(4, 2, dtype=F64), torch.arange(1, 5)
    batched, _ = torch.func.vmap(lambda x, h, t: transform.update({"x": x}, {"x": h}, {}, t))(xs, hs, ts)
    torch.testing.assert_close(batched["x"], 1 - 1 / ts.to(F64)[:, None].expand(4, 2))


def test_the_functional_form_by_name_is_the_transform() -> None:
    x, h, t = _tree(1.0, -2.0), _tree(0.5, 4.0), torch.tensor(3)
    state = {"m": _tree(0.1, 0.2), "s": _tree(0.3, 0.4)}
    by_name, _ = outer.update("adam", x, h, state, 0.05, t)
    transform, _ = outer.adam(0.05).update(x, h, state, t)
    assert torch.equal(by_name["x"], transform["x"]) and outer.init("sgd", x) == {}


# -- 3. F2SA and Penalty: one two-copy engine, two schedules ----------------------------------------------


def test_f2sa_and_penalty_are_the_two_copy_engine_with_their_schedules() -> None:
    for engine in (hypergrad.F2SA, hypergrad.Penalty):
        assert issubclass(engine, TwoCopy)
        for phase in ("init", "inner", "estimate", "outer", "lower_solution"):
            assert getattr(engine, phase) is getattr(TwoCopy, phase), (engine.__name__, phase)
    assert type(hypergrad.F2SA().penalty_schedule).__name__ == "F2SASchedule"
    assert type(hypergrad.Penalty().penalty_schedule).__name__ == "SigmaSchedule"


def test_penalty_with_fixed_sigma_is_f2sa_with_the_constant_schedule() -> None:
    # F2SA's y step alpha (grad f + lam grad g) is Penalty's gamma (sigma grad f + grad g) with sigma = 1 / lam and
    # alpha = gamma / lam; z steps with lr_z = gamma; the x step xi alpha = outer_lr.
    lam, gamma, outer_lr = 20.0, 0.4, 0.05
    penalty = hypergrad.Penalty(sigma=1 / lam, inner_steps=3, inner_lr=gamma, outer_lr=outer_lr)
    f2sa = hypergrad.F2SA(schedule="constant", lam0=lam, lam_max=lam, lr_y=gamma / lam, lr_z=gamma,
                          lr_x_ratio=outer_lr * lam / gamma, inner_steps=3)
    fns = quadratic()
    a, b = penalty.init(fns, *start()), f2sa.init(fns, *start())
    for _ in range(6):
        (a, metrics_a), (b, metrics_b) = penalty.step(fns, a, NO_DATA), f2sa.step(fns, b, NO_DATA)
    for key in ("x", "y", "z"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14, msg=key)
    torch.testing.assert_close(metrics_a["penalty_value"], metrics_b["penalty_value"], rtol=1e-12, atol=0.0)
    assert set(a) - set(b) == {"sigma"} and set(b) - set(a) == {"lam"}
