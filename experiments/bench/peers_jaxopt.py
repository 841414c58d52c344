"""JAXopt 0.8.5 on JAX (Blondel et al. 2022): implicit differentiation (``custom_root``) under ``jax.jit``.

Each builder returns a closure computing dF/dx from the ``Spec``'s (x, y), as torch tensors, with
JAXopt's documented API, the whole hypergradient one ``jax.jit``-compiled function:

- implicit: ``jaxopt.implicit_diff.custom_root(optimality, solve=...)`` around a solver that returns
  the given y (it already is y*(x)); the optimality condition is grad_y g = 0; the linear solves are
  ``jaxopt.linear_solve.solve_cg(maxiter=K, tol=0)`` (JAX's CG, a ``lax.while_loop``) and a
  truncated Neumann series with JAXopt's solve signature (JAXopt ships none), a ``lax.fori_loop``:
  v = alpha sum_{j=0..K} (I - alpha H)^j b, the series ours and TorchOpt's compute.
- unrolled: ``jax.grad`` through T gradient steps of size alpha on g, a ``lax.fori_loop`` (plain JAX:
  JAXopt's own unrolling differentiates its solvers' loops the same way).

f and g are the problem's, written again in ``jax.numpy`` (P1, digits cleaning's weighted linear
model, the MLP's per-parameter L2); the adapter checks them against the torch ones at (x, y) once,
so a transcription error shows as a failure, not as a wrong row. Float64 problems run with
``jax_enable_x64``; the MLP stays float32. XLA's CPU thread pool follows torch's thread count
(``XLA_FLAGS``, set before jax is first imported).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from experiments.bench.peers_problems import Spec
from hypergrad.tree import Tree

NAME = "jaxopt"
SOLVE_TOL = 0.0
"""CG's relative tolerance: 0 runs all K iterations (JAX's loop stops early only at an exact zero residual)."""


def _jax() -> Any:
    """jax, imported once with x64 on and XLA's CPU threads matched to torch's."""
    if "jax" not in globals():
        threads = torch.get_num_threads()
        if threads == 1 and "XLA_FLAGS" not in os.environ:
            os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        import jax

        jax.config.update("jax_enable_x64", True)
        globals()["jax"] = jax
    return globals()["jax"]


def _to_jax(t: Any) -> Any:
    jnp = _jax().numpy
    if isinstance(t, torch.Tensor):
        return jnp.asarray(t.detach().cpu().numpy())
    return t


def _to_torch(tree: dict[str, Any], like: Tree) -> Tree:
    return {k: torch.from_numpy(np.asarray(v)).to(like[k].device) for k, v in tree.items()}


def objectives(spec: Spec) -> tuple[Callable[..., Any], Callable[..., Any], Any, Any]:
    """(f, g, lower batch, upper batch) of ``spec`` in jax.numpy; f, g take (x, y, batch) dicts of arrays."""
    jax = _jax()
    jnp = jax.numpy
    lower, upper = (tuple(_to_jax(t) for t in b) for b in spec.batches)
    if spec.name.startswith("P1"):
        from problems.reference import QuadraticP1

        p = QuadraticP1()
        A, B, c, yt = (_to_jax(t) for t in (p.A, p.B, p.c, p.y_target))
        rho = p.rho

        def g(x: Any, y: Any, batch: Any) -> Any:
            return 0.5 * y["y"] @ A @ y["y"] - y["y"] @ (B @ x["x"] + c)

        def f(x: Any, y: Any, batch: Any) -> Any:
            return 0.5 * jnp.sum((y["y"] - yt) ** 2) + 0.5 * rho * jnp.sum(x["x"] ** 2)

    elif "digits cleaning" in spec.name:
        from problems.cleaning import DigitsCleaning

        params = inspect.signature(DigitsCleaning.__init__).parameters  # the spec's instance keeps the defaults
        mu, upper_l2 = params["mu"].default, params["upper_l2"].default

        def ce(logits: Any, labels: Any) -> Any:
            return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]

        def linear(y: Any, inputs: Any) -> Any:
            return inputs @ y["weight"].T + y["bias"]

        def g(x: Any, y: Any, batch: Any) -> Any:
            inputs, labels, index = batch
            weights = jax.nn.sigmoid(x["logits"][index])
            l2 = jnp.sum(y["weight"] ** 2) + jnp.sum(y["bias"] ** 2)
            return jnp.mean(weights * ce(linear(y, inputs), labels)) + mu / 2 * l2

        def f(x: Any, y: Any, batch: Any) -> Any:
            inputs, labels = batch
            return jnp.mean(ce(linear(y, inputs), labels)) + upper_l2 / 2 * jnp.sum(x["logits"] ** 2)

    elif spec.name.startswith("MLP"):
        layers = sorted({int(k.split(".")[0]) for k in spec.y})

        def net(y: Any, images: Any) -> Any:
            h = images.reshape(images.shape[0], -1)
            for i, layer in enumerate(layers):
                h = h @ y[f"{layer}.weight"].T + y[f"{layer}.bias"]
                if i < len(layers) - 1:
                    h = jax.nn.relu(h)
            return h

        def cross_entropy(y: Any, batch: Any) -> Any:
            images, labels = batch
            logits = net(y, images)
            picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

        def g(x: Any, y: Any, batch: Any) -> Any:
            decay = sum(jnp.sum(jnp.exp(x[k]) * y[k] ** 2) for k in y)
            return cross_entropy(y, batch) + 0.5 * decay

        def f(x: Any, y: Any, batch: Any) -> Any:
            return cross_entropy(y, batch)

    else:
        raise ValueError(f"peers_jaxopt: no JAX transcription of problem {spec.name!r}")
    _check(spec, f, g, lower, upper)
    return f, g, lower, upper


def _check(spec: Spec, f: Callable[..., Any], g: Callable[..., Any], lower: Any, upper: Any) -> None:
    """The JAX objectives equal the torch ones at the spec's (x, y) (to rounding)."""
    x, y = ({k: _to_jax(v) for k, v in t.items()} for t in (spec.x, spec.y))
    for name, ours, theirs, batch, jbatch in (("g", spec.fns.g, g, spec.batches[0], lower),
                                               ("f", spec.fns.f, f, spec.batches[1], upper)):
        want = float(ours(spec.x, spec.y, batch))
        got = float(theirs(x, y, jbatch))
        tol = 1e-10 if next(iter(spec.x.values())).dtype == torch.float64 else 1e-4
        if abs(got - want) > tol * max(1.0, abs(want)):
            raise AssertionError(f"peers_jaxopt: {name} of {spec.name} differs from the torch one: {got} vs {want}")


