"""One protocol for the learned optimizers (LO): ``LORule``, so that callers never branch on which LO they hold.

Two LOs share it: the reduced one of ``bilevel.learned.optimizer`` (``reduced_rule``) and the faithful
muLO one of ``bilevel.learned.adafac`` (``adafac_rule``). A rule bundles the LO's network (whose
``named_parameters()`` are the meta-parameters theta) with two pure functions of trees (dicts of
tensors)::

    state = rule.init_state(params)
    new_params, new_state = rule.step(theta, params, grads, state, t, multipliers, step_mult)

both differentiable in theta and params and usable under ``torch.func.vmap``. ``kind`` and
``settings`` (the net's constructor arguments) are what ``LearnedOptimizer.save`` records, so that
``LearnedOptimizer.load`` rebuilds the same LO.

This module also holds what both LOs share: the tree alias, the tanh step embedding of
Metz et al. 2022 / learned_optimization's ``tanh_embedding``, and the parameter-name check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

Tree = dict[str, Tensor]
Kind = Literal["reduced", "adafac"]

# tanh(t / tau - 1) for these tau (learned_optimization's ``tanh_embedding``, used by both LOs).
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)


def step_embedding(step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """tanh(t / tau - 1) for tau in ``TIMESCALES``: a 0-d step count t -> (11,) tensor of ``dtype``."""
    taus = torch.tensor(TIMESCALES, dtype=dtype, device=step.device)
    return torch.tanh(step.to(dtype) / taus - 1.0)


def check_names(where: str, names: Iterable[str]) -> None:
    """Raise ValueError if a parameter name contains '/', which separates the state's flat keys."""
    for name in names:
        if "/" in name:
            raise ValueError(f"{where}: parameter name {name!r} contains '/', which separates state keys; "
                             "rename the parameter")


def check_step_inputs(where: str, params: Tree, grads: Tree, multipliers: dict[str, float]) -> None:
    """Raise ValueError naming ``where`` for parameter names with '/', multipliers of unknown parameters, or a
    missing or misshapen gradient: what every LO step refuses before it runs."""
    check_names(where, params)
    unknown = sorted(set(multipliers) - set(params))
    if unknown:
        raise ValueError(f"{where}: multipliers name parameters that are not in params: {unknown}")
    for name, p in params.items():
        if name not in grads:
            raise ValueError(f"{where}: no gradient for parameter {name!r}")
        if grads[name].shape != p.shape:
            raise ValueError(f"{where}: gradient of {name!r} has shape {tuple(grads[name].shape)}, "
                             f"the parameter {tuple(p.shape)}")


def built_net(where: str, cls: type[nn.Module], net: nn.Module | None, settings: dict[str, Any]) -> Any:
    """``net``, or ``cls(**settings)`` when it is None; ValueError naming ``where`` for both given or a net of
    another type."""
    if net is None:
        return cls(**settings)
    if settings:
        raise ValueError(f"{where}: give a net or settings, not both (got settings {sorted(settings)})")
    if not isinstance(net, cls):
        raise ValueError(f"{where}: net must be a {cls.__name__}, got {type(net).__name__}")
    return net


class StepFn(Protocol):
    """One LO update: (theta, params, grads, state, t, multipliers, step_mult) -> (new_params, new_state)."""

    def __call__(self, theta: Tree, params: Tree, grads: Tree, state: Tree, t: Tensor,
                 multipliers: dict[str, float] | None = None,
                 step_mult: float | None = None) -> tuple[Tree, Tree]: ...


@dataclass(frozen=True, eq=False)
class LORule:
    """A learned optimizer behind one interface (build it with ``reduced_rule`` or ``adafac_rule``).

    Attributes:
        kind: "reduced" (``bilevel.learned.optimizer``) or "adafac" (``bilevel.learned.adafac``, muLO).
        net: the LO network; ``dict(net.named_parameters())`` is theta.
        init_state: params {name: tensor} -> the zero state (flat keys "name/<accumulator>").
        step: (theta, params, grads, state, t, multipliers=None, step_mult=None) -> (new_params,
            new_state); ``t`` is the 0-d count of earlier updates, ``multipliers`` the muP s_p by
            parameter name (missing: 1.0), ``step_mult`` None means ``default_step_mult``.
        default_step_mult: the LO's own global step scale.
        settings: the net's constructor arguments (plain Python values), saved with theta.
    """

    kind: Kind
    net: nn.Module
    init_state: Callable[[Tree], Tree]
    step: StepFn
    default_step_mult: float
    settings: dict[str, Any] = field(default_factory=dict)
