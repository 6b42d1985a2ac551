"""Build a bp.Graph from an ONNX model, so a model exported from PyTorch (or any ONNX producer)
can be compiled, inspected and trained here.

    g = bp.from_onnx("mlp.onnx")            # initializers -> parameters holding their values
    g.loss(bp.softmax_cross_entropy(g.outputs["logits"], g.input("labels", ("batch",), "int32")))
    model = bp.compile(g, optimizer=bp.optim.SGD(lr=0.1))

Every ONNX node becomes bpcompile ops, so gradients come from the same VJP rules as a graph
written by hand. Float initializers become trainable parameters under their ONNX names (integer
ones, such as Reshape's target shape, stay constants); graph inputs become inputs whose symbolic
dims (dim_param) are named runtime dims; graph outputs become named outputs. An operator, or an
attribute value, without a bpcompile form raises CompileError naming the node, the operator and
the attribute: never a wrong graph. The onnx package is the optional extra `bpcompile[onnx]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import sympy as sp

from ..errors import CompileError
from ..ir.graph import Graph, Node
from ..ops import core as ops
from ..ops import families
from .onnx_export import _onnx

Value = Node | np.ndarray  # a graph tensor, or a constant known at import time


class _Importer:
    def __init__(self, proto: Any, name: str | None):
        self.onnx = _onnx()
        self.proto = proto
        self.graph = Graph(name or proto.graph.name or "onnx_model")
        self.env: dict[str, Value] = {}
        self.node: Any = None  # the ONNX node being imported, for error messages

    # --- errors and attributes -------------------------------------------------------------
    def fail(self, what: str) -> CompileError:
        n = self.node
        return CompileError(f"from_onnx: node {n.name or n.output[0]!r} ({n.op_type}): {what}")

    def attrs(self) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in self.node.attribute}

    def only(self, allowed: dict[str, Any]) -> dict[str, Any]:
        """The node's attributes, refusing any that is not in `allowed` or has another value
        than the one bpcompile computes (None: any value)."""
        attrs = self.attrs()
        for key, value in attrs.items():
            if key not in allowed:
                raise self.fail(f"attribute {key!r} is not supported")
            expected = allowed[key]
            if expected is not None and _plain(value) != expected:
                raise self.fail(f"attribute {key}={_plain(value)!r} is not supported (only {expected!r})")
        return attrs

    # --- values --------------------------------------------------------------------------
    def get(self, name: str) -> Value | None:
        if name == "":
            return None
        if name not in self.env:
            raise self.fail(f"input {name!r} is not computed by any earlier node")
        return self.env[name]

    def constant(self, name: str, what: str) -> np.ndarray:
        value = self.get(name)
        if not isinstance(value, np.ndarray):
            raise self.fail(f"{what} must be a constant (an initializer or Constant), it is computed by the graph")
        return value

    def tensor(self, value: Value) -> Node:
        if isinstance(value, Node):
            return value
        if value.ndim == 0:
            return ops.const(float(value))
        raise self.fail("an operand that is a non-scalar constant must be an initializer")

    def operand(self, value: Value) -> Node | float:
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return float(value)
        return self.tensor(value)

    # --- the model -------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.proto.graph
        numpy_helper = self.onnx.numpy_helper
        for init in g.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype.kind == "f" and array.ndim > 0:
                self.env[init.name] = self.graph.param(init.name, array.shape, init=array.astype(np.float64))
            else:
                self.env[init.name] = array
        for value in g.input:
            if value.name not in self.env:
                self.env[value.name] = self.input(value)
        for node in g.node:
            self.node = node
            handler = IMPORTERS.get(node.op_type)
            if handler is None:
                raise self.fail(f"operator {node.op_type} is not supported (supported: {', '.join(sorted(IMPORTERS))})")
            results = handler(self, [self.get(i) for i in node.input])
            results = results if isinstance(results, tuple) else (results,)
            for out, value in zip(node.output, results):
                if out:
                    self.env[out] = value
        for value in g.output:
            result = self.env[value.name]
            self.graph.output(value.name, self.tensor(result) if isinstance(result, np.ndarray) else result)
        return self.graph

    def input(self, value: Any) -> Node:
        t = value.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(_dim_name(d.dim_param))
            else:
                dims.append("batch" if i == 0 else f"{_dim_name(value.name)}_{i}")
        kind = self.onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        return self.graph.input(value.name, tuple(dims), dtype="int32" if kind.kind in "iu" else None)


def _dim_name(text: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return name if name and not name[0].isdigit() else f"d_{name}"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- operators ---------------------------------------------------------------------------------

IMPORTERS: dict[str, Callable[[_Importer, list], Any]] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            IMPORTERS[name] = fn
        return fn
    return register


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
_BP_BINARY = {"Add": ops.add, "Sub": ops.sub, "Mul": ops.mul, "Div": ops.div, "Pow": ops.power}


@_op(*_BINARY)
def _binary(im: _Importer, args: list) -> Value:
    im.only({})
    a, b = args
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        try:
            return np.asarray(_BINARY[im.node.op_type](a, b))
        except TypeError:  # object arrays holding runtime sizes (names)
            raise im.fail("arithmetic on runtime sizes is not supported") from None
    return _BP_BINARY[im.node.op_type](im.tensor(a), im.operand(b))


_UNARY = {"Relu": ops.relu, "Sigmoid": ops.sigmoid, "Tanh": ops.tanh, "Softplus": ops.softplus, "Exp": ops.exp,
          "Log": ops.log, "Sqrt": ops.sqrt, "Abs": ops.abs, "Neg": ops.neg}
_A = tuple(sp.Symbol(f"a{i}", real=True) for i in range(4))
# other elementwise operators, as the SymPy function bpcompile differentiates
_SYMPY_UNARY = {"Erf": sp.erf, "Sin": sp.sin, "Cos": sp.cos, "Sinh": sp.sinh, "Cosh": sp.cosh, "Atan": sp.atan,
                "Sign": sp.sign, "Reciprocal": lambda a: 1 / a}
_COMPARE = {"Greater": sp.StrictGreaterThan, "Less": sp.StrictLessThan, "GreaterOrEqual": sp.GreaterThan,
            "LessOrEqual": sp.LessThan}


def _function(name: str, expr: sp.Expr, nargs: int) -> Callable[..., Node]:
    return ops.elementwise(name, expr, *_A[:nargs])


@_op(*_UNARY, *_SYMPY_UNARY)
def _unary(im: _Importer, args: list) -> Node:
    im.only({})
    kind = im.node.op_type
    fn = _UNARY.get(kind) or _function(kind.lower(), _SYMPY_UNARY[kind](_A[0]), 1)
    return fn(im.tensor(args[0]))


@_op("Max", "Min")
def _max_min(im: _Importer, args: list) -> Node:
    im.only({})
    fn = sp.Max if im.node.op_type == "Max" else sp.Min
    return _function(im.node.op_type.lower(), fn(*_A[:len(args)]), len(args))(*[im.tensor(a) for a in args])


class _Condition:
    """A comparison, kept until a Where selects with it (bpcompile has no boolean tensors)."""

    def __init__(self, relation: type, a: Node, b: Node):
        self.relation, self.a, self.b = relation, a, b


@_op(*_COMPARE)
def _compare(im: _Importer, args: list) -> _Condition:
    im.only({})
    return _Condition(_COMPARE[im.node.op_type], im.tensor(args[0]), im.tensor(args[1]))


@_op("Where")
def _where(im: _Importer, args: list) -> Node:
    im.only({})
    cond, x, y = args
    if not isinstance(cond, _Condition):
        raise im.fail("the condition must be a comparison (Greater, Less, GreaterOrEqual, LessOrEqual) of tensors")
    expr = sp.Piecewise((_A[2], cond.relation(_A[0], _A[1])), (_A[3], True))
    return _function("where", expr, 4)(cond.a, cond.b, im.tensor(x), im.tensor(y))


@_op("LeakyRelu")
def _leaky_relu(im: _Importer, args: list) -> Node:
    return ops.leaky_relu(im.tensor(args[0]), float(im.only({"alpha": None}).get("alpha", 0.01)))


@_op("Elu")
def _elu(im: _Importer, args: list) -> Node:
    return ops.elu(im.tensor(args[0]), float(im.only({"alpha": None}).get("alpha", 1.0)))


@_op("Gelu")
def _gelu(im: _Importer, args: list) -> Node:
    im.only({"approximate": "none"})
    return ops.gelu(im.tensor(args[0]))


@_op("Identity")
def _identity(im: _Importer, args: list) -> Value:
    im.only({})
    return args[0]


@_op("Dropout")
def _dropout(im: _Importer, args: list) -> Value:
    im.only({"seed": None})
    if len(args) > 2 and args[2] is not None and bool(im.constant(im.node.input[2], "Dropout's training_mode")):
        raise im.fail("training_mode=true is not supported (bpcompile's dropout is active in training calls)")
    ratio = float(im.constant(im.node.input[1], "Dropout's ratio")) if len(args) > 1 and args[1] is not None else 0.5
    return families.dropout(im.tensor(args[0]), ratio) if ratio > 0 else args[0]


@_op("MatMul")
def _matmul(im: _Importer, args: list) -> Node:
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
        c = im.operand(args[2])
        beta = float(attrs.get("beta", 1.0))
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _last_axis(im: _Importer, axis: int, ndim: int) -> None:
    if axis % ndim != ndim - 1:
        raise im.fail(f"attribute axis={axis} is not supported (only the last axis)")


@_op("Softmax", "LogSoftmax")
def _softmax(im: _Importer, args: list) -> Node:
    x = im.tensor(args[0])
    _last_axis(im, int(im.only({"axis": None}).get("axis", -1)), x.ndim)
    return ops.softmax(x) if im.node.op_type == "Softmax" else ops.log_softmax(x)


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
    return families.conv2d(im.tensor(args[0]), im.tensor(args[1]), bias,
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
    pool = families.max_pool2d if im.node.op_type == "MaxPool" else families.avg_pool2d
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
    y = families.batch_norm(im.tensor(x), gamma, beta, momentum=momentum, eps=float(attrs.get("epsilon", 1e-5)))
    graph = im.graph
    for stat, value in (("running_mean", mean), ("running_var", var)):  # start from the file's statistics
        source = value if isinstance(value, np.ndarray) else graph.param_init.get(value.attrs["name"])
        graph.param_init[f"{gamma.attrs['name']}.{stat}"] = np.asarray(source, dtype=np.float64)
    return y


@_op("Flatten")
def _flatten(im: _Importer, args: list) -> Node:
    x = im.tensor(args[0])
    axis = int(im.only({"axis": None}).get("axis", 1))
    if axis % max(x.ndim, 1) != 1:
        raise im.fail(f"attribute axis={axis} is not supported (only 1)")
    return ops.flatten(x)


@_op("Reshape")
def _reshape(im: _Importer, args: list) -> Value:
    """ONNX's target shape: 0 copies the input's size, -1 is inferred, a name is a runtime size."""
    im.only({"allowzero": 0})
    x = args[0]
    target = [v if isinstance(v, str) else int(v) for v in np.ravel(im.constant(im.node.input[1], "Reshape's shape"))]
    if isinstance(x, np.ndarray):
        return x.reshape(target)
    return ops.reshape(x, tuple(x.shape[i] if d == 0 else d for i, d in enumerate(target)))


def _axes(im: _Importer, args: list, attrs: dict) -> list[int] | None:
    """The axes of a node, from its attribute (older opsets) or its second input (newer ones)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in np.ravel(im.constant(im.node.input[1], "axes"))]
    return None


