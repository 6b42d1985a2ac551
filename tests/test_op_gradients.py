"""Every op, table-driven: compiled float64 loss and gradients equal the NumPy reference
interpreter and agree with central finite differences; float32 agrees with the reference.

A row is one op on one set of shapes. Operands are parameters (so their gradients are checked)
or inputs with a runtime "batch" dim; the loss is sum(op(...) * R) with R a random input of the
op's output shape, so every output element carries its own weight.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import sympy as sp
from gradcheck import check_model_gradients

import bpcompile as bp


@dataclass
class Row:
    name: str
    fn: Callable[..., bp.Tensor]
    params: dict[str, tuple]
    inputs: dict[str, tuple] = field(default_factory=dict)
    data: str = "normal"  # normal | positive | away (from kinks at 0)


z, w = sp.symbols("z w")
swish2 = bp.elementwise("swish2", z * sp.exp(-w**2) + sp.sin(z * w), z, w)
mish = bp.elementwise("mish", z * sp.tanh(sp.log(1 + sp.exp(z))), z)

MASK = np.random.default_rng(11).random((8, 8)) > 0.4
MASK[:, 0] = True  # every row keeps its first column
MASK_ROW_1_OFF = MASK[:3, :4] & (np.arange(3) != 1)[:, None]  # a query with nothing to attend to

UNARY = ["relu", "sigmoid", "tanh", "softplus", "gelu", "silu", "exp", "square", "neg"]
KINKED = ["relu", "abs", "leaky_relu", "elu"]

ROWS: list[Row] = [
    *[Row(f"{op}", lambda a, op=op: getattr(bp.ops, op)(a), {"a": (3, 5)}) for op in UNARY],
    *[Row(f"{op}-kink", lambda a, op=op: getattr(bp.ops, op)(a), {"a": (4, 3)}, data="away") for op in KINKED],
    Row("leaky_relu-slope", lambda a: bp.leaky_relu(a, 0.2), {"a": (6,)}, data="away"),
    Row("elu-alpha", lambda a: bp.elu(a, alpha=0.5), {"a": (6,)}, data="away"),
    Row("log", lambda a: bp.log(a), {"a": (3, 4)}, data="positive"),
    Row("sqrt", lambda a: bp.sqrt(a), {"a": (3, 4)}, data="positive"),
    Row("pow-const", lambda a: a ** 3, {"a": (5,)}),
    Row("pow-frac", lambda a: a ** 1.5, {"a": (5,)}, data="positive"),
    Row("pow-tensor", lambda a, b: a ** b, {"a": (2, 3), "b": (3,)}, data="positive"),
    Row("rpow", lambda a: 2.0 ** a, {"a": (4,)}),
    Row("add-bcast", lambda a, b: a + b, {"a": (3, 4), "b": (4,)}),
    Row("sub-bcast-both", lambda a, b: a - b, {"a": (3, 1), "b": (1, 4)}),
    Row("mul-bcast-rank", lambda a, b: a * b, {"a": (2, 3, 4), "b": (3, 1)}),
    Row("div", lambda a, b: a / b, {"a": (3, 4), "b": (3, 4)}, data="positive"),
    Row("rdiv-scalar", lambda a: 1.5 / a, {"a": (4,)}, data="positive"),
    Row("scalar-param", lambda a, s: a * s + s, {"a": (3, 2), "s": ()}),
    Row("fanout", lambda a: a * bp.tanh(a) + bp.sigmoid(a) * a, {"a": (7,)}),
    Row("batch-bias", lambda x, b: bp.tanh(x + b), {"b": (5,)}, {"x": ("batch", 5)}),
    Row("custom-2arg", lambda a, b: swish2(a, b), {"a": (3, 4), "b": (4,)}),
    Row("custom-mish", lambda a: mish(a), {"a": (8,)}),
    Row("custom-const-arg", lambda a: swish2(a, 0.5), {"a": (4,)}),
    Row("sum-all", lambda a: bp.sum(a), {"a": (3, 4)}),
    Row("sum-axis0", lambda a: bp.sum(a, axis=0), {"a": (3, 4)}),
    Row("sum-axis1-keep", lambda a: bp.sum(a, axis=1, keepdims=True), {"a": (3, 4)}),
    Row("sum-axes-02", lambda a: bp.sum(a, axis=(0, 2)), {"a": (2, 3, 4)}),
    Row("mean-neg-axis", lambda a: bp.mean(a, axis=-1), {"a": (2, 3, 4)}),
    Row("mean-all-keep", lambda a: bp.mean(a, keepdims=True), {"a": (3, 4)}),
    Row("mean-batch", lambda x, a: bp.mean(x * a, axis=0), {"a": (4,)}, {"x": ("batch", 4)}),
    Row("method-sum", lambda a: a.sum(axis=1), {"a": (3, 4)}),
    Row("reshape", lambda a: bp.reshape(a, (4, 3)) * bp.reshape(a, (4, 3)), {"a": (3, 4)}),
    Row("reshape-infer", lambda a: bp.tanh(a.reshape(2, -1)), {"a": (3, 4)}),
    Row("transpose", lambda a: bp.transpose(a) @ a, {"a": (3, 4)}),
    Row("transpose-axes", lambda a: bp.sigmoid(bp.transpose(a, (1, 2, 0))), {"a": (2, 3, 4)}),
    Row("T-property", lambda a, b: a.T * b, {"a": (3, 2), "b": (2, 3)}),
    Row("flatten", lambda x, a: bp.flatten(x * a), {"a": (2, 3)}, {"x": ("batch", 2, 3)}),
    Row("matmul", lambda a, b: a @ b, {"a": (3, 5), "b": (5, 4)}),
    Row("matmul-batch-input", lambda x, w: x @ w, {"w": (5, 3)}, {"x": ("batch", 5)}),
    Row("matmul-rank3", lambda a, b: a @ b, {"a": (2, 3, 5), "b": (5, 4)}),
    Row("matmul-vec-left", lambda a, b: a @ b, {"a": (5,), "b": (5, 4)}),
    Row("matmul-vec-right", lambda a, b: a @ b, {"a": (3, 5), "b": (5,)}),
    Row("matmul-chain-shared", lambda a, b: (a @ b) @ (a @ b).T, {"a": (3, 4), "b": (4, 3)}),
    Row("softmax", lambda a: bp.softmax(a), {"a": (3, 5)}),
    Row("softmax-3d", lambda a: bp.softmax(a), {"a": (2, 3, 4)}),
    Row("log_softmax", lambda a: bp.log_softmax(a), {"a": (3, 5)}),
    Row("mse", lambda x, w, t: bp.mse(bp.tanh(x @ w), t), {"w": (3, 3)}, {"x": ("batch", 3), "t": ("batch", 3)}),
    Row("mse-fixed", lambda a, t: bp.mse(a, t), {"a": (4, 3)}, {"t": (4, 3)}),
    Row("bce-logits", lambda x, w, t: bp.binary_cross_entropy_with_logits(3 * (x @ w), t), {"w": (3, 2)},
        {"x": ("batch", 3), "t": ("batch", 2)}),
    Row("softmax-ce", lambda a, y: bp.softmax_cross_entropy(a, y), {"a": (4, 5)}, {"y": (4,)}),
    Row("softmax-ce-batch", lambda x, w, y: bp.softmax_cross_entropy(x @ w, y), {"w": (3, 5)},
        {"x": ("batch", 3), "y": ("batch",)}),
    Row("where-const", lambda a, b: bp.where(MASK[:3, :4], a, b), {"a": (3, 4), "b": (4,)}),
    Row("where-scalar-bcast", lambda a: bp.where(MASK[0, :4], bp.tanh(a), 0.5), {"a": (3, 4)}),
    Row("masked_fill-inf-softmax", lambda a: bp.softmax(bp.masked_fill(a, ~MASK[:3, :5], -math.inf)), {"a": (3, 5)}),
    Row("max-axis1", lambda a: bp.max(a, axis=1), {"a": (3, 5)}),
    Row("max-all", lambda a: bp.max(a * a), {"a": (2, 3, 4)}),
    Row("min-axes-02-keep", lambda a: bp.min(a, axis=(0, 2), keepdims=True), {"a": (2, 3, 4)}),
    Row("max-batch", lambda x, a: bp.max(x * a, axis=0), {"a": (4,)}, {"x": ("batch", 4)}),
    Row("layer_norm", lambda a: bp.layer_norm(a), {"a": (3, 5)}),
    Row("layer_norm-affine-3d", lambda a, w, b: bp.layer_norm(a * a, w, b), {"a": (2, 3, 6), "w": (6,), "b": (6,)}),
    Row("layer_norm-batch", lambda x, a: bp.layer_norm(x + a), {"a": (7,)}, {"x": ("batch", 7)}),
    Row("attention", lambda q, k, v: bp.attention(q, k, v), {"q": (2, 3, 4), "k": (2, 5, 4), "v": (2, 5, 3)}),
    Row("attention-causal", lambda q, k, v: bp.attention(q, k, v, causal=True),
        {"q": (2, 2, 4, 3), "k": (2, 2, 4, 3), "v": (2, 2, 4, 3)}),
    Row("attention-qkv-heads", lambda a: _gpt_attention(a * a, 2, causal=True), {"a": (2, 5, 12)}),
    Row("attention-qkv-batch", lambda x, a: _gpt_attention(x + a, 2, causal=False), {"a": (3, 12)},
        {"x": ("batch", 3, 12)}),
    Row("attention-heads-separate", lambda q, k, v: bp.attention(_heads(q, 2), _heads(k, 2), _heads(v, 2)),
        {"q": (2, 3, 4), "k": (2, 5, 4), "v": (2, 5, 6)}),
    Row("attention-self", lambda a: bp.attention(a, a, a, causal=True, scale=0.6), {"a": (3, 4, 5)}),
    Row("attention-one-query", lambda q, k, v: bp.attention(q, k, v, causal=True),
        {"q": (1, 3), "k": (4, 3), "v": (4, 2)}),
    Row("attention-long-causal", lambda q, k, v: bp.attention(q, k, v, causal=True),  # BLAS products (K >= 16),
        {"q": (2, 45, 16), "k": (2, 40, 16), "v": (2, 40, 18)}),                    # two blocks of queries
    Row("attention-more-keys-causal", lambda q, k, v: bp.attention(q, k, v, causal=True, scale=0.3),
        {"q": (1, 40, 16), "k": (1, 70, 16), "v": (1, 70, 5)}),  # keys no query reaches
    Row("attention-long", lambda q, k, v: bp.attention(q, k, v),
        {"q": (2, 17, 16), "k": (2, 19, 16), "v": (2, 19, 18)}),
    Row("attention-mask-full-row", lambda q, k, v: bp.attention(q, k, v, mask=MASK_ROW_1_OFF),
        {"q": (2, 3, 2), "k": (2, 4, 2), "v": (2, 4, 3)}),
]


def _heads(x: bp.Tensor, heads: int) -> bp.Tensor:
    """(B, T, C) -> (B, heads, T, C // heads), as a transformer splits its heads."""
    b, t, c = x.shape
    return bp.transpose(bp.reshape(x, (b, t, heads, c // heads)), (0, 2, 1, 3))


def _gpt_attention(qkv: bp.Tensor, heads: int, causal: bool) -> bp.Tensor:
    """Attention over the heads of a fused (B, T, 3C) projection, merged back to (B, T, C)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    q, k, v = (_heads(bp.slice(qkv, 2, i * c, (i + 1) * c), heads) for i in range(3))
    return bp.reshape(bp.transpose(bp.attention(q, k, v, causal=causal), (0, 2, 1, 3)), (b, t, c))


def _param_data(shape: tuple, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "positive":
        return rng.uniform(0.5, 2.0, size=shape)
    if kind == "away":
        return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.2, 2.0, size=shape)
    return rng.normal(size=shape)


def build(row: Row, batch: int, rng: np.random.Generator) -> tuple[bp.Graph, dict]:
    g = bp.Graph(f"op_{row.name}")
    tensors = {}
    for name, shape in row.params.items():
        tensors[name] = g.param(name, shape, init=_param_data(shape, row.data, rng))
    for name, shape in row.inputs.items():
        tensors[name] = g.input(name, shape, dtype="int32" if name == "y" else None)
    order = list(row.fn.__code__.co_varnames[:row.fn.__code__.co_argcount])
    out = row.fn(*[tensors[n] for n in order if n in tensors])
    if out.shape == ():
        g.loss(out)
    else:
        weight = g.input("R", out.shape)
        g.loss(bp.sum(out * weight))
    inputs = {}
    for name, node in g.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in node.shape)
        if name == "y":
            inputs[name] = rng.integers(0, 5, size=shape).astype(np.int32)
        elif name == "t" and row.name.startswith("bce"):
            inputs[name] = rng.uniform(0, 1, size=shape)
        else:
            inputs[name] = rng.normal(size=shape)
    return g, inputs


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_op_gradient(row: Row, batch: int, build_dir) -> None:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()) + batch)
    graph, inputs = build(row, batch, rng)
    model = bp.compile(graph, dtype="float64", seed=0)
    for name, value in graph.param_init.items():
        np.testing.assert_array_equal(model.params[name], value)
    check_model_gradients(model, graph, inputs)


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in
                                 ("relu", "softplus", "gelu", "log_softmax", "softmax-ce-batch", "matmul-rank3",
                                  "sum-axes-02", "custom-mish", "mse", "transpose-axes", "layer_norm-affine-3d",
                                  "attention-causal", "max-axis1", "where-const")], ids=lambda r: r.name)
def test_op_float32_matches_reference(row: Row, build_dir) -> None:
    rng = np.random.default_rng(1)
    graph, inputs = build(row, 5, rng)
    model = bp.compile(graph, dtype="float32", seed=0)
    value, grads = model.loss_and_grad(**inputs)
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, model.params)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=1e-5)
    for k in grads:
        assert grads[k].dtype == np.float32
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=2e-4, atol=2e-5)
