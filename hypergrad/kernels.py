"""Every derivative an engine needs, built once on ``torch.func``.

``fn`` is a pure objective ``fn(x, y, batch) -> 0-d tensor`` of the upper variables x and the lower
variables y (both trees, see ``hypergrad.tree``). Nothing here keeps an autograd graph alive after
it returns, except the operator of ``hvp_operator`` in reverse-over-reverse mode, which holds one
gradient's graph for as long as the operator lives (one IFT estimate).

Second-order products:
- ``hvp``: H v = d_yy g v in one of three modes (``HVP_MODES``):
  "forward-over-reverse" (``jvp`` of ``grad``), "reverse-over-forward" (``grad`` of a ``jvp``) or
  "reverse-over-reverse" (``vjp`` of ``grad``). ``mode=None`` takes the device's default from
  ``DEFAULT_HVP_MODES``, chosen from ``experiments/results/speed/kernels.md``.
- ``hvp_operator``: the map v -> H v at a fixed (x, y) for the solvers. In reverse-over-reverse
  mode the gradient's graph is built once (``linearize``) and every product is a single reverse
  pass through it, which is what makes a K-step solve cheap.
- ``mixed_vjp``: J v = grad_x <grad_y g(x, y), v>, one ``vjp`` of ``grad_y g`` with respect to x.

Fallbacks: when a model lacks a derivative a mode needs (PyTorch's fused CPU/CUDA attention kernels
have no forward-mode derivative and no double backward), the products retry, with one warning per
objective, first in reverse-over-reverse mode and then with ``scaled_dot_product_attention`` pinned
to its composite math backend, which every mode can differentiate.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from hypergrad.tree import Tree

Objective = Callable[[Tree, Tree, Any], Tensor]
Linearization = Callable[[Tree], Tree]
"""The pullback of grad_y fn at a fixed (x, y): v -> H v by one reverse pass (``linearize``)."""

HVP_MODES = ("forward-over-reverse", "reverse-over-forward", "reverse-over-reverse")

DEFAULT_HVP_MODES: dict[str, str] = {
    # CPU (experiments/results/speed/kernels.md, one thread, in gradients): a standalone HVP costs 2.18
    # reverse-over-reverse, 4.52 forward-over-reverse, 4.20 reverse-over-forward on the MLP; 2.40 / 2.92 /
    # 2.75 on the CNN; 2.85 / 3.56 / 3.27 on the transformer block (math attention). Inside a solve a
    # product on the kept graph costs 0.86 / 1.10 / 1.80 gradients.
    "cpu": "reverse-over-reverse",
    # CUDA: not measured in this version (no GPU); reverse-over-reverse is the only mode whose solver
    # products reuse one graph (K products for one gradient's forward), so it is the default until
    # ``python -m experiments.bench.kernels --device cuda`` says otherwise.
    "cuda": "reverse-over-reverse",
}
"""Device type -> the HVP mode used when ``mode`` is None; other device types use the "cpu" entry."""

# Objectives known to need a fallback -> the level of _ATTEMPTS that worked (no re-failing each call).
_FALLBACK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grad_y(fn: Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tensor]:
    """(grad_y fn(x, y), fn(x, y)): one gradient. Leaves have the shapes of y's."""
    return grad_and_value(fn, argnums=1)(x, y, batch)


def grad_xy(fn: Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, Tensor]:
    """(grad_x fn, grad_y fn, fn(x, y)) from one reverse pass."""
    (gx, gy), value = grad_and_value(fn, argnums=(0, 1))(x, y, batch)
    return gx, gy, value


def default_hvp_mode(device: torch.device | str) -> str:
    """The HVP mode used on ``device`` when none is given (``DEFAULT_HVP_MODES``)."""
    kind = torch.device(device).type
    return DEFAULT_HVP_MODES.get(kind, DEFAULT_HVP_MODES["cpu"])


def check_mode(mode: str | None, y: Tree) -> str:
    """``mode``, or the default for the device of y's leaves when None; an unknown mode is an error."""
    if mode is None:
        return default_hvp_mode(next(iter(y.values())).device)
    if mode not in HVP_MODES:
        raise ValueError(f"kernels: HVP mode must be one of {', '.join(map(repr, HVP_MODES))}, got {mode!r}")
    return mode


def linearize(fn: Objective, x: Tree, y: Tree, batch: Any) -> Linearization:
    """The pullback of y -> grad_y fn(x, y) at y: v -> H v (H symmetric), one reverse pass per call.

    Building it costs one gradient with its graph recorded; the graph lives as long as the pullback.
    """
    _, pullback = vjp(lambda y_: grad(fn, argnums=1)(x, y_, batch), y)
    return lambda v: pullback(v)[0]


def hvp_in_mode(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree, mode: str) -> Tree:
    """H v in exactly ``mode`` (one of ``HVP_MODES``), with no fallback: raises if fn lacks a derivative it needs."""
    if mode == "forward-over-reverse":
        return jvp(lambda y_: grad(fn, argnums=1)(x, y_, batch), (y,), (v,))[1]
    if mode == "reverse-over-forward":
        # grad_y of the directional derivative <grad_y fn, v> taken in forward mode.
        return grad(lambda y_: jvp(lambda y__: fn(x, y__, batch), (y_,), (v,))[1])(y)
    return linearize(fn, x, y, batch)(v)


