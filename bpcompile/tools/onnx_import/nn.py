"""Network layers: MatMul, Gemm, Conv, pooling, BatchNormalization, LayerNormalization, Dropout."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...ir.graph import Node
from ...ops import core as ops
from ...ops import transformer
from ...ops.conv import conv2d
from ...ops.normalization import batch_norm
from ...ops.pool import avg_pool2d, max_pool2d
from ...ops.regularization import dropout
from .importer import _Importer, _op
from .reading import _plain
from .values import Value


@_op("Dropout")
def _dropout(im: _Importer, args: list) -> Value:
    im.only({"seed": None})
    if len(args) > 2 and args[2] is not None and bool(im.constant(im.node.input[2], "Dropout's training_mode")):
        raise im.fail("training_mode=true is not supported (bpcompile's dropout is active in training calls)")
    ratio = float(im.constant(im.node.input[1], "Dropout's ratio")) if len(args) > 1 and args[1] is not None else 0.5
    return dropout(im.tensor(args[0]), ratio) if ratio > 0 else args[0]


@_op("MatMul")
def _matmul(im: _Importer, args: list) -> Node:
    """NumPy's matmul, batched operands broadcast (bpcompile's bmatmul)."""
    im.only({})
    return ops.matmul(im.tensor(args[0]), im.tensor(args[1]))


@_op("Gemm")
def _gemm(im: _Importer, args: list) -> Node:
    attrs = im.only({"alpha": None, "beta": None, "transA": None, "transB": None})
    a, b = im.tensor(args[0]), im.tensor(args[1])
    if attrs.get("transA", 0):
        a = ops.transpose(a)
    if attrs.get("transB", 0):
        b = ops.transpose(b)
    y = ops.matmul(a, b)
    if float(attrs.get("alpha", 1.0)) != 1.0:
        y = y * float(attrs["alpha"])
    if len(args) > 2 and args[2] is not None:
        c = im.operand(args[2], y)
        beta = float(attrs.get("beta", 1.0))
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _pair(im: _Importer, values: Any, what: str) -> tuple[int, int]:
    values = [int(v) for v in values]
    if len(values) != 2:
        raise im.fail(f"attribute {what}={values} is not supported (2-D only)")
    return values[0], values[1]


def _padding(im: _Importer, attrs: dict) -> tuple[int, int]:
    if _plain(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise im.fail(f"attribute auto_pad={_plain(attrs['auto_pad'])!r} is not supported")
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise im.fail(f"attribute pads={pads} is not supported (only symmetric 2-D padding)")
    return pads[0], pads[1]


@_op("Conv")
def _conv(im: _Importer, args: list) -> Node:
    attrs = im.only({"kernel_shape": None, "strides": None, "pads": None, "dilations": [1, 1], "group": 1,
                     "auto_pad": None})
    bias = im.tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    return conv2d(im.tensor(args[0]), im.tensor(args[1]), bias,
                           stride=_pair(im, attrs.get("strides", [1, 1]), "strides"), padding=_padding(im, attrs))


@_op("MaxPool", "AveragePool")
def _pool(im: _Importer, args: list) -> Node:
    allowed = {"kernel_shape": None, "strides": None, "pads": None, "ceil_mode": 0, "auto_pad": None,
               "dilations": [1, 1], "storage_order": 0, "count_include_pad": None}
    attrs = im.only(allowed)
    if _padding(im, attrs) != (0, 0):
        raise im.fail("padded pooling is not supported")
    kernel = _pair(im, attrs["kernel_shape"], "kernel_shape")
    stride = _pair(im, attrs.get("strides", kernel), "strides")
    pool = max_pool2d if im.node.op_type == "MaxPool" else avg_pool2d
    return pool(im.tensor(args[0]), kernel, stride)


@_op("GlobalAveragePool")
def _global_average_pool(im: _Importer, args: list) -> Node:
    im.only({})
    return ops.mean(im.tensor(args[0]), axis=(2, 3), keepdims=True)


@_op("BatchNormalization")
def _batch_norm(im: _Importer, args: list) -> Node:
    attrs = im.only({"epsilon": None, "momentum": None, "training_mode": 0, "spatial": 1})
    x, scale, bias, mean, var = args
    gamma, beta = im.tensor(scale), im.tensor(bias)
    if gamma.op != "param":
        raise im.fail("its scale must be an initializer")
    momentum = 1.0 - float(attrs.get("momentum", 0.9))  # ONNX keeps that much of the running value
    y = batch_norm(im.tensor(x), gamma, beta, momentum=momentum, eps=float(attrs.get("epsilon", 1e-5)))
    graph = im.graph
    for stat, value in (("running_mean", mean), ("running_var", var)):  # start from the file's statistics
        source = value if isinstance(value, np.ndarray) else graph.param_init.get(value.attrs["name"])
        graph.param_init[f"{gamma.attrs['name']}.{stat}"] = np.asarray(source, dtype=np.float64)
    return y


@_op("LayerNormalization")
def _layer_norm(im: _Importer, args: list) -> Value:
    """bp.layer_norm over the axes from `axis` on (merged into one when there are several),
    then the scale and bias; the optional Mean and InvStdDev outputs as graph tensors."""
    attrs = im.only({"axis": None, "epsilon": None, "stash_type": 1})
    x = im.tensor(args[0])
    axis = int(attrs.get("axis", -1)) % x.ndim
    eps = float(attrs.get("epsilon", 1e-5))
    rows, trailing = x.shape[:axis], x.shape[axis:]
    if not all(isinstance(d, int) for d in trailing):
        raise im.fail(f"normalizing over runtime sizes {trailing} is not supported")
    flat = x if len(trailing) == 1 else ops.reshape(x, rows + (int(np.prod(trailing)),))
    y = transformer.layer_norm(flat, eps=eps)
    y = y if len(trailing) == 1 else ops.reshape(y, x.shape)
    scale, bias = args[1], args[2] if len(args) > 2 else None
    if not (isinstance(scale, np.ndarray) and np.all(scale == 1)):  # a constant unit scale is no product
        y = y * im.operand(scale, y)
    if bias is not None and not (isinstance(bias, np.ndarray) and np.all(bias == 0)):
        y = y + im.operand(bias, y)
    if not any(im.node.output[1:]):
        return y
    axes = tuple(range(axis, x.ndim))
    mean = ops.mean(x, axis=axes, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=axes, keepdims=True)
    return y, mean, ops.power(var + eps, -0.5)