@_op("Squeeze", "Unsqueeze")
def _squeeze(im: _Importer, args: list) -> Value:
    x = args[0]
    shape = list(x.shape)
    axes = _axes(im, args, im.only({"axes": None}))
    if im.node.op_type == "Squeeze":
        drop = {i for i, d in enumerate(shape) if d == 1} if axes is None else {a % len(shape) for a in axes}
        new = [d for i, d in enumerate(shape) if i not in drop]
    else:
        if axes is None:
            raise im.fail("Unsqueeze needs axes")
        new = list(shape)
        for a in sorted(a % (len(shape) + len(axes)) for a in axes):
            new.insert(a, 1)
    return x.reshape(new) if isinstance(x, np.ndarray) else ops.reshape(x, tuple(new))


@_op("Transpose")
def _transpose(im: _Importer, args: list) -> Value:
    perm = im.only({"perm": None}).get("perm")
    x = args[0]
    if isinstance(x, np.ndarray):
        return np.transpose(x, perm)
    return ops.transpose(x, perm)


@_op("Concat")
def _concat(im: _Importer, args: list) -> Value:
    axis = int(im.only({"axis": None})["axis"])
    if all(isinstance(a, np.ndarray) for a in args):
        return np.concatenate(args, axis=axis)
    return families.concat([im.tensor(a) for a in args], axis=axis)


