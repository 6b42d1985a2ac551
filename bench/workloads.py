"""The seven benchmark workloads, as data, plus the shared synthetic batch and initial weights.

Every runner trains the same model on the same batch from the same initial weights, so
the losses of the first steps can be compared across frameworks (``run.py`` does).

Parameter layouts follow the bpcompile DESIGN (and PyTorch where it has one):
dense weights are ``(in, out)`` and used as ``x @ W + b``; conv weights are
``(out, in, kh, kw)`` on NCHW; LSTM weights are ``W_ih (4H, I)``, ``W_hh (4H, H)`` with
gates in the order (i, f, g, o). The GPT (W7) uses ``x @ W + b`` too: ``attn_w`` is
``(C, 3C)`` with the columns of q, k and v in that order, heads contiguous inside each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optimizer:
    name: str  # "sgd" or "adam"
    lr: float


@dataclass(frozen=True)
class MLP:
    sizes: tuple[int, ...]  # input, hidden..., output
    activation: str  # "relu" or "mish" (x * tanh(softplus(x)), from primitives)


@dataclass(frozen=True)
class CNN:
    """conv3x3 -> ReLU -> maxpool2, once per entry of ``channels``, then flatten -> dense."""

    in_shape: tuple[int, int, int]  # C, H, W
    channels: tuple[int, ...]
    classes: int
    kernel: int = 3
    padding: int = 1
    pool: int = 2


@dataclass(frozen=True)
class LSTM:
    """One LSTM layer over the sequence; its last hidden state feeds a dense layer."""

    input_size: int
    hidden: int
    length: int
    out: int


@dataclass(frozen=True)
class GPT:
    """Decoder-only transformer (nanoGPT layout, pre-norm, no dropout), next-token CE.

    x = wte[idx] + wpe; per layer x += attn(ln1(x)), x += mlp(ln2(x)); logits = ln_f(x) @ lm_w.
    attn: qkv = h @ attn_w + attn_b, causal softmax(q k^T / sqrt(head)) v per head, then
    y @ proj_w + proj_b. mlp: gelu(h @ fc_w + fc_b) @ fc2_w + fc2_b, GELU in its erf form.
    Layer norms over the last axis with weight and bias, eps 1e-5; lm_w has no bias.
    """

    vocab: int
    block: int  # T: the sequence length of every batch row
    embed: int  # C
    heads: int
    layers: int
    mlp_ratio: int = 4
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads


Model = MLP | CNN | LSTM | GPT


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    model: Model
    loss: str  # "mse" or "softmax_ce" (int labels)
    batch: int
    optimizer: Optimizer

    @property
    def n_classes(self) -> int:
        return output_size(self.model)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("W1", "tiny MLP 2-16-1 ReLU", MLP((2, 16, 1), "relu"), "mse", 32,
                 Optimizer("sgd", 0.01)),
        Workload("W2", "MLP 784-256-128-10 ReLU, CE, Adam", MLP((784, 256, 128, 10), "relu"),
                 "softmax_ce", 128, Optimizer("adam", 1e-3)),
        Workload("W3", "MLP 512-2048-2048-512 ReLU", MLP((512, 2048, 2048, 512), "relu"),
                 "mse", 256, Optimizer("sgd", 0.01)),
        Workload("W4", "MLP 256-512-512-256 Mish", MLP((256, 512, 512, 256), "mish"),
                 "mse", 128, Optimizer("sgd", 0.01)),
        Workload("W5", "CNN 1x28x28 c8-p2-c16-p2-d10, CE", CNN((1, 28, 28), (8, 16), 10),
                 "softmax_ce", 64, Optimizer("sgd", 0.01)),
        Workload("W6", "LSTM 32->128 x32 steps, last h -> dense 1",
                 LSTM(32, 128, 32, 1), "mse", 32, Optimizer("sgd", 0.01)),
        Workload("W7", "GPT V65 T64 C128 4 heads 2 layers, CE, Adam",
                 GPT(vocab=65, block=64, embed=128, heads=4, layers=2), "softmax_ce", 16,
                 Optimizer("adam", 1e-3)),
    )
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name.upper()]
    except KeyError:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None


def output_size(model: Model) -> int:
    if isinstance(model, MLP):
        return model.sizes[-1]
    if isinstance(model, CNN):
        return model.classes
    return model.out


def cnn_feature_shapes(model: CNN) -> list[tuple[int, int, int]]:
    """(C, H, W) after each conv+pool stage, starting with the input."""
    shapes = [model.in_shape]
    for ch in model.channels:
        _, h, w = shapes[-1]
        h = (h + 2 * model.padding - model.kernel + 1) // model.pool
        w = (w + 2 * model.padding - model.kernel + 1) // model.pool
        shapes.append((ch, h, w))
    return shapes


def input_shape(w: Workload) -> tuple[int, ...]:
    m = w.model
    if isinstance(m, MLP):
        return (w.batch, m.sizes[0])
    if isinstance(m, CNN):
        return (w.batch, *m.in_shape)
    if isinstance(m, GPT):
        return (w.batch, m.block)
    return (w.batch, m.length, m.input_size)


def make_batch(w: Workload, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic batch: float32 inputs, and float32 targets or int32 labels.

    GPT: int32 token ids (B, T) and int32 labels (B, T), the next token of each position
    (one random sequence of T + 1 tokens per row, shifted by one)."""
    rng = np.random.default_rng(seed)
    if isinstance(w.model, GPT):
        seq = rng.integers(0, w.model.vocab, size=(w.batch, w.model.block + 1), dtype=np.int32)
        return np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(seq[:, 1:])
    x = rng.standard_normal(input_shape(w), dtype=np.float32)
    if w.loss == "softmax_ce":
        y = rng.integers(0, w.n_classes, size=(w.batch,), dtype=np.int32)
    else:
        y = rng.standard_normal((w.batch, w.n_classes), dtype=np.float32)
    return x, y


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], bound: float) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def gpt_layer_names(layer: int) -> dict[str, str]:
    """Parameter names of one GPT block, by role."""
    roles = ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b",
             "ln2_w", "ln2_b", "fc_w", "fc_b", "fc2_w", "fc2_b")
    return {r: f"h{layer}_{r}" for r in roles}


