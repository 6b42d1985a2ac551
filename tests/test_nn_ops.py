"""Model-family ops (conv, pooling, recurrent layers, batch norm, dropout, embedding, concat,
slice): compiled float64 loss and gradients equal the NumPy reference interpreter and agree
with central finite differences; plus train/eval behaviour, running statistics, dropout
reproducibility, multi-loss (GAN) training, errors and the layer helpers.

A row builds one op from parameters (whose gradients are checked) and inputs (runtime dims
"batch" / "time"); the loss is sum(op(...) * R), R a random input of the output's shape.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from gradcheck import check_model_gradients

import bpcompile as bp


@dataclass
class Row:
    name: str
    fn: Callable[..., bp.Tensor]
    params: dict[str, tuple]
    inputs: dict[str, tuple] = field(default_factory=dict)
    batch: int = 3
    time: int = 4


def _lstm_all(x, wi, wh, bi, bh, h0=None, c0=None):
    out, (h, c) = bp.lstm(x, wi, wh, bi, bh, h0, c0)
    return bp.concat([bp.reshape(out, (out.shape[0], -1)) if isinstance(out.shape[1], int) else bp.sum(out, axis=1),
                      h, c], axis=1)


def _gru_all(x, wi, wh, bi, bh, h0=None):
    out, h = bp.gru(x, wi, wh, bi, bh, h0)
    return bp.concat([bp.sum(out, axis=1), h], axis=1)


def _rnn_all(x, wi, wh, bi, bh, h0=None):
    out, h = bp.rnn(x, wi, wh, bi, bh, h0)
    return bp.concat([bp.sum(out, axis=1), h], axis=1)


H = 5
LSTM_P = {"wi": (4 * H, 3), "wh": (4 * H, H), "bi": (4 * H,), "bh": (4 * H,)}
GRU_P = {"wi": (3 * H, 3), "wh": (3 * H, H), "bi": (3 * H,), "bh": (3 * H,)}
RNN_P = {"wi": (H, 3), "wh": (H, H), "bi": (H,), "bh": (H,)}

ROWS: list[Row] = [
    Row("conv", lambda x, w, b: bp.conv2d(x, w, b), {"w": (4, 2, 3, 3), "b": (4,)}, {"x": ("batch", 2, 6, 5)}),
    Row("conv-stride2-pad1", lambda x, w, b: bp.conv2d(x, w, b, stride=2, padding=1), {"w": (3, 2, 3, 3), "b": (3,)},
        {"x": ("batch", 2, 7, 6)}),
    Row("conv-rect-nobias", lambda x, w: bp.conv2d(x, w, stride=(1, 2), padding=(1, 0)), {"w": (2, 3, 2, 3)},
        {"x": ("batch", 3, 5, 7)}),
    Row("conv-batch1-1x1", lambda x, w, b: bp.conv2d(x, w, b), {"w": (3, 2, 1, 1), "b": (3,)},
        {"x": ("batch", 2, 3, 3)}, batch=1),
    # few channels at stride 1 lower to the direct kernels (conv_lowering); wide or strided ones to im2col + GEMM
    Row("conv-direct-rect-pad", lambda x, w, b: bp.conv2d(x, w, b, padding=(0, 1)), {"w": (3, 2, 2, 3), "b": (3,)},
        {"x": ("batch", 2, 5, 4)}),
    Row("conv-gemm-wide", lambda x, w: bp.conv2d(x, w, padding=1), {"w": (5, 5, 3, 3)}, {"x": ("batch", 5, 4, 3)}),
    Row("conv-input-grad", lambda a, w: bp.relu(bp.conv2d(a, w, padding=1)), {"a": (2, 1, 5, 5), "w": (2, 1, 3, 3)}),
    Row("conv-stacked", lambda x, w1, w2: bp.conv2d(bp.tanh(bp.conv2d(x, w1, padding=1)), w2, stride=2),
        {"w1": (3, 1, 3, 3), "w2": (2, 3, 2, 2)}, {"x": ("batch", 1, 6, 6)}),
    Row("max_pool", lambda a: bp.max_pool2d(a, 2), {"a": (2, 3, 6, 4)}),
    Row("max_pool-overlap", lambda a: bp.max_pool2d(a, 3, stride=1), {"a": (2, 2, 5, 5)}),
    Row("max_pool-rect-batch", lambda x, w: bp.max_pool2d(x * w, (2, 3), stride=(1, 2)), {"w": (4, 7)},
        {"x": ("batch", 2, 4, 7)}),
    Row("avg_pool", lambda a: bp.avg_pool2d(a, 2), {"a": (2, 3, 4, 6)}),
    Row("avg_pool-overlap-batch1", lambda x, w: bp.avg_pool2d(x * w, 3, stride=2), {"w": (7, 7)},
        {"x": ("batch", 2, 7, 7)}, batch=1),
    Row("lstm", lambda x, wi, wh, bi, bh: _lstm_all(x, wi, wh, bi, bh), LSTM_P, {"x": ("batch", "time", 3)}),
    Row("lstm-h0c0", lambda x, wi, wh, bi, bh, h0, c0: _lstm_all(x, wi, wh, bi, bh, h0, c0),
        {**LSTM_P, "h0": (2, H), "c0": (2, H)}, {"x": (2, "time", 3)}),
    Row("lstm-len1-batch1", lambda x, wi, wh, bi, bh: _lstm_all(x, wi, wh, bi, bh), LSTM_P,
        {"x": ("batch", "time", 3)}, batch=1, time=1),
    Row("lstm-fixed-len", lambda x, wi, wh: _lstm_all(x, wi, wh, None, None), {"wi": (8, 3), "wh": (8, 2)},
        {"x": ("batch", 3, 3)}),
    Row("gru", lambda x, wi, wh, bi, bh: _gru_all(x, wi, wh, bi, bh), GRU_P, {"x": ("batch", "time", 3)}),
    Row("gru-h0-len1", lambda x, wi, wh, bi, bh, h0: _gru_all(x, wi, wh, bi, bh, h0), {**GRU_P, "h0": (2, H)},
        {"x": (2, "time", 3)}, time=1),
    Row("rnn", lambda x, wi, wh, bi, bh: _rnn_all(x, wi, wh, bi, bh), RNN_P, {"x": ("batch", "time", 3)}),
    Row("rnn-h0-batch1", lambda x, wi, wh, bi, bh, h0: _rnn_all(x, wi, wh, bi, bh, h0), {**RNN_P, "h0": (1, H)},
        {"x": (1, "time", 3)}, time=1),
    Row("batch_norm-2d", lambda x, ga, be: bp.batch_norm(x, ga, be), {"ga": (4,), "be": (4,)}, {"x": ("batch", 4)}),
    Row("batch_norm-4d", lambda x, ga, be: bp.batch_norm(x, ga, be), {"ga": (3,), "be": (3,)},
        {"x": ("batch", 3, 2, 3)}, batch=2),
    Row("batch_norm-param-input", lambda a, ga, be: bp.tanh(bp.batch_norm(a * a, ga, be)),
        {"a": (5, 3), "ga": (3,), "be": (3,)}),
    Row("dropout", lambda x, w: bp.dropout(x * w, 0.3), {"w": (6,)}, {"x": ("batch", 6)}, batch=5),
    Row("embedding", lambda ids, table: bp.embedding(ids, table), {"table": (7, 4)}, {"ids": ("batch", 3)}, batch=4),
    Row("embedding-batch1", lambda ids, table: bp.tanh(bp.embedding(ids, table)), {"table": (3, 2)},
        {"ids": ("batch",)}, batch=1),
    Row("concat-axis1", lambda a, b: bp.concat([a, bp.tanh(b), a], axis=1), {"a": (2, 3), "b": (2, 4)}),
    Row("concat-batch-last", lambda x, a: bp.concat([x * a, x], axis=-1), {"a": (2, 3)}, {"x": ("batch", 2, 3)}),
    Row("slice-fixed", lambda a: bp.slice(a, 1, 1, -1), {"a": (3, 5)}),
    Row("slice-axis0-sum", lambda a: bp.slice(a, 0, 0, 2) + bp.slice(a, 0, -2), {"a": (3, 4)}),
    Row("slice-runtime-end", lambda x, a: bp.slice(x * a, 1, -2), {"a": (3,)}, {"x": ("batch", "time", 3)}),
    Row("slice-runtime-front", lambda x, a: bp.slice(x * a, 1, 0, 1), {"a": (3,)}, {"x": ("batch", "time", 3)}),
    # the previous-step view the recurrent backward uses: its own VJP (time_unshift) is checked here
    Row("time_shift", lambda x, a, h: bp.ops.recurrent.time_shift(x * a, h), {"a": (2,), "h": (3, 2)},
        {"x": (3, "time", 2)}),
]


def _sizes(row: Row) -> dict[str, int]:
    return {"batch": row.batch, "time": row.time}


def build(row: Row, rng: np.random.Generator) -> tuple[bp.Graph, dict]:
    g = bp.Graph(f"nn_{row.name}")
    tensors = {}
    for name, shape in row.params.items():
        tensors[name] = g.param(name, shape, init=rng.normal(size=shape) * (0.5 if name.startswith("w") else 1.0))
    for name, shape in row.inputs.items():
        tensors[name] = g.input(name, shape, dtype="int32" if name == "ids" else None)
    order = list(row.fn.__code__.co_varnames[:row.fn.__code__.co_argcount])
    out = row.fn(*[tensors[n] for n in order if n in tensors])
    g.loss(bp.sum(out * g.input("R", out.shape)))
    sizes = _sizes(row)
    inputs = {}
    for name, node in g.inputs.items():
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in node.shape)
        if name == "ids":
            inputs[name] = rng.integers(0, row.params["table"][0], size=shape).astype(np.int32)
        else:
            inputs[name] = rng.normal(size=shape)
    return g, inputs


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_nn_op_gradient(row: Row, build_dir) -> None:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()))
    graph, inputs = build(row, rng)
    model = bp.compile(graph, dtype="float64", seed=0)
    check_model_gradients(model, graph, inputs)


def test_conv_lowering_by_shape() -> None:
    """Few input channels at stride 1 take the direct kernels; wide, strided or huge layers GEMM."""
    lowering = bp.ops.conv.conv_lowering
    assert lowering((1, 28, 28), 8, (3, 3), 1, 1) == "direct"  # W5's first layer
    assert lowering((8, 14, 14), 16, (3, 3), 1, 1) == "gemm"  # W5's second: C*kh*kw = 72
    assert lowering((1, 28, 28), 8, (3, 3), 2, 1) == "gemm"
    assert lowering((1, 28, 28), 64, (3, 3), 1, 1) == "gemm"
    assert lowering((1, 512, 512), 8, (3, 3), 1, 1) == "gemm"  # padded planes too big for the stack
    g = bp.Graph("lowering")
    x, w = g.param("x", (2, 2, 6, 5)), g.param("w", (4, 2, 3, 3))
    y = bp.conv2d(x, w, padding=1)
    loss = bp.sum(y * g.input("R", y.shape))
    roots = [y, *bp.grad(loss, [x, w])]
    assert "im2col" in {n.op for n in bp.ir.topo_order(roots)}  # the graph, as ONNX export sees it
    lowered = {n.op for n in bp.ir.topo_order(bp.passes.simplify(roots))}
    assert {"conv2d_direct", "conv2d_input_grad", "conv2d_weight_grad"} <= lowered
    assert not lowered & {"im2col", "col2im", "matmul"}


@pytest.mark.parametrize("name", ["conv-stride2-pad1", "conv-input-grad", "max_pool-overlap", "lstm", "gru",
                                  "batch_norm-4d"])
def test_nn_op_float32_matches_reference(name: str, build_dir) -> None:
    row = next(r for r in ROWS if r.name == name)
    graph, inputs = build(row, np.random.default_rng(3))
    model = bp.compile(graph, dtype="float32", seed=0)
    value, grads = model.loss_and_grad(**inputs)
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, model.params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4, atol=1e-4)
    for k in grads:
        assert grads[k].dtype == np.float32
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_lstm_runtime_length_and_batch(build_dir) -> None:
    """One compiled LSTM runs any (batch, time); outputs match the reference for each."""
    g = bp.Graph("lstm_lengths")
    x = g.input("x", ("batch", "time", 3))
    layer = bp.nn.LSTM(g, 3, 4)
    out, (h, c) = layer(x)
    g.output("out", out)
    g.output("h", h)
    g.output("c", c)
    model = bp.compile(g, dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    for batch, time in [(1, 1), (2, 7), (5, 3)]:
        xs = rng.normal(size=(batch, time, 3))
        got = model.forward(x=xs)
        ref = bp.evaluate([out, h, c], {"x": xs}, model.params, training=False)
        for k, r in zip(("out", "h", "c"), ref):
            np.testing.assert_allclose(got[k], r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["h"], got["out"][:, -1])


# --- batch norm ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [("batch", 3), ("batch", 3, 2, 2)])
def test_batch_norm_train_eval_and_running_stats(shape, build_dir) -> None:
    g = bp.Graph(f"bn_{len(shape)}d")
    x = g.input("x", shape)
    gamma = g.param("gamma", (3,), init=np.array([1.0, 2.0, 0.5]))
    beta = g.param("beta", (3,), init=np.array([0.0, 1.0, -1.0]))
    y = bp.batch_norm(x, gamma, beta, momentum=0.2, eps=1e-3)
    assert {"gamma.running_mean", "gamma.running_var"} <= set(g.params)
    assert "gamma.running_mean" not in g.trainable
    g.output("y", y)
    g.loss(bp.mean(bp.square(y)))
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.0))
    rng = np.random.default_rng(0)
    xs = rng.normal(2.0, 3.0, size=(6, 3) + ((2, 2) if len(shape) == 4 else ()))
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    bshape = (1, 3) + ((1, 1) if len(shape) == 4 else ())

    def norm(mu, var):
        return (xs - mu.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3) * gamma_v + beta_v

    gamma_v, beta_v = model.params["gamma"].reshape(bshape).copy(), model.params["beta"].reshape(bshape).copy()
    # forward (eval mode) uses the running statistics: initially mean 0, var 1
    np.testing.assert_allclose(model.forward(x=xs)["y"], norm(np.zeros(3), np.ones(3)), rtol=1e-12)
    # training calls use the batch statistics (biased variance) and do not touch running stats
    mu, var = xs.mean(axis=axes), xs.var(axis=axes)
    np.testing.assert_allclose(model.loss(x=xs), np.mean(norm(mu, var) ** 2), rtol=1e-12)
    model.loss_and_grad(x=xs)
    np.testing.assert_array_equal(model.params["gamma.running_mean"], 0.0)
    # train_step updates them as PyTorch: momentum, unbiased variance for running_var
    n = xs.size // 3
    model.train_step(x=xs)
    rm, rv = 0.2 * mu, 0.8 + 0.2 * var * n / (n - 1)
    np.testing.assert_allclose(model.params["gamma.running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(model.params["gamma.running_var"], rv, rtol=1e-12)
    model.train_step(x=xs)
    np.testing.assert_allclose(model.params["gamma.running_mean"], 0.8 * rm + 0.2 * mu, rtol=1e-12)
    np.testing.assert_allclose(model.forward(x=xs)["y"], norm(0.8 * rm + 0.2 * mu, 0.8 * rv + 0.2 * var * n / (n - 1)),
                               rtol=1e-12)
    # eval-mode forward is deterministic and per-sample (no batch statistics)
    one = model.forward(x=xs[:1])["y"]
    np.testing.assert_allclose(one, model.forward(x=xs)["y"][:1], rtol=1e-12)
    if len(shape) == 2:  # a batch of one sample: variance 0, running_var stays finite
        model.train_step(x=xs[:1])
        assert np.all(np.isfinite(model.params["gamma.running_var"]))


def test_batch_norm_running_stats_in_checkpoints(tmp_path, build_dir) -> None:
    g = bp.Graph("bn_ckpt")
    x = g.input("x", ("batch", 2))
    bn = bp.nn.BatchNorm(g, 2)
    g.output("y", bn(x))
    g.loss(bp.mean(bp.square(bn(x) - 1.0)))
    model = bp.compile(g, dtype="float32", optimizer=bp.optim.Adam(lr=0.01))
    xs = np.random.default_rng(0).normal(size=(8, 2))
    for _ in range(3):
        model.train_step(x=xs)
    model.save(tmp_path / "bn.npz")
    expected = model.forward(x=xs)["y"]
    other = bp.compile(g, dtype="float32", optimizer=bp.optim.Adam(lr=0.01))
    other.load(tmp_path / "bn.npz")
    np.testing.assert_array_equal(other.params["bn1.weight.running_var"], model.params["bn1.weight.running_var"])
    np.testing.assert_array_equal(other.forward(x=xs)["y"], expected)


# --- dropout ---------------------------------------------------------------------------------

def _dropout_model(seed: int = 0, p: float = 0.25) -> tuple[bp.Graph, bp.CompiledModel]:
    g = bp.Graph("dropout_mlp")
    x = g.input("x", ("batch", 16))
    t = g.input("t", ("batch", 1))
    h = bp.nn.Dropout(p)(bp.nn.Dense(g, 16, 32, activation="relu")(x))
    y = bp.nn.Dense(g, 32, 1)(h)
    g.output("y", y)
    g.output("h", h)
    g.loss(bp.mse(y, t))
    return g, bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.05), seed=seed)


def test_dropout_reproducible_and_eval_deterministic(build_dir) -> None:
    rng = np.random.default_rng(0)
    xs, ts = rng.normal(size=(64, 16)), rng.normal(size=(64, 1))
    g, a = _dropout_model()
    _, b = _dropout_model()
    losses_a = [a.train_step(x=xs, t=ts) for _ in range(5)]
    losses_b = [b.train_step(x=xs, t=ts) for _ in range(5)]
    assert losses_a == losses_b  # same seed, same steps: the same masks
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    # forward is the identity for dropout: deterministic and equal to the network without it
    out1, out2 = a.forward(x=xs), a.forward(x=xs)
    np.testing.assert_array_equal(out1["y"], out2["y"])
    relu_h = np.maximum(xs @ a.params["dense1.weight"] + a.params["dense1.bias"], 0)
    np.testing.assert_allclose(out1["h"], relu_h, rtol=1e-12)
    # training calls drop about p of the units and scale the rest by 1/(1-p); the compiled
    # masks are the reference interpreter's (same counter-based stream)
    loss_now = a.loss(x=xs, t=ts)
    assert loss_now == a.loss(x=xs, t=ts)
    ref = bp.reference.loss_and_grad(g, {"x": xs, "t": ts}, a.params, seed=a.seed, counter=a.step)
    value, grads = a.loss_and_grad(x=xs, t=ts)
    np.testing.assert_allclose(value, ref[0], rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[1][k], rtol=1e-9, atol=1e-12)
    train_h = bp.evaluate([g.outputs["h"]], {"x": xs}, a.params, training=True, seed=0, counter=3)[0]
    dropped = np.mean((train_h == 0) & (relu_h > 0)) / np.mean(relu_h > 0)
    assert 0.18 < dropped < 0.32
    kept = (train_h != 0)
    np.testing.assert_allclose(train_h[kept], relu_h[kept] / 0.75, rtol=1e-12)
    # a different model seed draws different masks
    _, c = _dropout_model(seed=1)
    for k in a.params:
        c.params[k][...] = b.params[k]
    c.step = b.step
    assert c.loss(x=xs, t=ts) != b.loss(x=xs, t=ts)


# --- GAN: several named losses, each training its own parameters -------------------------------

def test_gan_losses_update_only_their_params(build_dir) -> None:
    g = bp.Graph("tiny_gan")
    z = g.input("z", ("batch", 2))
    real = g.input("real", ("batch", 2))
    gen = bp.nn.Sequential(bp.nn.Dense(g, 2, 8, activation="relu", name="G1"), bp.nn.Dense(g, 8, 2, name="G2"))
    disc = bp.nn.Sequential(bp.nn.Dense(g, 2, 8, activation="leaky_relu", name="D1"), bp.nn.Dense(g, 8, 1, name="D2"))
    fake = gen(z)
    d_real, d_fake = disc(real), disc(fake)
    ones, zeros = bp.const(1.0, d_real.shape), bp.const(0.0, d_fake.shape)
    d_loss = bp.binary_cross_entropy_with_logits(d_real, ones) + bp.binary_cross_entropy_with_logits(d_fake, zeros)
    g_loss = bp.binary_cross_entropy_with_logits(d_fake, ones)
    g.loss(d_loss, name="d", params=disc.params)
    g.loss(g_loss, name="g", params=gen.params)
    g.output("fake", fake)
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.Adam(lr=0.01))
    rng = np.random.default_rng(0)
    zs, xs = rng.normal(size=(16, 2)), rng.normal(size=(16, 2))
    d_names = [p.attrs["name"] for p in disc.params]
    g_names = [p.attrs["name"] for p in gen.params]
    assert set(d_names) | set(g_names) == set(model.params)
    before = {k: v.copy() for k, v in model.params.items()}
    model.train_step(loss="d", z=zs, real=xs)
    assert all(not np.array_equal(model.params[k], before[k]) for k in d_names if not k.endswith("bias"))
    assert all(np.array_equal(model.params[k], before[k]) for k in g_names)
    mid = {k: v.copy() for k, v in model.params.items()}
    model.train_step(loss="g", z=zs)  # the generator's loss needs no real data
    assert all(np.array_equal(model.params[k], mid[k]) for k in d_names)
    assert any(not np.array_equal(model.params[k], mid[k]) for k in g_names)
    _, grads = model.loss_and_grad(loss="g", z=zs)
    assert set(grads) == set(g_names)
    check_model_gradients(model, g, {"z": zs, "real": xs}, loss="d")


# --- errors ------------------------------------------------------------------------------------

def test_embedding_out_of_range_raises_input_error(build_dir) -> None:
    g = bp.Graph("emb_range")
    ids = g.input("ids", ("batch", 2), dtype="int32")
    table = g.param("table", (5, 3), init="normal")
    e = bp.embedding(ids, table)
    g.output("e", e)
    g.loss(bp.mean(e))
    model = bp.compile(g, dtype="float32")
    good = np.array([[0, 4], [2, 2]], dtype=np.int32)
    np.testing.assert_array_equal(model.forward(ids=good)["e"], model.params["table"][good])
    for bad in (np.array([[0, 5]]), np.array([[-1, 0]])):
        with pytest.raises(bp.InputError, match=r"ids.*\[0, 5\)"):
            model.forward(ids=bad)
        with pytest.raises(bp.InputError):
            model.train_step(ids=bad)
    assert model.forward(ids=good)["e"].shape == (2, 2, 3)  # still usable


def test_slice_of_too_short_runtime_dim_raises(build_dir) -> None:
    g = bp.Graph("slice_short")
    x = g.input("x", ("batch", "time"))
    g.output("first3", bp.slice(x, 1, 0, 3))
    model = bp.compile(g)
    np.testing.assert_array_equal(model.forward(x=np.arange(8.0).reshape(2, 4))["first3"], [[0, 1, 2], [4, 5, 6]])
    with pytest.raises(bp.InputError):
        model.forward(x=np.zeros((2, 2)))


def test_shape_errors_name_operands() -> None:
    g = bp.Graph("nn_errors")
    x = g.input("x", ("batch", 3, 8, 8))
    with pytest.raises(bp.ShapeError, match=r"\(batch, 3, 8, 8\).*3 channels.*\(4, 2, 3, 3\)"):
        bp.conv2d(x, g.param("w", (4, 2, 3, 3)))
    with pytest.raises(bp.ShapeError, match="does not fit"):
        bp.max_pool2d(x, 9)
    with pytest.raises(bp.ShapeError, match="NCHW"):
        bp.avg_pool2d(g.input("flat", ("batch", 3)), 2)
    seq = g.input("seq", ("batch", "time", 3))
    with pytest.raises(bp.ShapeError, match=r"W_ih of shape \(16, 3\)"):
        bp.lstm(seq, g.param("wi", (16, 4)), g.param("wh", (16, 4)))
    with pytest.raises(bp.ShapeError, match="gamma"):
        bp.batch_norm(x, g.param("ga", (4,)), g.param("be", (3,)))
    with pytest.raises(bp.ShapeError, match="int32"):
        bp.embedding(x, g.param("tab", (3, 2)))
    with pytest.raises(bp.ShapeError, match="differ outside axis"):
        bp.concat([g.input("a", (2, 3)), g.input("b", (3, 3))], axis=1)
    with pytest.raises(bp.ShapeError, match="fixed length"):
        bp.slice(seq, 1, 1, -1)
    with pytest.raises(ValueError, match="p must be"):
        bp.dropout(x, 1.0)


# --- layer helpers ----------------------------------------------------------------------------

def test_layer_helpers_create_named_params_and_run(build_dir) -> None:
    g = bp.Graph("layers")
    img = g.input("img", ("batch", 1, 8, 8))
    ids = g.input("ids", ("batch", 5), dtype="int32")
    conv = bp.nn.Conv2d(g, 1, 4, 3, padding=1, activation="relu")
    bn = bp.nn.BatchNorm(g, 4)
    emb = bp.nn.Embedding(g, 10, 6)
    lstm = bp.nn.LSTM(g, 6, 7)
    drop = bp.nn.Dropout(0.5)
    dense = bp.nn.Dense(g, 4 * 4 * 4 + 7, 3)
    feat = bp.flatten(bp.max_pool2d(bn(conv(img)), 2))
    _, (h, _) = lstm(emb(ids))
    logits = dense(drop(bp.concat([feat, h], axis=1)))
    g.output("logits", logits)
    assert [p.attrs["name"] for p in conv.params] == ["conv1.weight", "conv1.bias"]
    assert [p.attrs["name"] for p in lstm.params] == ["lstm1.W_ih", "lstm1.W_hh", "lstm1.b_ih", "lstm1.b_hh"]
    assert bp.nn.Dense(g, 2, 2).name == "dense2"
    assert "bn1.weight.running_mean" in g.params
    model = bp.compile(g, dtype="float32", seed=0)
    assert model.params["lstm1.b_ih"][7:14].tolist() == [1.0] * 7  # forget-gate bias
    assert abs(float(model.params["conv1.weight"].std()) - np.sqrt(2 / 9)) < 0.2
    rng = np.random.default_rng(0)
    out = model.forward(img=rng.normal(size=(3, 1, 8, 8)), ids=rng.integers(0, 10, (3, 5)))["logits"]
    assert out.shape == (3, 3) and np.all(np.isfinite(out))
