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

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import sympy as sp

from .. import ops as families  # the op families' functions, each found by name in its ops module
from ..errors import CompileError, ShapeError
from ..ir.graph import FLOAT, Graph, Node, broadcast_shapes, dim_factors, product_dim
from ..ops import core as ops
from ..ops import transformer
from ..symbolic.functions import ARGS, Fn, builtin
from .onnx_export import DEFAULT_OPSET, _onnx

Value = Any  # a graph Node, a constant np.ndarray known at import time (an object array holds
# runtime sizes: bpcompile dims, names or products of them), or a value kept until its consumer:
# _Condition, _Infinite, _Causal, _Window

# The inputs of an operator its output is differentiable in (all when not listed): an
# initializer that reaches an output only through the others (a mask, a shape, indices) is a
# constant, not a trainable parameter.
_DATA_INPUTS = {
    **{op: () for op in ("Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
                         "Or", "Xor", "IsInf", "IsNaN", "ConstantOfShape", "Range", "ArgMax", "ArgMin")},
    **{op: (0,) for op in ("Reshape", "Slice", "Gather", "Expand", "Tile", "Squeeze", "Unsqueeze", "Split", "Trilu",
                           "Dropout", "Pad", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")},
    "Where": (1, 2),
}


def _data_inputs(onnx: Any, node: Any) -> tuple[int, ...]:
    if node.op_type == "Cast":  # a cast to bool or int is a test, not a value
        to = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
        kind = onnx.helper.tensor_dtype_to_np_dtype(to).kind if to is not None else "f"
        return (0,) if kind == "f" else ()
    return _DATA_INPUTS.get(node.op_type, tuple(range(len(node.input))))


def _differentiable(onnx: Any, graph: Any) -> set[str]:
    """The tensor names the graph outputs depend on through data inputs (not through shapes,
    conditions or indices)."""
    live = {value.name for value in graph.output}
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            live.update(node.input[i] for i in _data_inputs(onnx, node) if i < len(node.input))
    return live


class _Condition:
    """A boolean tensor, as a SymPy condition on graph tensors (bpcompile has no boolean
    tensors): kept until a Where selects with it or a Cast turns it into 1.0 / 0.0."""

    def __init__(self, expr: Any, operands: list[Node]):
        self.expr, self.operands = expr, operands
        self.shape = broadcast_shapes([n.shape for n in operands], [f"operand {i}" for i in range(len(operands))])

    def number(self) -> Node:
        return _select(sp.Piecewise((1, self.expr), (0, True)), self.operands, "condition")


class _Infinite:
    """x == ±inf. Alone it has no bpcompile form (a real never equals an infinity); in the guard
    Where(ReduceMax(s) == -inf, 0, Softmax(s)) that bp.to_onnx writes for a masked softmax's
    rows without an allowed key, it is bpcompile's attention softmax."""

    def __init__(self, x: Node, value: float):
        self.x, self.value, self.shape = x, value, x.shape


class _Causal:
    """The causal mask at a runtime length, which no constant can hold, as the steps from
    Trilu(ones) to the scores it masks: "allowed" (true for keys j <= i), "masked" (j > i),
    "additive" (0 or -inf), "scores" (s, -inf at j > i). Only a Softmax of the scores takes it,
    as bpcompile's causal attention softmax: how torch writes is_causal=True and bp.to_onnx
    writes causal attention when the length is a runtime size."""

    def __init__(self, kind: str, shape: tuple, scores: Node | None = None):
        self.kind, self.shape, self.scores = kind, tuple(shape), scores

    def negated(self) -> _Causal | None:
        flip = {"allowed": "masked", "masked": "allowed"}.get(self.kind)
        return _Causal(flip, self.shape) if flip else None

    def masking(self, im: _Importer, scores: Node) -> _Causal:
        """These scores, masked."""
        if scores.ndim < 2 or scores.shape[-2:] != self.shape[-2:] or any(d != 1 for d in self.shape[:-2]):
            raise im.fail(f"a causal mask of shape {self.shape} on scores of shape {scores.shape} is not supported")
        return _Causal("scores", scores.shape, scores)


class _Window:
    """A constant buffer cut from its front to runtime lengths (bias[:, :, :T, :T]), which no
    constant can hold: kept until it is a causal mask, a lower triangle of ones cut to one
    length along its last two axes (a GPT's causal buffer sliced to the sequence length; the
    fused causal softmax is that mask at any length)."""

    def __init__(self, values: np.ndarray, lengths: dict[int, str]):
        self.values, self.lengths = values, lengths
        self.shape = tuple(lengths.get(i, d) for i, d in enumerate(values.shape))

    def settled(self) -> _Window | _Causal:
        """The causal mask once the window is one, else the window."""
        n = self.values.ndim
        length = self.lengths.get(n - 1)
        if n < 2 or set(self.lengths) != {n - 2, n - 1} or self.lengths[n - 2] != length:
            return self
        rows, cols = self.values.shape[-2:]
        values = self.values.reshape(-1, rows, cols)
        ones = np.isin(values, (0, 1)).all() and all(_is_tril(v != 0, rows, cols) for v in values)
        return _Causal("allowed", self.shape) if ones else self


_WINDOW = ("a constant buffer sliced to a runtime length is supported only as a causal mask (a lower triangle of "
           "ones sliced to [:T, :T] along its last two axes)")
_CAUSAL = ("a causal mask of runtime size is supported only as Where(mask, scores, -inf) or scores + Where(mask, 0, "
           "-inf) before a Softmax")
# A masked score: -inf, or float32's lowest number as the dynamo exporter writes it (exp of
# either minus the row's max is 0, and a causal row always keeps its first key).
_LOWEST = float(np.finfo(np.float32).min)
_C = tuple(sp.Symbol(f"c{i}", real=True) for i in range(len(ARGS)))


def _select(expr: Any, operands: list[Node], name: str) -> Node:
    """ew of an expression of _C[:len(operands)]."""
    fn = Fn(name, expr.xreplace(dict(zip(_C, ARGS))), len(operands))
    return ops.ew(fn, *operands)


class _Importer:
    def __init__(self, proto: Any, name: str | None):
        self.onnx = _onnx()
        self.proto = proto
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
        self.graph = Graph(name or proto.graph.name or "onnx_model")
        self.env: dict[str, Value] = {}
        self.initial: dict[str, np.ndarray] = {}  # the initializers that became parameters
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

    def ints(self, name: str, what: str) -> list[int]:
        """A constant list of sizes or indices, refused when it holds runtime sizes (names)."""
        values = np.ravel(self.constant(name, what))
        if any(isinstance(v, str) for v in values):
            raise self.fail(f"{what} {[str(v) for v in values]} hold runtime sizes, which is not supported")
        return [int(v) for v in values]

    def tensor(self, value: Value) -> Node:
        """A graph tensor for a value: constants become bp.constant (scalars a filled tensor)."""
        if isinstance(value, Node):
            return value
        if isinstance(value, _Condition):
            return value.number()
        if isinstance(value, _Infinite):
            raise self.fail(_INFINITE)
        if isinstance(value, _Causal):
            raise self.fail(_CAUSAL)
        if isinstance(value, _Window):
            raise self.fail(_WINDOW)
        if value.dtype == object:
            raise self.fail("runtime sizes (from Shape) used as a tensor are not supported")
        if not np.all(np.isfinite(value)):
            raise self.fail("a constant holding inf or NaN is supported only as a Where branch or an Add/Sub "
                            "operand (a mask)")
        if value.ndim == 0:
            return ops.const(float(value))
        return transformer.constant(value)

    def operand(self, value: Value, like: Value = None) -> Node | float:
        """A number for a constant of one element that broadcasting against `like` does not
        widen, else a graph tensor."""
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype != object and np.isfinite(value).all():
            ndim = len(like.shape) if like is not None and not isinstance(like, np.ndarray) else 0
            if value.ndim <= ndim:
                return float(value.reshape(()))
        return self.tensor(value)

    def fold(self, args: list) -> tuple[np.ndarray, ...]:
        """Evaluate a node whose inputs are all constants, with ONNX's reference evaluator."""
        from onnx.reference import ReferenceEvaluator
        feeds = {name: value for name, value in zip(self.node.input, args) if name}
        try:
            results = ReferenceEvaluator(self.node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:  # noqa: BLE001 - reported with the node
            raise self.fail(f"evaluating it on its constant inputs failed: {e}") from None
        return tuple(np.asarray(r) for r in results)

    # --- the model -------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.proto.graph
        numpy_helper = self.onnx.numpy_helper
        live = _differentiable(self.onnx, g)
        kinds = _torch_kinds(g)
        for init in g.initializer:
            array = numpy_helper.to_array(init)
            unmarked = "CONSTANT" if kinds and array.size == 1 else "PARAMETER"
            trainable = kinds.get(init.name, unmarked) == "PARAMETER"
            if array.dtype.kind == "f" and array.ndim > 0 and init.name in live and trainable:
                self.env[init.name] = self.graph.param(init.name, array.shape, init=array.astype(np.float64))
                self.initial[init.name] = array
            else:
                self.env[init.name] = array
        for value in g.input:
            if value.name not in self.env:
                self.env[value.name] = self.input(value)
        for node in g.node:
            self.node = node
            args = [self.get(i) for i in node.input]
            if args and all(isinstance(a, np.ndarray) and a.dtype != object for a in args if a is not None) \
                    and node.op_type not in _NO_FOLD:
                results = self.fold(args)
            else:
                handler = IMPORTERS.get(node.op_type)
                if handler is None:
                    raise self.fail(f"operator {node.op_type} is not supported (supported: "
                                    f"{', '.join(sorted(IMPORTERS))})")
                try:
                    results = handler(self, args)
                except (ShapeError, ValueError, TypeError) as e:  # a bpcompile op refused the operands
                    raise self.fail(str(e)) from e
            results = results if isinstance(results, tuple) else (results,)
            for out, value in zip(node.output, results):
                if out:
                    self.env[out] = _settle(value)
        for value in g.output:
            result = self.env[value.name]
            self.graph.output(value.name, result if isinstance(result, Node) else self.tensor(result))
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
        return self.graph.input(value.name, tuple(dims), dtype="int32" if kind.kind in "iub" else None)


def _torch_kinds(graph: Any) -> dict[str, str]:
    """What torch.export says a tensor is (PARAMETER, BUFFER, ...), where the dynamo exporter
    wrote it down. In its models an initializer it does not mark is a folded parameter (a
    transposed weight) unless it has one element: a constant it stored, such as attention's
    sqrt(1/sqrt(d)) (the TorchScript exporter and bp.to_onnx write those as Constant nodes)."""
    kinds = {}
    for value in graph.value_info:
        for prop in getattr(value, "metadata_props", ()):
            if prop.key.endswith("InputSpec.kind"):
                kinds[value.name] = prop.value
    return kinds


_NO_FOLD = {"Identity"}  # evaluated by their own rule even on constants


def _settle(value: Value) -> Value:
    """Runtime sizes (an object array) that turned out to be all fixed become int64."""
    if isinstance(value, np.ndarray) and value.dtype == object and not any(isinstance(v, str) for v in value.flat):
        return value.astype(np.int64)
    return value


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
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):  # runtime sizes: folded otherwise
        return _size_arithmetic(im, a, b)
    kind = im.node.op_type
    for i, c in enumerate((a, b)):
        if kind == "Add" and isinstance(c, _Causal) and c.kind == "additive" and isinstance(args[1 - i], Node):
            return c.masking(im, args[1 - i])
    for i, c in enumerate((a, b)):
        if kind in ("Add", "Sub") and isinstance(c, np.ndarray) and not np.all(np.isfinite(c)):
            return _add_mask(im, im.tensor(args[1 - i]), c if kind == "Add" or i == 0 else -c,
                             negate=kind == "Sub" and i == 0)
    return _BP_BINARY[kind](im.operand(a, b), im.operand(b, a))


def _size_arithmetic(im: _Importer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mul of runtime sizes, or Div where it is exact, elementwise: bpcompile dims (B * T ->
    "T*batch", "T*batch" / T -> "batch"), as torch writes the target of x.view(B * T, C)."""
    kind = im.node.op_type
    if kind not in ("Mul", "Div"):
        raise im.fail(f"{kind} of runtime sizes {_sizes(a)} and {_sizes(b)} is not supported (only Mul, and Div "
                      "where it is exact, make a bpcompile dim)")
    left, right = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
    out = np.empty(left.shape, dtype=object)
    for index, (x, y) in enumerate(zip(left.flat, right.flat)):
        (cx, nx), (cy, ny) = dim_factors(_dim(x)), dim_factors(_dim(y))
        if kind == "Mul":
            out.flat[index] = product_dim(cx * cy, nx + ny)
            continue
        rest = Counter(nx) - Counter(ny)
        if cy == 0 or cx % cy or Counter(ny) - Counter(nx):
            raise im.fail(f"the runtime size {x!r} divided by {y!r} is not exact, which is not supported")
        out.flat[index] = product_dim(cx // cy, rest.elements())
    return out


def _dim(v: Any) -> int | str:
    """One element of a tensor of runtime sizes as a bpcompile dim."""
    if isinstance(v, str):
        return v
    if v != int(v):
        raise ValueError(f"runtime sizes combined with the non-integer {v!r} are not supported")
    return int(v)


def _sizes(values: np.ndarray) -> list:
    return [_dim(v) for v in np.ravel(values)]


def _add_mask(im: _Importer, x: Node, mask: np.ndarray, negate: bool) -> Node:
    """x + mask for a constant holding -inf (or +inf) where it masks, as torch writes attention
    masks: where(finite, x + the finite part, inf)."""
    finite = np.isfinite(mask)
    infinite = np.unique(mask[~finite])
    if len(infinite) != 1 or np.isnan(infinite[0]):
        raise im.fail("a constant operand may hold one infinity (a mask), not NaN or both signs")
    x = -x if negate else x
    rest = np.where(finite, mask, 0.0)
    if np.any(rest != 0):
        x = x + im.operand(rest, x)
    shape = broadcast_shapes([x.shape, mask.shape], ["x", "mask"])
    if not finite.any():
        return ops.const(float(infinite[0]), shape)
    return _widen(transformer.where(finite, x, float(infinite[0])), shape)


def _widen(node: Node, shape: tuple) -> Node:
    """`node` broadcast to `shape` (ONNX's result shape, which constants may widen)."""
    return node if node.shape == tuple(shape) else ops.ew(Fn("expand", ARGS[0], 1), node, shape=tuple(shape))


_UNARY = {"Relu": ops.relu, "Sigmoid": ops.sigmoid, "Tanh": ops.tanh, "Softplus": ops.softplus, "Exp": ops.exp,
          "Log": ops.log, "Sqrt": ops.sqrt, "Abs": ops.abs, "Neg": ops.neg}
_A = tuple(sp.Symbol(f"a{i}", real=True) for i in range(4))
# other elementwise operators, as the SymPy function bpcompile differentiates
_SYMPY_UNARY = {"Erf": sp.erf, "Sin": sp.sin, "Cos": sp.cos, "Sinh": sp.sinh, "Cosh": sp.cosh, "Atan": sp.atan,
                "Sign": sp.sign, "Reciprocal": lambda a: 1 / a}


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


# --- conditions: comparisons, logic and Where ---------------------------------------------------------

_COMPARE = {"Greater": sp.StrictGreaterThan, "Less": sp.StrictLessThan, "GreaterOrEqual": sp.GreaterThan,
            "LessOrEqual": sp.LessThan, "Equal": sp.Eq}
_LOGIC = {"Not": sp.Not, "And": sp.And, "Or": sp.Or, "Xor": sp.Xor}


def _condition(im: _Importer, build: Callable[..., Any], values: list, logical: bool) -> _Condition:
    """A condition `build(terms)` of graph tensors, constants and other conditions."""
    operands: list[Node] = []

    def symbol(node: Node) -> sp.Symbol:
        if node not in operands:
            if len(operands) == len(_C):
                raise im.fail(f"a condition on more than {len(_C)} tensors is not supported")
            operands.append(node)
        return _C[operands.index(node)]

    def term(value: Value) -> Any:
        if isinstance(value, _Infinite) or (isinstance(value, np.ndarray) and value.dtype != object
                                            and np.isinf(value).any()):
            raise im.fail(_INFINITE)
        if isinstance(value, _Causal):
            raise im.fail(_CAUSAL)
        if isinstance(value, _Condition):
            if not logical:
                raise im.fail("comparing boolean tensors is not supported")
            return value.expr.xreplace({_C[i]: symbol(n) for i, n in enumerate(value.operands)})
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype != object:
            if logical:
                return sp.true if bool(value) else sp.false
            return sp.Float(float(value)) if value.dtype.kind == "f" else sp.Integer(int(value))
        node = im.tensor(value)
        return sp.Ne(symbol(node), 0) if logical else symbol(node)

    expr = build(*[term(v) for v in values])
    if expr in (sp.true, sp.false):
        raise im.fail(f"the condition is always {bool(expr)}, which is not supported")
    return _Condition(expr, operands)


_INFINITE = "a test for inf is supported only in the guard Where(ReduceMax(s) == -inf, 0, Softmax(s))"


@_op(*_COMPARE)
def _compare(im: _Importer, args: list) -> _Condition | _Infinite:
    im.only({})
    if im.node.op_type == "Equal":
        for x, c in (args, args[::-1]):
            if isinstance(x, _Causal) and isinstance(c, np.ndarray) and c.size == 1 and x.negated():
                value = float(c.reshape(()))
                if value in (0.0, 1.0):
                    return x.negated() if value == 0.0 else x
            if isinstance(x, Node) and isinstance(c, np.ndarray) and c.size == 1 and c.dtype.kind == "f" \
                    and np.isinf(c).all() and c.ndim <= x.ndim:
                return _Infinite(x, float(c.reshape(())))
    return _condition(im, _COMPARE[im.node.op_type], args, logical=False)


def _empty_row_guard(im: _Importer, cond: _Infinite, x: Value, y: Value) -> Node:
    """Where(ReduceMax(s, -1) == -inf, 0, Softmax(s)): softmax with rows of no allowed key zeros."""
    top, p = cond.x, y
    if cond.value < 0 and isinstance(x, np.ndarray) and x.size == 1 and float(x.reshape(())) == 0.0 \
            and isinstance(p, Node) and p.op == "softmax" and top.op == "amax" and top.inputs[0] is p.inputs[0] \
            and top.attrs["axes"] == (p.ndim - 1,) and top.attrs["keepdims"]:
        return transformer.masked_softmax(p.inputs[0])
    raise im.fail(_INFINITE)


@_op(*_LOGIC)
def _logic(im: _Importer, args: list) -> _Condition | _Causal:
    im.only({})
    if im.node.op_type == "Not" and isinstance(args[0], _Causal) and args[0].negated():
        return args[0].negated()
    return _condition(im, _LOGIC[im.node.op_type], args, logical=True)


def _branch(im: _Importer, value: Value) -> Node | float:
    """A Where branch: a tensor, or a number (±inf allowed: a mask)."""
    if isinstance(value, np.ndarray) and value.dtype != object and value.size and np.all(value == value.flat[0]):
        number = float(value.flat[0])
        if not np.isfinite(number) or value.ndim == 0:
            return number
    return im.operand(value)


def _causal_where(im: _Importer, cond: _Causal, x: Value, y: Value) -> _Causal:
    """Where(allowed, s, -inf) -> masked scores; Where(allowed, 0, -inf) -> the additive mask
    (either with the masked positions first when the condition is "masked")."""
    if cond.kind not in ("allowed", "masked"):
        raise im.fail(_CAUSAL)
    keep, drop = (x, y) if cond.kind == "allowed" else (y, x)
    if not (isinstance(drop, np.ndarray) and drop.size == 1 and float(drop.reshape(())) <= _LOWEST):
        raise im.fail(_CAUSAL)
    if isinstance(keep, Node):
        return cond.masking(im, keep)
    if isinstance(keep, np.ndarray) and keep.size == 1 and float(keep.reshape(())) == 0.0:
        return _Causal("additive", cond.shape)
    raise im.fail(_CAUSAL)


@_op("Where")
def _where(im: _Importer, args: list) -> Node:
    im.only({})
    cond, x, y = args
    if isinstance(cond, _Infinite):
        return _empty_row_guard(im, cond, x, y)
    if isinstance(cond, _Causal):
        return _causal_where(im, cond, x, y)
    a, b = _branch(im, x), _branch(im, y)
    shape = broadcast_shapes([v.shape for v in args], ["cond", "x", "y"])
    if isinstance(cond, np.ndarray):  # a constant mask, e.g. torch's causal one
        if not any(isinstance(v, Node) for v in (a, b)):
            raise im.fail("a Where on a constant condition needs a graph tensor as one of its branches")
        return _widen(transformer.where(cond.astype(bool), a, b), shape)
    if not isinstance(cond, _Condition):  # a boolean graph input
        cond = _condition(im, lambda c: c, [cond], logical=True)
    operands = list(cond.operands)

    def term(v: Node | float) -> Any:
        if isinstance(v, float):
            return sp.oo if v == np.inf else -sp.oo if v == -np.inf else sp.Float(v)
        if v not in operands:
            operands.append(v)
        return _C[operands.index(v)]

    if len(set(operands) | {v for v in (a, b) if isinstance(v, Node)}) > len(_C):
        raise im.fail(f"a Where on more than {len(_C)} tensors is not supported")
    expr = sp.Piecewise((term(a), cond.expr), (term(b), True))
    return _widen(_select(expr, operands, "where"), shape)


# --- activations and plain structure ------------------------------------------------------------------

@_op("LeakyRelu")
def _leaky_relu(im: _Importer, args: list) -> Node:
    return ops.leaky_relu(im.tensor(args[0]), float(im.only({"alpha": None}).get("alpha", 0.01)))


@_op("Elu")
def _elu(im: _Importer, args: list) -> Node:
    return ops.elu(im.tensor(args[0]), float(im.only({"alpha": None}).get("alpha", 1.0)))


# torch's gelu(approximate="tanh"), ONNX's Gelu(approximate="tanh") from opset 20
_gelu_tanh = _function("gelu_tanh", _A[0] / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (_A[0] + 0.044715 * _A[0] ** 3))), 1)


@_op("Gelu")
def _gelu(im: _Importer, args: list) -> Node:
    """bp.gelu (erf form), or its tanh approximation as an elementwise function SymPy derives."""
    approximate = _plain(im.only({"approximate": None}).get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise im.fail(f"attribute approximate={approximate!r} is not supported (only 'none' or 'tanh')")
    return (ops.gelu if approximate == "none" else _gelu_tanh)(im.tensor(args[0]))


@_op("Identity")
def _identity(im: _Importer, args: list) -> Value:
    """The identity; of an initializer, a parameter of its own, as it is when torch's exporter
    writes one copy of initializers with equal values (ln_2.weight = Identity(ln_1.weight))."""
    im.only({})
    x, source, out = args[0], im.node.input[0], im.node.output[0]
    if isinstance(x, Node) and source in im.initial and out not in im.graph.params:
        array = im.initial[source]
        im.initial[out] = array
        return im.graph.param(out, array.shape, init=array.astype(np.float64))
    return x


@_op("Dropout")
def _dropout(im: _Importer, args: list) -> Value:
    im.only({"seed": None})
    if len(args) > 2 and args[2] is not None and bool(im.constant(im.node.input[2], "Dropout's training_mode")):
        raise im.fail("training_mode=true is not supported (bpcompile's dropout is active in training calls)")
    ratio = float(im.constant(im.node.input[1], "Dropout's ratio")) if len(args) > 1 and args[1] is not None else 0.5
    return families.dropout(im.tensor(args[0]), ratio) if ratio > 0 else args[0]


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


def _last_axis(im: _Importer, axis: int, ndim: int) -> None:
    if axis % ndim != ndim - 1:
        raise im.fail(f"attribute axis={axis} is not supported (only the last axis)")


@_op("Softmax", "LogSoftmax")
def _softmax(im: _Importer, args: list) -> Node:
    causal = args[0] if isinstance(args[0], _Causal) and args[0].kind == "scores" else None
    x = causal.scores if causal else im.tensor(args[0])
    # before opset 13 the default axis was 1, over the input flattened to 2-D there
    axis = int(im.only({"axis": None}).get("axis", -1 if im.opset >= 13 else 1))
    _last_axis(im, axis, x.ndim)
    if causal and im.node.op_type == "Softmax":  # keys j > i masked at a runtime length
        return _causal_softmax(x)
    if causal:
        raise im.fail(_CAUSAL)
    if im.node.op_type == "Softmax":
        scores = _causally_masked(x)
        return ops.softmax(x) if scores is None else _causal_softmax(scores)
    return ops.log_softmax(x)


def _causal_softmax(scores: Node) -> Node:
    return transformer.masked_softmax(scores, causal=True)


def _is_tril(values: np.ndarray, rows: int, cols: int) -> bool:
    return values.shape[-2:] == (rows, cols) and values.size == rows * cols and \
        np.array_equal(values.reshape(rows, cols), np.tril(np.ones((rows, cols), dtype=bool)))


def _causally_masked(x: Node) -> Node | None:
    """The scores s when x = where(tril mask, s, -inf) or s + (0 on the tril, float32's lowest
    above it) with a constant mask (what the causal mask of a fixed length folds to): their
    softmax is the fused causal one, no mask stored."""
    if x.op != "ew" or len(x.inputs) != 2 or x.ndim < 2:
        return None
    rows, cols = x.shape[-2:]
    if _is_builtin_add(x):
        for scores, mask in (x.inputs, x.inputs[::-1]):
            if mask.op == "constant" and scores.shape == x.shape:
                values = mask.attrs["values"]
                if np.all((values == 0) | (values <= _LOWEST)) and _is_tril(values == 0, rows, cols):
                    return scores
        return None
    if not isinstance(x.attrs["fn"].expr, sp.Piecewise):
        return None
    pieces = x.attrs["fn"].expr.args
    if len(pieces) != 2 or pieces[1][1] is not sp.true:
        return None
    (first, test), (other, _) = pieces
    if not (isinstance(test, sp.Unequality) and test.rhs == 0 and test.lhs in ARGS[:2]):
        return None
    m = ARGS.index(test.lhs)
    mask, scores = x.inputs[m], x.inputs[1 - m]
    if mask.op != "constant" or {first, other} != {ARGS[1 - m], -sp.oo}:
        return None
    values = mask.attrs["values"]
    allowed = values != 0 if first == ARGS[1 - m] else values == 0
    return scores if scores.shape == x.shape and _is_tril(allowed, rows, cols) else None


def _is_builtin_add(x: Node) -> bool:
    return x.attrs["fn"] is builtin("add") and len(x.inputs) == 2


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


@_op("Flatten")
def _flatten(im: _Importer, args: list) -> Node:
    x = im.tensor(args[0])
    axis = int(im.only({"axis": None}).get("axis", 1))
    if axis % max(x.ndim, 1) != 1:
        raise im.fail(f"attribute axis={axis} is not supported (only 1)")
    return ops.flatten(x)


@_op("Reshape")
def _reshape(im: _Importer, args: list) -> Value:
    """ONNX's target shape: 0 copies the input's size (an empty dim with allowzero=1, which
    bpcompile has not), -1 is inferred, a runtime size is a bpcompile dim (a name or a product
    of names, which bpcompile's reshape merges and splits)."""
    allowzero = int(im.only({"allowzero": None}).get("allowzero", 0))
    x = args[0]
    target = [v if isinstance(v, str) else int(v) for v in np.ravel(im.constant(im.node.input[1], "Reshape's shape"))]
    if allowzero and 0 in target:
        raise im.fail(f"attribute allowzero=1 with a 0 in the shape {target} (an empty dim) is not supported")
    if isinstance(x, np.ndarray):
        return x.reshape(target)
    x = im.tensor(x)
    return ops.reshape(x, tuple(x.shape[i] if d == 0 else d for i, d in enumerate(target)))


def _axes(im: _Importer, args: list, attrs: dict) -> list[int] | None:
    """The axes of a node, from its attribute (older opsets) or its second input (newer ones)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(args) > 1 and args[1] is not None:
        return im.ints(im.node.input[1], "axes")
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
    return x.reshape(new) if isinstance(x, np.ndarray) else ops.reshape(im.tensor(x), tuple(new))


@_op("Transpose")
def _transpose(im: _Importer, args: list) -> Value:
    perm = im.only({"perm": None}).get("perm")
    x = args[0]
    if isinstance(x, np.ndarray):
        return np.transpose(x, perm)
    return ops.transpose(im.tensor(x), perm)


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
    starts = im.ints(im.node.input[1], "Slice's starts")
    ends = _sizes(im.constant(im.node.input[2], "Slice's ends"))
    ndim = len(x.shape)
    axes = im.ints(im.node.input[3], "Slice's axes") if len(args) > 3 and args[3] is not None \
        else list(range(len(starts)))
    steps = im.ints(im.node.input[4], "Slice's steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    x = x if isinstance(x, np.ndarray | _Window) else im.tensor(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % ndim
        if isinstance(end, str) or isinstance(x, _Window):
            x = _cut(im, x, axis, start, end, step)
            continue
        stop = None if end >= 2**62 or (step < 0 and end <= -2**62) else end
        start = None if start <= -2**62 or (step < 0 and start >= 2**62) else start
        if isinstance(x, np.ndarray):
            index = [slice(None)] * ndim
            index[axis] = slice(start, stop, step)
            x = x[tuple(index)]
        elif step == 1:
            x = families.slice(x, axis, start, stop)
        elif isinstance(x.shape[axis], int):  # every step-th entry, or reversed (torch.flip): picked
            x = _take(im, x, axis, np.arange(x.shape[axis])[start:stop:step])
        else:
            raise im.fail(f"steps other than 1 along the runtime size {x.shape[axis]!r} are not supported")
    return x.settled() if isinstance(x, _Window) else x


def _cut(im: _Importer, x: Value, axis: int, start: int, end: int | str, step: int) -> Value:
    """x[start:end] along `axis` when end is a runtime size (or x a _Window): the identity where
    it is x's own size there; of a constant buffer, a _Window cut from its front."""
    if step != 1 or start != 0:
        raise im.fail(f"a slice [{start}:{end}:{step}] to a runtime size is supported only from 0 with step 1")
    if x.shape[axis] == end:
        return x
    if isinstance(x, np.ndarray) and x.dtype != object:
        x = _Window(x, {})
    if not isinstance(x, _Window) or axis in x.lengths:
        raise im.fail(f"slicing a tensor of shape {tuple(x.shape)} to the runtime size {end!r} along axis {axis} "
                      "is not supported (only a constant buffer, as a causal mask)")
    if isinstance(end, int):
        return _Window(np.take(x.values, np.arange(min(end, x.values.shape[axis])), axis=axis), x.lengths)
    return _Window(x.values, {**x.lengths, axis: end})


@_op("Split")
def _split(im: _Importer, args: list) -> tuple:
    """Consecutive slices: sizes from the second input, the `split` attribute (before opset 13)
    or equal parts (the last one smaller), as ONNX's Split."""
    attrs = im.only({"axis": None, "split": None, "num_outputs": None})
    x = args[0]
    axis = int(attrs.get("axis", 0)) % len(x.shape)
    if len(args) > 1 and args[1] is not None:
        sizes = im.ints(im.node.input[1], "Split's sizes")
    elif "split" in attrs:
        sizes = [int(v) for v in attrs["split"]]
    else:
        count, n = int(attrs.get("num_outputs", len(im.node.output))), x.shape[axis]
        if not isinstance(n, int):
            raise im.fail(f"splitting the runtime size {n!r} is not supported")
        part = -(-n // count)
        sizes = [part] * (count - 1) + [n - part * (count - 1)]
    parts, begin = [], 0
    for size in sizes:
        if isinstance(x, np.ndarray):
            parts.append(np.take(x, np.arange(begin, begin + size), axis=axis))
        else:
            parts.append(families.slice(im.tensor(x), axis, begin, begin + size))
        begin += size
    return tuple(parts)


@_op("Gather")
def _gather(im: _Importer, args: list) -> Value:
    """Rows of a table picked by int inputs (an embedding); slices for constant indices (a
    range of them, e.g. positions), else a product with their one-hot matrix."""
    axis = int(im.only({"axis": None}).get("axis", 0))
    data, indices = args
    if isinstance(data, np.ndarray) and isinstance(indices, np.ndarray):  # runtime sizes
        return np.asarray(np.take(data, indices, axis=axis), dtype=data.dtype)
    x = im.tensor(data)
    axis %= x.ndim
    if isinstance(indices, np.ndarray):
        return _take(im, x, axis, indices)
    if axis == 0 and isinstance(indices, Node) and indices.dtype == "int32" and x.ndim == 2:
        return families.embedding(indices, x)
    raise im.fail("only a row lookup of integer inputs in a 2-D table (axis 0) or constant indices are supported")


def _take(im: _Importer, x: Node, axis: int, indices: np.ndarray) -> Node:
    """x's entries at constant indices along a fixed axis: a slice for a range of them, else the
    product with their one-hot matrix."""
    n = x.shape[axis]
    if not isinstance(n, int):
        raise im.fail(f"indexing the runtime size {n!r} is not supported")
    picked = indices.astype(np.int64) % n
    if picked.ndim == 0:  # x[..., i, ...]: a slice without the axis
        part = families.slice(x, axis, int(picked), int(picked) + 1)
        return ops.reshape(part, tuple(d for k, d in enumerate(part.shape) if k != axis))
    if picked.ndim == 1 and picked.size and np.array_equal(picked, np.arange(picked[0], picked[0] + picked.size)):
        return families.slice(x, axis, int(picked[0]), int(picked[0]) + picked.size)
    if not picked.size:
        raise im.fail("an empty list of indices is not supported")
    others = [k for k in range(x.ndim) if k != axis]
    moved = x if axis == x.ndim - 1 else ops.transpose(x, (*others, axis))
    columns = ops.matmul(moved, transformer.constant(np.eye(n)[:, picked.reshape(-1)]))  # (..., picked)
    out = ops.reshape(columns, tuple(x.shape[k] for k in others) + picked.shape)
    r, k = len(others), picked.ndim
    perm = (*range(axis), *range(r, r + k), *range(axis, r))  # the picked dims where the axis was
    return out if perm == tuple(range(out.ndim)) else ops.transpose(out, perm)


@_op("Shape")
def _shape(im: _Importer, args: list) -> np.ndarray:
    attrs = im.only({"start": None, "end": None})
    shape = list(args[0].shape)[int(attrs.get("start", 0)):attrs.get("end")]
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


@_op("ConstantOfShape")
def _constant_of_shape(im: _Importer, args: list) -> Node:
    """A filled tensor of a shape holding runtime sizes (constant shapes are folded)."""
    attrs = im.only({"value": None})
    value = im.onnx.numpy_helper.to_array(attrs["value"]).reshape(()) if "value" in attrs else np.zeros(())
    if value.dtype.kind != "f":
        raise im.fail(f"a {value.dtype} tensor of runtime shape is not supported (only float)")
    dims = tuple(v if isinstance(v, str) else int(v) for v in np.ravel(args[0]))
    return ops.const(float(value), dims)


@_op("Expand")
def _expand(im: _Importer, args: list) -> Node:
    """NumPy broadcasting to the target shape (ONNX broadcasts both ways)."""
    im.only({})
    target = tuple(v if isinstance(v, str) else int(v) for v in np.ravel(im.constant(im.node.input[1], "shape")))
    x = args[0]
    if isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind == "f":
        return ops.const(float(x.reshape(())), broadcast_shapes([x.shape, target], ["input", "shape"]))
    x = im.tensor(x)
    return _widen(x, broadcast_shapes([x.shape, target], ["input", "shape"]))


@_op("Trilu")
def _trilu(im: _Importer, args: list) -> Value:
    upper = bool(im.only({"upper": None}).get("upper", 1))
    x = im.tensor(args[0])
    k = im.ints(im.node.input[1], "Trilu's k")[0] if len(args) > 1 and args[1] is not None else 0
    rows, cols = x.shape[-2:]
    if not isinstance(rows, int) or not isinstance(cols, int):
        ones = x.op == "ew" and not x.inputs and x.attrs["fn"].expr == 1
        if ones and (upper, k) in ((False, 0), (True, 1)):  # the causal mask: keys j <= i (or j > i)
            return _Causal("masked" if upper else "allowed", x.shape)
        raise im.fail(f"a triangle of runtime size {rows!r} x {cols!r} is supported only as a causal mask "
                      "(Trilu of ones, lower with k=0 or upper with k=1)")
    keep = np.triu(np.ones((rows, cols)), k) if upper else np.tril(np.ones((rows, cols)), k)
    return transformer.where(keep.astype(bool), x, 0.0)


@_op("Range")
def _range(im: _Importer, args: list) -> np.ndarray:
    raise im.fail("a range of runtime sizes is not supported (constant ranges are folded)")


@_op("Cast")
def _cast(im: _Importer, args: list) -> Value:
    to = im.onnx.helper.tensor_dtype_to_np_dtype(im.only({"to": None, "saturate": None})["to"])
    x = args[0]
    if isinstance(x, np.ndarray):
        return x if x.dtype == object else x.astype(to)
    if isinstance(x, _Causal):  # a triangle of ones is its own boolean
        return x
    if isinstance(x, _Window):
        return _Window(x.values.astype(to), x.lengths).settled()
    if to.kind == "b":
        return x if isinstance(x, _Condition) else _condition(im, lambda c: c, [x], logical=True)
    if isinstance(x, _Condition):
        return x.number()
    if (to.kind == "f") == (x.dtype == "float"):
        return x
    if to.kind == "f":  # int -> float: the identity as a float elementwise node (ew() would return x)
        return Node("ew", (x,), {"fn": Fn("float", ARGS[0], 1)}, x.shape, FLOAT)
    raise im.fail(f"a cast of a computed float tensor to {to} is not supported")


_REDUCE = {"ReduceMean": ops.mean, "ReduceSum": ops.sum, "ReduceMax": transformer.max, "ReduceMin": transformer.min}


@_op(*_REDUCE)
def _reduce(im: _Importer, args: list) -> Node:
    attrs = im.only({"axes": None, "keepdims": None, "noop_with_empty_axes": 0})
    x = im.tensor(args[0])
    axes = _axes(im, args, attrs)
    keep = bool(attrs.get("keepdims", 1))
    return _REDUCE[im.node.op_type](x, axis=None if not axes else tuple(axes), keepdims=keep)


# --- recurrent layers: LSTM, GRU, RNN -------------------------------------------------------------

# Where bpcompile's (PyTorch's) gate blocks sit in ONNX's weights: LSTM i, f, g, o are ONNX's
# blocks i, f, c, o of its order (i, o, f, c); GRU r, z, n are blocks r, z, h of (z, r, h).
_GATES = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}


@_op("LSTM", "GRU", "RNN")
def _recurrent(im: _Importer, args: list) -> tuple:
    """Each direction as bp.lstm / bp.gru / bp.rnn over (batch, time, features); the reverse one
    over the time-reversed sequence, its outputs reversed back; a relu RNN unrolled into
    products, sums and relus (bpcompile's RNN op is tanh). Returns Y, Y_h (and Y_c) in ONNX's
    layouts."""
    kind = im.node.op_type
    attrs = _recurrent_attrs(im, kind)
    layout, directions = int(attrs.get("layout", 0)), _directions(im, attrs)
    for index, what in ((4, "sequence_lens (sequences of their own lengths)"), (7, "P (peephole weights)")):
        if len(args) > index and args[index] is not None:
            raise im.fail(f"input {what} is not supported")
    x = im.tensor(args[0])
    if x.ndim != 3:
        raise im.fail(f"X must have 3 dims, got shape {x.shape}")
    seq = ops.transpose(x, (1, 0, 2)) if layout == 0 else x  # (batch, time, features)
    w, r = im.tensor(args[1]), im.tensor(args[2])
    hidden = int(attrs.get("hidden_size", r.shape[-1]))
    gates = len(_GATES[kind])
    if r.shape != (len(directions), gates * hidden, hidden):
        raise im.fail(f"R must have shape {(len(directions), gates * hidden, hidden)} for hidden_size={hidden} and "
                      f"{len(directions)} direction(s), got {r.shape}")
    bias = im.tensor(args[3]) if len(args) > 3 and args[3] is not None else None
    runs = []
    for d, (reverse, relu) in enumerate(directions):
        b = _direction(bias, d, 0)
        b_ih, b_hh = (None, None) if b is None else (families.slice(b, 0, 0, gates * hidden),
                                                     families.slice(b, 0, gates * hidden, None))
        weights = [_gate_order(kind, t, hidden) for t in (_direction(w, d, 0), _direction(r, d, 0), b_ih, b_hh)]
        states = [_initial_state(im, args[i] if len(args) > i else None, d, layout) for i in (5, 6)]
        source = _reversed_time(im, seq, attrs) if reverse else seq
        out, *last = _run(im, kind, relu, source, weights, states)
        runs.append((_reversed_time(im, out, attrs) if reverse else out, last))
    return _onnx_outputs(runs, layout)


def _recurrent_attrs(im: _Importer, kind: str) -> dict[str, Any]:
    allowed = {"hidden_size": None, "direction": None, "layout": None, "activations": None}
    if kind == "LSTM":
        allowed["input_forget"] = 0
    if kind == "GRU":
        allowed["linear_before_reset"] = None
    attrs = im.only(allowed)
    if int(attrs.get("layout", 0)) not in (0, 1):
        raise im.fail(f"attribute layout={attrs['layout']} is not supported (only 0 or 1)")
    if kind == "GRU" and int(attrs.get("linear_before_reset", 0)) != 1:
        raise im.fail(f"attribute linear_before_reset={int(attrs.get('linear_before_reset', 0))} is not supported "
                      "(only 1: the reset gate applied after the recurrent product, as PyTorch's GRU)")
    return attrs


def _directions(im: _Importer, attrs: dict) -> list[tuple[bool, bool]]:
    """(reversed, relu) for each direction the node runs."""
    direction = _plain(attrs.get("direction", "forward"))
    reverses = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if reverses is None:
        raise im.fail(f"attribute direction={direction!r} is not supported")
    kind = im.node.op_type
    default = _ACTIVATIONS[kind]
    given = [a.lower() for a in _plain(attrs.get("activations", list(default) * len(reverses)))]
    per = [tuple(given[i:i + len(default)]) for i in range(0, len(given), len(default))]
    accepted = (default, ("relu",)) if kind == "RNN" else (default,)
    if len(given) != len(default) * len(reverses) or any(p not in accepted for p in per):
        raise im.fail(f"attribute activations={_plain(attrs['activations'])} is not supported (only "
                      f"{' or '.join(str(list(a)) for a in accepted)} for each direction)")
    return [(reverse, p == ("relu",)) for reverse, p in zip(reverses, per)]


def _direction(t: Node | None, d: int, axis: int) -> Node | None:
    """Direction d of a tensor stacking the directions along `axis`, without that axis."""
    if t is None:
        return None
    part = families.slice(t, axis, d, d + 1)
    return ops.reshape(part, tuple(n for i, n in enumerate(t.shape) if i != axis))


def _gate_order(kind: str, t: Node | None, hidden: int) -> Node | None:
    """ONNX's gate blocks (rows of a weight, entries of a bias) in bpcompile's order."""
    if t is None or kind == "RNN":
        return t
    return families.concat([families.slice(t, 0, k * hidden, (k + 1) * hidden) for k in _GATES[kind]], axis=0)


def _initial_state(im: _Importer, value: Value | None, d: int, layout: int) -> Node | None:
    """Direction d of initial_h / initial_c as (batch, hidden); None for zeros (the default)."""
    if value is None or _is_zeros(value):
        return None
    return _direction(im.tensor(value), d, 0 if layout == 0 else 1)


def _is_zeros(value: Value) -> bool:
    """A constant of zeros, or slices and reshapes of a filled tensor of zeros (torch's
    exporter writes ConstantOfShape(batch, hidden) for absent initial states)."""
    if isinstance(value, np.ndarray):
        return value.dtype != object and not np.any(value)
    while isinstance(value, Node) and value.op in ("slice", "reshape"):
        value = value.inputs[0]
    return isinstance(value, Node) and value.op == "ew" and not value.inputs and value.attrs["fn"].expr == 0


def _reversed_time(im: _Importer, seq: Node, attrs: dict) -> Node:
    """seq (batch, time, width) with its steps in reverse order: the product with the reversing
    permutation of a fixed length (a gather by reversed indices), exact for finite values."""
    steps = seq.shape[1]
    if not isinstance(steps, int):
        raise im.fail(f"attribute direction={_plain(attrs.get('direction'))!r} over the runtime sequence length "
                      f"{steps!r} is not supported (only over a fixed length)")
    return ops.matmul(transformer.constant(np.eye(steps)[::-1].copy()), seq)


def _run(im: _Importer, kind: str, relu: bool, seq: Node, weights: list, states: list) -> tuple:
    """One direction: (outputs (batch, time, hidden), last h[, last c])."""
    w_ih, w_hh, b_ih, b_hh = weights
    h0, c0 = states
    if kind == "LSTM":
        out, (h, c) = families.lstm(seq, w_ih, w_hh, b_ih, b_hh, h0, c0)
        return out, h, c
    if kind == "GRU":
        return families.gru(seq, w_ih, w_hh, b_ih, b_hh, h0)
    if relu:
        return _relu_rnn(im, seq, w_ih, w_hh, b_ih, b_hh, h0)
    return families.rnn(seq, w_ih, w_hh, b_ih, b_hh, h0)


def _relu_rnn(im: _Importer, seq: Node, w_ih: Node, w_hh: Node, b_ih: Node | None, b_hh: Node | None,
              h0: Node | None) -> tuple[Node, Node]:
    """h_t = relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), unrolled over a fixed number of steps."""
    batch, steps, _ = seq.shape
    if not isinstance(steps, int):
        raise im.fail(f"attribute activations=['Relu'] over the runtime sequence length {steps!r} is not supported "
                      "(only over a fixed length: bpcompile's RNN op is tanh, a relu RNN is unrolled)")
    hidden = w_hh.shape[1]
    xp = ops.matmul(seq, ops.transpose(w_ih))
    for b in (b_ih, b_hh):
        xp = xp if b is None else xp + b
    recurrent, h, outs = ops.transpose(w_hh), h0, []
    for t in range(steps):
        a = ops.reshape(families.slice(xp, 1, t, t + 1), (batch, hidden))
        h = ops.relu(a if h is None else a + ops.matmul(h, recurrent))
        outs.append(ops.reshape(h, (batch, 1, hidden)))
    return families.concat(outs, axis=1), h


def _onnx_outputs(runs: list[tuple[Node, list[Node]]], layout: int) -> tuple:
    """Y (time, directions, batch, hidden) and Y_h, Y_c (directions, batch, hidden), or with the
    batch first when layout=1, from each direction's (outputs, last states)."""
    def with_axis(t: Node, axis: int) -> Node:
        return ops.reshape(t, t.shape[:axis] + (1,) + t.shape[axis:])

    if layout == 0:
        y = families.concat([with_axis(ops.transpose(out, (1, 0, 2)), 1) for out, _ in runs], axis=1)
    else:
        y = families.concat([with_axis(out, 2) for out, _ in runs], axis=2)
    axis = 0 if layout == 0 else 1
    last = [families.concat([with_axis(states[k], axis) for _, states in runs], axis=axis)
            for k in range(len(runs[0][1]))]
    return (y, *last)


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
