"""A learned optimizer (LO): a small per-parameter MLP that maps features of each coordinate to its update.

The architecture follows the small MLP optimizers of Metz et al. (2022, "Practical tradeoffs
between memory, compute, and performance in learned optimizers"; VeLO) as used by Thérien et al.
2024 (muLO), with the muP update multipliers s_p of ``bilevel.learned.mup``.

For every parameter tensor p with gradient g (any shape), the state is updated first
(no bias correction: the per-tensor normalization below makes it unnecessary)::

    m_b <- b m_b + (1 - b) g          b in (0.9, 0.99, 0.999)       (momenta)
    v   <- 0.999 v + 0.001 g^2                                       (RMS accumulator)
    r   <- 0.999 r + 0.001 mean_{last axis}(g^2)                     (Adafactor rows, ndim >= 2)
    c   <- 0.999 c + 0.001 mean_{second-to-last axis}(g^2)           (Adafactor columns, ndim >= 2)

then each coordinate gets 14 feature channels (``FEATURES``)::

    g, p, m_0.9, m_0.99, m_0.999, sqrt(v + eps),
    m_b * rsqrt(v + eps)            for the three b                  (Adam-like directions)
    sqrt(r_i + eps), sqrt(c_j + eps),                                (row / column RMS, broadcast)
    m_b * rsqrt(vf + eps)     for the three b, vf_ij = r_i c_j / (mean(r) + eps)   (Adafactor, Shazeer & Stern 2018)

(for tensors with fewer than 2 dims r and c are not kept: r = c = vf = v; mean(r) in vf is over the
last axis of r, i.e. per matrix for stacked matrices), each channel x normalized over its tensor:
x / sqrt(mean(x^2) + eps), eps = 1e-16 everywhere; then the 11 step
features tanh(t / tau - 1), tau in (1, 3, 10, 30, ..., 3e4, 1e5), are appended (not normalized),
giving 25 inputs. The MLP (25 -> 32 -> 32 -> 2, ReLU) outputs (d, a) and::

    p <- p - d * exp(0.001 a) * step_mult * s_p

with s_p the parameter's muP update multiplier (1 under SP or when not given).

This is a REDUCED version of muLO's optimizer (fixed decays, fewer inputs, eps 1e-16, an Adam-like
init); the faithful one, ``MuAdafacMLPLOpt`` (39 inputs, meta-learned decays), is
``bilevel.learned.adafac``.

``lo_init_state`` / ``lo_step`` are pure functions of trees (dicts of tensors), differentiable in
the LO's parameters theta and usable under ``torch.func.vmap``; ``reduced_rule`` bundles them with
the net as a ``bilevel.learned.rule.LORule``, the interface shared with ``adafac_rule``.
``LearnedOptimizer`` runs either rule as a ``torch.optim.Optimizer`` that trains any ``nn.Module``,
and its ``save`` / ``load`` are the documented file format of meta-trained optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.learned.adafac import AdafacLONet, adafac_rule
from bilevel.learned.rule import (
    TIMESCALES,
    Kind,
    LORule,
    Tree,
    built_net,
    check_names,
    check_step_inputs,
    step_embedding,
)

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
EPS = 1e-16
MAGNITUDE_SCALE = 0.001
FEATURES = (
    "g", "p", "m0.9", "m0.99", "m0.999", "rms",
    "m0.9/rms", "m0.99/rms", "m0.999/rms",
    "row", "col", "m0.9/factored", "m0.99/factored", "m0.999/factored",
)
INPUTS = len(FEATURES) + len(TIMESCALES)
# The channel the default initialization copies to d: Adam's direction m_0.9 / sqrt(v).
ADAM_CHANNEL = FEATURES.index("m0.9/rms")


class LearnedOptimizerNet(nn.Module):
    """The per-coordinate MLP: 25 inputs (14 channels + 11 step features) -> (d, a); its parameters are theta.

    Args:
        hidden: width of the two hidden ReLU layers (32 in Metz et al. 2022 and Thérien et al. 2024).
        init: "adam" (default) starts the LO at a known-good rule: two units of each hidden layer
            carry +-x and the output adds them back (d = relu(x) - relu(-x) = x) for the channel
            x = m_0.9 / sqrt(v) normalized over the tensor, so before meta-training the update is
            Adam's direction (without bias correction) at per-tensor RMS step_mult * s_p, plus a
            small random part (the output layer's random weights are scaled by ``output_scale``).
            "random": every layer at the default uniform(+-1/sqrt(fan_in)) init, the output layer
            scaled by ``output_scale``; not a useful optimizer until meta-trained.
        output_scale: scale of the output layer's random weights (small keeps the start near the rule).
        generator: random source of the init (None: torch's global one).
    """

    def __init__(self, hidden: int = 32, init: str = "adam", output_scale: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if init not in ("adam", "random"):
            raise ValueError(f"LearnedOptimizerNet: init must be 'adam' or 'random', got {init!r}")
        if hidden < 2 and init == "adam":
            raise ValueError(f"LearnedOptimizerNet: init 'adam' needs hidden >= 2, got {hidden}")
        self.hidden = hidden
        self.init = init
        self.output_scale = output_scale
        self.net = nn.Sequential(nn.Linear(INPUTS, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))
        with torch.no_grad():
            layers = self.layers()
            for layer in layers:
                bound = layer.weight.shape[1] ** -0.5
                for t in (layer.weight, layer.bias):
                    t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * bound)
            last = layers[-1]
            last.weight.mul_(output_scale)
            last.bias.mul_(output_scale)
            if init == "adam":
                first, second = layers[0], layers[1]
                for unit, sign in ((0, 1.0), (1, -1.0)):
                    first.weight[unit] = 0.0
                    first.weight[unit, ADAM_CHANNEL] = sign
                    first.bias[unit] = 0.0
                    second.weight[unit] = 0.0
                    second.weight[unit, unit] = 1.0
                    second.bias[unit] = 0.0
                    last.weight[0, unit] = sign
                last.bias[0] = 0.0

    def layers(self) -> list[nn.Linear]:
        """The three linear layers of ``net``."""
        return [layer for layer in self.net if isinstance(layer, nn.Linear)]

    def forward(self, features: Tensor, time: Tensor) -> Tensor:
        """features (n, 14) (the channels of ``FEATURES``), time (11,) (``step_embedding``) -> (n, 2): d and a.

        The MLP of the concatenation [features, time] (n, 25); the time part of the first layer is the
        same for every row, so it is folded into that layer's bias once per call.
        """
        first, second, last = self.layers()
        c = len(FEATURES)
        bias = first.bias + first.weight[:, c:] @ time
        h = torch.relu(F.linear(features, first.weight[:, :c], bias))
        return last(torch.relu(second(h)))


def _state_keys(name: str, ndim: int) -> list[str]:
    """The state keys of a parameter called ``name`` with ``ndim`` dims."""
    keys = [f"{name}/m{b}" for b in MOMENTUM_DECAYS] + [f"{name}/v"]
    return keys + [f"{name}/row", f"{name}/col"] if ndim >= 2 else keys


def lo_init_state(params: Tree) -> Tree:
    """The LO state for params {name: tensor}: zeros, flat keys "name/m0.9", "name/m0.99", "name/m0.999",
    "name/v" (each shaped like the parameter) and, for parameters of 2 or more dims with shape (..., R, C),
    "name/row" (..., R) and "name/col" (..., C)."""
    check_names("lo_init_state", params)
    state: Tree = {}
    for name, p in params.items():
        for b in MOMENTUM_DECAYS:
            state[f"{name}/m{b}"] = torch.zeros_like(p)
        state[f"{name}/v"] = torch.zeros_like(p)
        if p.dim() >= 2:
            state[f"{name}/row"] = p.new_zeros(p.shape[:-1])
            state[f"{name}/col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:])
    return state


def _accumulate(p: Tensor, g: Tensor, state: Tree, name: str) -> tuple[Tree, Tensor]:
    """Update the state of one parameter p (any shape): (its new state, its 14 channels (numel, 14), each
    normalized over the tensor: x / sqrt(mean(x^2) + eps))."""
    new: Tree = {}
    moms = []
    for b in MOMENTUM_DECAYS:
        m = b * state[f"{name}/m{b}"] + (1 - b) * g
        new[f"{name}/m{b}"] = m
        moms.append(m)
    g2 = g * g
    v = RMS_DECAY * state[f"{name}/v"] + (1 - RMS_DECAY) * g2
    new[f"{name}/v"] = v
    rms = torch.sqrt(v + EPS)  # + EPS: a finite derivative where v = 0 (backprop through LO steps)
    if p.dim() >= 2:
        r = RMS_DECAY * state[f"{name}/row"] + (1 - RMS_DECAY) * g2.mean(-1)
        c = RMS_DECAY * state[f"{name}/col"] + (1 - RMS_DECAY) * g2.mean(-2)
        new[f"{name}/row"] = r
        new[f"{name}/col"] = c
        row = torch.sqrt(r + EPS).unsqueeze(-1).expand_as(p)
        col = torch.sqrt(c + EPS).unsqueeze(-2).expand_as(p)
        factored = r.unsqueeze(-1) * c.unsqueeze(-2) / (r.mean(-1)[..., None, None] + EPS)
    else:
        row = col = rms
        factored = v
    inv_rms = torch.rsqrt(v + EPS)
    inv_factored = torch.rsqrt(factored + EPS)
    channels = [g, p, *moms, rms, *(m * inv_rms for m in moms), row, col, *(m * inv_factored for m in moms)]
    features = torch.stack([x.reshape(-1) for x in channels], dim=-1)
    return new, features * torch.rsqrt(torch.mean(features * features, dim=0) + EPS)


def lo_step(theta: Tree, net: LearnedOptimizerNet, params: Tree, grads: Tree, state: Tree, step: Tensor,
            multipliers: dict[str, float] | None = None, step_mult: float = 1e-3) -> tuple[Tree, Tree]:
    """One LO update of params {name: tensor} given their gradients: (new_params, new_state).

    Pure (no in-place updates, no ``.item()``, no branching on tensor values): differentiable in theta
    (``net``'s parameters by name, used through ``functional_call``) and in params, and usable under
    ``torch.func.vmap`` (e.g. over PES particles). ``step`` is the 0-d count t of updates taken before
    this one (int or float); ``multipliers`` maps parameter names to s_p (missing names: 1.0);
    ``state`` is ``lo_init_state(params)`` or a previous ``lo_step``'s. The formulas are in the
    module docstring. The net runs once per parameter tensor, on its (numel, 14) channels.
    """
    multipliers = multipliers or {}
    check_step_inputs("lo_step", params, grads, multipliers)
    like = next(iter(theta.values()))
    time = step_embedding(torch.as_tensor(step), like.dtype).to(like.device)
    new_params: Tree = {}
    new_state: Tree = {}
    for name, p in params.items():
        missing = [k for k in _state_keys(name, p.dim()) if k not in state]
        if missing:
            raise ValueError(f"lo_step: the state has no {missing} (start from lo_init_state(params))")
        new, features = _accumulate(p, grads[name], state, name)
        new_state.update(new)
        out = functional_call(net, theta, (features.to(device=like.device, dtype=like.dtype), time))
        out = out.to(device=p.device, dtype=p.dtype)
        update = out[:, 0] * torch.exp(MAGNITUDE_SCALE * out[:, 1]) * (step_mult * multipliers.get(name, 1.0))
        new_params[name] = p - update.reshape(p.shape)
    return new_params, new_state


def reduced_rule(net: LearnedOptimizerNet | None = None, **settings: Any) -> LORule:
    """The reduced LO as an ``LORule``: ``net`` (default ``LearnedOptimizerNet(**settings)``) with
    ``lo_init_state`` / ``lo_step`` bound to it; its default step_mult is ``lo_step``'s, 1e-3."""
    lo: LearnedOptimizerNet = built_net("reduced_rule", LearnedOptimizerNet, net, settings)

    def step(theta: Tree, params: Tree, grads: Tree, state: Tree, t: Tensor,
             multipliers: dict[str, float] | None = None, step_mult: float | None = None) -> tuple[Tree, Tree]:
        return lo_step(theta, lo, params, grads, state, t, multipliers, 1e-3 if step_mult is None else step_mult)

    return LORule("reduced", lo, lo_init_state, step, 1e-3,
                  {"hidden": lo.hidden, "init": lo.init, "output_scale": lo.output_scale})


def rule_of(lo: LORule | nn.Module) -> LORule:
    """``lo`` itself if it is an ``LORule``, else the rule of its net type (reduced or adafac)."""
    if isinstance(lo, LORule):
        return lo
    if isinstance(lo, LearnedOptimizerNet):
        return reduced_rule(lo)
    if isinstance(lo, AdafacLONet):
        return adafac_rule(lo)
    raise ValueError(f"rule_of: expected an LORule, a LearnedOptimizerNet or an AdafacLONet, got {type(lo).__name__}")


def make_rule(kind: Kind, settings: dict[str, Any]) -> LORule:
    """The rule of ``kind`` ("reduced" or "adafac") with a fresh net built from ``settings`` (its constructor
    arguments, as in ``LORule.settings``)."""
    if kind == "reduced":
        return reduced_rule(**settings)
    if kind == "adafac":
        return adafac_rule(**settings)
    raise ValueError(f"make_rule: unknown LO kind {kind!r} (expected 'reduced' or 'adafac')")


SAVE_FORMAT = "bilevel.learned.LearnedOptimizer/2"


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer (reduced or muLO) as a ``torch.optim.Optimizer`` for any ``nn.Module``.

    Updates in place, under no_grad, with ``rule.step`` (``lo_step`` or ``adafac_step``).

    Args:
        params: ``model.named_parameters()`` (names key the multipliers) or plain tensors (named "0", "1", ...).
        net: the LO: a ``LearnedOptimizerNet`` (reduced), an ``AdafacLONet`` (muLO) or an ``LORule``
            (default: a fresh ``LearnedOptimizerNet()``). Its net's parameters are theta unless ``theta``
            is given, which is then loaded into it (in place: pass a net of your own to keep it apart).
        theta: meta-parameters {name: tensor} matching ``net.state_dict()`` keys.
        step_mult: the global step scale of the update (None: the LO's own, 1e-3 for both LOs).
        multipliers: parameter name -> s_p (e.g. ``MuMLP.multipliers``); missing names get 1.0.

    Parameters whose ``.grad`` is None are skipped in that step. The state_dict holds the per-parameter
    accumulators, the step count and theta; ``save`` / ``load`` store only what defines the LO, the
    meta-training result, in the documented format of meta-trained optimizers (a dict, ``torch.save``,
    readable with ``torch.load(path, weights_only=True)``)::

        {"format": "bilevel.learned.LearnedOptimizer/2",
         "kind": "reduced" | "adafac",          which LO (``LORule.kind``)
         "settings": {...},                     the net's constructor arguments (``LORule.settings``)
         "theta": {name: tensor},               the net's state_dict
         "step_mult": float,                    the global step scale
         "hidden": int}                         the hidden width (also in settings; kept for format 1 readers)

    Format 1 (before the muLO optimizer) has only "theta", "hidden" and "step_mult" and is a reduced LO;
    ``load`` reads both.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                 net: LORule | nn.Module | None = None, theta: Tree | None = None, step_mult: float | None = None,
                 multipliers: dict[str, float] | None = None) -> None:
        items: list[Any] = list(params)
        if not items:
            raise ValueError("LearnedOptimizer: got an empty parameter list")
        if all(isinstance(it, tuple) for it in items):
            names, tensors = [str(n) for n, _ in items], [t for _, t in items]
        elif any(isinstance(it, tuple) for it in items):
            raise ValueError("LearnedOptimizer: params mixes (name, tensor) pairs and plain tensors")
        else:
            names, tensors = [str(i) for i in range(len(items))], items
        multipliers = dict(multipliers or {})
        unknown = sorted(set(multipliers) - set(names))
        if unknown:
            raise ValueError(f"LearnedOptimizer: multipliers name parameters that were not given: {unknown}")
        self.rule = rule_of(net if net is not None else LearnedOptimizerNet())
        step_mult = self.rule.default_step_mult if step_mult is None else step_mult
        if not (step_mult > 0 and math.isfinite(step_mult)):
            raise ValueError(f"LearnedOptimizer: step_mult must be finite and > 0, got {step_mult!r}")
        self.net = self.rule.net
        if theta is not None:
            self.net.load_state_dict(theta)
        defaults = {"step_mult": float(step_mult), "lo_step": 0}
        super().__init__([{"params": tensors, "names": names,
                           "multipliers": [float(multipliers.get(n, 1.0)) for n in names]}], defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of tensors; "names" (default "g{group}.{i}") and "multipliers" (a list aligned with the
        tensors, default 1.0) are filled in, and names must be unique over all groups."""
        group = dict(param_group)
        tensors = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        index = len(self.param_groups)
        names = [str(n) for n in group.get("names", [f"g{index}.{i}" for i in range(len(tensors))])]
        mults = [float(m) for m in group.get("multipliers", [1.0] * len(tensors))]
        if not len(names) == len(mults) == len(tensors):
            raise ValueError(f"LearnedOptimizer: group {index} has {len(tensors)} tensors, {len(names)} names and "
                             f"{len(mults)} multipliers")
        taken = {n for g in self.param_groups for n in g["names"]}
        clash = sorted(taken.intersection(names))
        if clash or len(set(names)) != len(names):
            raise ValueError(f"LearnedOptimizer: parameter names are not unique (group {index}): {clash or names}")
        check_names("LearnedOptimizer", names)
        super().add_param_group({**group, "params": tensors, "names": names, "multipliers": mults})

    @property
    def theta(self) -> Tree:
        """The meta-parameters {name: tensor} (the net's parameters, live)."""
        return dict(self.net.named_parameters())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, state, mults = {}, {}, {}, {}
            for name, p, s in zip(group["names"], group["params"], group["multipliers"], strict=True):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"LearnedOptimizer: sparse gradient for parameter {name!r}")
                params[name], grads[name], mults[name] = p, p.grad, s
                if not self.state[p]:
                    self.state[p].update({k.split("/", 1)[1]: v for k, v in self.rule.init_state({name: p}).items()})
                state.update({f"{name}/{k}": v for k, v in self.state[p].items()})
            if not params:
                continue
            step = torch.tensor(float(group["lo_step"]), device=group["params"][0].device)
            new_params, new_state = self.rule.step(self.theta, params, grads, state, step, mults, group["step_mult"])
            for name, p in params.items():
                p.copy_(new_params[name])
                for key in self.state[p]:
                    self.state[p][key] = new_state[f"{name}/{key}"]
            group["lo_step"] += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["theta"] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        theta = sd.pop("theta", None)
        if theta is not None:
            self.net.load_state_dict(theta)
        super().load_state_dict(sd)

    def save(self, path: str | Path) -> None:
        """Write the LO (kind, settings, theta, step_mult) to ``path`` in the format of the class docstring."""
        settings = dict(self.rule.settings)
        torch.save({"format": SAVE_FORMAT, "kind": self.rule.kind, "settings": settings,
                    "theta": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                    "step_mult": self.param_groups[0]["step_mult"], "hidden": settings.get("hidden")}, path)

    @classmethod
    def load(cls, path: str | Path, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
             multipliers: dict[str, float] | None = None, step_mult: float | None = None) -> LearnedOptimizer:
        """A fresh LearnedOptimizer for ``params`` with the LO saved at ``path`` (format 2, or format 1: reduced).

        ``step_mult`` (if given) overrides the saved one."""
        blob = torch.load(path, weights_only=True)
        if not isinstance(blob, dict) or "theta" not in blob:
            raise ValueError(f"LearnedOptimizer.load: {path} is not a saved learned optimizer (no 'theta'); "
                             "write it with LearnedOptimizer.save")
        if "kind" in blob:
            rule = make_rule(blob["kind"], blob["settings"])
        else:  # format 1: a reduced LO, its width the only setting
            rule = reduced_rule(hidden=blob["hidden"])
        return cls(params, net=rule, theta=blob["theta"],
                   step_mult=blob["step_mult"] if step_mult is None else step_mult, multipliers=multipliers)


def theta_of(net: nn.Module) -> Tree:
    """theta as a detached tree {name: tensor}, e.g. the initial upper variables of meta-training."""
    return {k: v.detach().clone() for k, v in net.named_parameters()}
