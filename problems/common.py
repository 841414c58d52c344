"""What the problems share: the dtype argument, the full-batch L-BFGS fit, and the data sets' loaders.

Every problem that takes ``dtype="float64"`` reads it with ``float_dtype``; every reference
solution or baseline fitted by L-BFGS (strong Wolfe line search) runs through ``lbfgs``; the
scikit-learn sets are loaded here (lazily: sklearn's import is slow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn


def float_dtype(name: str) -> torch.dtype:
    """``torch.float64`` from ``"float64"``; a clear error for anything that is not a float dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must name a floating-point torch dtype such as 'float64', got {name!r}")
    return dtype


def lbfgs(params: Iterable[Tensor], objective: Callable[[], Tensor], *, max_iter: int, tolerance_grad: float,
          tolerance_change: float, history_size: int = 20, backward: bool = True) -> None:
    """Minimize ``objective()`` over ``params`` in place: one ``torch.optim.LBFGS.step`` (lr 1, strong Wolfe).

    With ``backward=True`` the gradients come from ``objective().backward()``; with ``backward=False``
    ``objective`` sets each parameter's ``.grad`` itself (e.g. an analytic hypergradient) and returns the
    value. Gradients are enabled inside, so it may be called under ``torch.no_grad``.
    """
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                            tolerance_change=tolerance_change, history_size=history_size,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        if backward:
            loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


@contextmanager
def statistics_kept(module: nn.Module) -> Iterator[None]:
    """Within the block the module may run in training mode (a loss as f sees it, on batch statistics);
    afterwards its buffers (BatchNorm's running statistics, which such a forward moves) and its mode are as before."""
    saved = {k: b.clone() for k, b in module.named_buffers()}
    was_training = module.training
    try:
        yield
    finally:
        for name, buffer in module.named_buffers():
            buffer.copy_(saved[name])
        module.train(was_training)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: (pixels [1797, 64] float64 in 0..16, labels [1797] int)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data, data.target


def breast_cancer(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's breast-cancer set, rows permuted by ``numpy.random.RandomState(seed)``:
    (features [569, 30] float64, unstandardized; 0/1 labels [569]).

    The problems standardize it themselves, with the training rows' mean and standard deviation:
    ``LogisticL2`` (``problems.hpo``) with the sample standard deviation in float64 torch,
    ``SVMHyperparameters`` (``problems.svm``) with the population one in numpy, as each was measured.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    perm = np.random.RandomState(seed).permutation(data.target.shape[0])
    return data.data[perm], data.target[perm]
