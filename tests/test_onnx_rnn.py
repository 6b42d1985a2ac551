"""Recurrent layers through ONNX. bp.from_onnx on nn.LSTM / nn.GRU / nn.RNN (tanh and relu) as
torch.onnx.export writes them (TorchScript exporter, opset 17): batch first or time first, one
and two layers, one and two directions, with and without initial states. Each imports with
torch's forward (float32, 1e-5), with a loss added its loss and every gradient equal torch
autograd (float64), and SGD steps follow torch's trajectory. ONNX's other layout (batch first)
and attributes bpcompile cannot honour (refused by name); Gelu(approximate="tanh"). bp.to_onnx
writes bpcompile's recurrent layers as ONNX LSTM / GRU / RNN nodes that ONNX Runtime runs with
model.forward's results at runtime batch sizes and lengths."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import bpcompile as bp

onnx = pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime)")
torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")
nn, F = torch.nn, torch.nn.functional
helper, numpy_helper = onnx.helper, onnx.numpy_helper
TOL = dict(rtol=1e-5, atol=1e-5)
TOL64 = dict(rtol=1e-9, atol=1e-11)
T, FEATURES, HIDDEN = 5, 3, 4
# torch's gate blocks in ONNX's order: LSTM (i, f, g, o) -> (i, o, f, c), GRU (r, z, n) -> (z, r, h)
ONNX_GATES = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}


class Recurrent(nn.Module):
    """A torch recurrent layer returning (out, h_n[, c_n]), its initial states given or not."""

    def __init__(self, kind: str, nonlinearity: str = "tanh", batch_first: bool = True, layers: int = 1,
                 bidirectional: bool = False, bias: bool = True, hidden: int = HIDDEN):
        super().__init__()
        options = dict(num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, bias=bias)
        if kind == "RNN":
            options["nonlinearity"] = nonlinearity
        self.kind, self.batch_first = kind, batch_first
        self.rnn = getattr(nn, kind)(FEATURES, hidden, **options)

    def forward(self, x, *states):
        initial = (states if self.kind == "LSTM" else states[0]) if states else None
        out, last = self.rnn(x, initial)
        return (out, *last) if isinstance(last, tuple) else (out, last)

    def output_names(self) -> list[str]:
        return ["out", "h_n", "c_n"] if self.kind == "LSTM" else ["out", "h_n"]

    def state_names(self) -> list[str]:
        return ["h_0", "c_0"] if self.kind == "LSTM" else ["h_0"]

    def batch_axis(self, name: str) -> int:
        return (0 if self.batch_first else 1) if name in ("x", "out") else 1

    def example(self, rng: np.random.Generator, n: int, states: bool, dtype=np.float32) -> dict[str, np.ndarray]:
        layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        shape = (n, T, FEATURES) if self.batch_first else (T, n, FEATURES)
        feed = {"x": rng.normal(size=shape)}
        if states:
            feed.update({s: rng.normal(size=(layers, n, self.rnn.hidden_size)) for s in self.state_names()})
        return {k: v.astype(dtype) for k, v in feed.items()}


def export_onnx(net: nn.Module, feed: dict[str, np.ndarray], outputs: list[str], dynamic: dict,
                opset: int = 17) -> onnx.ModelProto:
    """The TorchScript exporter's ONNX of `net` called on `feed`."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, tuple(torch.from_numpy(v) for v in feed.values()), f, dynamo=False,
                          opset_version=opset, input_names=list(feed), output_names=outputs, dynamic_axes=dynamic)
    return onnx.load_from_string(f.getvalue())


def export(net: Recurrent, feed: dict[str, np.ndarray], time: bool = False) -> onnx.ModelProto:
    """A recurrent layer's ONNX, the batch dim of every input and output dynamic (and the length,
    when `time`)."""
    dynamic = {n: {net.batch_axis(n): "batch"} for n in [*feed, *net.output_names()]}
    if time:
        for n in ("x", "out"):
            dynamic[n][1 - net.batch_axis(n)] = "time"
    return export_onnx(net, feed, net.output_names(), dynamic)


def torch_outputs(net: nn.Module, feed: dict[str, np.ndarray]) -> list:
    return net(*[torch.from_numpy(v) for v in feed.values()])


