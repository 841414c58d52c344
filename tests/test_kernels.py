"""hypergrad.kernels: the three HVP modes, the reused-graph operator, the mixed VJP and the fallbacks,
checked against dense derivatives (torch.func.hessian / jacrev) of small closed-form problems in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from hypergrad import kernels, tree
from hypergrad.tree import Tree

F64 = torch.float64


def _problem() -> tuple[kernels.Objective, Tree, Tree, Tensor]:
    """A non-quadratic g(x, y) on trees: y = {a: [3], b: [2, 2]}, x = {w: [3], s: []}, batch = a [5, 7] matrix."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(5, 7, generator=gen, dtype=F64)

    def g(x: Tree, y: Tree, batch: Tensor) -> Tensor:
        flat = torch.cat([y["a"], y["b"].reshape(-1)])
        fit = F.softplus(batch @ flat).sum() + torch.tanh(y["b"]).prod() * x["s"]
        return fit + 0.5 * (x["w"].exp() * y["a"] ** 2).sum() + (x["w"] * y["a"] ** 3).sum() / 3

    x = {"w": torch.randn(3, generator=gen, dtype=F64), "s": torch.tensor(0.7, dtype=F64)}
    y = {"a": torch.randn(3, generator=gen, dtype=F64), "b": torch.randn(2, 2, generator=gen, dtype=F64)}
    return g, x, y, data


def _dense(g: kernels.Objective, x: Tree, y: Tree, batch: Tensor) -> tuple[Tensor, Tensor]:
    """(H [n, n], M [n, m]): d_yy g and d_y d_x g on the raveled trees (n = dim y, m = dim x)."""
    flat_x, unravel_x = tree.ravel(x)
    flat_y, unravel_y = tree.ravel(y)
    fn = lambda fx, fy: g(unravel_x(fx), unravel_y(fy), batch)  # noqa: E731
    h = hessian(fn, argnums=1)(flat_x, flat_y)
    m = jacrev(jacrev(fn, argnums=1), argnums=0)(flat_x, flat_y)  # row i = d/dx of (grad_y g)_i
    return h, m


def _random_like(y: Tree, seed: int) -> Tree:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in y.items()}


def _close(a: Tree, b: Tree) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", kernels.HVP_MODES)
def test_every_hvp_mode_is_the_dense_hessian_product(mode: str) -> None:
    g, x, y, batch = _problem()
    h, _ = _dense(g, x, y, batch)
    v = _random_like(y, 1)
    _, unravel = tree.ravel(y)
    expected = unravel(h @ tree.ravel(v)[0])
    assert torch.linalg.norm(h - h.T) < 1e-12 and torch.linalg.norm(h) > 1.0  # a real, symmetric Hessian
    _close(kernels.hvp(g, x, y, batch, v, mode), expected)
    operator = kernels.hvp_operator(g, x, y, batch, mode)
    _close(operator(v), expected)
    w = _random_like(y, 2)  # the operator's kept graph serves any number of products
    _close(operator(w), unravel(h @ tree.ravel(w)[0]))


def test_reused_graph_operator_under_vmap_forms_the_hessian() -> None:
    # solvers.dense (the Exact engine) vmaps the operator over unit vectors.
    g, x, y, batch = _problem()
    h, _ = _dense(g, x, y, batch)
    _, unravel = tree.ravel(y)
    operator = kernels.hvp_operator(g, x, y, batch, "reverse-over-reverse")
    eye = torch.eye(h.shape[0], dtype=F64)
    columns = vmap(lambda e: tree.ravel(operator(unravel(e)))[0])(eye)
    torch.testing.assert_close(columns, h, rtol=1e-10, atol=1e-12)


def test_mixed_vjp_is_the_dense_mixed_derivative() -> None:
    g, x, y, batch = _problem()
    _, m = _dense(g, x, y, batch)
    v = _random_like(y, 3)
    jv, gy, value = kernels.mixed_vjp(g, x, y, batch, v)
    _, unravel_x = tree.ravel(x)
    assert torch.linalg.norm(m) > 1.0
    _close(jv, unravel_x(m.T @ tree.ravel(v)[0]))
    _close(gy, kernels.grad_y(g, x, y, batch)[0])
    torch.testing.assert_close(value, g(x, y, batch))


def test_default_mode_comes_from_the_device_table_and_bad_modes_are_refused() -> None:
    assert kernels.default_hvp_mode("cpu") == kernels.DEFAULT_HVP_MODES["cpu"]
    assert kernels.default_hvp_mode("cuda:0") == kernels.DEFAULT_HVP_MODES["cuda"]
    assert set(kernels.DEFAULT_HVP_MODES.values()) <= set(kernels.HVP_MODES)
    g, x, y, batch = _problem()
    with pytest.raises(ValueError, match="HVP mode must be one of .*'sideways'"):
        kernels.hvp(g, x, y, batch, y, "sideways")


