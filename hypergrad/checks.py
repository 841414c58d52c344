"""Engine hyperparameters: each declared once, as a dataclass field that names its kind, and checked in one place.

An engine writes its hyperparameters as fields of a frozen dataclass::

    iters: int = hyperparameter(NONNEGATIVE_INT, 10)
    lam_max: float = hyperparameter(POSITIVE, 1e4, at_least="lam0")
    alpha: float | None = hyperparameter(OrNone(POSITIVE), None, derive=lambda engine: engine.inner_lr)

and ``Engine.__post_init__`` runs ``check`` on it: every field's kind, then the defaults derived from
other fields, then the bounds between fields. Numbers come out as ``float`` (integers as ``int``),
so an engine's state never depends on whether the user wrote 1 or 1.0.

Every refusal is a ``HyperparameterError`` (a ``ValueError``) whose message names the engine and the
argument, ``CG: iters must be an integer >= 0, got -1``, with one subclass per kind of fault:
``WrongType`` (also a ``TypeError``), ``OutOfRange``, ``UnknownChoice`` and ``Inconsistent``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

SPEC = "hyperparameter"
"""The key of a field's ``Spec`` in its metadata."""


class HyperparameterError(ValueError):
    """An engine refused a hyperparameter; the message names the engine and the argument."""


class WrongType(HyperparameterError, TypeError):
    """A value that is not of the field's kind: a string for a number, 1 for a bool, a non-callable.

    Also a ``TypeError``, which is what the fault is; a ``ValueError`` like every refusal of an argument.
    """


class OutOfRange(HyperparameterError):
    """A value of the right type outside the field's range: inner_lr <= 0, a NaN, beta >= 1."""


class UnknownChoice(HyperparameterError):
    """A name that is not among the field's choices: outer_optimizer="rmsprop"."""


class Inconsistent(HyperparameterError):
    """Two hyperparameters that contradict each other: lam_max < lam0, truncate > inner_steps."""


class Kind(Protocol):
    """What values a field takes: ``check`` returns the value (normalized) or raises a fault class."""

    @property
    def what(self) -> str:
        """The kind in words, completing "must be ...": "a finite number > 0"."""
        ...

    def check(self, value: Any) -> Any:
        """``value`` (normalized: numbers as float) or a bare fault class raised (``check`` below words it)."""
        ...


@dataclass(frozen=True)
class Real:
    """A finite real number (bool excluded) where ``inside`` holds; returned as float."""

    what: str
    inside: Callable[[float], bool]

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WrongType
        if not math.isfinite(value) or not self.inside(value):
            raise OutOfRange
        return float(value)


@dataclass(frozen=True)
class Integer:
    """An int (bool excluded) >= ``minimum``."""

    minimum: int

    @property
    def what(self) -> str:
        return f"an integer >= {self.minimum}"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WrongType
        if value < self.minimum:
            raise OutOfRange
        return value


@dataclass(frozen=True)
class Boolean:
    """True or False, and nothing that merely converts to one (1, "yes")."""

    what: str = "True or False"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise WrongType
        return value


@dataclass(frozen=True)
class OneOf:
    """One of the names ``choices``."""

    choices: tuple[str, ...]

    @property
    def what(self) -> str:
        return f"one of {', '.join(map(repr, self.choices))}"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise WrongType
        if value not in self.choices:
            raise UnknownChoice
        return value


@dataclass(frozen=True)
class OrNone:
    """None (the field's "not set", often derived from other fields) or a value of ``kind``."""

    kind: Kind

    @property
    def what(self) -> str:
        return self.kind.what

    def check(self, value: Any) -> Any:
        return None if value is None else self.kind.check(value)


@dataclass(frozen=True)
class Callback:
    """None or a callable; ``what`` says which signature it must have."""

    what: str

    def check(self, value: Any) -> Any:
        if value is not None and not callable(value):
            raise WrongType
        return value


POSITIVE = Real("a finite number > 0", lambda v: v > 0)
NONNEGATIVE = Real("a finite number >= 0", lambda v: v >= 0)
NONNEGATIVE_INT = Integer(0)
POSITIVE_INT = Integer(1)
BOOLEAN = Boolean()


def one_of(choices: Sequence[str]) -> OneOf:
    return OneOf(tuple(choices))


class Spec(NamedTuple):
    """A field's declaration: its kind, an optional derived default and optional bounds by other fields."""

    kind: Kind
    derive: Callable[[Any], Any] | None = None
    """The value when the field is None, from the (checked) engine: Neumann's alpha = inner_lr."""
    at_least: str | None = None
    """The name of a field this one must be >= (when both are set)."""
    at_most: str | None = None
    """The name of a field this one must be <= (when both are set)."""


def hyperparameter(kind: Kind, default: Any, *, derive: Callable[[Any], Any] | None = None,
                   at_least: str | None = None, at_most: str | None = None) -> Any:
    """A dataclass field declaring a hyperparameter of ``kind`` (checked by ``check``)."""
    return dataclasses.field(default=default, metadata={SPEC: Spec(kind, derive, at_least, at_most)})


def check(engine: Any, first: Sequence[str] = ()) -> None:
    """Check and normalize every declared hyperparameter of the dataclass ``engine`` in place.

    The one code path of every engine's argument checks: kinds first (in field order), then derived
    defaults, then bounds between fields. Raises a ``HyperparameterError`` naming the engine and the
    argument. The checked values are written back with the fields named in ``first`` leading, then
    the others in field order: that is the order of ``vars(engine)``, the record checkpoints keep.
    """
    owner = type(engine).__name__
    specs = [(f.name, f.metadata[SPEC]) for f in dataclasses.fields(engine) if SPEC in f.metadata]
    for name, spec in specs:
        value = getattr(engine, name)
        try:
            checked = spec.kind.check(value)
        except HyperparameterError as fault:  # the kinds raise the bare class: the message is built here, once
            raise type(fault)(f"{owner}: {name} must be {spec.kind.what}, got {value!r}") from None
        _set(engine, name, checked)
    for name, spec in specs:
        if spec.derive is not None and getattr(engine, name) is None:
            _set(engine, name, spec.derive(engine))
    for name, spec in specs:
        value = getattr(engine, name)
        for other, sign, holds in ((spec.at_least, ">=", _at_least), (spec.at_most, "<=", _at_most)):
            if other is None or value is None or getattr(engine, other) is None:
                continue
            if not holds(value, getattr(engine, other)):
                raise Inconsistent(f"{owner}: {name} must be {sign} {other} ({getattr(engine, other)!r}), "
                                   f"got {value!r}")
    names = [f.name for f in dataclasses.fields(engine)]
    order = [name for name in first if name in names] + [name for name in names if name not in first]
    values = {name: getattr(engine, name) for name in order}
    for name in order:  # re-inserted, so that vars(engine) lists them in this order
        object.__delattr__(engine, name)
    for name in order:
        _set(engine, name, values[name])


def _at_least(a: float, b: float) -> bool:
    return a >= b


def _at_most(a: float, b: float) -> bool:
    return a <= b


def _set(engine: Any, name: str, value: Any) -> None:
    # Engines are frozen dataclasses: their own __post_init__ is the one place allowed to normalize a field.
    object.__setattr__(engine, name, value)
