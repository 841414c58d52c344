"""The probe of ``hypergrad.kernels``: a Hessian-vector mode that is wrong or raises on an objective is replaced,
once and with one warning, by reverse-over-reverse; a right one is kept, silently.

References are independent of the code under test and of ``torch.func``: ``torch.autograd.functional.hessian``
(plain autograd double backward) in float64, itself checked against central finite differences of the
gradient. Not ``torch.func.hessian``: in torch 2.13 it is wrong through ``layer_norm`` and training-mode
``batch_norm`` with affine weights (11 % and 33 % relative error on the layers below; its inner ``jacrev``
computes the gradient under ``vmap``, and differentiating that again is wrong), while ``jacfwd(grad)``,
autograd and finite differences agree.

The probe's cost (once per objective and mode; calls after it cost what they did before) is measured in the
docstring of ``hypergrad.kernels``: about two products of the requested mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from hypergrad import kernels, tree
from hypergrad.tree import Tree

F64 = torch.float64
FOR, ROF, ROR = kernels.HVP_MODES


class _Case:
    """g(x, y, batch) = x["s"] * loss(net_y(batch)) + (net_y(batch) ** 3).mean() over a module's parameters y."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...], loss: str = "tanh", train: bool = True) -> None:
        gen = torch.Generator().manual_seed(sum(shape))
        self.net = net.to(F64).train(train)
        with torch.no_grad():  # affine weights away from 1 and 0, so their second derivatives matter
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        self.buffers = {k: b.detach().clone() for k, b in self.net.named_buffers()}
        self.batch = torch.randn(*shape, generator=gen, dtype=F64)
        self.target = torch.randn(self.out_shape(), generator=gen, dtype=F64)
        self.loss = loss
        self.x = {"s": torch.tensor(1.3, dtype=F64)}
        self.y = {k: p.detach().clone() for k, p in self.net.named_parameters()}

    def out_shape(self) -> torch.Size:
        with torch.no_grad():
            return self.net(self.batch).shape

    def objective(self) -> kernels.Objective:
        """A fresh objective (the probe's verdicts are kept per objective)."""
        def g(x: Tree, y: Tree, batch: Tensor) -> Tensor:
            out = functional_call(self.net, (y, {k: b.clone() for k, b in self.buffers.items()}), (batch,))
            if self.loss == "mse":
                return x["s"] * F.mse_loss(out, self.target) + (out**3).mean()
            return x["s"] * (out.tanh() ** 2).sum() + (out**3).mean()

        return g


class _Attention(nn.Module):
    """One head of self-attention through ``scaled_dot_product_attention`` (fused on CPU: the fallback path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, t: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(self.q(t), self.k(t), self.v(t))


CASES: dict[str, Callable[[], _Case]] = {
    "layernorm": lambda: _Case(nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), (4, 5)),
    "batchnorm": lambda: _Case(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (8, 5)),
    "mse": lambda: _Case(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (6, 5), loss="mse"),
    "groupnorm": lambda: _Case(nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(2, 6)), (4, 5)),
    "conv": lambda: _Case(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2)), (2, 2, 6, 6)),
    "dropout_eval": lambda: _Case(nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)),
                                  (4, 5), train=False),
    # 3-d inputs take the composite path, every mode differentiates it; 4-d ones the fused CPU kernel,
    # which has neither a forward-mode derivative nor a double backward (the fallbacks' case).
    "attention": lambda: _Case(_Attention(4), (2, 3, 4)),
    "attention_fused": lambda: _Case(_Attention(4), (1, 2, 3, 4)),
}
# (case, mode) pairs that are wrong or raise in this torch (2.13), checked below against the references.
REPLACED = {("layernorm", ROF), ("batchnorm", ROF), ("mse", FOR), *(("attention_fused", m) for m in kernels.HVP_MODES)}
REASON = {"layernorm": "differs from reverse-over-reverse by", "batchnorm": "differs from reverse-over-reverse by",
          "mse": "raised RuntimeError: ZeroTensors are immutable", "attention_fused": "lacks a derivative"}
RTOL = 1e-10


def _reference(case: _Case) -> Tensor:
    """d_yy g as a dense [n, n] matrix from plain autograd (math attention: the fused kernel has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flat, unravel = tree.ravel(case.y)
    g = case.objective()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(lambda f: g(case.x, unravel(f), case.batch), flat)


def _vector(y: Tree, seed: int) -> Tree:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in y.items()}


def _relative(a: Tree, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(tree.ravel(a)[0] - b) / torch.linalg.vector_norm(b))


def _kernel_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "kernels:" in str(w.message)]