def in_onnx_layout(proto: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch's recurrent weights (values or gradients, by torch's names) as the initializers of
    the exported ONNX: per layer W, R, B stacking the directions, gates in ONNX's order."""
    def gates(kind: str, t: np.ndarray) -> np.ndarray:
        blocks = np.split(t, len(ONNX_GATES[kind]), axis=0)
        return np.concatenate([blocks[k] for k in ONNX_GATES[kind]], axis=0)

    out = {}
    layers = [n for n in proto.graph.node if n.op_type in ONNX_GATES]
    for k, node in enumerate(layers):
        kind = node.op_type
        suffixes = [s for s in ("", "_reverse") if f"rnn.weight_ih_l{k}{s}" in tensors]
        for slot, (ih, hh) in ((1, ("weight_ih", None)), (2, ("weight_hh", None)), (3, ("bias_ih", "bias_hh"))):
            if f"rnn.{ih}_l{k}" not in tensors:  # a layer without biases: no B
                continue
            parts = [[gates(kind, tensors[f"rnn.{p}_l{k}{s}"]) for p in (ih, hh) if p] for s in suffixes]
            out[node.input[slot]] = np.stack([np.concatenate(p) for p in parts])
    return out


def named(net: nn.Module, grads: bool = False) -> dict[str, np.ndarray]:
    return {n: (p.grad if grads else p).detach().numpy() for n, p in net.named_parameters()}


