"""Export a compiled model's evaluation-mode forward graph to ONNX.

    bp.to_onnx(model, "model.onnx")   # the current parameters become initializers

Each graph node becomes one or a few ONNX nodes, named after the graph node it computes:
elementwise functions are printed from their SymPy expression (the builtins as their ONNX
operator, e.g. relu -> Relu; any other expression term by term: Add, Mul, Pow, Exp, Where for a
Piecewise, so where / masked_fill too, ...), the im2col + GEMM + transpose of a conv2d as one
Conv, pools as MaxPool / AveragePool, batch norm and dropout through their evaluation branch.
The transformer ops: constant -> a Constant node (float initializers are the parameters only),
layer_norm with the weight and bias after it -> one LayerNormalization (from opset 17; its
decomposition before), amax / amin -> ReduceMax / ReduceMin (axes an input from opset 18),
bmatmul's transposed operands -> Transpose + MatMul, fused attention -> what it fuses (the layout ops
of its operands, MatMul, the softmax, MatMul), attention_softmax -> Mul by the scale, the
causal mask as Where (a constant, or Trilu of the runtime length), Softmax, and zeros for rows
with no allowed key when a mask may leave one. Recurrent layers (bp.lstm / bp.gru / bp.rnn) ->
one ONNX LSTM / GRU / RNN node each, not unrolled: X is the layer's input (time first), W, R and
B its weights and biases with the gate blocks moved to ONNX's order by Slice + Concat (so the
parameters stay the initializers), initial states left out when zeros; the hidden states, the
last hidden and cell states are what bpcompile's layers return. Named runtime dims (the batch, a
sequence length) stay dynamic (ONNX dim_params); a reshape target holding several of them is
built from the graph inputs' runtime sizes (Shape, Gather, Mul, Concat). A node without an ONNX form raises
CompileError naming it.

The onnx package is the optional extra `bpcompile[onnx]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from ..errors import CompileError, InputError
from ..ir.graph import Graph, Node, dim_factors
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
LOGIC = {sp.And: "And", sp.Or: "Or", sp.Xor: "Xor"}
# the opset from which a reduction takes its axes as an input rather than an attribute
AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18}


def _broadcast(shapes: list[tuple]) -> tuple:
    """NumPy's broadcast of shapes whose runtime dims (names) match only themselves."""
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(ndim):
        dims = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0} - {1}
        out.append(dims.pop() if len(dims) == 1 else 1 if not dims else None)
    return tuple(out)


def _is_builtin(node: Node, name: str) -> bool:
    """Whether `node` applies the builtin elementwise `name` to two tensors."""
    return node.op == "ew" and len(node.inputs) == 2 and node.attrs["fn"] is builtin(name)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'bpcompile[onnx]'") from None
    return onnx


# a recurrent core's ONNX operator, and where bpcompile's (PyTorch's) gate blocks go in ONNX's
# order: LSTM (i, o, f, c) from (i, f, g, o), GRU (z, r, h) from (r, z, n)
RECURRENT = {"lstm_core": ("LSTM", (0, 3, 1, 2)), "gru_core": ("GRU", (1, 0, 2)), "rnn_core": ("RNN", (0,))}


def _projection(core: Node) -> tuple[Node, Node, Node | None, Node | None]:
    """(x, W_ih, b_ih, b_hh) of a recurrent core's input projection x W_ih^T + bias, as
    bp.lstm / bp.gru / bp.rnn build it (GRU's b_hh is an input of its core)."""
    xp, bias = core.inputs[0], None
    if _is_builtin(xp, "add"):
        xp, bias = xp.inputs
    if xp.op != "matmul" or xp.attrs["ta"] or not xp.attrs["tb"]:
        raise CompileError(f"to_onnx: node {core!r}: its input is not the projection x @ W_ih.T (+ bias) that "
                           "bp.lstm / bp.gru / bp.rnn build")
    x, w_ih = xp.inputs
    if core.op == "gru_core":
        return x, w_ih, bias, core.inputs[2]
    if bias is not None and _is_builtin(bias, "add") and all(b.shape == bias.shape for b in bias.inputs):
        return (x, w_ih, *bias.inputs)  # b_ih + b_hh
    return x, w_ih, bias, None


