"""bp.to_onnx: the exported graph passes onnx.checker's full check and ONNX Runtime computes
model.forward (float32, 1e-5), at two batch sizes (named dims stay dynamic); recurrent layers as
ONNX LSTM / GRU / RNN nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import bpcompile as bp
from bpcompile.ops.batched import bmatmul

onnx = pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime)")


def mlp() -> bp.Graph:
    g = bp.Graph("onnx_mlp")
    x = g.input("x", ("batch", 6))
    h = bp.nn.Dense(g, 6, 8, activation="relu")(x)
    h = bp.gelu(bp.nn.Linear(g, 8, 8)(h)) + bp.sigmoid(h) * bp.silu(h)
    h = bp.leaky_relu(h, 0.1) - bp.elu(h, 0.5) + bp.softplus(h) + bp.tanh(h) ** 2 / (1.0 + bp.abs(h))
    logits = bp.nn.Dense(g, 8, 3)(h)
    g.output("logits", logits)
    g.output("probs", bp.softmax(logits))
    g.output("logp", bp.log_softmax(logits))
    g.output("centered", logits - bp.mean(logits, axis=1, keepdims=True))
    return g


def cnn() -> bp.Graph:
    g = bp.Graph("onnx_cnn")
    x = g.input("x", ("batch", 2, 10, 10))
    h = bp.nn.Conv2d(g, 2, 4, 3, padding=1, name="conv1")(x)
    h = bp.max_pool2d(bp.relu(bp.nn.BatchNorm(g, 4, name="bn")(h)), 2)
    h = bp.nn.Conv2d(g, 4, 6, 3, stride=2, name="conv2")(bp.nn.Dropout(0.3)(h))
    h = bp.avg_pool2d(h, 2, stride=1)
    g.output("y", bp.nn.Linear(g, 6, 5, name="fc")(bp.flatten(h)))
    return g


def tokens() -> bp.Graph:
    """Embedding (Gather), concat, slice, a custom elementwise expression, sums and transposes."""
    g = bp.Graph("onnx_tokens")
    ids = g.input("ids", ("batch", 5), dtype="int32")
    feats = g.input("feats", ("batch", 5, 3))
    e = bp.nn.Embedding(g, 11, 4)(ids)
    h = bp.concat([e, feats], axis=2)  # (batch, 5, 7)
    a, b = sp.symbols("a b")
    ratio = bp.elementwise("ratio", sp.Piecewise((a / (1 + b * b), a > b), (sp.exp(-a) * sp.sqrt(1 + b * b), True)),
                           a, b)
    h = ratio(bp.slice(h, 2, 0, 4), bp.slice(h, 2, 3, 7))
    w = g.param("W", (4, 4), init="normal")
    y = h @ w  # (batch, 5, 4)
    g.output("y", bp.transpose(y, (0, 2, 1)))
    g.output("flat", bp.reshape(y, ("batch", 20)))
    g.output("total", bp.sum(y, axis=(1, 2)))
    return g


def gpt() -> bp.Graph:
    """examples/gpt_spec.yaml: embeddings, two pre-norm blocks (causal attention), a final layer
    norm and the LM head tied to the token table."""
    from bpcompile.tools.spec import load_spec
    return load_spec(Path(__file__).parent.parent / "examples" / "gpt_spec.yaml").graph


def attention() -> bp.Graph:
    """Attention with a key mask from an int input (a batch row of zeros masks every key: zeros
    out), causal attention with its own scale and a runtime length, max / min, masked_fill with a
    constant mask, layer norm without weights, and batched products reading operands transposed."""
    rng = np.random.default_rng(7)
    g = bp.Graph("onnx_attention")
    x = g.input("x", ("batch", 6, 8))
    keep = g.input("keep", ("batch", 1, 6), dtype="int32")
    seq = g.input("seq", ("batch", "time", 8))
    q, k, v = (bp.nn.Linear(g, 8, 8, name=n)(x) for n in "qkv")
    g.output("masked", bp.attention(q, k, v, mask=keep))
    g.output("causal", bp.attention(seq, seq, seq * 0.5, causal=True, scale=0.3))
    g.output("extremes", bp.max(x, axis=1) - bp.reshape(bp.min(x, axis=(1, 2), keepdims=True), ("batch", 1)))
    filled = bp.masked_fill(bp.layer_norm(x), rng.random((6, 8)) < 0.3, -2.0)
    g.output("filled", filled + bp.constant(rng.normal(size=8)))
    qt, vt = bp.transpose(q, (0, 2, 1)), bp.transpose(v, (0, 2, 1))
    g.output("products", bmatmul(q, k, ta=True) + bmatmul(qt, vt, tb=True))
    return g


def recurrent() -> bp.Graph:
    """An LSTM from given initial states, a GRU without biases and a tanh RNN starting from the
    GRU's last state, over a runtime length; the LSTM's last cell state is an output."""
    g = bp.Graph("onnx_recurrent")
    x = g.input("x", ("batch", "time", 3))
    h0, c0 = g.input("h0", ("batch", 5)), g.input("c0", ("batch", 5))
    out, (h, c) = bp.nn.LSTM(g, 3, 5, name="lstm")(x, h0, c0)
    seq, last = bp.nn.GRU(g, 5, 4, bias=False, name="gru")(out)
    y, _ = bp.nn.RNN(g, 4, 4, name="rnn")(seq, last)
    g.output("y", y)
    g.output("h", h)
    g.output("c", c)
    g.output("last", bp.tanh(last))
    return g


def inputs_for(name: str, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    if name == "mlp":
        return {"x": rng.normal(size=(n, 6)).astype(np.float32)}
    if name == "cnn":
        return {"x": rng.normal(size=(n, 2, 10, 10)).astype(np.float32)}
    if name == "gpt":
        return {"idx": rng.integers(0, 65, (n, 16)).astype(np.int32)}
    if name == "recurrent":
        return {"x": rng.normal(size=(n, n + 1, 3)).astype(np.float32),
                **{s: rng.normal(size=(n, 5)).astype(np.float32) for s in ("h0", "c0")}}
    if name == "attention":
        keep = rng.integers(0, 2, (n, 1, 6)).astype(np.int32)
        keep[0] = 0  # no key at all
        return {"x": rng.normal(size=(n, 6, 8)).astype(np.float32), "keep": keep,
                "seq": rng.normal(size=(n, n + 2, 8)).astype(np.float32)}
    return {"ids": rng.integers(0, 11, (n, 5)).astype(np.int32),
            "feats": rng.normal(size=(n, 5, 3)).astype(np.float32)}


GRAPHS = {"mlp": mlp, "cnn": cnn, "tokens": tokens, "gpt": gpt, "attention": attention, "recurrent": recurrent}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_onnx_runtime_computes_forward(name, build_dir, tmp_path):
    model = bp.compile(GRAPHS[name](), "float32", optimizer=bp.optim.SGD(lr=0.05), seed=1)
    rng = np.random.default_rng(0)
    if name == "cnn":  # running statistics away from their start
        model.params["bn.weight.running_mean"][...] = rng.normal(size=4)
        model.params["bn.weight.running_var"][...] = rng.uniform(0.5, 2.0, size=4)
    path = tmp_path / f"{name}.onnx"
    proto = bp.to_onnx(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert [o.name for o in proto.graph.output] == list(model.meta["outputs"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (3, 7):
        data = inputs_for(name, rng, n)
        expected = model.forward(**data)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, data)))
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=f"{name} {key} batch {n}")


@pytest.mark.parametrize("opset", [16, 17, 18])
def test_gpt_exports_at_each_opset(opset, build_dir):
    """Opset 16 writes layer norm decomposed; 18 gives reductions their axes as inputs."""
    model = bp.compile(gpt(), "float32", seed=3)
    proto = bp.to_onnx(model, opset=opset)
    kinds = {n.op_type for n in proto.graph.node}
    assert ("LayerNormalization" in kinds) == (opset >= 17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    data = inputs_for("gpt", np.random.default_rng(opset), 2)
    got = session.run(None, data)[0]
    np.testing.assert_allclose(got, model.forward(**data)["logits"], rtol=1e-5, atol=1e-5)


def test_batch_dim_stays_dynamic(build_dir):
    proto = bp.to_onnx(bp.compile(mlp(), "float32"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 6


def test_exported_parameters_are_the_current_ones(build_dir, tmp_path):
    model = bp.compile(mlp(), "float32", seed=2)
    before = bp.to_onnx(model)
    model.params["dense1.weight"][...] += 1.0
    after = bp.to_onnx(model)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    np.testing.assert_array_equal(weights["dense1.weight"], model.params["dense1.weight"])
    assert before != after


def test_unsupported_nodes_are_named(build_dir):
    g = bp.Graph("onnx_loss_output")
    x, labels = g.input("x", ("batch", 3)), g.input("labels", ("batch",), dtype="int32")
    g.output("loss", bp.softmax_cross_entropy(bp.nn.Linear(g, 3, 4)(x), labels))
    with pytest.raises(bp.CompileError, match="op 'softmax_ce'.*no ONNX export"):
        bp.to_onnx(bp.compile(g, "float32"))


def test_a_loaded_model_needs_its_graph(build_dir):
    model = bp.compile(mlp(), "float32")
    loaded = bp.load(model.build_path)
    with pytest.raises(bp.InputError, match="pass graph="):
        bp.to_onnx(loaded)
    assert bp.to_onnx(loaded, graph=mlp()).graph.name == "onnx_mlp"


def test_cli_export_onnx(build_dir, tmp_path, capsys):
    from bpcompile.tools.cli import main

    spec = tmp_path / "spec.py"
    spec.write_text("import bpcompile as bp\n"
                    "graph = g = bp.Graph('cli_onnx')\n"
                    "x = g.input('x', ('batch', 3))\n"
                    "g.output('y', bp.relu(bp.nn.Dense(g, 3, 2)(x)))\n")
    out = tmp_path / "m.onnx"
    assert main(["export", str(spec), "--onnx", str(out)]) == 0
    assert "Relu" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.ones((2, 3), np.float32)
    assert session.run(None, {"x": x})[0].shape == (2, 2)
    assert main(["export", str(spec)]) != 0
    assert "needs -o DIR" in capsys.readouterr().err
