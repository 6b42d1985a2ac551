"""bp.from_onnx on transformers exported by torch.onnx.export (the TorchScript exporter, opset 17;
the dynamo exporter, opset 18, where onnxscript is installed): a GPT-2 pre-norm block (causal SDPA, or an explicit
masked softmax over a tril buffer), the same at opset 16 (layer norm decomposed into
ReduceMean/Sub/Pow/Sqrt/Div) and with a runtime sequence length, a 1-layer GPT with token and
position embeddings (tied or not), and masks and reductions (Equal/Not/And, Where,
ReduceMax/ReduceMin, Trilu, Expand, ConstantOfShape). Each imports with torch's forward
(float32, 1e-4) and, with a loss added, torch's gradients."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

import bpcompile as bp

onnx = pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")
nn, F = torch.nn, torch.nn.functional
TOL = dict(rtol=1e-4, atol=1e-4)
T, C, HEADS, VOCAB = 8, 16, 2, 11


def export(net, example, names, opset=17, dynamic=None) -> onnx.ModelProto:
    """ONNX from torch.onnx.export (TorchScript), the batch dim of every input and output dynamic."""
    dynamic = dynamic or {n: {0: "batch"} for n in [*names, "out"]}
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, f, dynamo=False, opset_version=opset, input_names=list(names),
                          output_names=["out"], dynamic_axes=dynamic)
    return onnx.load_from_string(f.getvalue())


class Block(nn.Module):
    """GPT-2's pre-norm block, written out (not nn.TransformerEncoderLayer)."""

    def __init__(self, sdpa: bool = True):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.sdpa = sdpa
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def attn(self, x):
        b, t, c = x.size()
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = F.softmax(att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")), dim=-1)
            y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """One block between token + position embeddings and a final layer norm and LM head."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, C), nn.Embedding(T, C)
        self.h, self.ln_f = Block(), nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        return self.lm_head(self.ln_f(self.h(self.wte(idx) + self.wpe(pos))))


class Masks(nn.Module):
    """Masks from an int input (Equal/Not/And), Where, ReduceMax/ReduceMin, Trilu on a tensor,
    Expand and ConstantOfShape of the runtime batch, Gather of constant indices."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x, ids):
        h = self.fc(x)  # (batch, T, C)
        keep = torch.logical_and(ids != 0, torch.logical_not(ids == 3))  # (batch, T)
        scores = h @ h.transpose(1, 2) / 4.0  # (batch, T, T)
        scores = scores.masked_fill(~keep[:, None, :], -1e4)
        att = torch.softmax(scores - scores.amax(dim=-1, keepdim=True), dim=-1)
        y = torch.where(keep[:, :, None], att @ h, torch.zeros_like(h))
        spread = h.amax(dim=1, keepdim=True) - h.amin(dim=1, keepdim=True)  # (batch, 1, C)
        lower = torch.tril(scores)  # Trilu of a computed tensor
        picked = h[:, [2, 0, 1]].mean(1, keepdim=True) + h[..., [3, 1, 5, 5]].sum(-1, keepdim=True)
        return y + spread.expand(-1, T, -1) + lower.sum(-1, keepdim=True) * 0.01 + picked * 0.1


def export_dynamo(net, example, names, time: bool = False) -> onnx.ModelProto:
    """ONNX from the dynamo exporter (opset 18), the batch dim (and the length) dynamic."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    dims = {0: torch.export.Dim("batch")} | ({1: torch.export.Dim("time", min=2, max=T)} if time else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, example, dynamo=True, opset_version=18, input_names=list(names),
                                    output_names=["out"], dynamic_shapes=tuple(dims for _ in names), verbose=False)
    return program.model_proto


def _randomize(net, seed: int):
    """Parameters away from their initial values, so that no two are equal (torch's exporter
    would write one initializer for equal ones, e.g. every LayerNorm's ones)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def _ops(graph: bp.Graph) -> set[str]:
    seen, todo = set(), list(graph.outputs.values())
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.inputs)
    return {n.op for n in seen}


def _check_gradients(net, model, grads: dict) -> None:
    """Each bpcompile gradient against torch's, the parameters matched by value: torch's exporter
    names weights it stores transposed (x @ Wᵀ) "onnx::MatMul_N"; gradients of initializers
    holding the same torch parameter (a tied weight and its transposed copy) add up."""
    total = {name: np.zeros(p.shape) for name, p in net.named_parameters()}
    for key, value in model.params.items():
        for name, p in net.named_parameters():
            w = p.detach().numpy()
            if value.shape == w.shape and np.array_equal(value, w):
                total[name] += grads[key]
                break
            if value.shape == w.T.shape and np.array_equal(value, w.T):
                total[name] += grads[key].T
                break
        else:
            raise AssertionError(f"parameter {key} is none of torch's")
    for name, p in net.named_parameters():
        np.testing.assert_allclose(total[name], p.grad.numpy(), err_msg=name, **TOL)


@pytest.mark.parametrize("case", ["sdpa", "masked_softmax", "opset16", "runtime_length"])
def test_gpt_block_imports_with_torch_forward_and_gradients(case, build_dir):
    net = _randomize(Block(sdpa=case != "masked_softmax"), 0)
    time = "time" if case == "runtime_length" else T
    dynamic = {n: {0: "batch", 1: "time"} for n in ("x", "out")} if case == "runtime_length" else None
    proto = export(net, (torch.randn(2, T, C),), ["x"], opset=16 if case == "opset16" else 17, dynamic=dynamic)
    kinds = {n.op_type for n in proto.graph.node}
    assert ("LayerNormalization" in kinds) == (case != "opset16")
    g = bp.from_onnx(proto)
    assert "bias" not in g.params  # the causal buffer is a constant: only masks reach it
    assert "attention_softmax" in _ops(g)  # the causal mask, at any length, is the fused kernel's
    assert ("layer_norm" in _ops(g)) == (case != "opset16")  # the decomposed form stays elementwise + mean
    target = g.input("target", ("batch", time, C))
    g.loss(bp.mse(g.outputs["out"], target))
    model = bp.compile(g, "float32")
    rng = np.random.default_rng(1)
    for length in (T, 5) if case == "runtime_length" else (T,):
        net.zero_grad()
        x = rng.normal(size=(3, length, C)).astype(np.float32)
        y = rng.normal(size=(3, length, C)).astype(np.float32)
        tx = torch.from_numpy(x)
        with torch.no_grad():
            np.testing.assert_allclose(model.forward(x=x)["out"], net(tx).numpy(), **TOL)
        loss, grads = model.loss_and_grad(x=x, target=y)
        tloss = F.mse_loss(net(tx), torch.from_numpy(y))
        tloss.backward()
        np.testing.assert_allclose(loss, tloss.item(), **TOL)
        _check_gradients(net, model, grads)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gpt_with_embeddings_imports_and_trains_as_torch(tied, build_dir):
    net = _randomize(GPT(tied=tied), 2)
    g = bp.from_onnx(export(net, (torch.randint(0, VOCAB, (2, T)),), ["idx"]))
    targets = g.input("targets", ("batch", T), dtype="int32")
    g.loss(bp.softmax_cross_entropy(g.outputs["out"], targets))
    model = bp.compile(g, "float32")
    rng = np.random.default_rng(3)
    idx = rng.integers(0, VOCAB, (4, T))
    labels = rng.integers(0, VOCAB, (4, T))
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(idx=idx.astype(np.int32))["out"],
                                   net(torch.from_numpy(idx)).numpy(), **TOL)
    loss, grads = model.loss_and_grad(idx=idx.astype(np.int32), targets=labels.astype(np.int32))
    logits = net(torch.from_numpy(idx))
    tloss = F.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(labels).reshape(-1))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), **TOL)
    _check_gradients(net, model, grads)


