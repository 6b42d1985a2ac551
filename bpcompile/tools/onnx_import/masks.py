"""Conditions and attention masks: comparisons, logic and Where on SymPy conditions of graph
tensors, Trilu, and the Softmax that recognizes a causal mask as the fused causal softmax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy as sp

from ...ir.graph import Node, broadcast_shapes
from ...ops import core as ops
from ...ops import transformer
from ...symbolic.functions import ARGS, builtin
from .importer import _Importer, _op
from .values import _C, _CAUSAL, _INFINITE, _LOWEST, Value, _Causal, _Condition, _Infinite, _is_tril, _select, _widen

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
