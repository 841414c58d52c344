"""Precision of a training step: the objectives under autocast, the engine's own arithmetic in the state's dtype.

Lightning's precision plugins assume one backward per step through a model's forward. Here the engine
differentiates the problem's objectives many times per step (inner gradients, Hessian-vector products,
the mixed VJP) and also does arithmetic of its own: CG's tree updates and dot products, the outer
optimizer's moments, the state it keeps. With ``precision="bf16-mixed"`` Lightning runs the whole
``training_step`` under ``torch.autocast``, so every matmul of the engine's own, too, would be rounded to
bfloat16. ``StepPrecision`` splits the step instead:

- the objectives f, g, c and ``upper_metrics`` run under ``torch.autocast(device_type, dtype)`` with the
  plugin's dtype (``autocast_functions``); a 16-bit output is widened to float32, so the 0-d objective,
  the constraints and the metrics the engine sees are float32. Gradients with respect to float32
  parameters come back float32 (the cast's backward widens them), so HVPs and VJPs are float32 too;
- the engine's phases run with autocast off (``engine_context``): solvers, tree ops, the outer
  optimizer and the state (x, y, CG's v, Adam's moments) stay in float32, the parameters' dtype;
- ``lower_step`` / ``init_lower_state`` (lower dynamics, a learned optimizer's update) and the
  projections are the engine's arithmetic: they run in float32.

Precisions (Lightning's names):

=============  ==========================================================================================
"32-true"      plain float32 (the default)
"64-true"      Lightning converts the problem and every floating batch to float64; the state is float64.
               For checking: it matches a run on ``problem.double()`` with float64 data.
"bf16-mixed"   objectives under bfloat16 autocast, engine in float32 (CPU and CUDA)
"16-mixed"     objectives under float16 autocast, engine in float32, without loss scaling (CUDA; on CPU
               Lightning runs "bf16-mixed" instead, with a warning, see ``check_requested``). The engine
               differentiates functions itself, never through ``loss.backward()``, so Lightning's
               GradScaler has nothing to scale; it is disabled. Gradients below float16's smallest
               subnormal (6e-8) flush to zero: prefer "bf16-mixed", which has float32's range.
=============  ==========================================================================================

Refused, naming what works: "16-true" / "bf16-true" (the state itself would be 16-bit: Adam's second
moments and CG's residuals lose everything below 2^-8 relative, and on the default job "16-true" is
non-finite at the first step), "transformer-engine*", and plugins of other strategies (FSDP, DeepSpeed,
XLA). Mixed precision for a ``bilevel.Population`` is refused too: its objectives are built inside
each vmapped phase (``Population.member_functions``), where this wrapper does not reach yet.

Measured in ``experiments/results/precision.md`` (``python -m experiments.bench.precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import wraps
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from torch import Tensor

from hypergrad import Functions

SUPPORTED = ("32-true", "64-true", "bf16-mixed", "16-mixed")
"""Precisions a bilevel run accepts (``16-mixed`` on CUDA only)."""

LOW_PRECISION = (torch.float16, torch.bfloat16)

_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}
"""Lightning's legacy spellings (``precision=16`` and ``"16"`` mean ``"16-mixed"``)."""


def _works(on_cpu: bool) -> str:
    names = [p for p in SUPPORTED if not (on_cpu and p == "16-mixed")]
    return ", ".join(repr(p) for p in names)


@dataclass(frozen=True)
class StepPrecision:
    """How a training step runs: the objectives under autocast (``device_type``, ``dtype``), or in full precision.

    Attributes:
        name: Lightning's name of the precision ("32-true", "64-true", "bf16-mixed", "16-mixed").
        device_type: autocast's device type ("cpu", "cuda", "mps"); None unless mixed.
        dtype: the autocast dtype (torch.bfloat16 or torch.float16); None unless mixed.
    """

    name: str = "32-true"
    device_type: str | None = None
    dtype: torch.dtype | None = None

    @property
    def mixed(self) -> bool:
        """Whether the objectives run under autocast."""
        return self.dtype is not None

    def functions(self, fns: Functions) -> Functions:
        """``fns`` with its objectives under this autocast (``autocast_functions``); ``fns`` itself when not mixed.

        Call it once per run: ``hypergrad.kernels`` keeps its per-objective verdicts (HVP mode probe,
        fallbacks) under the function object, so a wrapper made per step would be probed per step.
        """
        if not self.mixed:
            return fns
        assert self.device_type is not None and self.dtype is not None
        return autocast_functions(fns, self.device_type, self.dtype)

    def engine_context(self) -> AbstractContextManager:
        """Autocast off for the engine's own arithmetic (Lightning entered it around ``training_step``)."""
        if not self.mixed:
            return nullcontext()
        assert self.device_type is not None  # set whenever mixed
        return torch.autocast(self.device_type, enabled=False)


