"""Batched matmul (NumPy matmul semantics): compiled values and gradients vs the NumPy
reference, float64 finite differences and torch.matmul; transposes of the last two axes fold
into the GEMM flags; gradients of gradients; runtime dims in the leading dims."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_model_gradients

import bpcompile as bp

SHAPES = [((2, 3, 4, 5), (2, 3, 5, 6)), ((3, 4, 5), (2, 3, 5, 6)), ((2, 1, 4, 5), (1, 3, 5, 2)),
          ((4, 5), (2, 5, 3)), ((5,), (2, 5, 3)), ((2, 3, 4, 5), (5,)), ((1, 1, 1), (3, 1, 1))]


def _model(sa, sb, name, transpose_b=False):
    rng = np.random.default_rng(0)
    g = bp.Graph(name)
    a = g.param("a", sa, init=rng.normal(size=sa))
    b = g.param("b", sb, init=rng.normal(size=sb))
    bb = bp.transpose(b, tuple(range(len(sb) - 2)) + (len(sb) - 1, len(sb) - 2)) if transpose_b else b
    y = a @ bb
    w = g.input("w", y.shape)
    g.output("y", y)
    g.loss(bp.sum(bp.tanh(y) * w))
    return g, y


@pytest.mark.parametrize("sa,sb", SHAPES)
def test_batched_matmul_values_and_gradients(sa, sb, build_dir) -> None:
    g, y = _model(sa, sb, "bmm")
    model = bp.compile(g, dtype="float64")
    np.testing.assert_allclose(model.forward()["y"], np.matmul(model.params["a"], model.params["b"]), rtol=1e-12)
    w = np.random.default_rng(1).normal(size=y.shape)
    check_model_gradients(model, g, {"w": w})


def test_transposed_operand_folds_into_gemm_flags(build_dir) -> None:
    g, y = _model((2, 3, 4, 5), (2, 3, 6, 5), "bmm_t", transpose_b=True)
    model = bp.compile(g, dtype="float64")
    a, b = model.params["a"], model.params["b"]
    np.testing.assert_allclose(model.forward()["y"], a @ np.swapaxes(b, -1, -2), rtol=1e-12)
    assert "Transpose" not in model.c_source and "transpose(" not in model.c_source
    check_model_gradients(model, g, {"w": np.random.default_rng(1).normal(size=y.shape)})


def test_runtime_dim_in_leading_dims_and_float32(build_dir) -> None:
    g = bp.Graph("bmm_rt")
    q = g.input("q", ("batch", 2, 5, 3))
    k = g.input("k", ("batch", 2, 7, 3))
    w = g.param("w", (3, 3), init="normal")
    s = (q @ w) @ bp.transpose(k, (0, 1, 3, 2))
    g.output("s", s)
    g.loss(bp.mean(bp.square(s)))
    rng = np.random.default_rng(2)
    for dtype, rtol in (("float64", 1e-12), ("float32", 1e-4)):
        model = bp.compile(g, dtype=dtype)
        for n in (1, 3):
            qv, kv = rng.normal(size=(n, 2, 5, 3)), rng.normal(size=(n, 2, 7, 3))
            want = (qv @ model.params["w"].astype(np.float64)) @ np.swapaxes(kv, -1, -2)
            np.testing.assert_allclose(model.forward(q=qv, k=kv)["s"], want, rtol=rtol, atol=rtol)
    model = bp.compile(g, dtype="float64")
    check_model_gradients(model, g, {"q": rng.normal(size=(3, 2, 5, 3)), "k": rng.normal(size=(3, 2, 7, 3))})


def test_mismatched_batched_shapes_raise() -> None:
    g = bp.Graph("bmm_bad")
    a = g.input("a", (2, 3, 4, 5))
    with pytest.raises(bp.ShapeError, match="do not align"):
        _ = a @ g.input("b", (2, 3, 4, 6))
    with pytest.raises(bp.ShapeError, match="broadcast"):
        _ = a @ g.input("c", (4, 5, 6))


def test_double_backward_through_batched_matmul(build_dir) -> None:
    rng = np.random.default_rng(3)
    g = bp.Graph("bmm_gg")
    a = g.param("a", (2, 3, 4), init=rng.normal(size=(2, 3, 4)))
    b = g.param("b", (4, 2), init=rng.normal(size=(4, 2)))
    c = g.param("c", (2, 2, 5), init=rng.normal(size=(2, 2, 5)))
    inner = bp.sum(bp.tanh((a @ b) @ c))
    ga, gc = bp.grad(inner, [a, c])
    g.loss(bp.sum(ga * ga) + bp.sum(bp.square(gc)))
    model = bp.compile(g, dtype="float64")
    check_model_gradients(model, g, {})


@pytest.mark.parametrize("sa,sb", SHAPES[:5])
def test_batched_matmul_matches_torch(sa, sb, build_dir) -> None:
    torch = pytest.importorskip("torch", reason="needs the [torch] extra")
    g, y = _model(sa, sb, "bmm_torch")
    w = np.random.default_rng(1).normal(size=y.shape)
    for dtype, rtol in (("float64", 1e-9), ("float32", 1e-4)):
        model = bp.compile(g, dtype=dtype)
        ta = torch.tensor(model.params["a"].astype(np.float64), requires_grad=True)
        tb = torch.tensor(model.params["b"].astype(np.float64), requires_grad=True)
        ty = torch.matmul(ta, tb)
        loss = (torch.tanh(ty) * torch.tensor(w)).sum()
        loss.backward()
        value, grads = model.loss_and_grad(w=w)
        np.testing.assert_allclose(value, loss.item(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(grads["a"], ta.grad.numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(grads["b"], tb.grad.numpy(), rtol=rtol, atol=rtol)