def _gpt_params(m: GPT, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """nanoGPT's init: N(0, 0.02) weights and embeddings, N(0, 0.02/sqrt(2 L)) for the
    projections into the residual stream, zero biases, layer norms weight 1 bias 0."""
    c, hid, std = m.embed, m.mlp_ratio * m.embed, 0.02
    resid_std = std / np.sqrt(2 * m.layers)
    p = {"wte": _normal(rng, (m.vocab, c), std), "wpe": _normal(rng, (m.block, c), std)}
    for layer in range(m.layers):
        n = gpt_layer_names(layer)
        p[n["ln1_w"]], p[n["ln1_b"]] = np.ones(c, np.float32), np.zeros(c, np.float32)
        p[n["attn_w"]], p[n["attn_b"]] = _normal(rng, (c, 3 * c), std), np.zeros(3 * c, np.float32)
        p[n["proj_w"]], p[n["proj_b"]] = _normal(rng, (c, c), resid_std), np.zeros(c, np.float32)
        p[n["ln2_w"]], p[n["ln2_b"]] = np.ones(c, np.float32), np.zeros(c, np.float32)
        p[n["fc_w"]], p[n["fc_b"]] = _normal(rng, (c, hid), std), np.zeros(hid, np.float32)
        p[n["fc2_w"]], p[n["fc2_b"]] = _normal(rng, (hid, c), resid_std), np.zeros(c, np.float32)
    p["lnf_w"], p["lnf_b"] = np.ones(c, np.float32), np.zeros(c, np.float32)
    p["lm_w"] = _normal(rng, (c, m.vocab), std)
    return p


def init_params(w: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial weights, keyed by the parameter names every runner uses."""
    rng = np.random.default_rng(seed)
    m = w.model
    p: dict[str, np.ndarray] = {}
    if isinstance(m, GPT):
        return _gpt_params(m, rng)
    if isinstance(m, MLP):
        for i, (n_in, n_out) in enumerate(zip(m.sizes[:-1], m.sizes[1:], strict=True)):
            p[f"W{i}"] = _he(rng, (n_in, n_out), n_in)
            p[f"b{i}"] = np.zeros(n_out, np.float32)
    elif isinstance(m, CNN):
        shapes = cnn_feature_shapes(m)
        for i, ch in enumerate(m.channels):
            c_in = shapes[i][0]
            p[f"conv{i}_w"] = _he(rng, (ch, c_in, m.kernel, m.kernel), c_in * m.kernel**2)
            p[f"conv{i}_b"] = np.zeros(ch, np.float32)
        flat = int(np.prod(shapes[-1]))
        p["fc_w"] = _he(rng, (flat, m.classes), flat)
        p["fc_b"] = np.zeros(m.classes, np.float32)
    else:
        bound = 1.0 / np.sqrt(m.hidden)
        p["W_ih"] = _uniform(rng, (4 * m.hidden, m.input_size), bound)
        p["W_hh"] = _uniform(rng, (4 * m.hidden, m.hidden), bound)
        p["b_ih"] = _uniform(rng, (4 * m.hidden,), bound)
        p["b_hh"] = _uniform(rng, (4 * m.hidden,), bound)
        p["fc_w"] = _uniform(rng, (m.hidden, m.out), bound)
        p["fc_b"] = np.zeros(m.out, np.float32)
    return p


def _gemm_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _layer_flops(m: int, k: int, n: int, first: bool) -> int:
    """Forward, weight gradient, and (unless it is the first layer) input gradient."""
    return _gemm_flops(m, k, n) * (2 if first else 3)


def gpt_forward_flops(m: GPT, batch: int) -> int:
    """Forward GEMM FLOPs of the GPT: the four dense products of each block, both attention
    products (q k^T and p v, over the full T x T score matrix, as dense kernels compute it)
    and the LM head. The embedding lookup is not a GEMM."""
    rows, c, t, d = batch * m.block, m.embed, m.block, m.head_dim
    dense = _gemm_flops(rows, c, 3 * c) + _gemm_flops(rows, c, c)  # qkv, output projection
    dense += _gemm_flops(rows, c, m.mlp_ratio * c) + _gemm_flops(rows, m.mlp_ratio * c, c)
    attention = 2 * batch * m.heads * _gemm_flops(t, d, t)  # q k^T: (T, d)(d, T); p v: (T, T)(T, d)
    return m.layers * (dense + attention) + _gemm_flops(rows, c, m.vocab)


def flops_per_step(w: Workload) -> int:
    """GEMM/conv multiply-add FLOPs of one training step (elementwise work not counted)."""
    m, b = w.model, w.batch
    if isinstance(m, GPT):
        # Backward: both operand gradients of every product (the residual stream needs the
        # input gradient even of the first block's qkv product), i.e. 3x the forward.
        return 3 * gpt_forward_flops(m, b)
    if isinstance(m, MLP):
        pairs = zip(m.sizes[:-1], m.sizes[1:], strict=True)
        return sum(_layer_flops(b, k, n, i == 0) for i, (k, n) in enumerate(pairs))
    if isinstance(m, CNN):
        shapes = cnn_feature_shapes(m)
        total = 0
        for i, ch in enumerate(m.channels):
            c_in, h, wd = shapes[i]
            h_out = h + 2 * m.padding - m.kernel + 1
            w_out = wd + 2 * m.padding - m.kernel + 1
            total += _layer_flops(b * h_out * w_out, c_in * m.kernel**2, ch, i == 0)
        return total + _layer_flops(b, int(np.prod(shapes[-1])), m.classes, False)
    gates = 4 * m.hidden
    per_t = _layer_flops(b, m.input_size, gates, True) + _layer_flops(b, m.hidden, gates, False)
    return m.length * per_t + _layer_flops(b, m.hidden, m.out, False)