# the torch layer (Recurrent's arguments), and whether its initial states are given
CASES = {
    "lstm_2_layers_bidirectional": (dict(kind="LSTM", layers=2, bidirectional=True), False),
    "lstm_time_first_states": (dict(kind="LSTM", batch_first=False), True),
    "lstm_bidirectional_states": (dict(kind="LSTM", bidirectional=True), True),
    "lstm_without_biases": (dict(kind="LSTM", bias=False), False),
    "gru_2_layers_states": (dict(kind="GRU", layers=2), True),
    "gru_time_first_bidirectional": (dict(kind="GRU", batch_first=False, bidirectional=True), False),
    "gru_without_biases_states": (dict(kind="GRU", bias=False), True),
    "rnn_tanh_bidirectional_states": (dict(kind="RNN", bidirectional=True), True),
    "rnn_relu_time_first_2_layers_bidirectional": (dict(kind="RNN", nonlinearity="relu", batch_first=False, layers=2,
                                                        bidirectional=True), False),
    "rnn_relu_states": (dict(kind="RNN", nonlinearity="relu"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_recurrent_layers_import_with_torch_forward_and_gradients(case, build_dir):
    layer, states = CASES[case]
    torch.manual_seed(0)
    net = Recurrent(**layer)
    rng = np.random.default_rng(1)
    model = bp.compile(bp.from_onnx(export(net, net.example(rng, 2, states)), name=f"rnn_{case}"), "float32")
    for n in (3, 6):
        feed = net.example(rng, n, states)
        got = model.forward(**feed)
        with torch.no_grad():
            for name, expected in zip(net.output_names(), torch_outputs(net, feed)):
                np.testing.assert_allclose(got[name], expected.numpy(), **TOL, err_msg=f"{name}, batch {n}")

    net = net.double()  # the loss and every gradient, in float64
    proto = export(net, net.example(rng, 2, states, np.float64))
    g = bp.from_onnx(proto, name=f"rnn64_{case}")
    targets = {name: g.input(f"{name}_target", g.outputs[name].shape) for name in net.output_names()}
    g.loss(sum(bp.mse(g.outputs[name], t) for name, t in targets.items()))
    model = bp.compile(g, "float64")
    feed = net.example(rng, 4, states, np.float64)
    target_values = {f"{name}_target": rng.normal(size=value.shape) for name, value in
                     model.forward(**feed).items()}
    loss, grads = model.loss_and_grad(**feed, **target_values)
    outputs = torch_outputs(net, feed)
    expected = sum(F.mse_loss(o, torch.from_numpy(target_values[f"{name}_target"]))
                   for name, o in zip(net.output_names(), outputs))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), **TOL64)
    torch_grads = in_onnx_layout(proto, named(net, grads=True))
    assert set(grads) == set(torch_grads), "every parameter has its gradient"
    for key, value in torch_grads.items():
        np.testing.assert_allclose(grads[key], value, **TOL64, err_msg=key)


class Classifier(nn.Module):
    """A two-layer bidirectional recurrent layer and a linear head on its last step."""

    def __init__(self, kind: str, nonlinearity: str = "tanh"):
        super().__init__()
        options = {"nonlinearity": nonlinearity} if kind == "RNN" else {}
        self.rnn = getattr(nn, kind)(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True, **options)
        self.fc = nn.Linear(2 * HIDDEN, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind,nonlinearity", [("LSTM", "tanh"), ("GRU", "tanh"), ("RNN", "relu")])
def test_sgd_steps_follow_torch(kind, nonlinearity, build_dir):
    torch.manual_seed(3)
    net = Classifier(kind, nonlinearity)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, T, FEATURES)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    proto = export_onnx(net, {"x": x[:2]}, ["out"], {"x": {0: "batch"}, "out": {0: "batch"}})
    g = bp.from_onnx(proto, name=f"rnn_sgd_{kind}_{nonlinearity}")
    g.loss(bp.softmax_cross_entropy(g.outputs["out"], g.input("labels", ("batch",), dtype="int32")))
    model = bp.compile(g, "float32", optimizer=bp.optim.SGD(lr=0.2, momentum=0.9))
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for step in range(5):
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        np.testing.assert_allclose(model.train_step(x=x, labels=y), loss.item(), **TOL, err_msg=f"step {step}")
    values = named(net)
    expected = in_onnx_layout(proto, values) | {k: values[k] for k in ("fc.weight", "fc.bias")}
    assert set(model.params) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(model.params[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_runtime_length_imports_and_time_reversal_needs_a_fixed_one(build_dir):
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    net = Recurrent("LSTM", batch_first=True)
    model = bp.compile(bp.from_onnx(export(net, net.example(rng, 2, True), time=True)), "float32")
    for n, steps in ((3, 2), (2, 9)):
        feed = {"x": rng.normal(size=(n, steps, FEATURES)).astype(np.float32),
                "h_0": rng.normal(size=(1, n, HIDDEN)).astype(np.float32),
                "c_0": rng.normal(size=(1, n, HIDDEN)).astype(np.float32)}
        with torch.no_grad():
            expected = torch_outputs(net, feed)
        got = model.forward(**feed)
        for name, value in zip(net.output_names(), expected):
            np.testing.assert_allclose(got[name], value.numpy(), **TOL, err_msg=f"{name}, length {steps}")
    bidirectional = Recurrent("GRU", bidirectional=True)
    with pytest.raises(bp.CompileError, match=r"\(GRU\): attribute direction='bidirectional' over the runtime "
                                              r"sequence length 'time' is not supported"):
        bp.from_onnx(export(bidirectional, bidirectional.example(rng, 2, False), time=True))
    relu = Recurrent("RNN", "relu")
    with pytest.raises(bp.CompileError, match=r"\(RNN\): attribute activations=\['Relu'\] over the runtime "
                                              r"sequence length 'time' is not supported"):
        bp.from_onnx(export(relu, relu.example(rng, 2, False), time=True))


# --- hand-written ONNX: the batch-first layout, and attributes bpcompile refuses ------------------

GATE_COUNT = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_node_model(op: str, layout: int = 0, directions: int = 1, with_state: bool = True,
                         extra_inputs: tuple[str, ...] = (), seed: int = 0, **attrs) -> onnx.ModelProto:
    """One ONNX LSTM / GRU / RNN node "rec" with random weights over x (time, batch, features),
    or (batch, time, features) when layout=1; initial_h a graph input when `with_state`."""
    rng = np.random.default_rng(seed)
    gates = GATE_COUNT[op]
    lead = ["batch", T] if layout else [T, "batch"]
    state = ["batch", directions, HIDDEN] if layout else [directions, "batch", HIDDEN]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [*lead, FEATURES])]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, state))
    inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.INT32, ["batch"]) for n in extra_inputs]
    weights = [numpy_helper.from_array((0.5 * rng.normal(size=shape)).astype(np.float32), name) for name, shape in
               (("W", (directions, gates * HIDDEN, FEATURES)), ("R", (directions, gates * HIDDEN, HIDDEN)),
                ("B", (directions, 2 * gates * HIDDEN)))]
    outputs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    node_inputs = ["x", "W", "R", "B", *(extra_inputs or [""]), "h0" if with_state else ""]
    node = helper.make_node(op, node_inputs, outputs, name="rec", hidden_size=HIDDEN, layout=layout, **attrs)
    values = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph([node], "rec", inputs, values, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_the_batch_first_layout_and_reverse_directions_import(op, direction, build_dir):
    """ONNX Runtime runs only layout 0: its results on the same node in that layout, transposed,
    are the oracle for layout 1."""
    directions = 2 if direction == "bidirectional" else 1
    attrs = {"direction": direction} | ({"linear_before_reset": 1} if op == "GRU" else {})
    batch_first = recurrent_node_model(op, 1, directions, **attrs)
    time_first = recurrent_node_model(op, 0, directions, **attrs)
    session = ort.InferenceSession(time_first.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, T, FEATURES)).astype(np.float32)
    h0 = rng.normal(size=(3, directions, HIDDEN)).astype(np.float32)
    y, *last = session.run(None, {"x": x.transpose(1, 0, 2), "h0": h0.transpose(1, 0, 2)})
    model = bp.compile(bp.from_onnx(batch_first, name=f"rec_{op}_{direction}"), "float32")
    got = model.forward(x=x, h0=h0)
    np.testing.assert_allclose(got["y"], y.transpose(2, 0, 1, 3), **TOL)
    for name, value in zip(["y_h", "y_c"], last):
        np.testing.assert_allclose(got[name], value.transpose(1, 0, 2), **TOL, err_msg=name)
    again = bp.compile(bp.from_onnx(time_first, name=f"rec0_{op}_{direction}"), "float32")
    np.testing.assert_allclose(again.forward(x=x.transpose(1, 0, 2), h0=h0.transpose(1, 0, 2))["y"], y, **TOL)


