"""Runtime sizes through ONNX. bp.from_onnx follows torch's shape arithmetic (Shape -> Gather ->
Mul -> Unsqueeze -> Concat -> Reshape, Reshape's 0 and -1) into bpcompile's product dims:
x.view(B * T, C) -> Linear -> view(B, T, H), and a nanoGPT-style LM head whose logits.view(-1, V)
meets F.cross_entropy; a causal buffer sliced to the runtime length, bias[:, :, :T, :T], is the
fused causal softmax. Exported by torch.onnx.export (TorchScript, opset 17, and the dynamo
exporter), one compile gives torch's forward (float32, 1e-5) at two batch sizes and lengths, and
torch's loss and gradients (float64). bp.to_onnx builds a reshape target splitting a product of
two runtime names from the graph inputs' sizes, so ONNX Runtime runs it at any batch and length."""

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
C, H, V, TMAX = 6, 4, 7, 8
SIZES = ((2, 3), (5, 7))  # (batch, length) pairs, both run by one compiled model


class Flattened(nn.Module):
    """A Linear over (B*T, C) rows, split back to (B, T, H)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, H)

    def forward(self, x):
        b, t, c = x.shape
        return torch.tanh(self.fc(x.view(b * t, c))).view(b, t, H)


class LMHead(nn.Module):
    """nanoGPT's shape moves around an embedding: tokens (B, T) -> (B*T, C) for a hidden
    layer, back to (B, T, C) for a layer norm, the head's logits flattened with view(-1, V)."""

    def __init__(self):
        super().__init__()
        self.wte, self.fc = nn.Embedding(V, C), nn.Linear(C, C)
        self.ln, self.head = nn.LayerNorm(C), nn.Linear(C, V)

    def forward(self, idx):
        b, t = idx.size()
        x = self.wte(idx)
        h = torch.tanh(self.fc(x.view(b * t, -1))).view(b, t, -1)
        logits = self.head(self.ln(h + x))
        return logits.view(-1, logits.size(-1))