def hvp(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree, mode: str | None = None, *,
        linearization: Linearization | None = None) -> Tree:
    """H v with H = d_yy fn(x, y); ``v`` and the result have the shapes of y.

    ``mode``: one of ``HVP_MODES``, None for the device's default. ``linearization`` (from
    ``linearize`` at the same fn, x, y, batch) skips the gradient's forward: H v is one reverse pass.
    """
    mode = check_mode(mode, y)
    if linearization is not None:
        try:
            return linearization(v)
        except (NotImplementedError, RuntimeError) as err:
            if not _missing_derivative(err):
                raise  # else: the graph lacks a double backward; find the fallback below
    return _with_fallbacks(fn, mode, lambda m: hvp_in_mode(fn, x, y, batch, v, m))


def hvp_operator(fn: Objective, x: Tree, y: Tree, batch: Any, mode: str | None = None) -> Callable[[Tree], Tree]:
    """The linear map v -> H v at (x, y), for the solvers in ``hypergrad.solvers``.

    In reverse-over-reverse mode (the default on every device, see ``DEFAULT_HVP_MODES``) the
    gradient's graph is built here once and each product is one reverse pass through it; the
    graph is freed with the operator. Every product goes through ``hvp`` with v as its last positional
    argument (the oracle counters of ``experiments/oracles.py`` read the vmap batch from it).
    """
    mode = check_mode(mode, y)
    if mode != "reverse-over-reverse":
        return lambda v: hvp(fn, x, y, batch, v, mode=mode)

    def build() -> dict[str, Any]:
        level = _level(fn)
        with _ATTEMPTS[level][1]():
            return {"level": level, "pullback": linearize(fn, x, y, batch)}

    # Built now, at the caller's vmap level; rebuilt only if a product found the graph lacks a derivative.
    built = build()

    def matvec(v: Tree) -> Tree:
        if built["level"] != _level(fn):
            built.update(build())
        return hvp(fn, x, y, batch, v, mode=mode, linearization=built["pullback"])

    return matvec


def mixed_vjp(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree) -> tuple[Tree, Tree, Tensor]:
    """(J v, grad_y fn, fn) at (x, y), where J v = grad_x <grad_y fn(x, y), v> (shapes of x, y, 0-d).

    The forward pass of the VJP is the lower gradient itself, so the lower stationarity
    |grad_y g| and the value g come with J v at no extra cost.
    """
    def once(_: str) -> tuple[Tree, Tree, Tensor]:
        gy, pullback, value = vjp(lambda x_: grad_y(fn, x_, y, batch), x, has_aux=True)
        (jv,) = pullback(v)
        return jv, gy, value

    return _with_fallbacks(fn, "reverse-over-reverse", once)


# -- fallbacks for models without some derivative ---------------------------------------------------

@contextmanager
def _math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its composite math backend: differentiable in every mode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# Fallback level -> (the mode to use instead of the requested one, or None to keep it; the context to run in).
_ATTEMPTS: tuple[tuple[str | None, Callable[[], Any]], ...] = (
    (None, nullcontext),
    ("reverse-over-reverse", nullcontext),
    ("reverse-over-reverse", _math_attention),
)
_HOW = ("", "reverse-over-reverse", "reverse-over-reverse with the math attention backend")


def _level(fn: Objective) -> int:
    """The fallback level ``fn`` is known to need (0: none)."""
    return _FALLBACK.get(fn, 0) if _weakrefable(fn) else 0


def _missing_derivative(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch saying an op lacks a forward-mode or higher-order derivative."""
    text = str(err)
    no_forward = "forward AD" in text or "forward mode AD" in text  # aten ops / custom autograd.Functions
    return no_forward or ("derivative for" in text and "not implemented" in text)


def _with_fallbacks(fn: Objective, mode: str, run: Callable[[str], Any]) -> Any:
    """``run(mode)``, retried at the next fallback level while a derivative is missing; the level is kept per fn."""
    start, tried = _level(fn), None
    for level in range(start, len(_ATTEMPTS)):
        alternative, context = _ATTEMPTS[level]
        attempt = (alternative or mode, context)
        if attempt == tried:
            continue  # the requested mode already was reverse-over-reverse: nothing new to try
        tried = attempt
        try:
            with context():
                out = run(attempt[0])
        except (NotImplementedError, RuntimeError) as err:
            if not _missing_derivative(err) or level == len(_ATTEMPTS) - 1:
                raise
            continue
        if level > start and _weakrefable(fn):
            _FALLBACK[fn] = level
            warnings.warn(f"kernels: {getattr(fn, '__qualname__', fn)!s} lacks a derivative the {mode} product "
                          f"needs; using {_HOW[level]} for it from now on", RuntimeWarning, stacklevel=3)
        return out
    raise AssertionError("unreachable: the last level either returns or raises")


def _weakrefable(fn: Any) -> bool:
    try:
        weakref.ref(fn)
    except TypeError:
        return False
    return True
