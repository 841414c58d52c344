"""The common recipe of most engines, as mixins and field declarations: gradient descent on g, an outer optimizer.

An engine that has a piece mixes it in and declares its fields with the functions here (so each
engine's signature lists its hyperparameters in its own order, and each field's kind is written once)::

    @dataclass(frozen=True, kw_only=True, repr=False)
    class Unrolled(GradientDescent, OuterOptimizer, Engine[UnrolledState]):
        inner_steps: int = recipe.inner_steps()
        inner_lr: float = recipe.inner_lr()
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from hypergrad import checks, kernels, outer
from hypergrad import tree as T
from hypergrad.tree import Tree
from hypergrad.truncation import at

GradY = Callable[[Callable[[Tree, Tree, Any], Tensor], Tree, Tree, Any], tuple[Tree, Tensor]]
"""How a lower gradient is taken: ``(g, x, y, batch) -> (grad_y g(x, y, batch), g(x, y, batch))``."""


def gradient_descent(g: Callable[[Tree, Tree, Any], Tensor], x: Tree, y: Tree, batch: Any, steps: int,
                     lr: float) -> Tree:
    """``steps`` gradient-descent steps y <- y - lr grad_y g(x, y, batch) (shapes of y). ``steps`` gradients of g."""
    for _ in range(steps):
        gy, _ = kernels.grad_y(g, x, y, batch)
        y = T.axpy(-lr, gy, y)
    return y


class GradientDescent:
    """The lower recipe: ``inner_steps`` steps of size ``inner_lr`` on g(x, .), warm-started from the last y."""

    inner_steps: int
    inner_lr: float

    def descend(self, g: Callable[[Tree, Tree, Any], Tensor], x: Tree, y: Tree, batch: Any, steps: int,
                gradient: GradY | None = None, first: int = 0) -> Tree:
        """``steps`` gradient-descent steps of size ``inner_lr`` on g(x, .) from y.

        Step i takes ``at(batch, first + i)``: a ``hypergrad.truncation.Truncation``'s own minibatch per step.

        ``gradient(g, x, y, batch) -> (grad_y g, g)`` takes each step's gradient: None for ``kernels.grad_y``
        (torch.func, composable with vmap and compile), or one recorded on autograd's tape (Unrolled:
        ``dynamics.taped_grad_y``).
        """
        gradient = gradient or kernels.grad_y  # looked up per call: experiments.oracles counts by replacing it
        for i in range(steps):
            gy, _ = gradient(g, x, y, at(batch, first + i))
            y = T.axpy(-self.inner_lr, gy, y)  # leaf by leaf when recorded on the tape (hypergrad.tree)
        return y


class OuterOptimizer:
    """The outer recipe: SGD or Adam (``outer_optimizer``) on x with step size ``outer_lr``; engines that declare
    ``outer_clip`` (``recipe.outer_clip``) clip the hypergradient to that global norm first."""

    outer_lr: float
    outer_optimizer: str
    outer_clip: float | None = None

    def outer_transform(self) -> outer.Transform:
        return outer.optimizer(self.outer_optimizer, self.outer_lr, self.outer_clip)


def inner_steps(default: int = 10, minimum: int = 0) -> Any:
    """Gradient steps on g(x, .) per outer step."""
    return checks.hyperparameter(checks.Integer(minimum), default)


def inner_lr(default: float = 0.1) -> Any:
    """The step size of those gradient steps."""
    return checks.hyperparameter(checks.POSITIVE, default)


def outer_lr(default: float = 0.01) -> Any:
    """The step size of the outer optimizer on x."""
    return checks.hyperparameter(checks.POSITIVE, default)


def outer_clip(default: float | None = None) -> Any:
    """The global norm the hypergradient is clipped to before the outer step (None: not clipped)."""
    return checks.hyperparameter(checks.OrNone(checks.POSITIVE), default)


def outer_optimizer(default: str = "adam") -> Any:
    """"sgd" or "adam" (Kingma and Ba 2015)."""
    return checks.hyperparameter(checks.one_of(outer.OPTIMIZERS), default)
