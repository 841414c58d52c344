"""The loop's guard on every outer step: nothing non-finite reaches the problem or a checkpoint.

After the engine's phases, ``StepGuard.accept`` reads back, in one transfer, whether each output
(y, the objectives and other metrics, the hypergradient, the engine's extra state, x) is finite
and the few scalars it watches. On the first non-finite value the run stops with
``NonFiniteStep`` naming the step, the quantity that went non-finite first (in the order the step
computes them) and the last finite objectives; with ``on_nonfinite="skip"`` the step is discarded
and counted instead. It also warns once when the linear solve keeps failing or the
hypergradient norm explodes, the usual prelude to a non-finite step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from hypergrad.finite import finite_flags, leaf_norms
from hypergrad.tree import Tree

ON_NONFINITE = ("raise", "skip")

RESIDUAL_PATIENCE = 20
"""Consecutive steps with solve_residual > 1 before the guard warns that the solve is failing."""
GROWTH_LIMIT = 1e6
"""Factor over its first value by which the hypergradient norm may grow before the guard warns."""
# Objectives quoted in the error message, and the scalars watched for the warnings.
_OBJECTIVES = ("upper_objective", "lower_objective")
_WATCHED = ("solve_residual", "hypergradient_norm")


class NonFiniteStep(FloatingPointError):
    """An outer step produced a non-finite value (``on_nonfinite="raise"``); the problem keeps its last finite state."""


def check_on_nonfinite(value: str) -> str:
    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, got {value!r}")
    return value


def step_quantities(state: dict[str, Any], hypergrad: Tree, metrics: dict[str, Tensor]) -> dict[str, Any]:
    """What one outer step produced, in the order it computes them: y, metrics, hypergradient, extras, x."""
    late = ("x", "outer", "step")
    return {
        "y": state["y"],
        **metrics,
        "hypergradient": hypergrad,
        **{f"state[{k!r}]": v for k, v in state.items() if k not in ("y", *late)},
        "x": state["x"],
        "state['outer']": state.get("outer"),
    }


def all_finite(tree: Any) -> bool:
    """Whether every floating entry of ``tree`` is finite: one fused norm per leaf and one read-back.

    Exact: a non-finite norm, which a huge but finite leaf can also give, is confirmed entry by entry.
    Used on the engine state at every checkpoint, where a check per leaf cost several operations each.
    """
    norms = leaf_norms({"tree": tree})
    if not norms or all(math.isfinite(v) for v in torch.stack(norms).tolist()):
        return True
    return bool(finite_flags({"tree": tree}).all())


class StepGuard:
    """Accepts, skips or stops each outer step by the finiteness of what it produced.

    Args:
        on_nonfinite: "raise" (stop with ``NonFiniteStep``) or "skip" (discard the step, count it).
        name: the problem's name, for messages.
    """

    def __init__(self, on_nonfinite: str = "raise", name: str = "problem") -> None:
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.name = name
        self.skipped = 0
        self.last_objectives: dict[str, float] = {}
        self.last_step = 0
        self._failing_solves = 0
        self._first_norm: float | None = None
        self._warned: set[str] = set()

    def accept(self, step: int, quantities: dict[str, Any], metrics: dict[str, Tensor]) -> bool:
        """True when every quantity of outer step ``step`` (1-based) is finite; else skip (False) or raise."""
        norms = leaf_norms(quantities)
        scalars = [name for name in (*_OBJECTIVES, *_WATCHED) if name in metrics]
        watched_values = [metrics[k] for k in scalars]
        # One stack (a cat for a population's [P] metrics) and one transfer: the guard's whole host cost.
        parts = [*norms, *watched_values]
        if all(part.dim() == 0 for part in parts):
            readback = torch.stack(parts).tolist() if parts else []
        else:
            readback = torch.cat([part.reshape(-1) for part in parts]).tolist()
        finite = [True] * len(quantities)
        if not all(math.isfinite(v) for v in readback[: len(norms)]):
            finite = finite_flags(quantities).tolist()  # exact: a huge finite leaf's norm may overflow
        # Populations give [P] metrics: the guard watches the worst member (objectives: their mean).
        watched, start = {}, len(norms)
        for name, value in zip(scalars, watched_values, strict=True):
            member_values = readback[start:start + value.numel()]
            start += value.numel()
            watched[name] = sum(member_values) / len(member_values) if name in _OBJECTIVES else max(member_values)
        if all(finite):
            self._watch(step, watched)
            self.last_objectives = {k: watched[k] for k in _OBJECTIVES if k in watched}
            self.last_step = step
            return True
        bad = [name for name, ok in zip(quantities, finite, strict=True) if not ok]
        if self.on_nonfinite == "skip":
            self.skipped += 1
            if "skip" not in self._warned:
                self._warned.add("skip")
                warnings.warn(f"{self._describe(step, bad)} The step was discarded (on_nonfinite='skip'); "
                              "skipped steps are counted in the metric nonfinite_skipped.", RuntimeWarning,
                              stacklevel=2)
            return False
        raise NonFiniteStep(
            f"{self._describe(step, bad)} The problem keeps its parameters from the last finite step and no checkpoint "
            "holds the non-finite values. Lower inner_lr or outer_lr, give an IFT engine damping, or pass "
            "on_nonfinite='skip' (CLI: --model.on_nonfinite skip) to discard such steps."
        )

    def _describe(self, step: int, bad: list[str]) -> str:
        then = f" (then {', '.join(bad[1:])})" if len(bad) > 1 else ""
        if self.last_objectives:
            last = ", ".join(f"{k}={v:.6g}" for k, v in self.last_objectives.items())
            before = f" Last finite objectives (step {self.last_step}): {last}."
        else:
            before = " No step before it was finite."
        return (f"{self.name}: outer step {step} produced non-finite values: {bad[0]} went non-finite "
                f"first{then}.{before}")

    def _watch(self, step: int, watched: dict[str, float]) -> None:
        residual = watched.get("solve_residual")
        if residual is not None:
            self._failing_solves = self._failing_solves + 1 if residual > 1 else 0
            if self._failing_solves >= RESIDUAL_PATIENCE:
                self._warn_once("solve_residual", f"{self.name}: solve_residual has stayed above 1 for "
                                f"{RESIDUAL_PATIENCE} steps (now {residual:.3g} at step {step}): the linear solve "
                                "does not converge (the lower Hessian may be indefinite), so the hypergradient is "
                                "the safeguard's first-order estimate (metric solve_fallback) or unreliable. Solve "
                                "such systems with CG(normal=True) or damping=..., or use more inner_steps or a "
                                "smaller inner_lr.")
        norm = watched.get("hypergradient_norm")
        if norm is not None and math.isfinite(norm):
            if self._first_norm is None and norm > 0:
                self._first_norm = norm
            elif self._first_norm is not None and norm > GROWTH_LIMIT * self._first_norm:
                self._warn_once("hypergradient_norm", f"{self.name}: hypergradient_norm grew from "
                                f"{self._first_norm:.3g} to {norm:.3g} (over {GROWTH_LIMIT:.0e}x) by step {step}: the "
                                "run is likely diverging. Lower outer_lr or inner_lr.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run counts and warns as the uninterrupted one."""
        return {"skipped": self.skipped, "first_norm": self._first_norm, "failing_solves": self._failing_solves,
                "warned": sorted(self._warned), "last_objectives": self.last_objectives, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state["skipped"]
        self._first_norm = state["first_norm"]
        self._failing_solves = state["failing_solves"]
        self._warned = set(state["warned"])
        self.last_objectives = dict(state["last_objectives"])
        self.last_step = state["last_step"]