REFUSED = [
    ("LSTM", {"clip": 3.0}, (), r"attribute 'clip' is not supported"),
    ("LSTM", {"input_forget": 1}, (), r"attribute input_forget=1 is not supported \(only 0\)"),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, (),
     r"attribute activations=\['Sigmoid', 'Relu', 'Tanh'\] is not supported \(only \['sigmoid', 'tanh', 'tanh'\]"),
    ("RNN", {"activations": ["HardSigmoid"], "activation_alpha": [0.2]}, (), r"attribute 'activation_alpha'"),
    ("RNN", {"activations": ["Sigmoid"]}, (), r"attribute activations=\['Sigmoid'\] is not supported \(only "
                                              r"\['tanh'\] or \['relu'\]"),
    ("GRU", {}, (), r"attribute linear_before_reset=0 is not supported \(only 1"),
    ("GRU", {"linear_before_reset": 1, "layout": 2}, (), r"attribute layout=2 is not supported"),
    ("GRU", {"linear_before_reset": 1}, ("lengths",), r"input sequence_lens .* is not supported"),
    ("RNN", {"direction": "sideways"}, (), r"attribute direction='sideways' is not supported"),
]


@pytest.mark.parametrize("op,attrs,extra,message", REFUSED)
def test_what_bpcompile_cannot_honour_is_refused_by_node_operator_and_attribute(op, attrs, extra, message):
    with pytest.raises(bp.CompileError, match=rf"node 'rec' \({op}\): {message}"):
        bp.from_onnx(recurrent_node_model(op, extra_inputs=extra, **attrs))


# --- Gelu(approximate="tanh") ----------------------------------------------------------------------

def test_gelu_tanh_imports_with_torch_forward_and_gradients(build_dir):
    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    net = nn.Sequential(nn.Linear(3, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 2))
    dynamic = {"x": {0: "batch"}, "out": {0: "batch"}}
    proto = export_onnx(net, {"x": rng.normal(size=(2, 3)).astype(np.float32)}, ["out"], dynamic, opset=20)
    assert [helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "Gelu" for a in n.attribute] \
        == [b"tanh"]
    x = 3 * rng.normal(size=(9, 3))
    model = bp.compile(bp.from_onnx(proto), "float32")
    with torch.no_grad():
        expected = net(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(model.forward(x=x.astype(np.float32))["out"], expected, **TOL)
    net = net.double()
    g = bp.from_onnx(export_onnx(net, {"x": x[:2]}, ["out"], dynamic, opset=20), name="gelu_tanh64")
    g.loss(bp.mse(g.outputs["out"], g.input("target", ("batch", 2))))
    target = rng.normal(size=(9, 2))
    loss, grads = bp.compile(g, "float64").loss_and_grad(x=x, target=target)
    expected = F.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(target))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), **TOL64)
    torch_grads = named(net, grads=True)
    assert set(grads) == set(torch_grads)  # Gemm reads the Linear weights in torch's layout
    for key, value in torch_grads.items():
        np.testing.assert_allclose(grads[key], value, **TOL64, err_msg=key)


# --- export: bpcompile's recurrent layers as ONNX LSTM / GRU / RNN ---------------------------------