@_op("Slice")
def _slice(im: _Importer, args: list) -> Value:
    im.only({})
    x = args[0]
    starts = np.ravel(im.constant(im.node.input[1], "Slice's starts"))
    ends = np.ravel(im.constant(im.node.input[2], "Slice's ends"))
    ndim = len(x.shape)
    axes = np.ravel(im.constant(im.node.input[3], "Slice's axes")) if len(args) > 3 and args[3] is not None \
        else np.arange(len(starts))
    if len(args) > 4 and args[4] is not None and np.any(im.constant(im.node.input[4], "Slice's steps") != 1):
        raise im.fail("steps other than 1 are not supported")
    for start, end, axis in zip(starts, ends, axes):
        axis = int(axis) % ndim
        stop = None if int(end) >= 2**62 else int(end)
        if isinstance(x, np.ndarray):
            index = [slice(None)] * ndim
            index[axis] = slice(int(start), stop)
            x = x[tuple(index)]
        else:
            x = families.slice(x, axis, int(start), stop)
    return x


@_op("Gather")
def _gather(im: _Importer, args: list) -> Value:
    axis = int(im.only({"axis": None}).get("axis", 0))
    data, indices = args
    if isinstance(data, np.ndarray) and isinstance(indices, np.ndarray):
        return np.asarray(np.take(data, indices, axis=axis), dtype=data.dtype)
    if isinstance(indices, np.ndarray) and indices.ndim == 0:  # x[..., i, ...]: a slice without the axis
        x = im.tensor(data)
        i = int(indices) % x.shape[axis]
        part = families.slice(x, axis, i, i + 1)
        return ops.reshape(part, tuple(d for k, d in enumerate(part.shape) if k != axis))
    if axis == 0 and isinstance(data, Node) and isinstance(indices, Node) and indices.dtype == "int32":
        return families.embedding(indices, data)
    raise im.fail("only a row lookup of integer inputs in a table (axis 0) or a constant index is supported")