class _Cube(torch.autograd.Function):
    """t^3 with a backward but no jvp: a model without forward-mode derivatives (double backward works)."""

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return t**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        return 3 * t**2 * grad_out


def test_forward_mode_falls_back_to_reverse_over_reverse_once() -> None:
    def g(x: Tree, y: Tree, batch: None) -> Tensor:
        return _Cube.apply(y["a"]).sum() + (x["w"] * y["a"] ** 2).sum()

    x = {"w": torch.tensor([0.5, 1.0, 2.0], dtype=F64)}
    y = {"a": torch.tensor([1.0, -2.0, 0.3], dtype=F64)}
    v = {"a": torch.tensor([0.2, 1.0, -1.0], dtype=F64)}
    expected = {"a": (6 * y["a"] + 2 * x["w"]) * v["a"]}  # H = diag(6 a + 2 w)
    with pytest.raises(NotImplementedError):  # the mode itself really is unavailable
        kernels.hvp_in_mode(g, x, y, None, v, "forward-over-reverse")
    with pytest.warns(RuntimeWarning, match="forward-over-reverse.*using reverse-over-reverse for it"):
        _close(kernels.hvp(g, x, y, None, v, "forward-over-reverse"), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second failure
        _close(kernels.hvp(g, x, y, None, v, "reverse-over-forward"), expected)


def test_fused_attention_falls_back_to_the_math_backend_in_every_mode() -> None:
    # PyTorch's fused CPU attention has neither a forward-mode derivative nor a double backward.
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 4, 3, generator=gen, dtype=F64)

    def g(x: Tree, y: Tree, batch: None) -> Tensor:
        k = y["k"]
        return F.scaled_dot_product_attention(q, k, k).square().sum() + 0.5 * (x["w"].exp() * k**2).sum()

    def g_math(x: Tree, y: Tree, batch: None) -> Tensor:  # the same function written out
        k = y["k"]
        attn = torch.softmax(q @ k.transpose(-1, -2) / 3**0.5, dim=-1)
        return (attn @ k).square().sum() + 0.5 * (x["w"].exp() * k**2).sum()

    x = {"w": torch.randn(1, 2, 4, 3, generator=gen, dtype=F64)}
    y = {"k": torch.randn(1, 2, 4, 3, generator=gen, dtype=F64)}
    v = _random_like(y, 5)
    h, _ = _dense(g_math, x, y, None)
    _, unravel = tree.ravel(y)
    expected = unravel(h @ tree.ravel(v)[0])
    for mode in kernels.HVP_MODES:
        with pytest.raises((NotImplementedError, RuntimeError)):
            kernels.hvp_in_mode(g, x, y, None, v, mode)
    with pytest.warns(RuntimeWarning, match="math attention backend"):
        operator = kernels.hvp_operator(g, x, y, None, "reverse-over-reverse")
        _close(operator(v), expected)
    _close(operator(v), expected)  # rebuilt on the math backend: products reuse the new graph
    for mode in kernels.HVP_MODES:
        _close(kernels.hvp(g, x, y, None, v, mode), expected)
    jv, _, _ = kernels.mixed_vjp(g, x, y, None, v)
    _close(jv, kernels.mixed_vjp(g_math, x, y, None, v)[0])


@pytest.mark.parametrize("mode", [None, *kernels.HVP_MODES])
def test_ift_engines_in_every_hvp_mode_match_the_closed_forms(mode: str | None) -> None:
    from hypergrad import CG, Neumann
    from problems.reference import QuadraticP1

    problem = QuadraticP1()
    converge = {"inner_steps": 200, "inner_lr": 0.2}  # 0.8^200: y = y*(x) to machine precision
    cg = CG(iters=3, hvp_mode=mode, **converge).hypergradient(problem, None, None)["x"]
    torch.testing.assert_close(cg, problem.hypergradient(), rtol=1e-10, atol=1e-12)
    neumann = Neumann(terms=4, alpha=0.2, hvp_mode=mode, **converge).hypergradient(problem, None, None)["x"]
    torch.testing.assert_close(neumann, problem.neumann_hypergradient(4, 0.2), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(neumann, cg, rtol=1e-3)  # the truncation is visible: the two checks differ


def test_engines_refuse_an_unknown_hvp_mode() -> None:
    from hypergrad import CG, Neumann

    for engine in (CG, Neumann):
        with pytest.raises(ValueError, match=f"{engine.__name__}: hvp_mode must be one of"):
            engine(hvp_mode="forward")
