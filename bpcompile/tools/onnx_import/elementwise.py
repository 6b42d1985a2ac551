"""Elementwise operators and reductions: arithmetic (of tensors, or of runtime sizes), masks
added as constants holding inf, activations, SymPy functions, Max/Min, Reduce*."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy as sp

from ...ir.graph import Node, broadcast_shapes
from ...ops import core as ops
from ...ops import transformer
from .importer import _Importer, _op
from .layout import _axes, _size_arithmetic
from .reading import _plain
from .values import Value, _Causal, _widen

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


_REDUCE = {"ReduceMean": ops.mean, "ReduceSum": ops.sum, "ReduceMax": transformer.max, "ReduceMin": transformer.min}


@_op(*_REDUCE)
def _reduce(im: _Importer, args: list) -> Node:
    attrs = im.only({"axes": None, "keepdims": None, "noop_with_empty_axes": 0})
    x = im.tensor(args[0])
    axes = _axes(im, args, attrs)
    keep = bool(attrs.get("keepdims", 1))
    return _REDUCE[im.node.op_type](x, axis=None if not axes else tuple(axes), keepdims=keep)