@_op("Shape")
def _shape(im: _Importer, args: list) -> np.ndarray:
    im.only({})
    shape = args[0].shape
    if all(isinstance(d, int) for d in shape):
        return np.asarray(shape, dtype=np.int64)
    return np.asarray(shape, dtype=object)  # runtime sizes by name, for Gather/Concat/Reshape to pass along


@_op("Constant")
def _constant(im: _Importer, args: list) -> np.ndarray:
    attrs = im.attrs()
    if "value" in attrs:
        return im.onnx.numpy_helper.to_array(attrs["value"])
    for key in ("value_float", "value_int"):
        if key in attrs:
            return np.asarray(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return np.asarray(list(attrs[key]))
    raise im.fail(f"attributes {sorted(attrs)} are not supported")


@_op("Cast")
def _cast(im: _Importer, args: list) -> Value:
    to = im.onnx.helper.tensor_dtype_to_np_dtype(im.only({"to": None, "saturate": None})["to"])
    x = args[0]
    if isinstance(x, np.ndarray):
        return x if x.dtype == object else x.astype(to)
    if (to.kind == "f") == (x.dtype == "float"):
        return x
    raise im.fail(f"a cast of a computed tensor to {to} is not supported")


@_op("ReduceMean", "ReduceSum")
def _reduce(im: _Importer, args: list) -> Node:
    attrs = im.only({"axes": None, "keepdims": None, "noop_with_empty_axes": 0})
    x = im.tensor(args[0])
    axes = _axes(im, args, attrs)
    keep = bool(attrs.get("keepdims", 1))
    reduce = ops.mean if im.node.op_type == "ReduceMean" else ops.sum
    return reduce(x, axis=None if axes is None else tuple(axes), keepdims=keep)


@_op("LayerNormalization")
def _layer_norm(im: _Importer, args: list) -> Node:
    attrs = im.only({"axis": None, "epsilon": None, "stash_type": 1})
    x = im.tensor(args[0])
    _last_axis(im, int(attrs.get("axis", -1)), x.ndim)
    mu = ops.mean(x, axis=-1, keepdims=True)
    centered = x - mu
    var = ops.mean(ops.square(centered), axis=-1, keepdims=True)
    y = centered * ops.power(var + float(attrs.get("epsilon", 1e-5)), -0.5)
    y = y * im.operand(args[1])
    if len(args) > 2 and args[2] is not None:
        y = y + im.operand(args[2])
    return y


def from_onnx(model: str | os.PathLike | Any, name: str | None = None) -> Graph:
    """A bp.Graph computing an ONNX model (a path or an onnx.ModelProto): add a loss to train it,
    or compile it as it is for inference."""
    onnx = _onnx()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes only help; the import checks its own
        pass
    return _Importer(proto, name).run()
