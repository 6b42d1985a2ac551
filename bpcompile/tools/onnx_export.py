"""Export a compiled model's evaluation-mode forward graph to ONNX.

    bp.to_onnx(model, "model.onnx")   # the current parameters become initializers

Each graph node becomes one or a few ONNX nodes, named after the graph node it computes:
elementwise functions are printed from their SymPy expression (the builtins as their ONNX
operator, e.g. relu -> Relu; any other expression term by term: Add, Mul, Pow, Exp, Where for a
Piecewise, ...), the im2col + GEMM + transpose of a conv2d as one Conv, pools as MaxPool /
AveragePool, batch norm and dropout through their evaluation branch. Named runtime dims stay
dynamic (ONNX dim_params). A node without an ONNX form raises CompileError naming it.

The onnx package is the optional extra `bpcompile[onnx]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from ..errors import CompileError, InputError
from ..ir.graph import Graph, Node
from ..symbolic.functions import ARGS, BUILTIN, builtin, is_dim_symbol

DEFAULT_OPSET = 17
# builtin elementwise functions that are one ONNX operator
OPERATORS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus", "exp": "Exp",
             "log": "Log", "sqrt": "Sqrt", "abs": "Abs", "neg": "Neg", "add": "Add", "sub": "Sub", "mul": "Mul",
             "div": "Div", "pow": "Pow"}
UNARY = {sp.exp: "Exp", sp.log: "Log", sp.tanh: "Tanh", sp.sinh: "Sinh", sp.cosh: "Cosh", sp.sin: "Sin",
         sp.cos: "Cos", sp.atan: "Atan", sp.erf: "Erf", sp.Abs: "Abs", sp.sign: "Sign"}
COMPARISONS = {sp.StrictGreaterThan: "Greater", sp.StrictLessThan: "Less", sp.GreaterThan: "GreaterOrEqual",
               sp.LessThan: "LessOrEqual", sp.Equality: "Equal"}


def _broadcast(shapes: list[tuple]) -> tuple:
    """NumPy's broadcast of shapes whose runtime dims (names) match only themselves."""
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(ndim):
        dims = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0} - {1}
        out.append(dims.pop() if len(dims) == 1 else 1 if not dims else None)
    return tuple(out)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'bpcompile[onnx]'") from None
    return onnx


