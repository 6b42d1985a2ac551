"""What an ONNX tensor is during the import: a graph Node, a constant np.ndarray, or a value
kept until its consumer (a condition, a test for inf, a causal mask, a cut constant buffer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp

from ...ir.graph import Node, broadcast_shapes
from ...ops import core as ops
from ...symbolic.functions import ARGS, Fn

if TYPE_CHECKING:
    from .importer import _Importer

Value = Any  # a graph Node, a constant np.ndarray known at import time (an object array holds
# runtime sizes: bpcompile dims, names or products of them), or a value kept until its consumer:
# _Condition, _Infinite, _Causal, _Window


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


_INFINITE = "a test for inf is supported only in the guard Where(ReduceMax(s) == -inf, 0, Softmax(s))"


def _select(expr: Any, operands: list[Node], name: str) -> Node:
    """ew of an expression of _C[:len(operands)]."""
    fn = Fn(name, expr.xreplace(dict(zip(_C, ARGS))), len(operands))
    return ops.ew(fn, *operands)


def _is_tril(values: np.ndarray, rows: int, cols: int) -> bool:
    return values.shape[-2:] == (rows, cols) and values.size == rows * cols and \
        np.array_equal(values.reshape(rows, cols), np.tril(np.ones((rows, cols), dtype=bool)))


def _widen(node: Node, shape: tuple) -> Node:
    """`node` broadcast to `shape` (ONNX's result shape, which constants may widen)."""
    return node if node.shape == tuple(shape) else ops.ew(Fn("expand", ARGS[0], 1), node, shape=tuple(shape))
