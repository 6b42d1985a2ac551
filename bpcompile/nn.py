"""Layer helpers for people used to Keras / PyTorch modules.

Each layer creates its parameters on a graph when constructed (with sensible default inits
and unique names such as "dense1.weight") and is then called on tensors:

    g = bp.Graph("cnn")
    conv = bp.nn.Conv2d(g, 1, 16, 3, padding=1, activation="relu")
    fc = bp.nn.Dense(g, 16 * 4 * 4, 10)
    logits = fc(bp.flatten(bp.max_pool2d(conv(x), 2)))

`layer.params` lists a layer's trainable parameter nodes (e.g. for `g.loss(..., params=...)`).
Weights use PyTorch's layouts (Linear (out, in); Conv2d (out, in, kh, kw); LSTM (4H, in) /
(4H, H)), except Dense, whose weight is (in, out) as bpcompile's `x @ W` convention.

Every layer also names its tensors as PyTorch does, for `model.state_dict()` and
`model.load_state_dict()`: a layer named "fc1" (pass name= to match a torch module's name) has
"fc1.weight" and "fc1.bias" in PyTorch's layouts (a Dense weight is transposed there), a
BatchNorm "bn" has "bn.running_mean", an LSTM "weight_ih_l0", "bias_hh_l0" and so on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .ir.graph import Graph, Node
from .ops import core as ops

__all__ = ["Layer", "Dense", "Linear", "Conv2d", "BatchNorm", "LSTM", "GRU", "RNN", "Embedding", "Dropout",
           "Sequential", "LayerNorm", "MultiHeadAttention", "TransformerBlock"]


def _activation(activation: str | Callable[[Node], Node] | None) -> Callable[[Node], Node] | None:
    if activation is None or callable(activation):
        return activation
    fn = getattr(ops, str(activation), None)
    if fn is None or not callable(fn):
        raise ValueError(f"unknown activation {activation!r}; use a bpcompile op name such as 'relu' or a callable")
    return fn


def _unique_name(g: Graph, kind: str) -> str:
    k = 1
    while any(p == f"{kind}{k}" or p.startswith(f"{kind}{k}.") for p in g.params):
        k += 1
    return f"{kind}{k}"


class Layer:
    """A callable holding the parameters it created on a graph."""

    kind = "layer"

    def __init__(self, g: Graph | None, name: str | None):
        if g is not None and not isinstance(g, Graph):
            raise TypeError(f"{type(self).__name__} expects a bp.Graph first, got {type(g).__name__}")
        self.graph = g
        self.name = name if name is not None else (_unique_name(g, self.kind) if g is not None else self.kind)
        self.params: list[Node] = []

    def _param(self, suffix: str, shape: tuple[int, ...], init: Any, torch_name: str | None = None,
               transpose: bool = False) -> Node:
        """A parameter "<layer>.<suffix>", known to state_dict as "<layer>.<torch_name or suffix>"."""
        node = self.graph.param(f"{self.name}.{suffix}", shape, init=init)
        self.graph.name_in_state_dict(node.attrs["name"], f"{self.name}.{torch_name or suffix}", transpose)
        self.params.append(node)
        return node

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, params={[p.attrs['name'] for p in self.params]})"


class Dense(Layer):
    """y = activation(x @ W + b), W (in, out) glorot-uniform (he-normal before a relu), b zeros."""

    kind = "dense"

    def __init__(self, g: Graph, in_features: int, out_features: int, activation: Any = None, bias: bool = True,
                 init: Any = None, name: str | None = None):
        super().__init__(g, name)
        self.activation = _activation(activation)
        if init is None:
            init = "he_normal" if activation in ("relu", ops.relu) else "glorot_uniform"
        self.weight = self._param("weight", (in_features, out_features), init, transpose=True)
        self.bias = self._param("bias", (out_features,), "zeros") if bias else None

    def _product(self, x: Node) -> Node:
        return x @ self.weight

    def __call__(self, x: Node) -> Node:
        y = self._product(x)
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation else y


class Linear(Dense):
    """PyTorch's nn.Linear: y = x @ W.T + b with W (out, in) glorot-uniform (the same for either
    layout), b zeros."""

    kind = "linear"

    def __init__(self, g: Graph, in_features: int, out_features: int, bias: bool = True, activation: Any = None,
                 init: Any = "glorot_uniform", name: str | None = None):
        Layer.__init__(self, g, name)
        self.activation = _activation(activation)
        self.weight = self._param("weight", (out_features, in_features), init)
        self.bias = self._param("bias", (out_features,), "zeros") if bias else None

    def _product(self, x: Node) -> Node:
        return x @ ops.transpose(self.weight)


class Conv2d(Layer):
    """2-D convolution on NCHW, weight (out, in, kh, kw) he-normal, bias zeros."""

    kind = "conv"

    def __init__(self, g: Graph, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, activation: Any = None, bias: bool = True, init: Any = "he_normal",
                 name: str | None = None):
        super().__init__(g, name)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding = stride, padding
        self.activation = _activation(activation)
        self.weight = self._param("weight", (out_channels, in_channels, kh, kw), init)
        self.bias = self._param("bias", (out_channels,), "zeros") if bias else None

    def __call__(self, x: Node) -> Node:
        from .ops.conv import conv2d
        y = conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return self.activation(y) if self.activation else y


class BatchNorm(Layer):
    """Batch normalization over channels of (N, C) or (N, C, H, W): gamma ones, beta zeros;
    running statistics "<name>.weight.running_mean" / ".running_var" (non-trainable)."""

    kind = "bn"

    def __init__(self, g: Graph, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 name: str | None = None):
        super().__init__(g, name)
        self.momentum, self.eps = momentum, eps
        self.weight = self._param("weight", (num_features,), "ones")
        self.bias = self._param("bias", (num_features,), "zeros")

    def __call__(self, x: Node) -> Node:
        from .ops.normalization import batch_norm
        y = batch_norm(x, self.weight, self.bias, momentum=self.momentum, eps=self.eps)
        for stat in ("running_mean", "running_var"):  # created by the first call
            self.graph.name_in_state_dict(f"{self.weight.attrs['name']}.{stat}", f"{self.name}.{stat}")
        return y


class _Recurrent(Layer):
    gates = 1

    def __init__(self, g: Graph, input_size: int, hidden_size: int, bias: bool = True, name: str | None = None):
        super().__init__(g, name)
        self.hidden_size = hidden_size
        gh = self.gates * hidden_size
        self.W_ih = self._param("W_ih", (gh, input_size), "glorot_uniform", "weight_ih_l0")
        self.W_hh = self._param("W_hh", (gh, hidden_size), "glorot_uniform", "weight_hh_l0")
        self.b_ih = self._param("b_ih", (gh,), self._bias_init(), "bias_ih_l0") if bias else None
        self.b_hh = self._param("b_hh", (gh,), "zeros", "bias_hh_l0") if bias else None

    def _bias_init(self) -> Any:
        return "zeros"


class LSTM(_Recurrent):
    """One LSTM layer over (batch, time, features); call(x, h0=None, c0=None) -> (out, (h, c)).
    Weights glorot-uniform; the forget gate's input bias starts at 1 (a common default that
    helps gradients flow through time early in training)."""

    kind = "lstm"
    gates = 4

    def _bias_init(self) -> Any:
        b = np.zeros(4 * self.hidden_size)
        b[self.hidden_size:2 * self.hidden_size] = 1.0
        return b

    def __call__(self, x: Node, h0: Node | None = None, c0: Node | None = None):
        from .ops.recurrent import lstm
        return lstm(x, self.W_ih, self.W_hh, self.b_ih, self.b_hh, h0, c0)


class GRU(_Recurrent):
    """One GRU layer (PyTorch's equations); call(x, h0=None) -> (out, h)."""

    kind = "gru"
    gates = 3

    def __call__(self, x: Node, h0: Node | None = None):
        from .ops.recurrent import gru
        return gru(x, self.W_ih, self.W_hh, self.b_ih, self.b_hh, h0)


class RNN(_Recurrent):
    """One tanh RNN layer; call(x, h0=None) -> (out, h)."""

    kind = "rnn"

    def __call__(self, x: Node, h0: Node | None = None):
        from .ops.recurrent import rnn
        return rnn(x, self.W_ih, self.W_hh, self.b_ih, self.b_hh, h0)


class Embedding(Layer):
    """A (num_embeddings, embedding_dim) table, normal(0, 0.05) init; call(ids) gathers rows."""

    kind = "embedding"

    def __init__(self, g: Graph, num_embeddings: int, embedding_dim: int, init: Any = "normal",
                 name: str | None = None):
        super().__init__(g, name)
        self.weight = self._param("weight", (num_embeddings, embedding_dim), init)

    def __call__(self, ids: Node) -> Node:
        from .ops.embeddings import embedding
        return embedding(ids, self.weight)


class Dropout(Layer):
    """Dropout with probability p in training calls, the identity in forward (no parameters).
    `salt` separates the masks of two Dropout layers applied to the same tensor."""

    kind = "dropout"

    def __init__(self, p: float = 0.5, salt: int = 0, g: Graph | None = None, name: str | None = None):
        super().__init__(g, name or "dropout")
        self.p, self.salt = float(p), int(salt)

    def __call__(self, x: Node) -> Node:
        from .ops.regularization import dropout
        return dropout(x, self.p, salt=self.salt)


class Sequential(Layer):
    """Layers (or any callables) applied in order; `params` gathers theirs."""

    kind = "seq"

    def __init__(self, *layers: Callable[[Node], Node]):
        super().__init__(None, "sequential")
        self.layers = list(layers)
        for layer in self.layers:
            self.params.extend(getattr(layer, "params", []))

    def __call__(self, x: Node) -> Node:
        for layer in self.layers:
            x = layer(x)
        return x


class LayerNorm(Layer):
    """Layer norm over the last axis of size `normalized_shape` (torch.nn.LayerNorm): weight ones,
    bias zeros (`elementwise_affine=False`: neither; `bias=False`: no bias)."""

    kind = "ln"

    def __init__(self, g: Graph, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, name: str | None = None):
        super().__init__(g, name)
        self.eps = float(eps)
        self.weight = self._param("weight", (normalized_shape,), "ones") if elementwise_affine else None
        self.bias = self._param("bias", (normalized_shape,), "zeros") if elementwise_affine and bias else None

    def __call__(self, x: Node) -> Node:
        from .ops.transformer import layer_norm
        return layer_norm(x, self.weight, self.bias, eps=self.eps)


def _heads(x: Node, heads: int) -> Node:
    """(B, T, C) -> (B, heads, T, C // heads)."""
    b, t, c = x.shape
    return ops.transpose(ops.reshape(x, (b, t, heads, c // heads)), (0, 2, 1, 3))


class MultiHeadAttention(Layer):
    """Self-attention over (B, T, C) with `heads` heads: one fused QKV projection, scaled
    dot-product attention (causal by default), an output projection. Parameters in the layout
    of torch.nn.MultiheadAttention: in_proj_weight (3C, C) glorot-uniform, in_proj_bias (3C,),
    out_proj.weight (C, C), out_proj.bias (C,) zeros. `dropout` drops attention weights in
    training calls."""

    kind = "attn"

    def __init__(self, g: Graph, embed_dim: int, heads: int, causal: bool = True, bias: bool = True,
                 dropout: float = 0.0, name: str | None = None):
        super().__init__(g, name)
        if embed_dim % heads:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} is not divisible by heads {heads}")
        self.embed_dim, self.heads, self.causal, self.dropout = embed_dim, heads, bool(causal), float(dropout)
        self.in_proj_weight = self._param("in_proj_weight", (3 * embed_dim, embed_dim), "glorot_uniform")
        self.in_proj_bias = self._param("in_proj_bias", (3 * embed_dim,), "zeros") if bias else None
        self.out_proj = Linear(g, embed_dim, embed_dim, bias=bias, name=f"{self.name}.out_proj")
        self.params.extend(self.out_proj.params)

    def __call__(self, x: Node) -> Node:
        from .ops.slicing import slice
        from .ops.transformer import attention
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.name}: expects (batch, time, {self.embed_dim}), got {x.shape}")
        qkv = x @ ops.transpose(self.in_proj_weight)
        if self.in_proj_bias is not None:
            qkv = qkv + self.in_proj_bias
        c = self.embed_dim
        q, k, v = (_heads(slice(qkv, -1, i * c, (i + 1) * c), self.heads) for i in range(3))
        y = attention(q, k, v, causal=self.causal, dropout=self.dropout)
        b, _, t, _ = y.shape
        return self.out_proj(ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, c)))