class _Exporter:
    """Builds the ONNX graph of the nodes that the outputs need, each once."""

    def __init__(self, model: Any, graph: Graph):
        self.onnx = _onnx()
        self.model, self.graph = model, graph
        self.np_dtype = model.dtype
        self.elem = self.onnx.helper.np_dtype_to_tensor_dtype(model.dtype)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.names: dict[Node, str] = {}
        self.count = 0

    # --- bookkeeping -------------------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def emit(self, op: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self.fresh(stem)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def constant(self, value: Any, dtype: Any = None) -> str:
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        name = self.fresh("const")
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def value(self, node: Node) -> str:
        """The ONNX name of the tensor `node` computes, emitting its nodes the first time."""
        name = self.names.get(node)
        if name is None:
            method = getattr(self, f"op_{node.op}", None)
            if method is None:
                raise CompileError(f"to_onnx: node {node!r} (op {node.op!r}) has no ONNX export")
            name = self.names[node] = method(node)
        return name

    def _dims(self, shape: tuple) -> list[Any]:
        return [d if isinstance(d, int) else str(d) for d in shape]

    # --- leaves ------------------------------------------------------------------------------
    def op_input(self, node: Node) -> str:
        name = node.attrs["name"]
        elem = self.elem if node.dtype == "float" else self.onnx.TensorProto.INT32
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, elem, self._dims(node.shape)))
        return name

    def op_param(self, node: Node) -> str:
        name = node.attrs["name"]
        value = np.asarray(self.model.params[name], dtype=self.np_dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    # --- elementwise -------------------------------------------------------------------------
    def op_ew(self, node: Node) -> str:
        fn = node.attrs["fn"]
        args = [self.value(i) for i in node.inputs]
        if fn.nargs == 0:
            if not all(isinstance(d, int) for d in node.shape):
                raise CompileError(f"to_onnx: constant {node!r} has a runtime shape")
            return self.constant(np.full(node.shape, float(fn.expr)))
        if fn.name in OPERATORS and fn.name in BUILTIN and fn is builtin(fn.name):
            out = self.emit(OPERATORS[fn.name], args, fn.name)
        else:
            out = self.expression(fn.expr, args, node)
        return self._expand(out, node)

    def _expand(self, out: str, node: Node) -> str:
        """Broadcast to the node's shape where its operands alone do not reach it."""
        if _broadcast([i.shape for i in node.inputs]) == tuple(node.shape):
            return out
        if not all(isinstance(d, int) for d in node.shape):
            raise CompileError(f"to_onnx: node {node!r} broadcasts to a runtime shape")
        return self.emit("Expand", [out, self.constant(node.shape, np.int64)], "expand")

    def expression(self, expr: sp.Expr, args: list[str], node: Node) -> str:
        """ONNX nodes computing a SymPy expression of ARGS (the node's operands)."""
        def print_(e: sp.Expr) -> str:
            if e in ARGS[:len(args)]:
                return args[ARGS.index(e)]
            if e.is_Number:
                return self.constant(float(e))
            if isinstance(e, sp.Symbol) and is_dim_symbol(e):
                raise CompileError(f"to_onnx: node {node!r} uses the runtime size {e} inside an elementwise function")
            if isinstance(e, sp.Add | sp.Mul):
                terms = [print_(a) for a in e.args]
                out = terms[0]
                for t in terms[1:]:
                    out = self.emit("Add" if isinstance(e, sp.Add) else "Mul", [out, t], "ew")
                return out
            if isinstance(e, sp.Pow):
                base, exponent = e.args
                if exponent == sp.Rational(1, 2):
                    return self.emit("Sqrt", [print_(base)], "ew")
                if exponent == -1:
                    return self.emit("Reciprocal", [print_(base)], "ew")
                return self.emit("Pow", [print_(base), print_(exponent)], "ew")
            if type(e) in UNARY:
                return self.emit(UNARY[type(e)], [print_(e.args[0])], "ew")
            if isinstance(e, sp.Max | sp.Min):
                return self.emit("Max" if isinstance(e, sp.Max) else "Min", [print_(a) for a in e.args], "ew")
            if isinstance(e, sp.Piecewise):
                return piecewise(list(e.args))
            if isinstance(e, sp.Heaviside):
                x = print_(e.args[0])
                return self.emit("Where", [self.emit("Greater", [x, self.constant(0.0)], "ew"),
                                           self.constant(1.0), self.constant(0.0)], "ew")
            raise CompileError(f"to_onnx: node {node!r}: the elementwise function {node.attrs['fn'].name!r} uses "
                               f"{type(e).__name__} ({e}), which has no ONNX export")

        def piecewise(pieces: list) -> str:
            (value, condition), rest = pieces[0], pieces[1:]
            if condition is sp.true or not rest:
                return print_(value)
            if type(condition) not in COMPARISONS:
                raise CompileError(f"to_onnx: node {node!r}: condition {condition} has no ONNX export")
            test = self.emit(COMPARISONS[type(condition)], [print_(condition.lhs), print_(condition.rhs)], "ew")
            return self.emit("Where", [test, print_(value), piecewise(rest)], "ew")

        return print_(expr)

    # --- structure ---------------------------------------------------------------------------
    def op_mode_select(self, node: Node) -> str:
        return self.value(node.inputs[1])  # the evaluation branch: running statistics, no dropout

    def op_reduce(self, node: Node) -> str:
        x = self.value(node.inputs[0])
        axes = list(node.attrs["axes"]) or list(range(len(node.inputs[0].shape)))
        keep = int(bool(node.attrs["keepdims"]))
        if node.attrs["mean"]:
            return self.emit("ReduceMean", [x], "mean", axes=axes, keepdims=keep)
        return self.emit("ReduceSum", [x, self.constant(axes, np.int64)], "sum", keepdims=keep)

    def op_reshape(self, node: Node) -> str:
        x = node.inputs[0]
        target = []
        for i, d in enumerate(node.shape):
            if isinstance(d, int):
                target.append(d)
            elif i < len(x.shape) and x.shape[i] == d:
                target.append(0)  # ONNX: copy the input's size
            else:
                target.append(-1)
        if target.count(-1) > 1:
            raise CompileError(f"to_onnx: reshape {node!r} has more than one runtime size to infer")
        return self.emit("Reshape", [self.value(x), self.constant(target, np.int64)], "reshape")

    def op_transpose(self, node: Node) -> str:
        conv = self._conv(node)
        if conv is not None:
            return conv
        return self.emit("Transpose", [self.value(node.inputs[0])], "transpose", perm=list(node.attrs["axes"]))

    def _conv(self, node: Node) -> str | None:
        """conv2d's transpose(matmul(im2col(x), reshape(w), tb), (0, 3, 1, 2)) as one Conv."""
        product = node.inputs[0]
        if tuple(node.attrs["axes"]) != (0, 3, 1, 2) or product.op != "matmul" or product.attrs["ta"] \
                or not product.attrs["tb"]:
            return None
        cols, wmat = product.inputs
        if cols.op != "im2col" or wmat.op != "reshape":
            return None
        (kh, kw), (sh, sw), (ph, pw) = cols.attrs["kernel"], cols.attrs["stride"], cols.attrs["padding"]
        w = wmat.inputs[0]
        return self.emit("Conv", [self.value(cols.inputs[0]), self.value(w)], "conv", kernel_shape=[kh, kw],
                         strides=[sh, sw], pads=[ph, pw, ph, pw])

    def _transposed_last(self, name: str, ndim: int) -> str:
        perm = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return self.emit("Transpose", [name], "transpose", perm=perm)

    def op_matmul(self, node: Node) -> str:
        a, b = node.inputs
        left, right = self.value(a), self.value(b)
        if node.attrs["ta"]:
            left = self._transposed_last(left, a.ndim)
        if node.attrs["tb"]:
            right = self._transposed_last(right, b.ndim)
        return self.emit("MatMul", [left, right], "matmul")

    op_bmatmul = op_matmul

    def op_softmax(self, node: Node) -> str:
        return self.emit("Softmax", [self.value(node.inputs[0])], "softmax", axis=-1)

    def op_log_softmax(self, node: Node) -> str:
        return self.emit("LogSoftmax", [self.value(node.inputs[0])], "log_softmax", axis=-1)

    def _pool(self, node: Node, op: str) -> str:
        return self.emit(op, [self.value(node.inputs[0])], node.op, kernel_shape=list(node.attrs["kernel"]),
                         strides=list(node.attrs["stride"]))

    def op_max_pool2d(self, node: Node) -> str:
        return self._pool(node, "MaxPool")

    def op_avg_pool2d(self, node: Node) -> str:
        return self._pool(node, "AveragePool")

    def op_embedding(self, node: Node) -> str:
        ids, table = node.inputs
        return self.emit("Gather", [self.value(table), self.value(ids)], "embedding", axis=0)

    def op_concat(self, node: Node) -> str:
        return self.emit("Concat", [self.value(i) for i in node.inputs], "concat", axis=node.attrs["axis"])

    def op_slice(self, node: Node) -> str:
        axis, begin = node.attrs["axis"], node.attrs["begin"]
        length = node.shape[axis]
        if not isinstance(length, int):
            raise CompileError(f"to_onnx: slice {node!r} has a runtime length")
        return self.emit("Slice", [self.value(node.inputs[0]), self.constant([begin], np.int64),
                                   self.constant([begin + length], np.int64), self.constant([axis], np.int64)],
                         "slice")

    # --- the model ---------------------------------------------------------------------------
    def model_proto(self, opset: int) -> Any:
        helper = self.onnx.helper
        outputs = []
        for name, node in self.graph.outputs.items():
            self.nodes.append(helper.make_node("Identity", [self.value(node)], [name], name=f"output_{name}"))
            outputs.append(helper.make_tensor_value_info(name, self.elem, self._dims(node.shape)))
        graph = helper.make_graph(self.nodes, self.graph.name, self.inputs, outputs, self.initializers)
        proto = helper.make_model(graph, producer_name="bpcompile", opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = min(proto.ir_version, 10)  # readable by ONNX Runtime releases of the last years
        return proto


def to_onnx(model: Any, path: str | os.PathLike | None = None, opset: int | None = None,
            graph: Graph | None = None) -> Any:
    """The model's evaluation-mode forward graph with its current parameters as an ONNX
    ModelProto, checked by onnx.checker (full check); written to `path` (atomically) if given.
    `graph` is the graph the model was compiled from (a model from bp.compile knows it)."""
    graph = graph if graph is not None else getattr(model, "graph", None)
    if graph is None:
        raise InputError("to_onnx needs the graph the model was compiled from: pass graph= for a model "
                         "loaded with bp.load")
    if not graph.outputs:
        raise InputError(f"model {model.name!r} declares no outputs to export (use g.output(name, tensor))")
    onnx = _onnx()
    proto = _Exporter(model, graph).model_proto(opset or DEFAULT_OPSET)
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        from ..runtime.model import write_atomic
        data = proto.SerializeToString()
        write_atomic(Path(path), lambda f: f.write(data))
    return proto