def step_precision(plugin: Precision, population: bool = False, device_type: str = "cpu") -> StepPrecision:
    """The ``StepPrecision`` of a Trainer's precision plugin; refuses precisions the engines cannot honour.

    For "16-mixed" the plugin's GradScaler is replaced by a disabled one: it scales the loss of a
    ``backward()`` that a bilevel step never makes, and Lightning's step through it would fail ("Attempted
    unscale_ but _scale is None": no loss was ever scaled). A disabled scaler passes ``optimizer.step`` through.

    ``device_type`` (the Trainer's device) only shapes the message: on CPU it does not offer "16-mixed".

    Raises:
        ValueError: for a plugin other than 32-true, 64-true, bf16-mixed, 16-mixed, or a mixed
            precision with a population, naming what works.
    """
    if type(plugin) is Precision:
        return StepPrecision("32-true")
    if type(plugin) is DoublePrecision:
        return StepPrecision("64-true")
    on_cpu = device_type == "cpu"
    if type(plugin) is MixedPrecision:
        if population:
            raise ValueError(
                f"precision={plugin.precision!r} is not supported for a bilevel.Population yet (its objectives are "
                "built inside every vmapped phase, out of reach of the autocast wrapper): use '32-true' or '64-true', "
                "or train the members one by one"
            )
        if plugin.scaler is not None:
            plugin.scaler = torch.amp.GradScaler(plugin.device, enabled=False)
        dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
        return StepPrecision(plugin.precision, plugin.device, dtype)
    name = getattr(plugin, "precision", None)
    what = f"precision={name!r}" if name is not None else f"the precision plugin {type(plugin).__name__}"
    raise _unsupported(what, name, on_cpu)


def _unsupported(what: str, name: Any, on_cpu: bool) -> ValueError:
    """The refusal of a precision the engines cannot run, naming why and what works."""
    why = ""
    if name in ("16-true", "bf16-true"):
        why = (": it would keep the engine state itself (x, y, CG's v, the outer optimizer's moments) in 16 bits, "
               "which loses everything below 2^-8 relative ('16-true' is non-finite at the first step of the "
               "default job)")
    return ValueError(f"bilevel does not support {what}{why}. Supported: {_works(on_cpu)} ('bf16-mixed' and "
                      "'16-mixed' run the objectives under autocast and keep the engine in float32)")


def check_requested(precision: Any, accelerator: Any = "auto") -> None:
    """Refuse, before a Trainer is built, a ``precision`` argument that Lightning would not run as asked.

    On CPU Lightning turns "16-mixed" into "bf16-mixed" with only a warning; this refuses it instead,
    naming what works. Other unsupported precisions are refused here too (``step_precision`` refuses
    them again once the Trainer exists, for Trainers built elsewhere). ``precision`` None is "32-true".
    """
    if precision is None:
        return
    name = _ALIASES.get(str(precision), str(precision))
    if name == "16-mixed" and _resolves_to_cpu(accelerator):
        raise ValueError(
            "precision='16-mixed' is not available on CPU: Lightning would run 'bf16-mixed' in its place (AMP with "
            f"float16 is CUDA-only in Lightning). Pass precision='bf16-mixed' for mixed precision on CPU; supported "
            f"on CPU: {_works(True)}"
        )
    if name not in SUPPORTED:
        raise _unsupported(f"precision={precision!r}", name, _resolves_to_cpu(accelerator))


def _resolves_to_cpu(accelerator: Any) -> bool:
    """Whether Lightning's ``accelerator`` argument means the CPU here ("auto" without CUDA or MPS)."""
    if accelerator is None or accelerator == "auto":
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    if isinstance(accelerator, str):
        return accelerator == "cpu"
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(accelerator, CPUAccelerator)


def autocast_functions(fns: Functions, device_type: str, dtype: torch.dtype) -> Functions:
    """``fns`` with f, g, c and ``upper_metrics`` each run under ``torch.autocast(device_type, dtype)``.

    A 16-bit floating output (a 0-d objective, c's entries, a metric) is widened to float32; other
    outputs (float32 from autocast's float32 ops such as ``cross_entropy``, float64) are returned as
    they are. Projections and lower dynamics are the engine's arithmetic and are not wrapped. Each
    wrapper carries ``compute_dtype`` (the autocast dtype) for tools that want to know it.
    """
    if dtype not in LOW_PRECISION:
        raise ValueError(f"autocast_functions: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    wrapped: dict[str, Any] = {name: _under_autocast(getattr(fns, name), device_type, dtype)
               for name in ("f", "g", "c", "upper_metrics") if getattr(fns, name) is not None}
    return replace(fns, **wrapped)


def _under_autocast(fn: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    @wraps(fn)
    def under_autocast(*args: Any) -> Any:
        # cache_enabled=False, as Lightning's plugin: autocast's weight-cast cache would hold casts of
        # torch.func's wrapped tensors beyond the transform that made them.
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            out = fn(*args)
        return _widen(out)

    under_autocast.compute_dtype = dtype  # type: ignore[attr-defined]
    return under_autocast


def _widen(out: Any) -> Any:
    """16-bit floating tensors (alone or as dict values) to float32; anything else unchanged."""
    if isinstance(out, Tensor):
        return out.float() if out.dtype in LOW_PRECISION else out
    if isinstance(out, dict):
        return {k: _widen(v) for k, v in out.items()}
    return out