def test_recurrent_layers_export_as_onnx_recurrent_operators(build_dir, tmp_path):
    """Not unrolled: one ONNX node per layer, its weights read from the layer's parameters
    (every one random here, biases too), the batch and the length dynamic."""
    import test_onnx_export as exported

    model = bp.compile(exported.recurrent(), "float32", seed=2)
    rng = np.random.default_rng(8)
    for value in model.params.values():
        value[...] = 0.5 * rng.normal(size=value.shape)
    path = tmp_path / "recurrent.onnx"
    proto = bp.to_onnx(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    kinds = [n.op_type for n in proto.graph.node]
    assert sorted(k for k in kinds if k in ONNX_GATES) == ["GRU", "LSTM", "RNN"]
    assert not {"MatMul", "Gemm", "Sigmoid", "Tanh"} & set(kinds[:kinds.index("RNN")])
    x = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in x] == ["batch", "time", 3]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    again = bp.compile(bp.from_onnx(proto, name="recurrent_again"), "float32")
    for n, steps in ((3, 6), (6, 1)):
        feed = {"x": rng.normal(size=(n, steps, 3)).astype(np.float32),
                **{s: rng.normal(size=(n, 5)).astype(np.float32) for s in ("h0", "c0")}}
        expected = model.forward(**feed)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, **TOL, err_msg=f"{key}, batch {n}, length {steps}")
            np.testing.assert_allclose(again.forward(**feed)[key], value, **TOL, err_msg=f"round trip {key}")


@pytest.mark.parametrize("case", ["lstm_2_layers_bidirectional", "lstm_without_biases", "gru_time_first_bidirectional",
                                  "rnn_relu_time_first_2_layers_bidirectional"])
def test_imported_torch_layers_export_again_with_torch_outputs(case, build_dir):
    """torch -> ONNX -> bpcompile -> ONNX: the reverse directions (a product with the reversing
    permutation) and the unrolled relu RNN export as MatMul / Relu, the rest as ONNX recurrent
    nodes, and ONNX Runtime computes torch's outputs."""
    torch.manual_seed(9)
    net = Recurrent(**CASES[case][0])
    rng = np.random.default_rng(9)
    model = bp.compile(bp.from_onnx(export(net, net.example(rng, 2, True)), name=f"again_{case}"), "float32")
    session = ort.InferenceSession(bp.to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feed = net.example(rng, 5, True)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    with torch.no_grad():
        for name, expected in zip(net.output_names(), torch_outputs(net, feed)):
            np.testing.assert_allclose(got[name], expected.numpy(), **TOL, err_msg=name)


@pytest.mark.parametrize("case", ["lstm_2_layers_bidirectional", "gru_time_first_bidirectional",
                                  "rnn_tanh_bidirectional_states"])
def test_the_dynamo_exporter_s_recurrent_layers_import(case, build_dir):
    """torch.onnx.export(dynamo=True) writes LSTM / GRU nodes with other initializer names and
    shape arithmetic, and an RNN op by op (torch.flip as a Slice of step -1): the loss and every
    gradient (float64) as torch's."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    layer, states = CASES[case]
    torch.manual_seed(10)
    net = Recurrent(**layer).double()
    rng = np.random.default_rng(10)

    def dynamo(feed: dict[str, np.ndarray]) -> onnx.ModelProto:
        batch = torch.export.Dim("batch")
        dims = ({net.batch_axis("x"): batch},) + ((tuple({1: batch} for _ in list(feed)[1:]),) if states else ())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(net, tuple(torch.from_numpy(v) for v in feed.values()), dynamo=True,
                                     opset_version=18, input_names=list(feed), output_names=net.output_names(),
                                     dynamic_shapes=dims, verbose=False).model_proto

    proto = dynamo(net.example(rng, 2, states, np.float64))
    g = bp.from_onnx(proto, name=f"dynamo_{case}")
    g.loss(sum(bp.mean(bp.square(g.outputs[name] - 0.5)) for name in net.output_names()))
    model = bp.compile(g, "float64")
    feed = net.example(rng, 3, states, np.float64)
    loss, grads = model.loss_and_grad(**feed)
    expected = sum(((o - 0.5) ** 2).mean() for o in torch_outputs(net, feed))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), **TOL64)
    torch_grads = in_onnx_layout(proto, named(net, grads=True))
    for key in set(grads) - set(torch_grads):  # a layer written out op by op: weights as they are, or transposed
        value = model.params[key]
        match = [(n, turn) for n, w in named(net).items() for turn in (False, True)[:w.ndim]
                 if np.array_equal(w.T if turn else w, value)]
        assert len(match) == 1, f"parameter {key} is none of torch's"
        name, turn = match[0]
        torch_grads[key] = named(net, grads=True)[name].T if turn else named(net, grads=True)[name]
    assert set(grads) == set(torch_grads)
    for key, value in torch_grads.items():
        np.testing.assert_allclose(grads[key], value, **TOL64, err_msg=key)
