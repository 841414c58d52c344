"""The networks the benchmarks time, as bilevel problems in pure-function form.

Each is a per-parameter L2 hyperparameter problem (Lorraine, Vicol, Duvenaud 2020) on a batch of
generated MNIST-shaped data: y = the network's weights, x = log weight decays with y's shapes,

    g(x, y) = CE(net_y; lower batch) + 1/2 sum_p exp(x_p) y_p^2,    f(x, y) = CE(net_y; upper batch),

so every kernel (grad, HVP, mixed VJP) does real work on both levels. The data is random and fixed
by a seed: timing and memory do not depend on its values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hypergrad import Functions
from hypergrad.tree import Tree


def mlp(width: int = 256, depth: int = 2, inputs: int = 784, classes: int = 10) -> nn.Module:
    """MLP inputs-width-...-width-classes with ReLU (784-256-256-10 by default)."""
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [inputs] + [width] * depth
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], classes))
    return nn.Sequential(*layers)


def cnn(channels: int = 16, classes: int = 10) -> nn.Module:
    """A small CNN for 1x28x28 images: two 3x3 conv-ReLU-maxpool blocks and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, classes),
    )


class TransformerClassifier(nn.Module):
    """One pre-norm transformer encoder block over 28 rows of a 28x28 image, mean-pooled, then a head."""

    def __init__(self, d_model: int = 128, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d_model)
        self.block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.embed(images.reshape(images.shape[0], 28, 28))
        return self.head(self.block(tokens).mean(dim=1))


def batch(size: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(images [size, 1, 28, 28], labels [size]) drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 28, 28, generator=gen, dtype=dtype)
    labels = torch.randint(0, 10, (size,), generator=gen)
    return images.to(device), labels.to(device)


def l2_problem(net: nn.Module, batch_size: int = 64, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, log_decay: float = -6.0,
               ) -> tuple[Functions, Tree, Tree, tuple[Any, Any]]:
    """(fns, x, y, (lower_batch, upper_batch)) of the per-parameter L2 problem on ``net``.

    y = ``net``'s parameters (moved to ``device``/``dtype``), x = log decays with y's shapes set to
    ``log_decay``; the two batches are independent draws of ``batch_size`` examples.
    """
    device = torch.device(device)
    net = net.to(device=device, dtype=dtype)
    y = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = {k: torch.full_like(v, log_decay) for k, v in y.items()}

    def cross_entropy(params: Tree, data: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = data
        return F.cross_entropy(functional_call(net, params, (images,)), labels)

    def g(x: Tree, y: Tree, data: Any) -> Tensor:
        decay = sum((x[k].exp() * y[k].square()).sum() for k in y)
        return cross_entropy(y, data) + 0.5 * decay

    def f(x: Tree, y: Tree, data: Any) -> Tensor:
        return cross_entropy(y, data)

    batches = (batch(batch_size, 0, device, dtype), batch(batch_size, 1, device, dtype))
    return Functions(f=f, g=g, name=f"L2({type(net).__name__})"), x, y, batches


NETWORKS = {"mlp": mlp, "cnn": cnn, "transformer": TransformerClassifier}
