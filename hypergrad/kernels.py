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

Probe: a mode can also be silently wrong or fail in ways the fallbacks do not recognise (in torch
2.13 reverse-over-forward is wrong through ``layer_norm`` and training-mode ``batch_norm``, and
forward-over-reverse raises "ZeroTensors are immutable" through ``mse_loss``). So the first time
``hvp`` or ``hvp_operator`` meets an objective in forward-over-reverse or reverse-over-forward mode,
``probe_hvp_mode`` compares that mode with reverse-over-reverse (the reference, never probed) on one
random vector: in y's dtypes, drawn from a private generator with a fixed seed, the objective run
under ``torch.random.fork_rng`` so the global RNG stream (dropout masks) is the same with or without
the probe. A mode that raises or differs by more than ``probe_tolerance`` is replaced, for that
objective, by reverse-over-reverse (with the fallbacks above), with one warning naming the mode, the
objective and the reason. The verdict is kept per objective and mode, so the probe runs once, not per
call; it costs two products (one in the mode, one in reverse-over-reverse) plus drawing the vector,
the RNG forks and the comparison, once per objective and mode (``tests/test_hvp_probe.py`` counts the calls).
The probe needs Python booleans from tensors, which it cannot have while ``torch.func`` transforms
(``vmap`` of a population, the solvers' ``vmap`` over vectors) or ``torch.compile`` trace the call.
There, an objective without a verdict gets reverse-over-reverse (correct by construction; nothing is
recorded) and is probed at its next plain call; ``hvp_operator`` probes when it is built, before the
solvers vmap its products. Call ``probe_hvp_mode`` on one member's plain (x, y, batch) first to have
a population or a compiled engine use the requested mode.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import MethodType
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from hypergrad import loops
from hypergrad.distributed import mean_over_ranks, world_size
from hypergrad.plain import plain_call
from hypergrad.tree import Tree

Objective = Callable[[Tree, Tree, Any], Tensor]
_Pullback = tuple[Any, Callable[..., Any]]
_PullbackWithAux = tuple[Any, Callable[..., Any], Any]
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

# Both maps are keyed by the objective's owner (``_slot``: the function, or a bound method's instance) and die with it.
# Objectives known to need a fallback -> {key: the level of _ATTEMPTS that worked} (no re-failing each call).
_FALLBACK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Objectives probed -> {(key, mode): whether the mode agreed with reverse-over-reverse} (one probe per pair).
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PROBE_SEED = 20240610
"""Seed of the probe's private generator: the probe vector is the same in every run and process."""


def vjp_of(func: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.vjp(func, *primals)``: (output, pullback). Typed here: torch annotates both arities as one union."""
    return cast(_Pullback, vjp(func, *primals))


def vjp_with_aux(func: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any], Any]:
    """``torch.func.vjp(func, *primals, has_aux=True)``: (output, pullback, auxiliary output)."""
    return cast(_PullbackWithAux, vjp(func, *primals, has_aux=True))


def grad_y(fn: Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tensor]:
    """(grad_y fn(x, y), fn(x, y)): one gradient. Leaves have the shapes of y's.

    Under a process group both are means over ranks (one all-reduce; ``hypergrad.distributed``),
    differentiably: an unrolled run through it descends on the global mean gradient.
    """
    return mean_over_ranks(_local_grad_y(fn, x, y, batch))


def _local_grad_y(fn: Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tensor]:
    """``grad_y`` on this rank's batch alone (no all-reduce): for use inside products reduced as a whole."""
    if _recordable(x, y):
        return _autograd_and_value(fn, x, y, batch, of_x=False)[1:]
    return grad_and_value(fn, argnums=1)(x, y, batch)


def grad_xy(fn: Objective, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, Tensor]:
    """(grad_x fn, grad_y fn, fn(x, y)) from one reverse pass (shapes of x, y, 0-d); mean over ranks, 1 all-reduce."""
    if _recordable(x, y):
        return mean_over_ranks(_autograd_and_value(fn, x, y, batch, of_x=True))
    (gx, gy), value = grad_and_value(fn, argnums=(0, 1))(x, y, batch)
    return mean_over_ranks((gx, gy, value))


def _autograd_and_value(fn: Objective, x: Tree, y: Tree, batch: Any, of_x: bool) -> tuple[Tree, Tree, Tensor]:
    """(grad_x fn (empty unless ``of_x``), grad_y fn, fn) by one ``torch.autograd.grad``: a plain call's gradient.

    The same numbers as ``torch.func.grad_and_value`` without its per-op transform dispatch (``_recordable``).
    """
    with torch.enable_grad():
        xs = {k: t.detach().requires_grad_() for k, t in x.items()} if of_x else x
        ys = {k: t.detach().requires_grad_() for k, t in y.items()}
        value = fn(xs, ys, batch)
        if not of_x:
            return {}, autograd_grad(value, ys), value.detach()
        if not value.requires_grad:
            return {k: _zero(t) for k, t in x.items()}, {k: torch.zeros_like(t) for k, t in y.items()}, value.detach()
        grads = torch.autograd.grad(value, [*xs.values(), *ys.values()], allow_unused=True)
    # A leaf of x that fn does not use (f of most problems: a validation loss has no hyperparameter) gets a zero
    # that holds no memory, where a dense one would sit beside the solve as one more tensor the size of x.
    gx = {k: _zero(t) if grad is None else grad for (k, t), grad in zip(x.items(), grads[:len(x)], strict=True)}
    gy = {k: torch.zeros_like(t) if grad is None else grad
          for (k, t), grad in zip(y.items(), grads[len(x):], strict=True)}
    return gx, gy, value.detach()


def _zero(like: Tensor) -> Tensor:
    """Zeros shaped as ``like`` in one element of memory (a stride-0 view): read-only, as a gradient is used."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand_as(like)


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
    Its products are this rank's own (not averaged over ranks): ``hvp`` averages them.
    """
    _, pullback = vjp_of(lambda y_: grad(fn, argnums=1)(x, y_, batch), y)
    return lambda v: pullback(v)[0]


def hvp_in_mode(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree, mode: str) -> Tree:
    """H v in exactly ``mode`` (one of ``HVP_MODES``), with no fallback: raises if fn lacks a derivative it needs.

    This rank's own product (not averaged over ranks; ``hvp`` is): the probe and the benchmarks use it.
    """
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
    Under a process group the product is the mean over ranks (one all-reduce per call; under the
    solvers' vmap over vectors, one for all of them).
    """
    return mean_over_ranks(_local_hvp(fn, x, y, batch, v, mode, linearization))


def _local_hvp(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree, mode: str | None,
               linearization: Linearization | None) -> Tree:
    """``hvp`` on this rank's batch alone."""
    mode = check_mode(mode, y)
    if linearization is not None:
        try:
            return linearization(v)
        except (NotImplementedError, RuntimeError) as err:
            if not _missing_derivative(err):
                raise  # else: the graph lacks a double backward; find the fallback below
    mode = _probed_mode(fn, x, y, batch, mode)
    return _with_fallbacks(fn, mode, lambda m: hvp_in_mode(fn, x, y, batch, v, m))


def hvp_operator(fn: Objective, x: Tree, y: Tree, batch: Any, mode: str | None = None) -> Callable[[Tree], Tree]:
    """The linear map v -> H v at (x, y), for the solvers in ``hypergrad.solvers``.

    In reverse-over-reverse mode (the default on every device, see ``DEFAULT_HVP_MODES``) the
    gradient's graph is built here once and each product is one reverse pass through it; the graph
    is freed with the operator, and ``mixed_vjp(..., operator=...)`` takes J v from the same graph.
    On a plain call (no torch.func transform, no torch.compile, x and y outside any autograd graph)
    ``torch.autograd`` records it directly, in (x, y), as hand-written code would (``Recorded``); under
    a transform ``torch.func`` does (``linearize``). Every product goes through ``hvp`` with v as its
    last positional argument (the oracle counters of ``experiments/oracles.py`` read the vmap batch
    from it), so under a process group each product is averaged over ranks there, once.
    """
    # Probed here, outside the solvers' vmap over v: a mode found wrong takes the kept-graph path below.
    mode = _probed_mode(fn, x, y, batch, check_mode(mode, y))
    if loops.folding() and world_size() == 1:
        # Compiling with folded solver loops (compile_engine(fold_loops=True)): a pullback built outside cannot
        # enter torch 2.13's while_loop body, so each product recomputes the gradient inside it.
        return loops.mark_loop_safe(lambda v: hvp(fn, x, y, batch, v, mode=mode))
    if mode != "reverse-over-reverse":
        return lambda v: hvp(fn, x, y, batch, v, mode=mode)

    def build(recorded: bool) -> dict[str, Any]:
        level = _level(fn)
        with _ATTEMPTS[level][1]():
            pullback = Recorded(fn, x, y, batch) if recorded else linearize(fn, x, y, batch)
        return {"level": level, "pullback": pullback}

    # Built now, at the caller's vmap level; rebuilt if a product found the graph lacks a derivative, or on
    # torch.func if the products are vmapped (Exact's dense solve): torch.autograd cannot take batched vectors.
    built = build(_recordable(x, y))

    def matvec(v: Tree) -> Tree:
        if built["level"] != _level(fn) or (isinstance(built["pullback"], Recorded) and not _plain_call()):
            built.update(build(False))
        return hvp(fn, x, y, batch, v, mode=mode, linearization=built["pullback"])

    matvec.built = built  # type: ignore[attr-defined]  # read by mixed_vjp(operator=...)
    return matvec


def mixed_vjp(fn: Objective, x: Tree, y: Tree, batch: Any, v: Tree,
              operator: Callable[[Tree], Tree] | None = None) -> tuple[Tree, Tree, Tensor]:
    """(J v, grad_y fn, fn) at (x, y), where J v = grad_x <grad_y fn(x, y), v> (shapes of x, y, 0-d).

    The forward pass of the VJP is the lower gradient itself, so the lower stationarity
    |grad_y g| and the value g come with J v at no extra cost. With ``operator`` (an ``hvp_operator``
    at the same fn, x, y, batch whose graph ``torch.autograd`` recorded) J v is one reverse pass through
    the solve's own graph and no gradient is recorded again. Under a process group all three are means
    over ranks, in one all-reduce (v must be the same on every rank).
    """
    recorded = _recorded(operator)
    if recorded is not None:
        try:
            return mean_over_ranks((recorded.mixed(v), recorded.gradient, recorded.value))
        except (NotImplementedError, RuntimeError) as err:
            if not _missing_derivative(err):
                raise  # else: the graph lacks a double backward; the torch.func path below finds the fallback

    def once(_: str) -> tuple[Tree, Tree, Tensor]:
        # The local gradient: one all-reduce of the three results, not one for the forward and one for J v.
        gy, pullback, value = vjp_with_aux(lambda x_: _local_grad_y(fn, x_, y, batch), x)
        (jv,) = pullback(v)
        return jv, gy, value

    return mean_over_ranks(_with_fallbacks(fn, "reverse-over-reverse", once))


def _recorded(operator: Callable[[Tree], Tree] | None) -> Recorded | None:
    recorded = getattr(operator, "built", {}).get("pullback")
    return recorded if isinstance(recorded, Recorded) and _plain_call() else None


def _recordable(*trees: Tree) -> bool:
    """Whether ``torch.autograd`` may record here: a plain call on tensors outside any autograd graph.

    Detaching such tensors to record a private graph changes nothing for the caller; a tensor with
    ``requires_grad`` belongs to a graph the caller may differentiate (torch.func keeps that path).
    """
    # Autograd itself may be switched off below us: the eager cond operator (BO-REP's periodic update) runs its
    # branches below the autograd dispatch key, where a recorded graph would silently be empty.
    # _plain_call first: dynamo folds it to False and never sees the dispatch query (which would break the graph).
    return (_plain_call() and not torch._C._dispatch_tls_is_dispatch_key_excluded(_AUTOGRAD)
            and not any(t.requires_grad for tree in trees for t in tree.values()))


_AUTOGRAD = torch._C.DispatchKey.AutogradFunctionality


class Recorded:
    """grad_y fn at (x, y) recorded by ``torch.autograd`` with ``create_graph``: H v and J v as reverse passes.

    What hand-written code does (``autograd.grad(g, y, create_graph=True)``, then ``autograd.grad(gy, y, v,
    retain_graph=True)`` per product and ``autograd.grad(gy, x, v)`` once): each pass goes only to the
    inputs it asks for, where a ``torch.func`` pullback in (x, y) would compute both. Plain calls only
    (``_recordable``); a product is this rank's own (``hvp`` averages it). Calling it is H v (shapes of y).
    """

    def __init__(self, fn: Objective, x: Tree, y: Tree, batch: Any) -> None:
        with torch.enable_grad():
            self._x = {k: t.detach().requires_grad_() for k, t in x.items()}
            self._y = {k: t.detach().requires_grad_() for k, t in y.items()}
            value = fn(self._x, self._y, batch)
            gradient = autograd_grad(value, self._y, create_graph=True)
        self.value = value.detach()
        self.gradient = {k: g.detach() for k, g in gradient.items()}
        # Leaves of grad_y fn that depend on nothing (fn linear in them) have no graph and contribute 0.
        self._outputs = {k: g for k, g in gradient.items() if g.requires_grad}

    def __call__(self, v: Tree) -> Tree:
        return self._pull(v, self._y)

    def mixed(self, v: Tree) -> Tree:
        """J v = grad_x <grad_y fn, v> (shapes of x)."""
        return self._pull(v, self._x)

    def _pull(self, v: Tree, inputs: dict[Any, Tensor]) -> dict[Any, Tensor]:
        # The graph is kept (retain_graph) until the operator dies: a fallback step takes J at a second vector.
        if not self._outputs:
            return {k: torch.zeros_like(t) for k, t in inputs.items()}
        grads = torch.autograd.grad(list(self._outputs.values()), list(inputs.values()),
                                    [v[k] for k in self._outputs], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        return dict(zip(inputs, grads, strict=True))


def autograd_grad(value: Tensor, wrt: dict[Any, Tensor], create_graph: bool = False) -> dict[Any, Tensor]:
    """d value / d wrt by ``torch.autograd.grad`` (zeros for leaves value does not depend on, as torch.func gives;
    shapes of wrt): the plain route's gradient (``Recorded``, ``grad_xy``; Unrolled's tape, ``dynamics``)."""
    if not value.requires_grad:
        return {k: torch.zeros_like(t) for k, t in wrt.items()}
    grads = torch.autograd.grad(value, list(wrt.values()), create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return dict(zip(wrt, grads, strict=True))


# -- the probe: modes that are right or replaced ----------------------------------------------------

def probe_tolerance(dtype: torch.dtype) -> float:
    """The largest relative difference from reverse-over-reverse a mode may show in ``dtype``.

    sqrt(eps) for float32/float64 (1.5e-8, 3.5e-4): right modes differ by rounding, a few eps (1e-7 measured
    on a float32 MLP and CNN), wrong ones by 1e-2 and more. 16-bit types get 8 eps (0.0625 bfloat16, 0.0078
    float16) because their sqrt(eps) (0.09 for bfloat16) would pass products that are 9 % off.
    """
    eps = torch.finfo(dtype).eps
    return eps**0.5 if eps < 1e-4 else 8 * eps


def probe_hvp_mode(fn: Objective, x: Tree, y: Tree, batch: Any, mode: str | None = None) -> str:
    """The mode ``hvp`` and ``hvp_operator`` will use for ``fn`` when asked for ``mode``; probes it if not yet done.

    Runs the probe of the module docstring on this plain (not vmapped, not compiled) (x, y, batch) and
    records the verdict, so that later calls, also under ``torch.func.vmap`` or ``torch.compile``, use the
    requested mode when it agreed. Returns ``mode`` or "reverse-over-reverse". Costs one product in
    ``mode`` and one in reverse-over-reverse, once per objective and mode.
    """
    mode = check_mode(mode, y)
    if not _plain_call():
        raise RuntimeError("kernels.probe_hvp_mode: call it outside torch.func transforms and torch.compile "
                           "(on one member's x, y and batch for a population)")
    return _probed_mode(fn, x, y, batch, mode)


_plain_call = plain_call  # the probe's and the recorded graphs' test (``hypergrad.plain``)


def _verdict(fn: Objective, mode: str) -> bool | None:
    """True: ``mode`` agreed for ``fn``; False: it was replaced; None: not probed yet."""
    slot = _slot(fn)
    return None if slot is None else _VERDICTS.get(slot[0], {}).get((slot[1], mode))


def _probed_mode(fn: Objective, x: Tree, y: Tree, batch: Any, mode: str) -> str:
    """``mode`` if it is (or, probed now, turns out) right for ``fn``; else reverse-over-reverse."""
    if mode == "reverse-over-reverse" or _level(fn) > 0:
        return mode  # the reference; or a fallback level already overrides every mode
    verdict = _verdict(fn, mode)
    if verdict is None:
        if not _plain_call():
            # Under vmap/compile the probe cannot branch on its result: use the reference now, probe later.
            return "reverse-over-reverse"
        verdict = _probe(fn, x, y, batch, mode)
    return mode if verdict else "reverse-over-reverse"


def _probe(fn: Objective, x: Tree, y: Tree, batch: Any, mode: str) -> bool:
    """Compare ``mode`` with reverse-over-reverse on one fixed random vector; record and return the verdict."""
    v = _probe_vector(y)
    devices = sorted({t.device for t in y.values() if t.device.type not in ("cpu", "meta")}, key=str)

    def product(m: str) -> Tree:
        # Each product starts from the caller's RNG state (same dropout masks in both) and leaves it as it was.
        with _fork_rng(devices):
            return _with_fallbacks(fn, m, lambda m_: hvp_in_mode(fn, x, y, batch, v, m_), requested=mode)

    try:
        out, failure = product(mode), None
    except Exception as err:  # anything: the mode is replaced if the reference works
        out, failure = None, err
    if _level(fn) > 0:
        return False  # a missing derivative: _with_fallbacks has warned and overrides every mode from now on
    reference = product("reverse-over-reverse")  # raises if fn itself is broken: nothing is recorded then
    if out is not None:  # the mode's product ran (failure is None)
        difference = _relative_difference(out, reference)
        # The least precise leaf sets it; an objective run under autocast (``compute_dtype``, set by the
        # loop's mixed-precision wrapper) rounds at its compute dtype, not at its leaves'.
        dtypes = [t.dtype for t in y.values()] + [d for d in (getattr(fn, "compute_dtype", None),) if d is not None]
        tolerance = max(probe_tolerance(dtype) for dtype in dtypes)
        agrees = difference <= tolerance  # False for NaN
        reason = f"differs from reverse-over-reverse by {difference:.2g} (relative; tolerance {tolerance:.2g})"
    else:
        agrees = False
        first_line = (str(failure).strip().splitlines() or [""])[0]
        reason = f"raised {type(failure).__name__}: {first_line}"
    if (slot := _slot(fn)) is not None:
        _VERDICTS.setdefault(slot[0], {})[slot[1], mode] = agrees
    if not agrees:
        warnings.warn(f"kernels: the {mode} product of {_name(fn)} {reason}; using reverse-over-reverse for it "
                      "from now on", RuntimeWarning, stacklevel=4)
    return agrees


def _probe_vector(y: Tree) -> Tree:
    """A standard normal tree shaped like y, in y's dtypes, from a private generator (global RNG untouched)."""
    generators: dict[torch.device, torch.Generator] = {}
    out = {}
    for k, t in y.items():
        if t.device not in generators:
            generators[t.device] = torch.Generator(device=t.device).manual_seed(PROBE_SEED)
        out[k] = torch.randn(t.shape, generator=generators[t.device], dtype=t.dtype, device=t.device)
    return out


def _relative_difference(a: Tree, b: Tree) -> float:
    """|a - b| / max(|a|, |b|) over whole trees, accumulated in at least float32; 0 when both are zero."""
    def wide(t: Tensor) -> Tensor:
        return t.detach().to(torch.promote_types(t.dtype, torch.float32))

    diff = sum(float(torch.linalg.vector_norm(wide(a[k]) - wide(b[k])) ** 2) for k in b) ** 0.5
    scale = max(sum(float(torch.linalg.vector_norm(wide(t[k])) ** 2) for k in b) ** 0.5 for t in (a, b))
    return 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")


@contextmanager
def _fork_rng(devices: list[torch.device]) -> Iterator[None]:
    """``torch.random.fork_rng`` over the CPU generator and those of ``devices`` (accelerators of one type)."""
    kind = devices[0].type if devices else "cuda"
    indices = [d.index if d.index is not None else 0 for d in devices]
    with torch.random.fork_rng(devices=indices, device_type=kind):
        yield


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", fn))


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
    slot = _slot(fn)
    return 0 if slot is None else _FALLBACK.get(slot[0], {}).get(slot[1], 0)


def _missing_derivative(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch saying an op lacks a forward-mode or higher-order derivative."""
    text = str(err)
    no_forward = "forward AD" in text or "forward mode AD" in text  # aten ops / custom autograd.Functions
    return no_forward or ("derivative for" in text and "not implemented" in text)


def _with_fallbacks(fn: Objective, mode: str, run: Callable[[str], Any], requested: str | None = None) -> Any:
    """``run(mode)``, retried at the next fallback level while a derivative is missing; the level is kept per fn.

    ``requested``: the mode the caller asked for, named in the warning (the probe runs the reference for it).
    """
    start, tried, reason = _level(fn), None, ""
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
            reason = reason or (str(err).strip().splitlines() or [""])[0]  # the requested mode's own failure
            continue
        if level > start and (slot := _slot(fn)) is not None:
            _FALLBACK.setdefault(slot[0], {})[slot[1]] = level
            warnings.warn(f"kernels: {_name(fn)} lacks a derivative the {requested or mode} product needs "
                          f"({reason}); using {_HOW[level]} for it from now on", RuntimeWarning, stacklevel=3)
        return out
    raise AssertionError("unreachable: the last level either returns or raises")


def _slot(fn: Any) -> tuple[Any, Any] | None:
    """(owner, key) under which fn's fallback level and verdicts are kept; None if they cannot be kept.

    A bound method is a new object at every attribute access (``kernels.hvp(self.g, ...)``): keyed by itself
    its entries would die at once and it would be probed, and warned about, at every call. So it is kept
    under its instance, keyed by its function. Objects that take no weak reference are not kept (probed at
    every plain call).
    """
    owner, key = (fn.__self__, fn.__func__) if isinstance(fn, MethodType) else (fn, None)
    return (owner, key) if _weakrefable(owner) else None


def _weakrefable(fn: Any) -> bool:
    try:
        weakref.ref(fn)
    except TypeError:
        return False
    return True
