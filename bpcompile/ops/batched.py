"""Batched matrix products: `a @ b` with NumPy's `matmul` semantics when both operands have
leading (batch) dims, e.g. (B, H, T, d) @ (B, H, d, S) or (H, T, d) @ (B, H, d, S).

The op "bmatmul" follows ops/core.py's pattern: its shape rule broadcasts the leading dims (runtime
dims allowed there), its VJP is two batched products summed back over broadcast dims (graph
ops, so gradients of gradients work), its reference is `numpy.matmul`, and its kernel
(templates/bmatmul.c.j2) is a loop of GEMM calls over the batch, split across the thread pool
by batch. `ta` / `tb` read an operand's last two axes transposed (the GEMM flags), and a
simplify rule folds `transpose(x, (..., -1, -2))` operands into them: no transposed copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, broadcast_shapes, shape_str
from ..ir.kernel import Kernel, Mono, broadcast_strides, coalesce, contiguous_strides
from .core import concrete, matmul_display, register, register_kernel, register_rewrite, reshape, unbroadcast

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["bmatmul"]


def _rows_cols(x: Node, transposed: bool) -> tuple[Any, Any]:
    r, c = x.shape[-2], x.shape[-1]
    return (c, r) if transposed else (r, c)


def bmatmul(a: Node, b: Node, ta: bool = False, tb: bool = False) -> Node:
    """op(a) @ op(b) over broadcast leading dims; both operands at least 2-D."""
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"matmul: batched operands must be at least 2-D, got {shape_str(a.shape)} @ "
                         f"{shape_str(b.shape)}")
    m, ka = _rows_cols(a, ta)
    kb, n = _rows_cols(b, tb)
    if ka != kb:
        raise ShapeError(f"matmul: shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not align: "
                         f"contracted dims {ka!r} != {kb!r}")
    try:
        lead = broadcast_shapes([a.shape[:-2], b.shape[:-2]], ["left batch dims", "right batch dims"])
    except ShapeError as e:
        raise ShapeError(f"matmul: {shape_str(a.shape)} @ {shape_str(b.shape)}: {e}") from None
    return Node("bmatmul", (a, b), {"ta": bool(ta), "tb": bool(tb)}, tuple(lead) + (m, n), FLOAT)


def batched_matmul(a: Node, b: Node) -> Node:
    """NumPy matmul of operands of which one has more than 2 dims and the other at least 1."""
    if a.ndim == 1:
        out = bmatmul(reshape(a, (1, a.shape[0])), b)
        return reshape(out, out.shape[:-2] + out.shape[-1:])
    if b.ndim == 1:
        out = bmatmul(a, reshape(b, (b.shape[0], 1)))
        return reshape(out, out.shape[:-1])
    return bmatmul(a, b)


def _bmatmul_vjp(node: Node, g: Node) -> list[Node]:
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    da = bmatmul(b, g, tb, True) if ta else bmatmul(g, b, False, not tb)
    db = bmatmul(g, a, True, ta) if tb else bmatmul(a, g, not ta, False)
    return [unbroadcast(da, a.shape), unbroadcast(db, b.shape)]


def _bmatmul_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    a, b = args
    a = np.swapaxes(a, -1, -2) if node.attrs["ta"] else a
    b = np.swapaxes(b, -1, -2) if node.attrs["tb"] else b
    return np.matmul(a, b).reshape(concrete(node.shape, dims))


register("bmatmul", vjp=_bmatmul_vjp, ref=_bmatmul_ref, kernel="bmatmul", display=matmul_display)


def _swaps_last_two(x: Node) -> bool:
    n = x.ndim
    return x.op == "transpose" and n >= 2 and x.attrs["axes"] == tuple(range(n - 2)) + (n - 1, n - 2)


def _fold_transpose_into_bmatmul(node: Node) -> Node | None:
    """bmatmul(swapaxes(a, -1, -2), b) -> bmatmul(a, b, ta): the GEMM reads it transposed."""
    if _swaps_last_two(node) and node.inputs[0].op == "bmatmul":  # (A B)ᵀ = Bᵀ Aᵀ
        x, y = node.inputs[0].inputs
        return bmatmul(y, x, not node.inputs[0].attrs["tb"], not node.inputs[0].attrs["ta"])
    if node.op != "bmatmul":
        return None
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    if _swaps_last_two(a):
        return bmatmul(a.inputs[0], b, not ta, tb)
    if _swaps_last_two(b):
        return bmatmul(a, b.inputs[0], ta, not tb)
    return None


register_rewrite(_fold_transpose_into_bmatmul)


def _bmatmul_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    m, kk = _rows_cols(a, ta)
    n = node.shape[-1]
    lead = node.shape[:-2]
    mat = [Mono.of(x.shape[-2:]) for x in (a, b, node)]
    strides = [[s * mat[i] for s in broadcast_strides(x.shape[:-2], lead)] for i, x in enumerate((a, b))]
    strides.append([s * mat[2] for s in contiguous_strides(lead)])
    sizes, (sa, sb, _) = coalesce([Mono.of((d,)) for d in lead], strides)
    count = ctx.c(Mono.of(lead))
    M, N, K = ctx.c(Mono.of((m,))), ctx.c(Mono.of((n,))), ctx.c(Mono.of((kk,)))
    return {"ta": int(ta), "tb": int(tb), "M": M, "N": N, "K": K,
            "lda": ctx.c(Mono.of(a.shape[-1:])), "ldb": ctx.c(Mono.of(b.shape[-1:])), "ldc": N,
            "count": count, "out_stride": ctx.c(mat[2]),
            "lead": [{"size": ctx.c(s), "sa": ctx.c(x) if x.coef else "", "sb": ctx.c(y) if y.coef else ""}
                     for s, x, y in reversed(list(zip(sizes, sa, sb)))],
            "split": {"what": "its batch of products", "work": f"({count})*{M}*{N}*{K}/16"}}


register_kernel("bmatmul", _bmatmul_builder)