@pytest.mark.parametrize("case", ["block", "block_runtime_length", "gpt"])
def test_dynamo_exports_import_with_torch_forward_and_gradients(case, build_dir):
    """The dynamo exporter's forms: Reshape(allowzero=1), kᵀ through a Reshape merging the
    batch dims, the causal mask as float32's lowest number, scales stored as initializers."""
    if case == "gpt":
        net = _randomize(GPT(), 6)
        proto = export_dynamo(net, (torch.randint(0, VOCAB, (2, T)),), ["idx"])
    else:
        net = _randomize(Block(), 7)
        proto = export_dynamo(net, (torch.randn(2, T, C),), ["x"], time=case == "block_runtime_length")
    g = bp.from_onnx(proto)
    assert "attention_softmax" in _ops(g)
    out = g.outputs["out"]
    target = g.input("target", out.shape)
    g.loss(bp.mse(out, target))
    model = bp.compile(g, "float32")
    rng = np.random.default_rng(8)
    length = 5 if case == "block_runtime_length" else T
    if case == "gpt":
        feed = {"idx": rng.integers(0, VOCAB, (3, T)).astype(np.int32)}
        x = torch.from_numpy(feed["idx"]).long()
        y = rng.normal(size=(3, T, VOCAB)).astype(np.float32)
    else:
        feed = {"x": rng.normal(size=(3, length, C)).astype(np.float32)}
        x = torch.from_numpy(feed["x"])
        y = rng.normal(size=(3, length, C)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(**feed)["out"], net(x).numpy(), **TOL)
    loss, grads = model.loss_and_grad(**feed, target=y)
    tloss = F.mse_loss(net(x), torch.from_numpy(y))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), **TOL)
    _check_gradients(net, model, grads)


def test_masks_reductions_and_runtime_shapes_import(build_dir):
    net = _randomize(Masks(), 4)
    example = (torch.randn(2, T, C), torch.randint(0, 5, (2, T)).int())
    proto = export(net, example, ["x", "ids"])
    kinds = {n.op_type for n in proto.graph.node}
    assert {"Equal", "Not", "And", "Where", "ReduceMax", "ReduceMin", "Trilu", "Expand", "Gather",
            "ConstantOfShape"} <= kinds
    g = bp.from_onnx(proto)
    target = g.input("target", ("batch", T, C))
    g.loss(bp.mse(g.outputs["out"], target))
    model = bp.compile(g, "float32")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, T, C)).astype(np.float32)
    ids = rng.integers(0, 5, (3, T)).astype(np.int32)
    ids[:, 0] = 1  # every row keeps a key
    y = rng.normal(size=(3, T, C)).astype(np.float32)
    tx, tids = torch.from_numpy(x), torch.from_numpy(ids)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x=x, ids=ids)["out"], net(tx, tids).numpy(), **TOL)
    loss, grads = model.loss_and_grad(x=x, ids=ids, target=y)
    tloss = F.mse_loss(net(tx, tids), torch.from_numpy(y))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), **TOL)
    _check_gradients(net, model, grads)

