"""Embedding lookup: rows of a table picked by int32 ids, whose kernel checks every id; its
gradient adds the incoming rows back into the table's rows (`embedding_grad`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, INT, Node, shape_str
from ..ir.kernel import Kernel
from .core import _check_tensor, _need_float, register, register_kernel
from .display import ATOM, Notation, Shown, called
from .shared import _c

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["embedding"]


def embedding(ids: Node, table: Node) -> Node:
    """Rows of `table` (V, D) picked by the int32 `ids` (any shape): shape ids.shape + (D,).
    An id outside [0, V) makes the call raise InputError (the kernel checks every id)."""
    _check_tensor(ids, "embedding")
    _check_tensor(table, "embedding")
    if ids.dtype != INT:
        raise ShapeError(f"embedding: ids must be an int32 tensor, got {ids.dtype} {shape_str(ids.shape)}")
    _need_float(table, "embedding table")
    if table.ndim != 2 or not all(isinstance(d, int) for d in table.shape):
        raise ShapeError(f"embedding: table must be (vocabulary, dim) with fixed sizes, got {shape_str(table.shape)}")
    return Node("embedding", (ids, table), {"classes": table.shape[0], "label_arg": 0},
                (*ids.shape, table.shape[1]), FLOAT)


def _embedding_vjp(node: Node, g: Node) -> list[Node | None]:
    ids, table = node.inputs
    return [None, Node("embedding_grad", (g, ids), {"classes": table.shape[0], "label_arg": 1}, table.shape, FLOAT)]


def _embedding_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    ids, table = args
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(f"embedding: ids must be in [0, {table.shape[0]})")
    return table[ids]


def _embedding_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g, ids = args
    out = np.zeros(node.shape)
    np.add.at(out, ids.reshape(-1).astype(np.int64), g.reshape(-1, node.shape[1]))
    return out


def _embedding_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    grad = node.op == "embedding_grad"
    ids = node.inputs[1] if grad else node.inputs[0]
    return {"grad": grad, "count": _c(ctx, *ids.shape), "V": node.attrs["classes"],
            "D": node.shape[-1]}


def _embedding_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """table[indices]: the rows of the table the indices pick."""
    return f"{n.at_least(args[1], ATOM)}[{args[0][0]}]", ATOM


register("embedding", vjp=_embedding_vjp, ref=_embedding_ref, kernel="embedding", display=_embedding_display)


def _embedding_grad_vjp(node: Node, g: Node) -> list[Node | None]:
    """embedding_grad adds rows of its cotangent into the table's rows: linear in it, so its VJP
    picks the rows back out (an embedding lookup of g)."""
    _, ids = node.inputs
    return [embedding(ids, g), None]


register("embedding_grad", vjp=_embedding_grad_vjp, ref=_embedding_grad_ref, kernel="embedding",
         display=called("scatter_add"))
register_kernel("embedding", _embedding_builder, failing=True)