@pytest.mark.parametrize("name", list(CASES))
def test_the_references_are_the_finite_difference_hessians(name: str) -> None:
    case = CASES[name]()
    h = _reference(case)
    flat, unravel = tree.ravel(case.y)
    g = case.objective()
    v = tree.ravel(_vector(case.y, 1))[0]
    gradient = lambda f: tree.ravel(torch.func.grad(g, argnums=1)(case.x, unravel(f), case.batch))[0]  # noqa: E731
    eps = 1e-5  # central differences in float64: error ~ eps^2 |third derivative| + 1e-16 / eps
    fd = (gradient(flat + eps * v) - gradient(flat - eps * v)) / (2 * eps)
    assert torch.linalg.vector_norm(h @ v) > 1e-2
    torch.testing.assert_close(h @ v, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", kernels.HVP_MODES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("first", ["hvp", "hvp_operator"])
def test_a_wrong_mode_is_replaced_once_a_right_one_kept_silently(name: str, mode: str, first: str) -> None:
    case = CASES[name]()
    h = _reference(case)
    v, w = _vector(case.y, 2), _vector(case.y, 3)
    hv, hw = h @ tree.ravel(v)[0], h @ tree.ravel(w)[0]
    replaced = (name, mode) in REPLACED
    # The mode itself really is wrong or raises in this torch exactly where a replacement is expected.
    try:
        raw_right = _relative(kernels.hvp_in_mode(case.objective(), case.x, case.y, case.batch, v, mode), hv) < 1e-8
    except (RuntimeError, NotImplementedError):
        raw_right = False
    assert raw_right == (not replaced)

    g = case.objective()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if first == "hvp_operator":
            operator = kernels.hvp_operator(g, case.x, case.y, case.batch, mode)
            products = [(operator(v), hv), (operator(w), hw), (kernels.hvp(g, case.x, case.y, case.batch, w, mode), hw)]
        else:
            products = [(kernels.hvp(g, case.x, case.y, case.batch, v, mode), hv),
                        (kernels.hvp(g, case.x, case.y, case.batch, w, mode), hw)]
            operator = kernels.hvp_operator(g, case.x, case.y, case.batch, mode)
            products += [(operator(v), hv), (operator(w), hw)]
    for product, expected in products:
        assert _relative(product, expected) < RTOL
    messages = _kernel_warnings(caught)
    assert len(messages) == (1 if replaced else 0), messages
    if replaced:
        assert mode in messages[0] and "_Case.objective.<locals>.g" in messages[0] and REASON[name] in messages[0]


def test_the_probe_runs_once_per_objective_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    in_mode = kernels.hvp_in_mode
    monkeypatch.setattr(kernels, "hvp_in_mode", lambda *a: calls.append(a[-1]) or in_mode(*a))
    case = CASES["layernorm"]()
    g, v = case.objective(), _vector(case.y, 4)
    for mode, then in ((FOR, FOR), (ROF, ROR)):  # right: kept; wrong: replaced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernels.hvp(g, case.x, case.y, case.batch, v, mode)
        assert calls == [mode, ROR, then]  # the probe's two products, then the call's own
        calls.clear()
        for _ in range(3):
            kernels.hvp(g, case.x, case.y, case.batch, v, mode)
        assert calls == [then] * 3
        calls.clear()
    kernels.hvp(case.objective(), case.x, case.y, case.batch, v, ROR)
    assert calls == [ROR]  # the reference is never probed


def test_the_probe_leaves_the_global_rng_stream_alone() -> None:
    case = CASES["conv"]()
    state = torch.get_rng_state()
    kernels.hvp(case.objective(), case.x, case.y, case.batch, _vector(case.y, 5), FOR)
    assert torch.equal(torch.get_rng_state(), state)
    # An objective that draws (dropout in training mode): the first call (probe, then the product) and a later
    # one (no probe) from the same RNG state give the same bits and leave the same state; both products of the
    # probe saw the same masks, so the right mode was kept (no warning).
    case = _Case(nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)), (4, 5))
    g, v = case.objective(), _vector(case.y, 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = kernels.hvp(g, case.x, case.y, case.batch, v, ROF)
        runs.append((tree.ravel(out)[0], torch.get_rng_state(), torch.rand(3)))
    assert kernels._verdict(g, ROF) is True
    (a, state_a, next_a), (b, state_b, next_b) = runs
    assert torch.equal(a, b) and torch.equal(state_a, state_b) and torch.equal(next_a, next_b)
    torch.manual_seed(7)
    assert torch.equal(a, tree.ravel(kernels.hvp_in_mode(g, case.x, case.y, case.batch, v, ROF))[0])


def test_under_vmap_an_unprobed_objective_gets_the_reference_and_is_probed_at_the_next_plain_call() -> None:
    # A population: P members' y stacked, the call vmapped; the probe cannot branch on batched results.
    case = CASES["layernorm"]()
    # v is per member, as a solver's iterate is in a population (batched y with an unbatched v makes this
    # torch's reverse-over-reverse fail through layer_norm under vmap: an in-place op in its double backward).
    members, vectors = [_vector(case.y, 10 + i) for i in range(3)], [_vector(case.y, 20 + i) for i in range(3)]
    stacked = [{k: torch.stack([m[k] for m in trees]) for k in case.y} for trees in (members, vectors)]
    g = case.objective()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vmap(lambda y, v: kernels.hvp(g, case.x, y, case.batch, v, ROF))(*stacked)
    assert kernels._verdict(g, ROF) is None
    for i, (member, v) in enumerate(zip(members, vectors, strict=True)):
        case.y = member
        assert _relative({k: t[i] for k, t in out.items()}, _reference(case) @ tree.ravel(v)[0]) < RTOL
    with pytest.warns(RuntimeWarning, match="reverse-over-forward product of .* differs"):
        kernels.hvp(g, case.x, members[0], case.batch, vectors[0], ROF)
    assert kernels._verdict(g, ROF) is False


def test_the_operator_is_probed_before_the_solvers_vmap_over_vectors() -> None:
    # solvers.dense (Exact) forms H by vmapping the operator over unit vectors.
    case = CASES["batchnorm"]()
    h = _reference(case)
    _, unravel = tree.ravel(case.y)
    g = case.objective()
    with pytest.warns(RuntimeWarning, match="reverse-over-forward product of .* differs") as caught:
        operator = kernels.hvp_operator(g, case.x, case.y, case.batch, ROF)
        columns = vmap(lambda e: tree.ravel(operator(unravel(e)))[0])(torch.eye(h.shape[0], dtype=F64))
    assert len(_kernel_warnings(list(caught))) == 1
    torch.testing.assert_close(columns, h, rtol=1e-10, atol=1e-12)


def test_probe_hvp_mode_settles_the_verdict_up_front_and_refuses_transforms() -> None:
    case = CASES["layernorm"]()
    g = case.objective()
    assert kernels.probe_hvp_mode(g, case.x, case.y, case.batch, FOR) == FOR
    with pytest.warns(RuntimeWarning, match="reverse-over-forward"):
        assert kernels.probe_hvp_mode(g, case.x, case.y, case.batch, ROF) == ROR
    assert kernels.probe_hvp_mode(g, case.x, case.y, case.batch, None) == kernels.default_hvp_mode("cpu")
    with pytest.raises(RuntimeError, match="outside torch.func transforms"):
        vmap(lambda y: kernels.probe_hvp_mode(g, case.x, y, case.batch, FOR))(
            {k: t.unsqueeze(0) for k, t in case.y.items()})


def test_under_torch_compile_the_probe_waits_and_a_verdict_is_used() -> None:
    case = CASES["mse"]()
    v = _vector(case.y, 8)
    expected = _reference(case) @ tree.ravel(v)[0]
    g = case.objective()

    def compiled(mode: str) -> Tree:
        torch._dynamo.reset()
        return torch.compile(lambda y: kernels.hvp(g, case.x, y, case.batch, v, mode), fullgraph=True,
                             backend="eager")(case.y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is probed while dynamo traces: the reference is traced instead
        assert _relative(compiled(FOR), expected) < RTOL  # forward-over-reverse would raise in mse_loss
    assert kernels._verdict(g, FOR) is None
    with pytest.warns(RuntimeWarning, match="ZeroTensors"):
        assert kernels.probe_hvp_mode(g, case.x, case.y, case.batch, FOR) == ROR
    assert _relative(compiled(FOR), expected) < RTOL  # the verdict is read while tracing
    assert kernels.probe_hvp_mode(g, case.x, case.y, case.batch, ROF) == ROF
    assert _relative(compiled(ROF), expected) < RTOL


def test_the_tolerance_follows_the_dtype() -> None:
    assert kernels.probe_tolerance(torch.float64) < 1e-7 < kernels.probe_tolerance(torch.float32) < 1e-3
    assert 1e-3 < kernels.probe_tolerance(torch.float16) < kernels.probe_tolerance(torch.bfloat16) < 0.1
    # float32: a right mode on an MLP is kept (rounding is far below the tolerance); the wrong one still found.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 1))
    y = {k: p.detach().clone() for k, p in net.named_parameters()}
    batch = torch.randn(32, 16)

    def g(x: Tree, y: Tree, batch: Tensor) -> Tensor:
        return functional_call(net, y, (batch,)).tanh().square().mean()

    assert kernels.probe_hvp_mode(g, {}, y, batch, FOR) == FOR
    with pytest.warns(RuntimeWarning, match="reverse-over-forward product of .*g differs"):
        assert kernels.probe_hvp_mode(g, {}, y, batch, ROF) == ROR


def test_a_bound_method_is_probed_once_though_each_access_makes_a_new_object() -> None:
    case = CASES["layernorm"]()

    class Problem:
        def lower(self, x: Tree, y: Tree, batch: Tensor) -> Tensor:
            return case.objective()(x, y, batch)

        def other(self, x: Tree, y: Tree, batch: Tensor) -> Tensor:
            return case.objective()(x, y, batch)

    problem, v = Problem(), _vector(case.y, 9)
    expected = _reference(case) @ tree.ravel(v)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _relative(kernels.hvp(problem.lower, case.x, case.y, case.batch, v, ROF), expected) < RTOL
        assert _relative(kernels.hvp(problem.other, case.x, case.y, case.batch, v, ROF), expected) < RTOL
    messages = _kernel_warnings(caught)
    assert len(messages) == 2 and "Problem.lower" in messages[0] and "Problem.other" in messages[1]
