"""Build a bp.Graph from an ONNX model, so a model exported from PyTorch (or any ONNX producer)
can be compiled, inspected and trained here.

    g = bp.from_onnx("mlp.onnx")            # initializers -> parameters holding their values
    g.loss(bp.softmax_cross_entropy(g.outputs["logits"], g.input("labels", ("batch",), "int32")))
    model = bp.compile(g, optimizer=bp.optim.SGD(lr=0.1))

Every ONNX node becomes bpcompile ops, so gradients come from the same VJP rules as a graph
written by hand. Float initializers that the outputs depend on as data become trainable
parameters under their ONNX names; the others (a causal-mask buffer, Reshape's target shape,
indices), those torch.export marks as buffers and, in its models, those of one element (a
scale) stay constants, and a node whose inputs are all constants is evaluated at import time
by ONNX's reference evaluator (so a mask built from Shape/Expand/Trilu/Equal/Where of fixed sizes
becomes one bp.constant). Graph inputs become inputs whose symbolic dims (dim_param) are named
runtime dims. A shape tensor holds bpcompile dims (ints, names, products of names) which
Shape/Gather/Concat/Unsqueeze pass along and Mul (and an exact Div) multiply into product dims,
so the target of x.view(B * T, C) is ("T*batch", C) for bpcompile's reshape; graph outputs
become named outputs. An operator, or an attribute value, without a bpcompile form raises CompileError naming
the node, the operator and the attribute: never a wrong graph. The onnx package is the optional
extra `bpcompile[onnx]`.

Transformers as torch.onnx.export writes them (TorchScript or dynamo): LayerNormalization ->
bp.layer_norm (the decomposed form of opsets before 17 imports op by op); MatMul of batched
operands -> bmatmul with NumPy broadcasting; Split / Slice -> slices; Reshape's -1 and 0 as ONNX
defines them, runtime sizes merged into product dims and split again; a causal mask (-inf or float32's lowest
number added to the scores, a where() over a tril buffer, or Trilu of ones of a runtime length)
before a Softmax -> the fused causal attention softmax; other masks -> bp.where on bp.constant or on
conditions of graph tensors (Equal/Less/.../Not/And/Or/Xor, bpcompile having no boolean
tensors); Gather of a table by int inputs -> embedding, by constant indices -> a slice or a
product with their one-hot matrix; Identity of an initializer -> a parameter of its own (torch's
exporter writes one initializer for parameters with equal values).

Recurrent layers: each direction of an LSTM / GRU / RNN node -> bp.lstm / bp.gru / bp.rnn over
(batch, time, features), the gate blocks of W, R and B sliced into bpcompile's (PyTorch's)
order; the reverse direction runs over the time-reversed sequence (a product with the reversing
permutation: fixed lengths only); a relu RNN is unrolled (fixed lengths only). Both layouts;
GRU only with linear_before_reset=1 (PyTorch's); clip, other activations, sequence_lens and
peepholes are refused. Gelu(approximate="tanh") -> its tanh formula.
"""

from __future__ import annotations

from . import elementwise, layout, masks, nn, recurrent  # noqa: F401 - register their operators' rules
from .importer import IMPORTERS, from_onnx

__all__ = ["IMPORTERS", "from_onnx"]