def _states(core: Node) -> list[Node]:
    """A recurrent core's initial states: h0 (and c0 for an LSTM)."""
    return list(core.inputs[2:4]) if core.op == "lstm_core" else [core.inputs[-1]]


class _Exporter:
    """Builds the ONNX graph of the nodes that the outputs need, each once."""

    def __init__(self, model: Any, graph: Graph, opset: int = DEFAULT_OPSET):
        self.onnx = _onnx()
        self.model, self.graph, self.opset = model, graph, opset
        self.np_dtype = model.dtype
        self.elem = self.onnx.helper.np_dtype_to_tensor_dtype(model.dtype)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.names: dict[Node, str] = {}
        self.recurrent: dict[Node, dict[str, str]] = {}  # a recurrent core's ONNX outputs
        self.sizes: dict[str, str] = {}  # a runtime size, read from a graph input
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
        """A fixed tensor: an initializer, or a Constant node for a float array (initializers
        of floats are the parameters, which bp.from_onnx makes trainable)."""
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        name = self.fresh("const")
        tensor = self.onnx.numpy_helper.from_array(array, name)
        if array.dtype.kind == "f" and array.ndim > 0:
            self.nodes.append(self.onnx.helper.make_node("Constant", [], [name], name=name, value=tensor))
        else:
            self.initializers.append(tensor)
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

    def reduce(self, op: str, x: str, axes: list[int], keepdims: bool, stem: str) -> str:
        """A reduction, its axes an input or an attribute as the opset wants."""
        if self.opset >= AXES_AS_INPUT[op]:
            return self.emit(op, [x, self.constant(axes, np.int64)], stem, keepdims=int(keepdims))
        return self.emit(op, [x], stem, axes=axes, keepdims=int(keepdims))

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

    def op_constant(self, node: Node) -> str:
        return self.constant(node.attrs["values"])

    # --- elementwise -------------------------------------------------------------------------
    def op_ew(self, node: Node) -> str:
        fused = self._affine_layer_norm(node)
        if fused is not None:
            return fused
        fn = node.attrs["fn"]
        args = [self.value(i) if i.dtype == "float" else self.emit("Cast", [self.value(i)], "cast", to=self.elem)
                for i in node.inputs]  # int operands (a mask, a condition) as floats
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

        def test(c: Any) -> str:
            if type(c) in COMPARISONS:
                return self.emit(COMPARISONS[type(c)], [print_(c.lhs), print_(c.rhs)], "ew")
            if isinstance(c, sp.Unequality):
                return self.emit("Not", [self.emit("Equal", [print_(c.lhs), print_(c.rhs)], "ew")], "ew")
            if isinstance(c, sp.Not):
                return self.emit("Not", [test(c.args[0])], "ew")
            if type(c) in LOGIC:
                out = test(c.args[0])
                for a in c.args[1:]:
                    out = self.emit(LOGIC[type(c)], [out, test(a)], "ew")
                return out
            raise CompileError(f"to_onnx: node {node!r}: condition {c} has no ONNX export")

        def piecewise(pieces: list) -> str:
            (value, condition), rest = pieces[0], pieces[1:]
            if condition is sp.true or not rest:
                return print_(value)
            return self.emit("Where", [test(condition), print_(value), piecewise(rest)], "ew")

        return print_(expr)

    # --- structure ---------------------------------------------------------------------------
    def op_mode_select(self, node: Node) -> str:
        return self.value(node.inputs[1])  # the evaluation branch: running statistics, no dropout

    def op_reduce(self, node: Node) -> str:
        axes = list(node.attrs["axes"]) or list(range(len(node.inputs[0].shape)))
        op = "ReduceMean" if node.attrs["mean"] else "ReduceSum"
        return self.reduce(op, self.value(node.inputs[0]), axes, node.attrs["keepdims"], op[6:].lower())

    def op_amax(self, node: Node) -> str:
        return self.reduce("ReduceMax", self.value(node.inputs[0]), list(node.attrs["axes"]), node.attrs["keepdims"],
                           "max")

    def op_amin(self, node: Node) -> str:
        return self.reduce("ReduceMin", self.value(node.inputs[0]), list(node.attrs["axes"]), node.attrs["keepdims"],
                           "min")

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
        shape = self._runtime_shape(node.shape) if target.count(-1) > 1 else self.constant(target, np.int64)
        return self.emit("Reshape", [self.value(x), shape], "reshape")

    def _runtime_shape(self, shape: tuple) -> str:
        """A shape holding runtime sizes as an int64 tensor, each dim the product of its fixed
        factor and its named factors read from the graph's inputs: (T*batch, C) -> (batch, T, C)
        has two sizes to infer, which ONNX's -1 cannot."""
        dims = []
        for d in shape:
            coef, names = dim_factors(d)
            factors = [self._size(n) for n in names] + ([self.constant([coef], np.int64)] if coef != 1 else [])
            size = factors[0]
            for f in factors[1:]:
                size = self.emit("Mul", [size, f], "size")
            dims.append(size)
        return self.emit("Concat", dims, "target", axis=0)

    def _size(self, name: str) -> str:
        """The runtime size `name` as a 1-element int64 tensor: Shape and Gather of a graph input
        that declares it (one the exported outputs already need, where there is one)."""
        if name not in self.sizes:
            inputs = sorted(self.graph.inputs.values(), key=lambda n: n not in self.names)
            source = next((n for n in inputs if name in n.shape), None)
            if source is None:
                raise CompileError(f"to_onnx: no input of graph {self.graph.name!r} declares the runtime size {name!r}")
            shape = self.emit("Shape", [self.value(source)], "shape")
            index = self.constant([source.shape.index(name)], np.int64)
            self.sizes[name] = self.emit("Gather", [shape, index], name, axis=0)
        return self.sizes[name]

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

    def op_attention_softmax(self, node: Node) -> str:
        """softmax(scale · s) over the last axis, keys j > i masked when causal; a row with no
        allowed key (every score -inf from a mask) gives zeros, as the bpcompile kernel."""
        x = node.inputs[0]
        s = self.value(x)
        if node.attrs["scale"] != 1.0:
            s = self.emit("Mul", [s, self.constant(node.attrs["scale"])], "scale")
        if node.attrs["causal"]:
            s = self.emit("Where", [self._causal(s, node.shape), s, self.constant(-np.inf)], "causal")
        p = self.emit("Softmax", [s], "softmax", axis=-1)
        if not (x.op == "ew" and x.attrs["fn"].expr.has(-sp.oo)):
            return p  # no score is -inf: every row has an allowed key
        top = self.reduce("ReduceMax", s, [-1], True, "row_max")
        empty = self.emit("Equal", [top, self.constant(-np.inf)], "empty_row")
        return self.emit("Where", [empty, self.constant(0.0), p], "attention")

    def op_attention(self, node: Node) -> str:
        """The fused attention node as the bmatmul / attention_softmax / bmatmul it computes."""
        from ..ops.attention_fused import decompose
        return self.value(decompose(node))

    def _causal(self, s: str, shape: tuple) -> str:
        """The boolean (T, S) mask of keys j <= i: a constant, or Trilu of ones of s's last two
        dims when one of them is a runtime size."""
        rows, cols = shape[-2:]
        if isinstance(rows, int) and isinstance(cols, int):
            return self.constant(np.tril(np.ones((rows, cols), dtype=bool)), np.bool_)
        dims = self.emit("Slice", [self.emit("Shape", [s], "shape"), self.constant([-2], np.int64),
                                   self.constant([2**63 - 1], np.int64)], "dims")
        ones = self.emit("ConstantOfShape", [dims], "ones",
                         value=self.onnx.numpy_helper.from_array(np.ones(1, dtype=self.np_dtype)))
        lower = self.emit("Trilu", [ones], "tril", upper=0)
        return self.emit("Cast", [lower], "causal_mask", to=self.onnx.TensorProto.BOOL)

    def op_layer_norm(self, node: Node) -> str:
        """x̂ over the last axis: LayerNormalization with unit scale (weight and bias are the
        elementwise nodes after it), or its decomposition before opset 17."""
        x, eps = self.value(node.inputs[0]), node.attrs["eps"]
        if self.opset >= 17:
            ones = self.constant(np.ones(node.shape[-1]))
            return self.emit("LayerNormalization", [x, ones], "layer_norm", axis=-1, epsilon=eps)
        centered = self.emit("Sub", [x, self.reduce("ReduceMean", x, [-1], True, "ln_mean")], "ln_centered")
        var = self.reduce("ReduceMean", self.emit("Mul", [centered, centered], "ln_square"), [-1], True, "ln_var")
        std = self.emit("Sqrt", [self.emit("Add", [var, self.constant(eps)], "ln_var_eps")], "ln_std")
        return self.emit("Div", [centered, std], "layer_norm")

    def _affine_layer_norm(self, node: Node) -> str | None:
        """layer_norm(x) * w (+ b), w and b of the last axis' size, as one LayerNormalization."""
        if self.opset < 17:
            return None
        product, bias = node, None
        if _is_builtin(node, "add"):
            product, bias = node.inputs if _is_builtin(node.inputs[0], "mul") else node.inputs[::-1]
        if not _is_builtin(product, "mul"):
            return None
        ln, weight = product.inputs if product.inputs[0].op == "layer_norm" else product.inputs[::-1]
        row = (ln.shape[-1],) if ln.op == "layer_norm" else None
        if row is None or weight.shape != row or (bias is not None and bias.shape != row) or product.shape != ln.shape \
                or node.shape != ln.shape:
            return None
        inputs = [self.value(ln.inputs[0]), self.value(weight)] + ([self.value(bias)] if bias is not None else [])
        return self.emit("LayerNormalization", inputs, "layer_norm", axis=-1, epsilon=ln.attrs["eps"])

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
        recurrent = self._recurrent_slice(node)
        if recurrent is not None:
            return recurrent
        axis, begin = node.attrs["axis"], node.attrs["begin"]
        length = node.shape[axis]
        if not isinstance(length, int):
            raise CompileError(f"to_onnx: slice {node!r} has a runtime length")
        end = 2**63 - 1 if begin < 0 and begin + length == 0 else begin + length  # a window up to the end
        return self._slice(self.value(node.inputs[0]), begin, end, axis)

    def _slice(self, name: str, begin: int, end: int, axis: int) -> str:
        return self.emit("Slice", [name, self.constant([begin], np.int64), self.constant([end], np.int64),
                                   self.constant([axis], np.int64)], "slice")

    # --- recurrent layers ----------------------------------------------------------------------
    def op_lstm_core(self, node: Node) -> str:
        raise CompileError(f"to_onnx: node {node!r}: only the hidden states of an LSTM and its last cell state have "
                           "an ONNX form, not the cell states of every step")

    def op_gru_core(self, node: Node) -> str:
        return self._recurrent(node)["seq"]

    op_rnn_core = op_gru_core

    def _recurrent_slice(self, node: Node) -> str | None:
        """An LSTM's hidden states (B, T, H) sliced out of its core's (B, T, 2H), and the last
        step of its cell states (B, 1, H): the ONNX LSTM's Y and Y_c."""
        x = node.inputs[0]
        axis, begin = node.attrs["axis"], node.attrs["begin"]
        if x.op == "lstm_core" and axis == 2 and begin == 0 and node.shape[2] * 2 == x.shape[2]:
            return self._recurrent(x)["seq"]
        if not (x.op == "slice" and x.inputs[0].op == "lstm_core" and x.attrs["begin"] > 0 and axis == 1):
            return None
        steps = x.shape[1]
        if begin != (steps - 1 if isinstance(steps, int) else -1) or node.shape[1] != 1:
            return None  # other steps of the cell states: op_lstm_core refuses them
        shape = self.constant([-1, 1, x.shape[2]], np.int64)
        return self.emit("Reshape", [self._recurrent(x.inputs[0])["c"], shape], "last_cell")

    def _recurrent(self, core: Node) -> dict[str, str]:
        """The ONNX LSTM / GRU / RNN (forward, layout 0) computing a recurrent core, emitted once:
        {"seq": hidden states (B, T, H), "c": the last cell state (1, B, H)}. Its X is the input
        of the core's projection, W and B that projection's weight and bias (gates in ONNX's
        order), R the recurrent weight."""
        names = self.recurrent.get(core)
        if names is not None:
            return names
        op, order = RECURRENT[core.op]
        x, w_ih, b_ih, b_hh = _projection(core)
        w_hh = core.inputs[1]
        hidden = w_hh.shape[1]
        stem = core.op[:-5]
        weights = [self._stacked(self._gates(self.value(t), order, hidden), t.shape) for t in (w_ih, w_hh)]
        biases = [b_ih, b_hh]
        if any(b is not None for b in biases):
            parts = [self._gates(self.value(b), order, hidden) if b is not None
                     else self.constant(np.zeros(len(order) * hidden)) for b in biases]
            bias = self.emit("Concat", parts, f"{stem}_bias", axis=0)
            weights.append(self._stacked(bias, (2 * len(order) * hidden,)))
        else:
            weights.append("")
        inputs = [self.emit("Transpose", [self.value(x)], f"{stem}_x", perm=[1, 0, 2]), *weights, ""]
        inputs += [self._initial(s, hidden) for s in _states(core)]
        while not inputs[-1]:  # optional inputs left out at the end
            inputs.pop()
        outputs = [self.fresh(f"{stem}_{part}") for part in ("y", "h", "c")[:3 if op == "LSTM" else 2]]
        attrs = {"linear_before_reset": 1} if op == "GRU" else {}
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=self.fresh(stem), hidden_size=hidden,
                                                     **attrs))
        y = self.emit("Reshape", [outputs[0], self.constant([0, -1, hidden], np.int64)], f"{stem}_seq")  # (T, B, H)
        names = {"seq": self.emit("Transpose", [y], f"{stem}_seq", perm=[1, 0, 2]), "c": outputs[-1]}
        self.recurrent[core] = names
        return names

    def _gates(self, name: str, order: tuple[int, ...], hidden: int) -> str:
        """The gate blocks (rows) of a weight or bias in ONNX's order."""
        if len(order) == 1:
            return name
        blocks = [self._slice(name, k * hidden, (k + 1) * hidden, 0) for k in order]
        return self.emit("Concat", blocks, "gates", axis=0)

    def _stacked(self, name: str, shape: tuple) -> str:
        """A tensor with a leading axis of one direction."""
        return self.emit("Reshape", [name, self.constant([1, *shape], np.int64)], "direction")

    def _initial(self, state: Node, hidden: int) -> str:
        """initial_h / initial_c (1, B, H), or "" for zeros (ONNX's default)."""
        if state.op == "ew" and not state.inputs and state.attrs["fn"].expr == 0:
            return ""
        return self.emit("Reshape", [self.value(state), self.constant([1, -1, hidden], np.int64)], "initial")

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
    opset = opset or DEFAULT_OPSET
    proto = _Exporter(model, graph, opset).model_proto(opset)
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        from ..runtime.model import write_atomic
        data = proto.SerializeToString()
        write_atomic(Path(path), lambda f: f.write(data))
    return proto
