r"""The faithful muLO learned optimizer: an MLP on Adafactor-style features (``MuAdafacMLPLOpt``).

Thérien, Joseph, Knyazev, Oyallon, Rish, Belilovsky 2024, "muLO: Compute-efficient meta-generalization
of learned optimizers". Their optimizer is ``MuAdafacMLPLOpt`` in ``src/mup_adafac_mlp_lopt.py`` of
bentherien/mu_learned_optimization, a copy of ``AdafacMLPLOpt`` of google/learned_optimization
(``learned_optimization/learned_optimizers/adafac_mlp_lopt.py``, accumulators in
``learned_optimizers/common.py``) that multiplies the step by the parameter's muP learning-rate
multiplier and replaces non-finite gradients by finite ones. Everything below was read from those
three files; this is our own PyTorch code. The settings are the ones muLO meta-trains with
(``src/meta_trainers.py``, ``config/config_base.py``): hidden width 32, 2 hidden layers, exp_mult
0.001, step_mult 0.001, momentum decays (0.9, 0.99, 0.999), RMS decay (0.999,), Adafactor decays
(0.9, 0.99, 0.999), no gradient clipping.

Meta-learned accumulator decays (``decay_to_param`` / ``param_to_decay``, ``_get_rolling``). theta
holds ``momentum_decays`` (3,), ``rms_decays`` (1,) and ``adafactor_decays`` (3,), all zero at init,
and the decays in use are, for the initial decays d0::

    decay = 1 - exp(10 (log(1 - d0) / 10 + theta_decay))  (= 1 - (1 - d0) exp(10 theta_decay))

The RMS and Adafactor decays are clipped to [0, 1] where they are used (``jnp.clip``); the momentum
decays are not.

Accumulators (``common.vec_rolling_mom``, ``vec_rolling_rms``, ``vec_factored_rolling``), for a
parameter p with gradient g (first g <- nan_to_num(g): NaN -> 0, +-inf -> the dtype's extremes; with
``clip_grad``, before that, every g of the call is scaled by 1 / max(1, ||g||_global), optax's
``clip_by_global_norm(1.0)``)::

    m_k <- b_k m_k + (1 - b_k) g                                    k = 1..3   state "name/m" (*S, 3)
    v   <- c v + (1 - c) g^2,  c = clip(rms decay)                              "name/rms" (*S, 1)
    q   = g^2 + 1e-30                                               Adafactor, for each decay f_k (clipped):
    matrices: v_row <- f v_row + (1 - f) mean_{d0}(q)                          "name/v_row" (*S minus d0, 3)
              v_col <- f v_col + (1 - f) mean_{d1}(q)                          "name/v_col" (*S minus d1, 3)
              row_factor = srsqrt(v_row / (mean_{d1}(v_row) + 1e-9)),  col_factor = srsqrt(v_col)
              fac_g = g row_factor col_factor          (each factor broadcast back over its reduced axis)
    vectors:  v_diag <- f v_diag + (1 - f) q                                     "name/v_diag" (*S, 3)
              fac_g = g srsqrt(v_diag + 1e-9)

with srsqrt(x) = rsqrt(max(x, 1e-9)) (``common.safe_rsqrt``). ``common.factored_dims`` factors the
two largest axes: d0 is the larger, d1 the other (``argsort``; on a tie d0 is the later axis). We
factor the last two axes of a tensor (..., R, C) (a stack of matrices, as the reduced LO does):
d0 = the last axis if C >= R, else the second to last. For 2-d tensors this is exactly the official
rule; for 3 or more dims the official code factors the two largest axes of the whole tensor instead.
Tensors with fewer than 2 dims (biases, scalars) keep v_diag.

Inputs (``_mod``), 28 feature channels in this order (``FEATURES``; k runs over the 3 decays)::

    g, p, m_k, v, m_k rsqrt(v + 1e-6), rsqrt(v + 1e-6), fac_g_k,
    matrices: row_k, col_k, rsqrt(row_k + 1e-8), rsqrt(col_k + 1e-8), m_k row_factor_k col_factor_k
    vectors:  v_diag_k, v_diag_k, rsqrt(v_diag_k + 1e-8), rsqrt(v_diag_k + 1e-8), m_k (v_diag_k + 1e-6)^-1/2

(row_k = v_row_k, col_k = v_col_k broadcast back to p's shape; the k-th momentum pairs with the k-th
Adafactor decay), each channel x normalized over the whole tensor (``second_moment_normalizer``)::

    x <- x rsqrt(1e-5 + mean(x^2))

then the 11 step features tanh(t / tau - 1), tau in (1, 3, 10, ..., 3e4, 1e5) with t the number of
earlier updates (``tanh_embedding(opt_state.iteration)``), are appended unnormalized: 39 inputs.
The epsilons thus are: normalizer 1e-5, Adam channels 1e-6, factored features 1e-8, safe rsqrt and
row-mean 1e-9, squared gradient 1e-30.

MLP: 39 -> 32 -> 32 -> 2, ReLU between layers, no activation at the output; every weight drawn from
haiku's ``TruncatedNormal(stddev=1 / sqrt(fan_in))`` (a standard normal truncated to [-2, 2], times
the stddev, no variance correction), biases zero, decays zero. With output (d, a) per coordinate::

    step = d exp(exp_mult a) step_mult,     p <- p - step s_p

with s_p the parameter's muP multiplier, one float per tensor (muLO's ``mup_lrs_to_use``, built
from ``MuMLP.get_adam_mup_lr_mul`` in ``src/mu_mlp.py``: hidden weights hidden_lr_mult / fan_in,
every other weight and every bias 1). Pass it as the explicit name -> float map ``multipliers``:
``MuMLP.mulo_multipliers`` of ``bilevel.learned.mup`` is muLO's map, ``MuMLP.multipliers`` ours
(hidden weights base_width / fan_in, the same up to the constant base_width).

``adafac_init_state`` / ``adafac_step`` are pure functions of trees, like ``lo_init_state`` /
``lo_step``; ``adafac_rule`` wraps them as a ``bilevel.learned.rule.LORule``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.learned.rule import TIMESCALES, LORule, Tree, built_net, check_names, check_step_inputs, step_embedding

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
EXP_MULT = 0.001
STEP_MULT = 0.001
NORMALIZER_EPS = 1e-5  # second_moment_normalizer
ADAM_EPS = 1e-6  # rsqrt(v + 1e-6) and, for vectors, (v_diag + 1e-6)^-1/2
FACTORED_FEATURE_EPS = 1e-8  # rsqrt(row + 1e-8), rsqrt(col + 1e-8)
SAFE_RSQRT_FLOOR = 1e-9  # common.safe_rsqrt; also the 1e-9 added to mean(v_row) and to v_diag
GRAD_SQR_EPS = 1e-30  # factored_rolling's epsilon
DECAY_PARAM_SCALE = 10.0  # decay_to_param / param_to_decay
CLIP_NORM = 1.0
FEATURES = (
    "g", "p", "m0", "m1", "m2", "rms", "m0*rsqrt(rms)", "m1*rsqrt(rms)", "m2*rsqrt(rms)", "rsqrt(rms)",
    "fac_g0", "fac_g1", "fac_g2", "row0", "row1", "row2", "col0", "col1", "col2",
    "rsqrt(row0)", "rsqrt(row1)", "rsqrt(row2)", "rsqrt(col0)", "rsqrt(col1)", "rsqrt(col2)",
    "fac_mom0", "fac_mom1", "fac_mom2",
)
INPUTS = len(FEATURES) + len(TIMESCALES)


def feature_count(momenta: int, rms: int, adafactor: int) -> int:
    """The number of feature channels for these numbers of decays (28 for 3, 1, 3).

    Broadcasting in the official code pairs m with rms and m with the Adafactor factors, so each pair of
    counts must be equal or contain a 1."""
    return 2 + momenta + rms + max(momenta, rms) + rms + adafactor + 4 * adafactor + max(momenta, adafactor)


class AdafacLONet(nn.Module):
    """muLO's per-coordinate MLP (39 -> hidden -> hidden -> 2) plus the meta-learned decay offsets; theta.

    Parameters (theta): ``momentum_decays`` (3,), ``rms_decays`` (1,), ``adafactor_decays`` (3,) (zero:
    the decays start at their initial values) and ``net.{0,2,4}.{weight,bias}``.

    Args:
        hidden: width of the hidden ReLU layers (32 in muLO).
        hidden_layers: number of hidden layers (2).
        exp_mult: scale of the magnitude output a in exp(exp_mult a) (0.001).
        step_mult: the default global step scale (0.001; ``adafac_step``'s ``step_mult`` overrides it).
        initial_momentum_decays, initial_rms_decays, initial_adafactor_decays: the decays at theta = 0.
        clip_grad: clip the gradients of each call to global norm 1 first (off in muLO's runs).
        generator: random source of the init (None: torch's global one).
    """

    def __init__(self, hidden: int = 32, hidden_layers: int = 2, exp_mult: float = EXP_MULT,
                 step_mult: float = STEP_MULT, initial_momentum_decays: Sequence[float] = MOMENTUM_DECAYS,
                 initial_rms_decays: Sequence[float] = RMS_DECAYS,
                 initial_adafactor_decays: Sequence[float] = ADAFACTOR_DECAYS, clip_grad: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        decays = {"initial_momentum_decays": tuple(float(d) for d in initial_momentum_decays),
                  "initial_rms_decays": tuple(float(d) for d in initial_rms_decays),
                  "initial_adafactor_decays": tuple(float(d) for d in initial_adafactor_decays)}
        _check_settings(hidden, hidden_layers, exp_mult, step_mult, decays)
        self.hidden, self.hidden_layers = hidden, hidden_layers
        self.exp_mult, self.step_mult, self.clip_grad = float(exp_mult), float(step_mult), bool(clip_grad)
        self.initial_momentum_decays = decays["initial_momentum_decays"]
        self.initial_rms_decays = decays["initial_rms_decays"]
        self.initial_adafactor_decays = decays["initial_adafactor_decays"]
        self.features = feature_count(len(self.initial_momentum_decays), len(self.initial_rms_decays),
                                      len(self.initial_adafactor_decays))
        self.inputs = self.features + len(TIMESCALES)
        self.momentum_decays = nn.Parameter(torch.zeros(len(self.initial_momentum_decays)))
        self.rms_decays = nn.Parameter(torch.zeros(len(self.initial_rms_decays)))
        self.adafactor_decays = nn.Parameter(torch.zeros(len(self.initial_adafactor_decays)))
        sizes = [self.inputs] + [hidden] * hidden_layers + [2]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        with torch.no_grad():
            for layer in self.layers():
                std = layer.weight.shape[1] ** -0.5  # haiku TruncatedNormal(1 / sqrt(fan_in)): cut at +-2 std
                nn.init.trunc_normal_(layer.weight, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
                layer.bias.zero_()

    def layers(self) -> list[nn.Linear]:
        """The linear layers of ``net``, input first."""
        return [layer for layer in self.net if isinstance(layer, nn.Linear)]

    def settings(self) -> dict[str, Any]:
        """The constructor arguments (without the generator) as plain Python values: ``AdafacLONet(**settings)``."""
        return {"hidden": self.hidden, "hidden_layers": self.hidden_layers, "exp_mult": self.exp_mult,
                "step_mult": self.step_mult, "initial_momentum_decays": list(self.initial_momentum_decays),
                "initial_rms_decays": list(self.initial_rms_decays),
                "initial_adafactor_decays": list(self.initial_adafactor_decays), "clip_grad": self.clip_grad}

    def forward(self, features: Tensor, time: Tensor) -> Tensor:
        """features (n, 28) (normalized ``FEATURES``), time (11,) (``step_embedding``) -> (n, 2): d and a.

        The MLP of [features, time] (n, 39); the time part of the first layer is the same for every row,
        so it is folded into that layer's bias once per call."""
        layers = self.layers()
        first = layers[0]
        bias = first.bias + first.weight[:, self.features:] @ time
        h = F.linear(features, first.weight[:, :self.features], bias)
        for layer in layers[1:]:
            h = layer(torch.relu(h))
        return h


def _check_settings(hidden: int, hidden_layers: int, exp_mult: float, step_mult: float,
                    decays: dict[str, tuple[float, ...]]) -> None:
    for name, value in (("hidden", hidden), ("hidden_layers", hidden_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"AdafacLONet: {name} must be a positive int, got {value!r}")
    for name, number in (("exp_mult", exp_mult), ("step_mult", step_mult)):
        if not math.isfinite(number):
            raise ValueError(f"AdafacLONet: {name} must be finite, got {number!r}")
    for name, values in decays.items():
        if not values or not all(0.0 <= d < 1.0 for d in values):
            raise ValueError(f"AdafacLONet: {name} must be a non-empty list of decays in [0, 1), got {values}")
    m, r, f = (len(v) for v in decays.values())
    if not (r in (1, m) or m == 1) or not (f in (1, m) or m == 1):
        raise ValueError(f"AdafacLONet: {m} momentum, {r} rms and {f} adafactor decays do not broadcast "
                         "(each of rms and adafactor needs as many decays as momentum, or one)")


def _net_decay_counts(net: AdafacLONet | None) -> tuple[int, int, int]:
    if net is None:
        return len(MOMENTUM_DECAYS), len(RMS_DECAYS), len(ADAFACTOR_DECAYS)
    return len(net.initial_momentum_decays), len(net.initial_rms_decays), len(net.initial_adafactor_decays)


def factored_axes(shape: Sequence[int]) -> tuple[int, int] | None:
    """(d1, d0) as negative axes of a tensor of ``shape``: d0 the larger of its last two axes (C on a tie),
    d1 the other; None for fewer than 2 dims (no factoring). ``common.factored_dims`` for 2-d shapes."""
    if len(shape) < 2:
        return None
    return (-2, -1) if shape[-1] >= shape[-2] else (-1, -2)


def _state_shapes(shape: torch.Size, counts: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    m, r, f = counts
    shapes = {"m": (*shape, m), "rms": (*shape, r)}
    axes = factored_axes(shape)
    if axes is None:
        shapes["v_diag"] = (*shape, f)
    else:
        d1, d0 = axes
        dims = list(shape)
        shapes["v_row"] = (*(n for i, n in enumerate(dims) if i != len(dims) + d0), f)
        shapes["v_col"] = (*(n for i, n in enumerate(dims) if i != len(dims) + d1), f)
    return shapes


def adafac_init_state(params: Tree, net: AdafacLONet | None = None) -> Tree:
    """The zero state for params {name: tensor of shape S}: flat keys "name/m" (*S, 3), "name/rms" (*S, 1)
    and, for S = (..., R, C), "name/v_row" / "name/v_col" ((..., R, 3) / (..., C, 3) if C >= R, else
    (..., C, 3) / (..., R, 3): see ``factored_axes``), otherwise "name/v_diag" (*S, 3). The decay
    counts (3, 1, 3) come from ``net`` if given."""
    check_names("adafac_init_state", params)
    counts = _net_decay_counts(net)
    return {f"{name}/{key}": p.new_zeros(shape) for name, p in params.items()
            for key, shape in _state_shapes(p.shape, counts).items()}


def _decay(initial: tuple[float, ...], offset: Tensor) -> Tensor:
    """param_to_decay(decay_to_param(d0) + offset) = 1 - exp(10 (log(1 - d0) / 10 + offset))."""
    d0 = torch.tensor(initial, dtype=offset.dtype, device=offset.device)
    return 1.0 - torch.exp(DECAY_PARAM_SCALE * (torch.log(1.0 - d0) / DECAY_PARAM_SCALE + offset))


def accumulator_decays(theta: Tree, net: AdafacLONet) -> tuple[Tensor, Tensor, Tensor]:
    """The decays in use (momentum (3,), RMS (1,), Adafactor (3,)) from theta's offsets; RMS and Adafactor
    clipped to [0, 1] as the official accumulators do."""
    momentum = _decay(net.initial_momentum_decays, theta["momentum_decays"])
    rms = _decay(net.initial_rms_decays, theta["rms_decays"]).clamp(0.0, 1.0)
    adafactor = _decay(net.initial_adafactor_decays, theta["adafactor_decays"]).clamp(0.0, 1.0)
    return momentum, rms, adafactor


def _safe_rsqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp_min(x, SAFE_RSQRT_FLOOR))


def _factored(g: Tensor, m: Tensor, q: Tensor, f: Tensor, state: Tree, name: str,
              axes: tuple[int, int]) -> tuple[Tree, list[Tensor]]:
    """Adafactor accumulators of a (..., R, C) tensor: new v_row, v_col and the channels fac_g, row, col,
    rsqrt(row), rsqrt(col), fac_mom, each (..., R, C, k)."""
    d1, d0 = axes
    v_row = f * state[f"{name}/v_row"] + (1 - f) * q.mean(d0).unsqueeze(-1)
    v_col = f * state[f"{name}/v_col"] + (1 - f) * q.mean(d1).unsqueeze(-1)
    # The decay axis is last, so the parameter's axis d (negative) sits at d - 1 in the state.
    row_factor = _safe_rsqrt(v_row / (v_row.mean(-2, keepdim=True) + SAFE_RSQRT_FLOOR)).unsqueeze(d0 - 1)
    col_factor = _safe_rsqrt(v_col).unsqueeze(d1 - 1)
    shape = (*g.shape, f.shape[-1])
    row, col = v_row.unsqueeze(d0 - 1).expand(shape), v_col.unsqueeze(d1 - 1).expand(shape)
    channels = [g.unsqueeze(-1) * row_factor * col_factor, row, col,
                torch.rsqrt(row + FACTORED_FEATURE_EPS), torch.rsqrt(col + FACTORED_FEATURE_EPS),
                m * row_factor * col_factor]
    return {f"{name}/v_row": v_row, f"{name}/v_col": v_col}, channels


def _diagonal(g: Tensor, m: Tensor, q: Tensor, f: Tensor, state: Tree, name: str) -> tuple[Tree, list[Tensor]]:
    """The unfactored accumulator v_diag of a tensor of < 2 dims and its channels, each (*S, k)."""
    v = f * state[f"{name}/v_diag"] + (1 - f) * q.unsqueeze(-1)
    inv = torch.rsqrt(v + FACTORED_FEATURE_EPS)
    channels = [g.unsqueeze(-1) * _safe_rsqrt(v + SAFE_RSQRT_FLOOR), v, v, inv, inv, m * (v + ADAM_EPS) ** -0.5]
    return {f"{name}/v_diag": v}, channels


def _features(p: Tensor, g: Tensor, state: Tree, name: str,
              decays: tuple[Tensor, Tensor, Tensor]) -> tuple[Tree, Tensor]:
    """Update one parameter's accumulators: (its new state, its channels (numel, 28), each normalized over
    the tensor: x rsqrt(1e-5 + mean(x^2)))."""
    momentum, rms_decay, fac_decay = (d.to(p.dtype) for d in decays)
    g1 = g.unsqueeze(-1)
    m = momentum * state[f"{name}/m"] + (1 - momentum) * g1
    v = rms_decay * state[f"{name}/rms"] + (1 - rms_decay) * g1 * g1
    q = g * g + GRAD_SQR_EPS
    axes = factored_axes(p.shape)
    if axes is None:
        new, adafactor = _diagonal(g, m, q, fac_decay, state, name)
    else:
        new, adafactor = _factored(g, m, q, fac_decay, state, name, axes)
    inv_rms = torch.rsqrt(v + ADAM_EPS)
    channels = [g1, p.unsqueeze(-1), m, v, m * inv_rms, inv_rms, *adafactor]
    features = torch.cat([c.reshape(p.numel(), -1) for c in channels], dim=-1)
    features = features * torch.rsqrt(NORMALIZER_EPS + torch.mean(features * features, dim=0))
    return {f"{name}/m": m, f"{name}/rms": v, **new}, features


def _clean_gradients(grads: Tree, names: list[str], clip: bool) -> Tree:
    """Optionally clip to global norm 1 (optax.clip_by_global_norm), then nan_to_num, as the official update."""
    out = {name: grads[name] for name in names}
    if clip and out:
        total = sum((g * g).sum() for g in out.values())
        # 1 / max(1, norm), written so that its derivative is finite at a zero gradient.
        scale = CLIP_NORM * torch.rsqrt(torch.clamp_min(torch.as_tensor(total), CLIP_NORM ** 2))
        out = {name: g * scale.to(g.dtype) for name, g in out.items()}
    return {name: torch.nan_to_num(g) for name, g in out.items()}


def _check_call(theta: Tree, net: AdafacLONet, params: Tree, grads: Tree, state: Tree,
                multipliers: dict[str, float]) -> None:
    check_step_inputs("adafac_step", params, grads, multipliers)
    missing_theta = sorted(set(dict(net.named_parameters())) - set(theta))
    if missing_theta:
        raise ValueError(f"adafac_step: theta has no {missing_theta} (pass dict(net.named_parameters()))")
    counts = _net_decay_counts(net)
    for name, p in params.items():
        for key, shape in _state_shapes(p.shape, counts).items():
            have = state.get(f"{name}/{key}")
            if have is None or tuple(have.shape) != shape:
                got = "nothing" if have is None else f"shape {tuple(have.shape)}"
                raise ValueError(f"adafac_step: the state has {got} for '{name}/{key}', expected shape {shape} "
                                 "(start from adafac_init_state(params, net))")


def adafac_step(theta: Tree, net: AdafacLONet, params: Tree, grads: Tree, state: Tree, step: Tensor,
                multipliers: dict[str, float] | None = None,
                step_mult: float | None = None) -> tuple[Tree, Tree]:
    """One muLO update of params {name: tensor} given their gradients: (new_params, new_state).

    Pure (no in-place updates, no ``.item()``, no branching on tensor values): differentiable in theta
    (``net``'s parameters by name: the MLP through ``functional_call``, the decay offsets directly) and in
    params, usable under ``torch.func.vmap`` and ``torch.func.grad``. ``step`` is the 0-d count t of
    updates taken before this one; ``multipliers`` maps parameter names to s_p (missing: 1.0);
    ``step_mult`` None means ``net.step_mult``; ``state`` is ``adafac_init_state(params, net)`` or a
    previous ``adafac_step``'s. Parameters may have any shape: (), (n,), (R, C) or stacks (..., R, C).
    The formulas are in the module docstring; the net runs once per tensor on its (numel, 39) inputs.
    """
    multipliers = multipliers or {}
    _check_call(theta, net, params, grads, state, multipliers)
    scale = net.step_mult if step_mult is None else float(step_mult)
    like = theta["net.0.weight"]
    time = step_embedding(torch.as_tensor(step), like.dtype).to(like.device)
    decays = accumulator_decays(theta, net)
    grads = _clean_gradients(grads, list(params), net.clip_grad)
    new_params: Tree = {}
    new_state: Tree = {}
    for name, p in params.items():
        new, features = _features(p, grads[name], state, name, decays)
        new_state.update(new)
        out = functional_call(net, theta, (features.to(device=like.device, dtype=like.dtype), time))
        out = out.to(device=p.device, dtype=p.dtype)
        update = out[:, 0] * torch.exp(net.exp_mult * out[:, 1]) * (scale * multipliers.get(name, 1.0))
        new_params[name] = p - update.reshape(p.shape)
    return new_params, new_state


def adafac_rule(net: AdafacLONet | None = None, **settings: Any) -> LORule:
    """The muLO optimizer as an ``LORule``: ``net`` (default ``AdafacLONet(**settings)``) with
    ``adafac_init_state`` / ``adafac_step`` bound to it."""
    lo: AdafacLONet = built_net("adafac_rule", AdafacLONet, net, settings)

    def init_state(params: Tree) -> Tree:
        return adafac_init_state(params, lo)

    def step(theta: Tree, params: Tree, grads: Tree, state: Tree, t: Tensor,
             multipliers: dict[str, float] | None = None, step_mult: float | None = None) -> tuple[Tree, Tree]:
        return adafac_step(theta, lo, params, grads, state, t, multipliers, step_mult)

    return LORule("adafac", lo, init_state, step, lo.step_mult, lo.settings())
