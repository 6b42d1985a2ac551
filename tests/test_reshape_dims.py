"""Reshape merges runtime dims with others into product dims and splits them back, as NumPy
does: (batch, T, C) -> (batch*T, C) -> (batch, T, C), in shapes, the compiled module (forward and
backward, against finite differences, the NumPy reference and torch), `bpcompile show` and the
exported C."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from gradcheck import check_model_gradients

import bpcompile as bp
from bpcompile.ir import shape_str

T, C, V = 4, 6, 5


# --- shapes -------------------------------------------------------------------------------------

def test_fixed_dims_merge_into_a_named_dim_and_split_back():
    g = bp.Graph("shapes")
    x = g.input("x", ("batch", 8, 16))
    flat = bp.reshape(x, (-1, 16))
    assert flat.shape == ("8*batch", 16)
    assert bp.reshape(flat, ("batch", 8, 16)) is x  # back to the input itself
    assert bp.reshape(flat, (-1, 8, 16)) is x  # -1 infers "batch"
    assert bp.reshape(x, (-1,)).shape == ("128*batch",)
    assert bp.reshape(flat, (-1, 4, 4)).shape == ("8*batch", 4, 4)
    assert bp.reshape(x, ("batch", -1)).shape == ("batch", 128)
    assert bp.flatten(x).shape == ("batch", 128)
    assert bp.reshape(x, (np.int64(-1), np.int64(16))) is flat  # NumPy's integers, as NumPy takes them


def test_named_dims_merge_into_one_canonical_product():
    g = bp.Graph("names")
    x = g.input("x", ("batch", "T", C))
    flat = x.reshape(-1, C)
    assert flat.shape == ("T*batch", C)
    # however the product is written, it is the same dim
    assert bp.reshape(x, ("batch*T", C)) is flat and bp.reshape(x, ("T*batch*1", C)) is flat
    assert bp.reshape(flat, ("batch", "T", C)) is x
    assert bp.reshape(flat, ("batch", -1, C)) is x  # infers "T"
    assert bp.reshape(x, (-1,)).shape == (f"{C}*T*batch",)
    assert bp.flatten(x).shape == ("batch", f"{C}*T")
    # a product dim broadcasts with itself and matches the labels of the same product
    assert (flat + bp.reshape(x * 2.0, (-1, C))).shape == ("T*batch", C)
    assert bp.sum(flat, axis=0).shape == (C,)


@pytest.mark.parametrize("dim", ["batch*T", "T*batch", "8", "2*batch"])
def test_an_input_dim_must_be_a_plain_name(dim):
    g = bp.Graph("plain")
    with pytest.raises(bp.ShapeError, match=rf"input 'x': dimension '{re.escape(dim)}'.*plain name.*bp\.reshape"):
        g.input("x", (dim, 3))


@pytest.mark.parametrize("target, message", [
    (("batch", 9, 16), r"element counts differ \(128\*batch vs 144\*batch\)"),
    (("T", 8, 16), r"element counts differ \(128\*batch vs 128\*T\)"),
    ((-1, -1), r"only one dimension can be -1 \(inferred\), the target has 2"),
    ((-1, 7), r"cannot infer -1, the other dims \(7\) do not divide the element count 128\*batch"),
    ((-1, "T"), r"cannot infer -1, the other dims \(T\) do not divide the element count 128\*batch"),
    ((0, 16), r"invalid dimension 0"),
    ((-1, 16.0), r"invalid dimension 16\.0"),
    ((-1, True), r"invalid dimension True"),
    (("", 128), r"invalid dimension ''"),
])
def test_reshape_errors_name_both_shapes(target, message):
    g = bp.Graph("bad")
    x = g.input("x", ("batch", 8, 16))
    with pytest.raises(bp.ShapeError) as e:
        bp.reshape(x, target)
    text = str(e.value)
    assert text.startswith(f"reshape: cannot reshape (batch, 8, 16) to {shape_str(target)}: "), text
    assert re.search(message, text), text


def test_a_product_dim_does_not_broadcast_with_its_factors():
    g = bp.Graph("mismatch")
    x = g.input("x", ("batch", T, C))
    with pytest.raises(bp.ShapeError, match=r"4\*batch.*batch|batch.*4\*batch"):
        _ = bp.reshape(x, (-1, C)) + g.input("y", ("batch", C))


# --- compiled models: a Dense on (batch*T, C) and a nanoGPT-style LM head -----------------------

H = 3
LM_SPEC = f'''
"""A nanoGPT-style LM head: token embeddings (batch, T, C) flattened to (batch*T, C) for a
hidden layer and the head, logits reshaped to (batch, T, V) and flattened again, with the labels
(batch, T) -> (batch*T,), into softmax cross-entropy."""
import bpcompile as bp

optimizer = bp.optim.Adam(lr=1e-2)
seed = 0
C, V = {C}, {V}


def build(time="T"):
    g = bp.Graph("lm_head")
    ids = g.input("ids", ("batch", time), dtype="int32")
    y = g.input("y", ("batch", time), dtype="int32")
    wte = g.param("wte", (V, C), init="normal")
    W = g.param("W", (C, C), init="glorot_uniform")
    b = g.param("b", (C,), init="normal")
    head = g.param("head", (C, V), init="glorot_uniform")
    x = bp.embedding(ids, wte)
    h = bp.tanh(bp.reshape(x, (-1, C)) @ W + b)
    logits = bp.reshape(h @ head, ("batch", time, V))
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits.reshape(-1, V), y.reshape(-1)))
    return g
'''


def lm_head(time="T") -> bp.Graph:
    namespace: dict = {}
    exec(compile(LM_SPEC, "lm_head.py", "exec"), namespace)
    return namespace["build"](time)


def dense_round_trip(time) -> bp.Graph:
    """(batch, T, C) -> (batch*T, C) -> Dense + tanh -> (batch, T, H), with a loss that also
    averages over the product dim."""
    g = bp.Graph("dense_round_trip")
    x = g.input("x", ("batch", time, C))
    t = g.input("t", ("batch", time, H))
    W = g.param("W", (C, H), init="normal")
    b = g.param("b", (H,), init="normal")
    h = bp.tanh(bp.reshape(x, (-1, C)) @ W + b)
    back = bp.reshape(h, ("batch", time, H))
    g.output("h", back)
    g.loss(bp.mse(back, t) + bp.sum(bp.square(bp.mean(h, axis=0))))
    return g


def lm_data(batch: int, time: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, V, size=(batch, time)).astype(np.int32),
            "y": rng.integers(0, V, size=(batch, time)).astype(np.int32)}


def dense_data(batch: int, time: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(batch, time, C)), "t": rng.normal(size=(batch, time, H))}


def torch_dense(torch, params: dict, data: dict):
    B, time = data["x"].shape[:2]
    W, b = (torch.tensor(params[k], requires_grad=True) for k in ("W", "b"))
    h = torch.tanh(torch.tensor(data["x"]).view(B * time, C) @ W + b)
    back = h.view(B, time, H)
    loss = torch.nn.functional.mse_loss(back, torch.tensor(data["t"])) + (h.mean(0) ** 2).sum()
    loss.backward()
    return loss, back, {"W": W.grad, "b": b.grad}


def torch_lm(torch, params: dict, data: dict):
    B, time = data["ids"].shape
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x = torch.nn.functional.embedding(torch.tensor(data["ids"], dtype=torch.long), leaves["wte"])
    h = torch.tanh(x.view(B * time, C) @ leaves["W"] + leaves["b"])
    logits = (h @ leaves["head"]).view(B, time, V)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, V), torch.tensor(data["y"], dtype=torch.long).view(-1))
    loss.backward()
    return loss, logits, {k: v.grad for k, v in leaves.items()}


CASES = {"dense": (dense_round_trip, dense_data, torch_dense, "h"), "lm_head": (lm_head, lm_data, torch_lm, "logits")}


@pytest.mark.parametrize("time", ["T", T], ids=["T-runtime", "T-fixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_flattened_models_match_references_and_torch(case, time, build_dir):
    """Loss and every gradient against float64 finite differences, the NumPy reference and
    torch (view(B*T, C)), at two runtime sizes of one compiled model."""
    torch = pytest.importorskip("torch")
    make_graph, make_data, torch_model, output = CASES[case]
    graph = make_graph(time)
    model = bp.compile(graph, "float64", optimizer=None, seed=1)
    for k, (batch, steps) in enumerate([(2, T), (3, 5 if time == "T" else T)]):
        data = make_data(batch, steps, seed=k)
        grads = check_model_gradients(model, graph, data, seed=k)
        loss, out, torch_grads = torch_model(torch, dict(model.params), data)
        assert model.loss(**data) == pytest.approx(loss.item(), rel=1e-12)
        forward = {k: v for k, v in data.items() if k in ("x", "ids")}
        np.testing.assert_allclose(model.forward(**forward)[output], out.detach().numpy(), rtol=1e-12, atol=1e-14)
        assert set(grads) == set(torch_grads)
        for name, g in grads.items():
            np.testing.assert_allclose(g, torch_grads[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


def test_float32_lm_head_trains_like_torch_adam(build_dir):
    torch = pytest.importorskip("torch")
    graph = lm_head()
    model = bp.compile(graph, "float32", optimizer=bp.optim.Adam(lr=1e-2), seed=2)
    leaves = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in model.params.items()}
    opt = torch.optim.Adam(leaves.values(), lr=1e-2)
    for step in range(5):
        data = lm_data(3, 4 + step % 2, seed=step)
        loss = model.train_step(**data)
        opt.zero_grad()
        ref, _, grads = torch_lm(torch, {k: v.detach().numpy() for k, v in leaves.items()}, data)
        for k, v in leaves.items():
            v.grad = grads[k]
        opt.step()
        assert loss == pytest.approx(ref.item(), rel=1e-5)
    for k, v in leaves.items():
        np.testing.assert_allclose(model.params[k], v.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_labels_out_of_range_after_a_flatten_name_the_input_and_its_classes(build_dir):
    g = bp.Graph("flat_labels")
    logits = g.input("logits", ("batch", "T", V))
    y = g.input("y", ("batch", "T"), dtype="int32")
    w = g.param("w", (V,), init="ones")
    g.loss(bp.softmax_cross_entropy(bp.reshape(logits * w, (-1, V)), bp.reshape(y, (-1,))))
    model = bp.compile(g, "float64", optimizer=None)
    labels = np.zeros((2, 3), dtype=np.int32)
    labels[1, 2] = V
    with pytest.raises(bp.InputError, match=rf"input 'y': labels must be class indices in \[0, {V}\), got values "
                                            rf"from 0 to {V}"):
        model.loss(logits=np.zeros((2, 3, V)), y=labels)


# --- every kernel kind that loops over a product dim ------------------------------------------

PRODUCT_OPS = {  # f(flat) with flat of shape (T*batch, C)
    "log_softmax": lambda f: bp.log_softmax(f),
    "softmax-mean-all": lambda f: bp.mean(bp.softmax(f)) * bp.sum(f),
    "layer_norm": lambda f: bp.layer_norm(f),
    "sum-keepdims-broadcast": lambda f: f - bp.sum(f, axis=0, keepdims=True) / 3.0,
    "mean-rows": lambda f: bp.mean(f, axis=1),
    "max-over-product": lambda f: bp.max(f, axis=0),
    "contract-over-product": lambda f: bp.transpose(f) @ f,  # (C, T*batch) @ (T*batch, C)
    "transpose": lambda f: bp.sigmoid(bp.transpose(f)),
    "concat": lambda f: bp.concat([f, bp.square(f)], axis=1),
    "reshape-4d": lambda f: bp.sum(bp.reshape(f, ("batch", -1, 2, C // 2)), axis=(0, 2)),
}


@pytest.mark.parametrize("name", list(PRODUCT_OPS))
def test_ops_on_a_product_dim_match_references(name, build_dir):
    g = bp.Graph(f"product_{name}")
    x = g.input("x", ("batch", "T", C))
    w = g.param("w", (C,), init="normal")
    out = PRODUCT_OPS[name](bp.reshape(bp.tanh(x * w), (-1, C)))
    g.loss(bp.mean(bp.square(out)) if out.shape else out)
    model = bp.compile(g, "float64", optimizer=None, seed=3)
    rng = np.random.default_rng(0)
    for batch, steps in [(2, 3), (3, 1)]:
        check_model_gradients(model, g, {"x": rng.normal(size=(batch, steps, C))})


def conv_frames(g: bp.Graph) -> tuple[bp.Tensor, dict]:
    """Each of T frames of a batch through one conv and pool: (batch, T, 1, 5, 5) -> (T*batch, 1, 5, 5)."""
    x = g.input("x", ("batch", "T", 1, 5, 5))
    y = bp.max_pool2d(bp.relu(bp.conv2d(bp.reshape(x, (-1, 1, 5, 5)), g.param("w", (2, 1, 3, 3), init="normal"))), 2)
    return bp.reshape(y, ("batch", "T", -1)), {"x": (2, 3, 1, 5, 5)}


def lstm_rows(g: bp.Graph) -> tuple[bp.Tensor, dict]:
    """T sequences of length 4 per batch row through one LSTM: (batch, T, 4, 3) -> (T*batch, 4, 3)."""
    x = g.input("x", ("batch", "T", 4, 3))
    weights = [g.param(n, s, init="normal") for n, s in (("W_ih", (8, 3)), ("W_hh", (8, 2)), ("b_ih", (8,)),
                                                        ("b_hh", (8,)))]
    _, (h, _) = bp.lstm(bp.reshape(x, (-1, 4, 3)), *weights)
    return bp.reshape(h, ("batch", "T", 2)), {"x": (2, 3, 4, 3)}


def embedding_batch_norm(g: bp.Graph) -> tuple[bp.Tensor, dict]:
    """Flattened ids (T*batch,) into an embedding, batch statistics over the T*batch rows."""
    ids = g.input("ids", ("batch", "T"), dtype="int32")
    e = bp.embedding(bp.reshape(ids, (-1,)), g.param("table", (7, 4), init="normal"))
    return bp.batch_norm(e * 1.5, g.param("gamma", (4,), init="ones"), g.param("beta", (4,))), {"ids": (2, 3)}


@pytest.mark.parametrize("family", [conv_frames, lstm_rows, embedding_batch_norm], ids=lambda f: f.__name__)
def test_layer_families_take_a_product_batch_dim(family, build_dir):
    g = bp.Graph(family.__name__)
    out, shapes = family(g)
    g.loss(bp.mean(bp.square(out)))
    model = bp.compile(g, "float64", optimizer=None, seed=4)
    rng = np.random.default_rng(1)
    data = {k: rng.integers(0, 7, size=s).astype(np.int32) if g.inputs[k].dtype == "int32" else rng.normal(size=s)
            for k, s in shapes.items()}
    check_model_gradients(model, g, data)


# --- bpcompile show and the exported C ------------------------------------------------------

def test_show_writes_the_product_dims(tmp_path, capsys, build_dir):
    from bpcompile.tools.cli import main
    spec = tmp_path / "lm_head.py"
    spec.write_text(LM_SPEC)
    assert main(["show", str(spec), "--grad"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"= reshape\(T\d+, \(T\*batch, 6\)\)", out)
    assert re.search(r"logits\s+= reshape\(A\d+, \(batch, T, 5\)\)", out)
    assert re.search(r"loss\s+= mean_T\*batch -log softmax\(A\d+\)\[T\d+\]", out)
    assert re.search(r"dA\d+\s+= \(softmax\(A\d+\) - onehot\(T\d+\)\) / T·batch", out)  # the mean's count, by factor
    assert re.search(r"db\s+= Σ_T\*batch dZ\d+", out)


needs_toolchain = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                     reason="needs a C compiler and make")


def _make_and_run(folder, *args: str) -> str:
    flags = "CFLAGS=-std=c99 -O2 -Wall -Wextra -Werror -pedantic"
    done = subprocess.run(["make", "-s", flags], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run(["./main", *args], cwd=folder, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


@needs_toolchain
def test_exported_lm_head_trains_like_the_module(tmp_path, build_dir):
    from bpcompile.tools import export
    graph, optimizer = lm_head(), bp.optim.Adam(lr=1e-2)
    export.export_model(graph, tmp_path, "float64", optimizer, seed=0, dims={"T": 3}, batch=2, steps=4)
    out = _make_and_run(tmp_path, "-save", "trained.bin")
    c_losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]
    model = bp.compile(graph, "float64", optimizer=optimizer, seed=0)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 2, "T": 3}, seed=0, dtype=np.float64)
    assert data["y"].shape == (2, 3) and data["y"].max() >= 2  # labels drawn over all V classes
    np.testing.assert_allclose(c_losses, [model.train_step(**data) for _ in range(4)], rtol=1e-12)
    restored = bp.compile(graph, "float64", optimizer=optimizer, seed=5)
    restored.load(tmp_path / "trained.bin")
    for name, value in model.params.items():
        np.testing.assert_allclose(restored.params[name], value, rtol=1e-12, atol=1e-15, err_msg=name)


@needs_toolchain
def test_exported_forward_sizes_a_product_dim_output(tmp_path, build_dir):
    from bpcompile.tools import export
    g = bp.Graph("flat_out")
    x = g.input("x", ("n", "T", 3))
    w = g.param("w", (3, 2), init="ones")
    g.output("y", bp.tanh(bp.reshape(x, (-1, 3)) @ w))  # (T*n, 2)
    export.export_model(g, tmp_path, "float64", dims={"n": 4, "T": 5})
    total = float(re.search(r"output y sum (\S+)", _make_and_run(tmp_path)).group(1))
    data = export.synthetic_inputs([{"name": "x", "shape": ["n", "T", 3], "dtype": "float"}], {"n": 4, "T": 5})
    expected = np.tanh(data["x"].astype(np.float64).reshape(-1, 3) @ np.ones((3, 2)))
    assert total == pytest.approx(expected.sum(), rel=1e-6)


def test_onnx_export_of_a_flatten_and_split_runs_in_onnxruntime(tmp_path, build_dir):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = bp.compile(dense_round_trip(T), "float32", optimizer=None, seed=1)
    bp.to_onnx(model, tmp_path / "dense.onnx")
    session = ort.InferenceSession(str(tmp_path / "dense.onnx"))
    for batch in (2, 5):
        x = np.random.default_rng(batch).normal(size=(batch, T, C)).astype(np.float32)
        np.testing.assert_allclose(session.run(None, {"x": x})[0], model.forward(x=x)["h"], rtol=1e-5, atol=1e-6)