def neumann_solve(budget: int, alpha: float) -> Callable[..., Any]:
    """A JAXopt-style ``solve(matvec, b)``: alpha sum_{j=0..K} (I - alpha H)^j b, a ``lax.fori_loop``."""
    jax = _jax()
    tree_map = jax.tree_util.tree_map

    def solve(matvec: Callable[[Any], Any], b: Any, **_: Any) -> Any:
        def body(_: Any, carry: Any) -> Any:
            c, p = carry
            c = tree_map(lambda ci, hi: ci - alpha * hi, c, matvec(c))
            return c, tree_map(lambda pi, ci: pi + ci, p, c)

        _, p = jax.lax.fori_loop(0, budget, body, (b, b))
        return tree_map(lambda pi: alpha * pi, p)

    return solve


def implicit(spec: Spec, budget: int, solver: str) -> Callable[[], Tree]:
    """dF/dx by JAXopt's ``custom_root`` under jit; ``solver`` "cg" or "neumann", K = ``budget``."""
    jax = _jax()
    from jaxopt import linear_solve
    from jaxopt.implicit_diff import custom_root

    f, g, lower, upper = objectives(spec)
    if solver == "cg":
        def solve(matvec: Callable[[Any], Any], b: Any) -> Any:
            return linear_solve.solve_cg(matvec, b, maxiter=budget, tol=SOLVE_TOL)
    else:
        solve = neumann_solve(budget, spec.alpha)

    def optimality(y: Any, x: Any) -> Any:
        return jax.grad(g, argnums=1)(x, y, lower)

    @custom_root(optimality, solve=solve)
    def inner(y0: Any, x: Any) -> Any:
        return jax.lax.stop_gradient(y0)  # y is already the lower solution

    hypergradient = jax.jit(jax.grad(lambda x, y0: f(x, inner(y0, x), upper)))
    return _runner(spec, hypergradient)


def unrolled(spec: Spec, budget: int) -> Callable[[], Tree]:
    """dF/dx by ``jax.grad`` through ``budget`` gradient steps of size alpha on g (a ``lax.fori_loop``) under jit."""
    jax = _jax()
    f, g, lower, upper = objectives(spec)
    grad_y = jax.grad(g, argnums=1)
    alpha = spec.alpha

    def through(x: Any, y0: Any) -> Any:
        y0 = jax.lax.stop_gradient(y0)
        y = jax.lax.fori_loop(0, budget, lambda _, y: jax.tree_util.tree_map(
            lambda yi, gi: yi - alpha * gi, y, grad_y(x, y, lower)), y0)
        return f(x, y, upper)

    return _runner(spec, jax.jit(jax.grad(through)))


def _runner(spec: Spec, hypergradient: Callable[..., Any]) -> Callable[[], Tree]:
    x, y = ({k: _to_jax(v) for k, v in t.items()} for t in (spec.x, spec.y))

    def run() -> Tree:
        out = hypergradient(x, y)
        _jax().block_until_ready(out)
        return _to_torch(out, spec.x)

    return run


def methods(spec: Spec, budget: int) -> dict[str, Callable[[], Tree]]:
    """JAXopt's methods at budget K (CG iterations = Neumann terms = unrolled steps)."""
    return {
        "JAXopt implicit CG (jit)": implicit(spec, budget, "cg"),
        "JAXopt implicit Neumann (jit)": implicit(spec, budget, "neumann"),
        "JAX unrolled (jit)": unrolled(spec, budget),
    }


def versions() -> str:
    """'jax X, jaxlib Y, jaxopt Z' (jaxopt has no __version__: read from the installed metadata)."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("jax", "jaxlib", "jaxopt"))
