"""The maximal update parametrization (muP) of an MLP family, and the coordinate check.

Yang, Hu, Babuschkin, Sidor, Liu, Farhi, Ryder, Pachocki, Chen, Gao 2022 (Tensor Programs V): in
muP the size of every layer's update, measured per coordinate, does not change with the width,
so hyperparameters tuned at a base width transfer to wider networks. Thérien et al. 2024 (muLO)
apply the same per-parameter multipliers to a learned optimizer's update.

One MLP family, two parametrizations, built from a base width and a width multiplier
m = width / base_width (``fan_in`` below is the fan-in of the layer):

=================  ==========================  ==========================================
parameter          SP                          muP
=================  ==========================  ==========================================
input weight       N(0, 1/fan_in)              N(0, 1/fan_in)
hidden weights     N(0, 1/fan_in)              N(0, 1/fan_in), update multiplier s_p = 1/m
output weight      N(0, 1/fan_in)              zero, forward multiplier 1/m (= base_width / fan_in)
biases             zero                        zero
=================  ==========================  ==========================================

All update multipliers are 1 under SP, and at m = 1 muP and SP differ only in the zero output
initialization, so an optimizer tuned (or meta-trained) at the base width sees the same dynamics
in both; they part only as the width grows. The multipliers are the Adam-style ones (MuAdam in
Yang et al.'s ``mup`` package): right for any update whose coordinates are O(1) regardless of the
gradient's scale (Adam, a learned optimizer on normalized features). MuSGD's differ and live in
``MuMLP.sgd_multipliers``. Both are explicit maps from parameter name to float, never attributes
on tensors. ``MuMLP.mulo_multipliers`` is muLO's own map (Thérien et al. 2024, ``MuMLP.get_adam_mup_lr_mul``
in ``src/mu_mlp.py`` of bentherien/mu_learned_optimization): hidden weights hidden_lr_mult / fan_in,
everything else 1, i.e. ``multipliers`` times hidden_lr_mult / base_width on the hidden weights.

The output bias (``output_bias``). Yang et al.'s ``mup.MuReadout`` leaves the readout's bias unscaled,
logits = (W h) / m + b ("unscaled"), while muLO's MLP multiplies the whole readout, bias included,
logits = (W h + b) / m ("scaled": ``return out * self.output_mul`` after the last ``hk.Linear`` in
``src/mu_mlp.py``). The default is "scaled", muLO's convention, since muLO is the method reproduced
here (and it was this module's behaviour already); "unscaled" gives mup's. The two agree at m = 1 and
whenever the output bias is zero, as it is at init here; they part once the bias is trained, where
"unscaled" lets the bias move the logits by O(1) per update at every width and "scaled" by O(1/m).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Parametrization = Literal["mup", "sp"]
OutputBias = Literal["scaled", "unscaled"]


class MuMLP(nn.Module):
    """ReLU MLP ``inputs -> width (x depth) -> classes`` in muP or SP (see the module docstring).

    Parameters are ``input.{weight,bias}``, ``hidden.{i}.{weight,bias}`` for i < depth - 1 and
    ``output.{weight,bias}``; ``depth`` is the number of hidden (ReLU) layers. ``output_bias`` says whether
    the forward multiplier scales the output bias too ("scaled", muLO: (W h + b) * output_mult) or not
    ("unscaled", mup's MuReadout: (W h) * output_mult + b); see the module docstring.

    Attributes:
        width: the hidden width, round(base_width * width_mult).
        width_mult: m = width / base_width (the realized ratio).
        output_mult: the float multiplying the output layer in ``forward`` (1/m in muP, 1 in SP).
        multipliers: parameter name -> s_p, the update multiplier for Adam-like updates (MuAdam,
            and the learned optimizer's s_p): 1/m for hidden weights in muP, 1 otherwise.
        sgd_multipliers: parameter name -> learning-rate multiplier for SGD (MuSGD): m for the
            input weight, hidden biases and the output weight, 1 for hidden weights and the output
            bias in muP; all 1 in SP.
        output_bias: "scaled" or "unscaled" (see above).
    """

    def __init__(self, inputs: int, classes: int, base_width: int, width_mult: float = 1.0, depth: int = 2,
                 parametrization: Parametrization = "mup", generator: torch.Generator | None = None,
                 output_bias: OutputBias = "scaled") -> None:
        super().__init__()
        for name, value in (("inputs", inputs), ("classes", classes), ("base_width", base_width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MuMLP: {name} must be a positive int, got {value!r}")
        if not width_mult > 0:
            raise ValueError(f"MuMLP: width_mult must be > 0, got {width_mult!r}")
        if parametrization not in ("mup", "sp"):
            raise ValueError(f"MuMLP: parametrization must be 'mup' or 'sp', got {parametrization!r}")
        if output_bias not in ("scaled", "unscaled"):
            raise ValueError(f"MuMLP: output_bias must be 'scaled' (muLO) or 'unscaled' (mup's MuReadout), "
                             f"got {output_bias!r}")
        self.output_bias = output_bias
        width = max(1, round(base_width * width_mult))
        self.width = width
        self.width_mult = width / base_width
        self.base_width = base_width
        self.parametrization = parametrization
        mup = parametrization == "mup"
        m = self.width_mult

        self.input = nn.Linear(inputs, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.output = nn.Linear(width, classes)
        self.output_mult = 1.0 / m if mup else 1.0
        with torch.no_grad():
            for layer in (self.input, *self.hidden, self.output):
                fan_in = layer.weight.shape[1]
                std = 0.0 if (mup and layer is self.output) else fan_in ** -0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                layer.bias.zero_()

        self.multipliers: dict[str, float] = {name: 1.0 for name, _ in self.named_parameters()}
        self.sgd_multipliers: dict[str, float] = dict(self.multipliers)
        if mup:
            for i in range(depth - 1):
                self.multipliers[f"hidden.{i}.weight"] = 1.0 / m
                self.sgd_multipliers[f"hidden.{i}.bias"] = m
            self.sgd_multipliers["input.weight"] = m
            self.sgd_multipliers["input.bias"] = m
            self.sgd_multipliers["output.weight"] = m

    def mulo_multipliers(self, hidden_lr_mult: float = 1.0) -> dict[str, float]:
        """muLO's update multipliers s_p (``get_adam_mup_lr_mul``): hidden weights hidden_lr_mult / fan_in in
        muP, every other parameter 1 (all 1 in SP). A fresh name -> float map."""
        out = {name: 1.0 for name, _ in self.named_parameters()}
        if self.parametrization == "mup":
            for i in range(len(self.hidden)):
                out[f"hidden.{i}.weight"] = hidden_lr_mult / self.width  # a hidden layer's fan_in is the width
        return out

    def readout(self, h: Tensor) -> Tensor:
        """Logits (batch, classes) of the last hidden activation h (batch, width), with ``output_bias``'s convention."""
        if self.output_bias == "scaled":
            return self.output(h) * self.output_mult
        return F.linear(h, self.output.weight) * self.output_mult + self.output.bias

    def activations(self, x: Tensor) -> list[Tensor]:
        """Every hidden layer's post-ReLU activation (batch, width) and the logits (batch, classes)."""
        h = F.relu(self.input(x))
        out = [h]
        for layer in self.hidden:
            h = F.relu(layer(h))
            out.append(h)
        out.append(self.readout(h))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, classes) of inputs (batch, inputs)."""
        return self.activations(x)[-1]


def mlp(inputs: int, classes: int, base_width: int, width_mult: float = 1.0, depth: int = 2,
        parametrization: Parametrization = "mup", generator: torch.Generator | None = None,
        output_bias: OutputBias = "scaled") -> MuMLP:
    """A ``MuMLP`` (see its docstring); the function form used by configs and task families."""
    return MuMLP(inputs, classes, base_width, width_mult, depth, parametrization, generator, output_bias)


def mu_param_groups(model: nn.Module, lr: float, rule: Literal["adam", "sgd"] = "adam",
                    multipliers: dict[str, float] | None = None, weight_decay: float | None = None,
                    **options: float) -> list[dict]:
    """Param groups for ``torch.optim.Adam/AdamW`` (rule "adam", MuAdam) or ``torch.optim.SGD`` (MuSGD).

    Each group holds the parameters sharing one multiplier s and has ``lr = lr * s``; with
    ``weight_decay`` given, ``weight_decay = weight_decay / s``, so that the decay per step
    (lr * weight_decay, in AdamW and in SGD) does not change with the width, as in Yang et al.'s
    ``mup`` package. Without it the optimizer's default applies unscaled (AdamW: 0.01, so hidden
    weights decay 1/m as fast per step). Other ``options`` are copied into every group. The
    multipliers come from ``multipliers`` if given, else ``model.multipliers`` (rule "adam") or
    ``model.sgd_multipliers`` (rule "sgd"); a model without them (a plain module: SP) gets one group
    at ``lr``.
    """
    if rule not in ("adam", "sgd"):
        raise ValueError(f"mu_param_groups: rule must be 'adam' or 'sgd', got {rule!r}")
    named = dict(model.named_parameters())
    if multipliers is None:
        multipliers = getattr(model, "multipliers" if rule == "adam" else "sgd_multipliers", None) or {}
    unknown = sorted(set(multipliers) - set(named))
    if unknown:
        raise ValueError(f"mu_param_groups: multipliers name parameters the model does not have: {unknown}")
    bad = sorted(n for n, s in multipliers.items() if not s > 0)
    if bad:
        raise ValueError(f"mu_param_groups: multipliers must be > 0, not for {bad}")
    groups: dict[float, list[Tensor]] = {}
    for name, p in named.items():
        groups.setdefault(float(multipliers.get(name, 1.0)), []).append(p)
    out = []
    for s, ps in groups.items():
        group = {"params": ps, "lr": lr * s, **options}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay / s
        out.append(group)
    return out


def coordinate_check(make_model: Callable[[int], nn.Module], widths: Iterable[int], data: tuple[Tensor, Tensor],
                     steps: int, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                     seeds: Sequence[int] = (0,)) -> dict[int, list[float]]:
    """Mean |activation| per layer after ``steps`` training steps, per width (Yang et al. 2022, coordinate check).

    For each width and seed: ``torch.manual_seed(seed)``, build ``make_model(width)`` (a module with
    ``activations(x) -> list[Tensor]``, as ``MuMLP``), take ``steps`` full-batch steps of
    ``optimizer_factory(model)`` on the cross-entropy of ``data = (inputs (n, d), labels (n,))``,
    then measure mean |a| of every returned activation on ``inputs``. Returns
    {width: [mean |a| per layer, averaged over seeds]}. Under muP the numbers stay flat as the width
    grows; under SP with a fixed learning rate they grow with it (the updates blow up).
    ``coordinate_trajectory`` gives the same numbers after every step.
    """
    return {w: rows[-1] for w, rows in
            coordinate_trajectory(make_model, widths, data, steps, optimizer_factory, seeds).items()}


def coordinate_trajectory(make_model: Callable[[int], nn.Module], widths: Iterable[int],
                          data: tuple[Tensor, Tensor], steps: int,
                          optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                          seeds: Sequence[int] = (0,)) -> dict[int, list[list[float]]]:
    """As ``coordinate_check``, but {width: [[mean |a| per layer] at step 0, 1, ..., steps]} (steps + 1 rows)."""
    if steps < 0:
        raise ValueError(f"coordinate_check: steps must be >= 0, got {steps}")
    if not seeds:
        raise ValueError("coordinate_check: seeds is empty")
    inputs, labels = data
    result: dict[int, list[list[float]]] = {}
    for width in widths:
        per_seed = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = make_model(width)
            activations = getattr(model, "activations", None)
            if not callable(activations):
                raise TypeError(f"coordinate_check: make_model({width}) returned {type(model).__name__}, "
                                "which has no activations(x) method")
            opt = optimizer_factory(model)
            rows = []
            for step in range(steps + 1):
                if step:
                    opt.zero_grad()
                    F.cross_entropy(model(inputs), labels).backward()
                    opt.step()
                with torch.no_grad():
                    rows.append(torch.stack([a.abs().mean() for a in activations(inputs)]))
            per_seed.append(torch.stack(rows))
        result[width] = torch.stack(per_seed).mean(0).tolist()
    return result