class TransformerBlock(Layer):
    """A pre-norm transformer block (GPT-2's): x + attn(ln_1(x)), then + mlp(ln_2(x)) with
    mlp = c_proj(gelu(c_fc(.))) of width mlp_ratio * C; `dropout` on both residual branches
    and the attention weights. Sub-layers are named "<name>.ln_1", ".attn", ".ln_2",
    ".mlp.c_fc", ".mlp.c_proj"."""

    kind = "block"

    def __init__(self, g: Graph, embed_dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 causal: bool = True, name: str | None = None):
        super().__init__(g, name)
        self.ln_1 = LayerNorm(g, embed_dim, name=f"{self.name}.ln_1")
        self.attn = MultiHeadAttention(g, embed_dim, heads, causal=causal, dropout=dropout, name=f"{self.name}.attn")
        self.ln_2 = LayerNorm(g, embed_dim, name=f"{self.name}.ln_2")
        self.c_fc = Linear(g, embed_dim, mlp_ratio * embed_dim, name=f"{self.name}.mlp.c_fc")
        self.c_proj = Linear(g, mlp_ratio * embed_dim, embed_dim, name=f"{self.name}.mlp.c_proj")
        self.drop = Dropout(dropout, salt=zlib.crc32(self.name.encode()))  # blocks drop independently
        for layer in (self.ln_1, self.attn, self.ln_2, self.c_fc, self.c_proj):
            self.params.extend(layer.params)

    def __call__(self, x: Node) -> Node:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.c_proj(ops.gelu(self.c_fc(self.ln_2(x)))))

