"""Checks that run before any work starts, with errors that name the problem, the method and the fault."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from hypergrad import Engine, Functions
from hypergrad.tree import Tree


def check_objectives(fns: Functions, x: Tree, y: Tree, lower_batch: Any, upper_batch: Any) -> None:
    """Evaluate f, g (and c) once at the current x, y on the first batches and check what they return.

    Raises TypeError for a non-tensor, ValueError for a non-scalar or non-finite objective or a lower
    objective that does not depend on the lower variables; warns for an upper variable that both
    objectives ignore.
    """
    name = fns.name
    used_by: dict[str, set[str]] = {k: set() for k in x}
    checks = [("lower_objective", fns.g, lower_batch, "lower"), ("upper_objective", fns.f, upper_batch, "upper")]
    if fns.c is not None:
        checks.append(("lower_constraints", fns.c, lower_batch, "lower"))
    for method, fn, batch, level in checks:
        xr = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        yr = {k: v.clone().requires_grad_(True) for k, v in y.items()}
        with torch.enable_grad():
            try:
                out = fn(xr, yr, batch)
            except Exception as err:
                if hasattr(err, "add_note"):  # Python >= 3.11; on 3.10 the traceback still shows the method
                    err.add_note(f"(raised by {name}.{method} on the first {level} batch, before training started)")
                raise
        where = f"{name}.{method}"
        if not isinstance(out, Tensor):
            raise TypeError(f"{where} must return a torch.Tensor, got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"{where} must return a floating-point tensor, got dtype {out.dtype}")
        if method == "lower_constraints":
            if not torch.isfinite(out).all():
                raise ValueError(f"{where} returned non-finite entries at the initial x, y on the first lower batch")
            continue
        if out.dim() != 0:
            raise ValueError(
                f"{where} must return a 0-d (scalar) tensor, got shape {tuple(out.shape)}; reduce it, e.g. with .mean()"
            )
        if not torch.isfinite(out):
            raise ValueError(
                f"{where} returned {out.item()} at the initial x, y on the first {level} batch; it must be finite"
            )
        grads = _grads(out, [*xr.values(), *yr.values()])
        gx, gy = grads[: len(xr)], grads[len(xr):]
        if method == "lower_objective" and all(g is None for g in gy):
            raise ValueError(
                f"{where} does not depend on the lower variables (the parameters under self.lower): "
                "the lower level must be a function of y"
            )
        for k, g in zip(xr, gx, strict=True):
            if g is not None:
                used_by[k].add(method)
    for k, methods in used_by.items():
        # With lower dynamics or a restart x may act through lower_step or lower_start alone (a learned
        # optimizer's parameters, MAML's initialization).
        if not methods and fns.lower_step is None and fns.lower_start is None:
            warnings.warn(
                f"{name}: upper variable '{k}' (self.upper.{k}) is ignored by both lower_objective and "
                "upper_objective; its hypergradient is always zero",
                stacklevel=3,
            )


def check_engine(fns: Functions, engine: Any) -> None:
    """The engine is an Engine instance that can solve this problem (constraints, mainly)."""
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a hypergrad.Engine (e.g. hypergrad.CG(iters=10)), got {type(engine).__name__}")
    engine.check_functions(fns)


def _grads(out: Tensor, inputs: list[Tensor]) -> list[Tensor | None]:
    if not out.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(out, inputs, allow_unused=True))