class CausalBuffer(nn.Module):
    """Causal self-attention over a tril buffer sliced to the runtime length, as nanoGPT writes
    it without SDPA: att.masked_fill(self.bias[:, :, :T, :T] == 0, -inf)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.register_buffer("bias", torch.tril(torch.ones(TMAX, TMAX)).view(1, 1, TMAX, TMAX))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)).masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(b, t, c)


def export(net, example: torch.Tensor, exporter: str) -> onnx.ModelProto:
    """The ONNX of torch.onnx.export, the input's first two dims dynamic (batch, T)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("T", min=2, max=TMAX)}
            return torch.onnx.export(net, (example,), dynamo=True, opset_version=18, input_names=["x"],
                                     output_names=["out"], dynamic_shapes=(dims,), verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(net, (example,), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["out"], dynamic_axes={"x": {0: "batch", 1: "T"}})
        return onnx.load_from_string(f.getvalue())


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """Parameters moved off their initial values, so that no two initializers are equal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def feed(net: nn.Module, batch: int, length: int, rng) -> np.ndarray:
    if isinstance(net, LMHead):
        return rng.integers(0, V, (batch, length)).astype(np.int32)
    return rng.normal(size=(batch, length, C))


def torch_names(net: nn.Module, params: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Each bpcompile parameter's torch parameter, matched by value, and whether ONNX stores it
    transposed (torch's exporter writes x @ Wᵀ with Wᵀ as an initializer)."""
    found = {}
    for key, value in params.items():
        for name, p in net.named_parameters():
            w = p.detach().numpy().astype(np.float64)
            if value.shape == w.shape and np.array_equal(value, w):
                found[key] = (name, False)
            elif w.ndim == 2 and value.shape == w.T.shape and np.array_equal(value, w.T):
                found[key] = (name, True)
        assert key in found, f"parameter {key} is none of torch's"
    assert sorted(n for n, _ in found.values()) == sorted(n for n, _ in net.named_parameters())
    return found


def with_loss(net: nn.Module, g: bp.Graph) -> bp.Graph:
    """The loss torch computes, added on the bpcompile side: cross-entropy of the flattened
    logits against the flattened labels, else the mean squared error to a target."""
    out = g.outputs["out"]
    if isinstance(net, LMHead):
        assert out.shape == ("T*batch", V)  # logits.view(-1, V), a product of the runtime sizes
        y = g.input("y", ("batch", "T"), dtype="int32")
        g.loss(bp.softmax_cross_entropy(out, bp.reshape(y, (-1,))))
    else:
        g.loss(bp.mse(out, g.input("y", out.shape)))
    return g


def torch_loss(net: nn.Module, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    if isinstance(net, LMHead):
        return F.cross_entropy(net(torch.from_numpy(x).long()), torch.from_numpy(y).long().view(-1))
    return F.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(y))


MODELS = {"flattened": Flattened, "lm_head": LMHead, "causal_buffer": CausalBuffer}
CASES = [(m, e) for m in MODELS for e in ("torchscript", "dynamo")]


@pytest.mark.parametrize("name, exporter", CASES)
def test_runtime_sizes_import_with_torch_forward_at_two_sizes(name, exporter, build_dir):
    net = randomized(MODELS[name](), 1)
    example = torch.from_numpy(feed(net, 2, 4, np.random.default_rng(0)))
    g = bp.from_onnx(export(net, example.long() if name == "lm_head" else example.float(), exporter))
    model = bp.compile(g, "float32")
    rng = np.random.default_rng(2)
    for batch, length in SIZES:
        x = feed(net, batch, length, rng)
        with torch.no_grad():
            expected = net(torch.from_numpy(x).long() if name == "lm_head" else torch.from_numpy(x).float())
        np.testing.assert_allclose(model.forward(x=x.astype(np.float32) if x.dtype.kind == "f" else x)["out"],
                                   expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, exporter", CASES)
def test_runtime_sizes_import_with_torch_loss_and_gradients_in_float64(name, exporter, build_dir):
    net = randomized(MODELS[name](), 3)
    example = torch.from_numpy(feed(net, 2, 4, np.random.default_rng(4)))
    g = with_loss(net, bp.from_onnx(export(net, example.long() if name == "lm_head" else example.float(), exporter)))
    if name == "causal_buffer":
        assert "bias" not in g.params  # the buffer is the fused causal mask, not a parameter
    model = bp.compile(g, "float64")
    names = torch_names(net, model.params)
    net.double()
    rng = np.random.default_rng(5)
    for batch, length in SIZES:
        x = feed(net, batch, length, rng)
        y = rng.integers(0, V, (batch, length)).astype(np.int32) if name == "lm_head" else \
            rng.normal(size=(batch, length, C if name == "causal_buffer" else H))
        net.zero_grad()
        expected = torch_loss(net, x, y)
        expected.backward()
        loss, grads = model.loss_and_grad(x=x, y=y)
        np.testing.assert_allclose(loss, expected.item(), rtol=1e-10)
        grads_by_torch = dict(net.named_parameters())
        for key, (torch_name, transposed) in names.items():
            grad = grads_by_torch[torch_name].grad.numpy()
            np.testing.assert_allclose(grads[key], grad.T if transposed else grad, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{key} ({torch_name})")


# --- refusals: what bpcompile's dims cannot hold -------------------------------------------------

def shape_model(steps: list[tuple[str, int]], tail: list[int]) -> onnx.ModelProto:
    """y = Reshape(x, Concat(size, tail)) on x (batch, T, 4), size = Shape(x)[1] through the
    steps (op, operand) in turn: shape arithmetic written by hand."""
    h, numbers = onnx.helper, onnx.numpy_helper
    nodes = [h.make_node("Shape", ["x"], ["shape"]), h.make_node("Gather", ["shape", "one"], ["s0"], axis=0)]
    inits = [numbers.from_array(np.array([1], np.int64), "one"), numbers.from_array(np.array(tail, np.int64), "tail")]
    for i, (op, operand) in enumerate(steps):
        inits.append(numbers.from_array(np.array([operand], np.int64), f"k{i}"))
        nodes.append(h.make_node(op, [f"s{i}", f"k{i}"], [f"s{i + 1}"], name=f"size{i}"))
    nodes += [h.make_node("Concat", [f"s{len(steps)}", "tail"], ["target"], axis=0),
              h.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "T", 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    return h.make_model(h.make_graph(nodes, "shapes", [x], [y], inits), opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("steps, tail, shape", [
    ([("Mul", 2)], [-1, 2], ("2*T", "batch", 2)),
    ([("Mul", 4), ("Div", 2)], [-1, 2], ("2*T", "batch", 2)),
    ([("Mul", 4), ("Div", 4)], [-1, 0], ("T", "batch", 4)),
])
def test_products_and_exact_quotients_of_runtime_sizes_are_product_dims(steps, tail, shape):
    assert bp.from_onnx(shape_model(steps, tail)).outputs["y"].shape == shape


@pytest.mark.parametrize("steps, message", [
    ([("Add", 1)], r"node 'size0' \(Add\): Add of runtime sizes \['T'\] and \[1\] is not supported \(only Mul, "
                   r"and Div where it is exact"),
    ([("Div", 2)], r"node 'size0' \(Div\): the runtime size 'T' divided by 2 is not exact"),
    ([("Mul", 3), ("Div", 2)], r"node 'size1' \(Div\): the runtime size '3\*T' divided by 2 is not exact"),
])
def test_shape_arithmetic_without_a_bpcompile_dim_is_refused_by_name(steps, message):
    with pytest.raises(bp.CompileError, match=message):
        bp.from_onnx(shape_model(steps, [-1]))


def test_a_buffer_sliced_to_a_runtime_length_other_than_a_causal_mask_is_refused():
    """A buffer that is not a triangle of ones, cut to the runtime length: no constant holds
    it, so one error names the node and what is supported."""
    net = CausalBuffer()
    net.bias.mul_(0.5)
    proto = export(net, torch.randn(2, 4, C), "torchscript")
    with pytest.raises(bp.CompileError, match=r"\((Equal|Cast|Where)\): a constant buffer sliced to a runtime length "
                                              r"is supported only as a causal mask"):
        bp.from_onnx(proto)


# --- export: a reshape splitting a product of two runtime names ----------------------------------

def dense_round_trip() -> bp.Graph:
    """(batch, T, C) -> (T*batch, C) -> Dense + tanh -> (batch, T, H): the split back needs both
    runtime sizes, which ONNX's single -1 cannot infer."""
    g = bp.Graph("dims_round_trip")
    x = g.input("x", ("batch", "T", C))
    h = bp.nn.Dense(g, C, H, activation="tanh")(bp.reshape(x, (-1, C)))
    g.output("h", bp.reshape(h, ("batch", "T", H)))
    g.output("flat", h * 2.0)
    return g


def test_export_splits_a_product_of_runtime_names_from_the_input_sizes(build_dir, tmp_path):
    model = bp.compile(dense_round_trip(), "float32", seed=0)
    path = tmp_path / "dims.onnx"
    proto = bp.to_onnx(model, path)
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {"h": ["batch", "T", H], "flat": ["T*batch", H]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    again = bp.compile(bp.from_onnx(proto), "float32")  # and back: the same forward
    rng = np.random.default_rng(6)
    for batch, length in SIZES:
        x = rng.normal(size=(batch, length, C)).astype(np.float32)
        expected = model.forward(x=x)
        got = dict(zip(["h", "flat"], session.run(["h", "flat"], {"x": x})))
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(again.forward(x=x)[key], expected[key], rtol=1e-5, atol=1e-6)
