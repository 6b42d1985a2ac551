"""The kernel builders of the core kernel kinds (elementwise, gemm, reduce, softmax, softmax_ce,
transpose, copy, random): each turns a scheduled kernel into its template's context (sizes,
index expressions, printed formulas). The op families register theirs next to their ops."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp

from ..errors import CompileError
from ..ir.graph import INT, Node
from ..ir.kernel import Kernel, Mono, broadcast_strides, coalesce, contiguous_strides, packed_strides
from ..ops.core import register_kernel
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS
from .printer import print_formulas

if TYPE_CHECKING:  # builders are handed a Context by the module renderer
    from .module import Context


def index_expr(ctx: Context, loop_vars: list[str], strides: list[Mono]) -> str:
    terms = []
    for var, st in zip(loop_vars, strides):
        if st.coef == 0:
            continue
        terms.append(var if st == Mono(1) else f"{var}*{ctx.c(st)}")
    return " + ".join(terms) or "0"


def _unprintable(k: Kernel, ctx: Context, error: Exception) -> CompileError:
    """A CompileError naming the function the C printer failed on, its elementwise op and node."""
    for m in k.nodes:
        fn = m.attrs["fn"]
        try:
            print_formulas([fn.expr], ctx.printer())
        except Exception as e:
            funcs = sorted({type(f).__name__ for f in fn.expr.atoms(sp.Function)
                            if type(f).__name__ in str(e)}) or [str(e).splitlines()[0]]
            return CompileError(f"cannot print {', '.join(funcs)} in C: elementwise op {fn.name!r} "
                                f"({fn.pretty()}) of node {m}")
    return CompileError(f"cannot print the elementwise kernel of {k.nodes[-1]} in C: {error}")


# --- kernel builders: one per kernel kind, each returning its template's context --------------

def _elementwise(k: Kernel, ctx: Context) -> dict[str, Any]:
    root = k.nodes[-1]
    shape = root.shape
    leaf_sym = {x: sp.Symbol(f"v{i}", real=True) for i, x in enumerate(k.inputs)}
    exprs: dict[Node, sp.Expr] = {}
    for m in k.nodes:
        fn = m.attrs["fn"]
        exprs[m] = fn.expr.xreplace({ARGS[j]: exprs.get(x, leaf_sym.get(x)) for j, x in enumerate(m.inputs)})
    for o in k.outputs:  # runtime sizes used inside formulas (a mean's 1/n) must be declared too
        ctx.used_dims.update(ew_mod.dim_name(s) for s in exprs[o].free_symbols if ew_mod.is_dim_symbol(s))
    try:
        temps, values = ctx.formulas([exprs[o] for o in k.outputs], list(leaf_sym.values()))
    except Exception as e:  # SymPy's printer cannot print some function: name it, its op and node
        raise _unprintable(k, ctx, e) from None
    sizes = [Mono.of((d,)) for d in shape]
    operand_strides = [broadcast_strides(x.shape, shape) for x in k.inputs] + \
                      [contiguous_strides(shape) for _ in k.outputs]
    sizes, operand_strides = coalesce(sizes, operand_strides)
    loop_vars = [f"i{d}" for d in range(len(sizes))]
    loops = [{"var": v, "size": ctx.c(s)} for v, s in zip(loop_vars, sizes)]
    hoisted, loads = [], []
    for i, x in enumerate(k.inputs):
        st = operand_strides[i]
        load = {"name": leaf_sym[x].name, "array": f"in{i}", "index": index_expr(ctx, loop_vars, st),
                "cast": x.dtype == INT}
        (hoisted if all(s.coef == 0 for s in st) else loads).append(load)
    stores = [{"array": f"out{j}", "index": index_expr(ctx, loop_vars, operand_strides[len(k.inputs) + j]),
               "value": v} for j, v in enumerate(values)]
    split = {"what": f"its outer loop ({loops[0]['var']})", "work": ctx.size(shape),
             "grain": 16 if len(loops) == 1 else 1} if loops else None
    return {"loops": loops, "hoisted": hoisted, "loads": loads, "temps": temps, "stores": stores, "split": split}


def _gemm(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    lead_a = Mono.of(a.shape[:-1])
    m = Mono.of(a.shape[-1:]) if ta else lead_a
    kk = lead_a if ta else Mono.of(a.shape[-1:])
    n = Mono.of(b.shape[:1]) if tb else Mono.of(b.shape[-1:])
    return {"ta": int(ta), "tb": int(tb), "M": ctx.c(m), "N": ctx.c(n), "K": ctx.c(kk),
            "lda": ctx.c(Mono.of(a.shape[-1:])), "ldb": ctx.c(Mono.of(b.shape[-1:])), "ldc": ctx.c(n)}


REDUCE_BLOCK = 512  # columns summed at once when reducing leading axes


REDUCE_COMBINE = {"reduce": "sum", "amax": "max", "amin": "min"}


def _reduce(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    axes = node.attrs["axes"]
    mean = node.attrs.get("mean", False)
    combine = REDUCE_COMBINE[node.op]
    lead = len(axes)
    cols = x.shape[lead:]
    if axes == tuple(range(lead)) and cols and all(isinstance(d, int) for d in cols):
        # (rows, cols) with the rows summed: read each row contiguously into a block of
        # double accumulators (a bias gradient summed over the batch)
        ncols = int(np.prod(cols))
        rows = ctx.c(Mono.of(x.shape[:lead]))
        return {"columns": True, "rows": rows, "cols": ncols, "combine": combine,
                "block": min(ncols, REDUCE_BLOCK), "mean": mean,
                "count": rows if mean else "",
                "split": {"what": "its columns", "work": f"({rows})*{ncols}"} if ncols >= 32 else None}
    strides = contiguous_strides(x.shape)
    kept = [(Mono.of((d,)), strides[i]) for i, d in enumerate(x.shape) if i not in axes]
    red = [(Mono.of((d,)), strides[i]) for i, d in enumerate(x.shape) if i in axes]
    kept_sizes, (kept_strides,) = coalesce([s for s, _ in kept], [[st for _, st in kept]])
    red_sizes, (red_strides,) = coalesce([s for s, _ in red], [[st for _, st in red]])
    outer = [f"i{d}" for d in range(len(kept_sizes))]
    inner = [f"j{d}" for d in range(len(red_sizes))]
    # a contiguous innermost reduced dim is summed with 8 partial sums, so that it vectorizes
    contiguous = bool(red_strides) and red_strides[-1] == Mono(1) and (red_sizes[-1].dims or red_sizes[-1].coef >= 8)
    return {
        "combine": combine,
        "contiguous_last": contiguous,
        "row_offset": index_expr(ctx, inner[:-1], red_strides[:-1]) if contiguous else "",
        "last_size": ctx.c(red_sizes[-1]) if contiguous else "",
        "columns": False,
        "outer": [{"var": v, "size": ctx.c(s)} for v, s in zip(outer, kept_sizes)],
        "inner": [{"var": v, "size": ctx.c(s)} for v, s in zip(inner, red_sizes)],
        "base": index_expr(ctx, outer, kept_strides),
        "offset": index_expr(ctx, inner, red_strides),
        "out_index": index_expr(ctx, outer, packed_strides(kept_sizes)),
        "count": ctx.c(Mono.of(tuple(x.shape[a] for a in axes))) if mean else "",
        "mean": mean,
        # each piece sums its own outputs, each in the order a whole kernel would
        "split": {"what": f"its outer loop ({outer[0]})", "work": ctx.size(x.shape)} if outer else None,
    }


def _softmax(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    return {"rows": ctx.c(Mono.of(x.shape[:-1])), "cols": ctx.c(Mono.of(x.shape[-1:])),
            "log": node.op == "log_softmax", "masked": node.op == "attention_softmax",
            "causal": node.attrs.get("causal", False), "queries": ctx.c(Mono.of(x.shape[-2:-1])),
            "scale": repr(node.attrs.get("scale", 1.0))}


def _softmax_ce(k: Kernel, ctx: Context) -> dict[str, Any]:
    logits = k.nodes[0].inputs[0]
    return {"rows": ctx.c(Mono.of(logits.shape[:-1])), "cols": ctx.c(Mono.of(logits.shape[-1:])),
            "grad": k.nodes[0].op == "softmax_ce_grad"}


def _transpose(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    perm = node.attrs["axes"]
    in_strides = contiguous_strides(x.shape)
    sizes = [Mono.of((d,)) for d in node.shape]
    sizes, (src, dst) = coalesce(sizes, [[in_strides[p] for p in perm], contiguous_strides(node.shape)])
    loop_vars = [f"i{d}" for d in range(len(sizes))]
    loops = [{"var": v, "size": ctx.c(s)} for v, s in zip(loop_vars, sizes)]
    split = {"what": f"its outer loop ({loops[0]['var']})", "work": ctx.size(node.shape)} if len(loops) > 1 else None
    return {"loops": loops, "src": index_expr(ctx, loop_vars, src), "dst": index_expr(ctx, loop_vars, dst),
            "split": split}


def _copy(k: Kernel, ctx: Context) -> dict[str, Any]:
    return {"count": ctx.size(k.nodes[0].shape)}


def _random(k: Kernel, ctx: Context) -> dict[str, Any]:
    return {"count": ctx.size(k.nodes[0].shape), "salt": k.nodes[0].attrs["salt"], **ctx.rng_decls()}


for _kind, _builder in {"elementwise": _elementwise, "gemm": _gemm, "reduce": _reduce, "softmax": _softmax,
                        "transpose": _transpose, "copy": _copy, "random": _random}.items():
    register_kernel(_kind, _builder)
register_kernel("softmax_ce", _softmax_ce, failing=True)  # validates the labels: may return an error code
