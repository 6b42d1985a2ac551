"""Gradients of gradients: kinked functions take DiracDelta = 0 (as PyTorch and JAX), and
what cannot be printed or differentiated twice is a bp.CompileError, never a raw exception."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from gradcheck import check_model_gradients

import bpcompile as bp


def _gradient_penalty(act) -> tuple[bp.Graph, dict]:
    """WGAN-GP: loss = mean((||d critic / dx|| - 1)^2) with critic = sum(act(x W) v)."""
    rng = np.random.default_rng(0)
    g = bp.Graph("gp")
    x = g.input("x", ("batch", 3))
    W = g.param("W", (3, 16), init=rng.normal(size=(3, 16)))
    v = g.param("v", (16,), init=rng.normal(size=16))
    (dx,) = bp.grad(bp.sum(act(x @ W) @ v), [x])
    g.loss(bp.mean(bp.square(bp.sqrt(bp.sum(dx * dx, axis=1)) - 1.0)))
    return g, {"x": rng.normal(size=(5, 3))}


@pytest.mark.parametrize("act", [bp.relu, bp.softplus, bp.abs, bp.tanh, lambda t: bp.leaky_relu(t, 0.2)],
                         ids=["relu", "softplus", "abs", "tanh", "leaky_relu"])
def test_gradient_penalty_matches_reference_and_fd(act, build_dir) -> None:
    graph, inputs = _gradient_penalty(act)
    model = bp.compile(graph, dtype="float64")
    check_model_gradients(model, graph, inputs)


def test_gradient_penalty_matches_torch_double_backward(build_dir) -> None:
    torch = pytest.importorskip("torch", reason="needs the [torch] extra")
    graph, inputs = _gradient_penalty(bp.relu)
    model = bp.compile(graph, dtype="float64")
    value, grads = model.loss_and_grad(**inputs)
    W = torch.tensor(model.params["W"], requires_grad=True)
    v = torch.tensor(model.params["v"], requires_grad=True)
    x = torch.tensor(inputs["x"], requires_grad=True)
    critic = (torch.relu(x @ W) @ v).sum()
    (dx,) = torch.autograd.grad(critic, x, create_graph=True)
    loss = ((dx.norm(dim=1) - 1) ** 2).mean()
    loss.backward()
    np.testing.assert_allclose(value, loss.item(), rtol=1e-12)
    np.testing.assert_allclose(grads["W"], W.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["v"], v.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_partials_have_no_dirac_delta() -> None:
    for name in ("relu", "softplus", "abs", "bce_with_logits"):
        fn = bp.symbolic.builtin(name)
        for i in range(fn.nargs):
            first = fn.partial(i)
            second = bp.symbolic.Fn("d", first.raw, fn.nargs).partial(i)
            assert not second.raw.has(sp.DiracDelta) and not second.expr.has(sp.DiracDelta), name


def test_unprintable_function_is_a_compile_error(build_dir) -> None:
    z = sp.Symbol("z")
    bessel = bp.elementwise("bessel", sp.besselj(0, z), z)
    g = bp.Graph("bessel")
    a = g.param("a", (3,))
    g.loss(bp.sum(bessel(a)))
    with pytest.raises(bp.CompileError, match=r"besselj.*'bessel'.*node"):
        bp.compile(g, dtype="float64")


def test_no_second_derivative_rule_is_a_compile_error() -> None:
    g = bp.Graph("pool2")
    a = g.param("a", (1, 1, 4, 4))
    (da,) = bp.grad(bp.sum(bp.max_pool2d(a * a, 2)), [a])
    with pytest.raises(bp.CompileError, match="max_pool2d_grad .*no second-derivative rule"):
        bp.grad(bp.sum(da * da), [a])
