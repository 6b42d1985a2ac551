"""The ops a transformer needs beyond matmul and softmax: fixed tensors (`constant`),
selection and masking (`where`, `masked_fill`), max/min reductions, layer norm and scaled
dot-product attention.

Each follows ops/core.py's pattern (shape rule, VJP in graph ops, NumPy reference, kernel kind):

- `constant` is a leaf-like op whose kernel copies values printed into the C source.
- `where` / `masked_fill` are elementwise functions (a SymPy Piecewise), so they fuse with
  their neighbours and SymPy derives their gradients (0 where not selected); `-inf` is allowed
  as the filled value.
- `max` / `min` reduce like `sum`; their gradient is shared evenly among ties, as torch.amax.
- `layer_norm` is one fused kernel writing x̂ = (x - mean) / std and 1/std per row; the affine
  part (x̂ w + b) is elementwise. Its backward is one fused kernel,
  dx = (1/std) (g - mean(g) - x̂ mean(g x̂)).
- `attention` without a mask or dropout, on fixed lengths and head dims, is one fused node
  each way (ops/attention_fused.py: q, k, v read in place from the tensors they were sliced,
  reshaped or transposed out of). Otherwise it is q @ kᵀ (a batched GEMM reading k
  transposed), the mask as `where(mask, s, -inf)`, a fused kernel for softmax(scale · s) with
  the causal mask (only j <= i is read; a row with no allowed key gives zeros, as torch's
  scaled_dot_product_attention does), and @ v; its backward is the batched-GEMM and softmax
  rules, all graph ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, Shape, broadcast_shapes, shape_str
from ..ir.kernel import Kernel, Mono
from ..symbolic.functions import ARGS, Fn
from .batched import bmatmul
from .core import (
    _check_tensor,
    _need_float,
    _no_grad,
    _norm_axes,
    ew,
    mul,
    register,
    register_kernel,
    reshape,
    sum,
)
from .display import ATOM, MUL, POW, Notation, Shown, called, number

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["constant", "where", "masked_fill", "max", "min", "layer_norm", "attention", "masked_softmax"]

CONSTANT_LIMIT = 1 << 20  # elements a constant may hold: its values are printed into the C source


# --- constants ----------------------------------------------------------------------------------

def constant(value: Any) -> Node:
    """A fixed float tensor (e.g. a mask: booleans become 1.0 / 0.0) printed into the C source."""
    array = np.asarray(value)
    if array.dtype == object or np.iscomplexobj(array) or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"constant: expected a real or boolean array, got {array.dtype}")
    if array.size == 0 or array.size > CONSTANT_LIMIT:
        raise ShapeError(f"constant: needs 1 to {CONSTANT_LIMIT} elements, got {array.size}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("constant: values must be finite (masked_fill / where take -inf)")
    return Node("constant", (), {"values": array}, array.shape, FLOAT)


def _constant_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    text = [repr(float(v)) for v in k.nodes[0].attrs["values"].reshape(-1)]
    return {"count": len(text), "rows": [", ".join(text[i:i + 8]) for i in range(0, len(text), 8)]}


register("constant", vjp=lambda node, g: [], kernel="constant",
         ref=lambda node, args, dims: node.attrs["values"].copy(),
         display=lambda node, args, n: (n.call("constant", shape_str(node.shape)), ATOM))
register_kernel("constant", _constant_builder)


# --- selection and masking ------------------------------------------------------------------------

_WHERE = Fn("where", sp.Piecewise((ARGS[1], sp.Ne(ARGS[0], 0)), (ARGS[2], True)), 3, ("cond", "a", "b"))


def _as_condition(cond: Any) -> Node:
    if isinstance(cond, Node):
        return cond
    return constant(np.asarray(cond, dtype=bool))


def _fill_value(value: Any) -> Any:
    """A number, or ±inf as a SymPy infinity (ew refuses non-finite numbers elsewhere)."""
    if isinstance(value, Node):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"expected a tensor or a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError("a fill value must not be NaN")
    if math.isinf(value):
        return sp.oo if value > 0 else -sp.oo
    return value


def where(cond: Any, a: Any, b: Any) -> Node:
    """a where cond is non-zero, else b, broadcasting all three (as numpy.where). `cond` is a
    bool/int graph tensor or a constant array; `a` and `b` tensors or numbers (±inf allowed)."""
    cond = _as_condition(cond)
    a, b = _fill_value(a), _fill_value(b)
    if not any(isinstance(v, Node) for v in (a, b)):
        raise TypeError("where: a or b must be a graph tensor")
    infinite = {i + 1: v for i, v in enumerate((a, b)) if isinstance(v, sp.Expr)}
    if infinite:  # an infinity goes into the formula itself: it is a value, never arithmetic
        fn = Fn("where", _WHERE.expr.xreplace({ARGS[i]: v for i, v in infinite.items()}), 3, _WHERE.display)
        operands = [cond] + [0 if isinstance(v, sp.Expr) else v for v in (a, b)]
        return ew(fn, *operands)
    return ew(_WHERE, cond, a, b)


def masked_fill(x: Node, mask: Any, value: float) -> Node:
    """x with `value` where mask is non-zero (as torch's masked_fill; value may be -inf)."""
    _need_float(_check_tensor(x, "masked_fill"), "masked_fill")
    return where(mask, value, x)


# --- max and min ----------------------------------------------------------------------------------

def _extreme(op: str, x: Node, axis: Any, keepdims: bool) -> Node:
    _need_float(_check_tensor(x, op), op)
    axes = _norm_axes(axis, x.ndim, op)
    if not axes:
        return x
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return Node(op, (x,), {"axes": axes, "keepdims": bool(keepdims)}, shape, FLOAT)


def max(x: Node, axis: Any = None, keepdims: bool = False) -> Node:  # noqa: A001 - NumPy's name
    """Largest element over `axis` (all axes when None), as numpy.max; the gradient is shared
    evenly among the elements equal to the maximum (torch.amax)."""
    return _extreme("amax", x, axis, keepdims)


def min(x: Node, axis: Any = None, keepdims: bool = False) -> Node:  # noqa: A001 - NumPy's name
    """Smallest element over `axis`, as numpy.min; ties share the gradient (torch.amin)."""
    return _extreme("amin", x, axis, keepdims)


_TIE = Fn("is_extreme", sp.Piecewise((1, sp.Eq(ARGS[0], ARGS[1])), (0, True)), 2)
_SHARE = Fn("tie_share", ARGS[0] * ARGS[1] / ARGS[2], 3)


def _extreme_vjp(node: Node, g: Node) -> list[Node]:
    x = node.inputs[0]
    axes = node.attrs["axes"]
    kept = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    m, g = (reshape(v, kept) for v in (node, g))
    ties = ew(_TIE, x, m)
    return [ew(_SHARE, g, ties, sum(ties, axis=axes, keepdims=True))]


def _extreme_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    f = np.max if node.op == "amax" else np.min
    return f(args[0], axis=node.attrs["axes"], keepdims=node.attrs["keepdims"])


def _extreme_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """max(x), or max_T(x) over some axes."""
    x, axes = node.inputs[0], node.attrs["axes"]
    labels = "" if len(axes) == x.ndim else "_" + ",".join(n.axes(x, axes))
    return n.call(("max" if node.op == "amax" else "min") + labels, args[0][0]), ATOM


for _op in ("amax", "amin"):
    register(_op, vjp=_extreme_vjp, ref=_extreme_ref, kernel="reduce", display=_extreme_display)


# --- layer norm -----------------------------------------------------------------------------------

def _rows_shape(x: Node) -> Shape:
    return x.shape[:-1] + (1,)


def layer_norm(x: Node, weight: Node | None = None, bias: Node | None = None, eps: float = 1e-5) -> Node:
    """(x - mean) / sqrt(var + eps) over the last axis (biased variance), times `weight`, plus
    `bias` (both of the last axis' size, optional): torch.nn.functional.layer_norm."""
    _need_float(_check_tensor(x, "layer_norm"), "layer_norm")
    if x.ndim == 0 or not isinstance(x.shape[-1], int):
        raise ShapeError(f"layer_norm: the last axis must be a fixed size, got {shape_str(x.shape)}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps}")
    for what, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _need_float(_check_tensor(p, f"layer_norm {what}"), f"layer_norm {what}")
            if p.shape != (x.shape[-1],):
                raise ShapeError(f"layer_norm: {what} must have shape ({x.shape[-1]},) for x of shape "
                                 f"{shape_str(x.shape)}, got {shape_str(p.shape)}")
    y = Node("layer_norm", (x,), {"eps": eps}, x.shape, FLOAT)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _layer_norm_all(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    x = args[0]
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + node.attrs["eps"])
    return (x - mean) * rstd, rstd


def _layer_norm_aux(node: Node) -> list[Node]:
    return [Node("layer_norm_rstd", (node, *node.inputs), {}, _rows_shape(node.inputs[0]), FLOAT)]


def _layer_norm_vjp(node: Node, g: Node) -> list[Node]:
    (rstd,) = _layer_norm_aux(node)
    return [Node("layer_norm_grad", (g, node, rstd), {}, node.shape, FLOAT)]


def _layer_norm_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g, xhat, rstd = args
    return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


def _layer_norm_grad_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """(g, x̂, 1/std) -> 1/std ⊙ (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂)): g projected off 1 and x̂."""
    g, xhat, rstd = (a for a, _ in args)
    rstd = n.at_least(args[2], POW)
    inner = f"{g} - {n.call('mean', g)} - {xhat}{n.ODOT}{n.call('mean', g + n.ODOT + xhat)}"
    return f"{rstd}{n.ODOT}{n.group(inner)}", MUL


register("layer_norm", vjp=_layer_norm_vjp, kernel="layer_norm", aux=_layer_norm_aux,
         ref=lambda node, args, dims: _layer_norm_all(node, args, dims)[0], display=called())
register("layer_norm_rstd", vjp=_no_grad("layer_norm_rstd"), kernel="aux",  # inputs: the normalized value, then x
         ref=lambda node, args, dims: _layer_norm_all(node.inputs[0], args[1:], dims)[1],
         display=lambda node, args, n: (f"1/{n.call('std', args[1][0])}", MUL))
register("layer_norm_grad", vjp=_no_grad("layer_norm_grad"), ref=_layer_norm_grad_ref, kernel="layer_norm",
         display=_layer_norm_grad_display)


def _layer_norm_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    rows = ctx.c(Mono.of(node.shape[:-1]))
    cols = node.shape[-1]
    return {"grad": node.op == "layer_norm_grad", "rows": rows, "cols": cols, "eps": repr(node.attrs.get("eps", 0.0)),
            "split": {"what": "its rows", "work": f"({rows})*{cols}"}}


register_kernel("layer_norm", _layer_norm_builder)


# --- attention ------------------------------------------------------------------------------------

def attention(q: Node, k: Node, v: Node, causal: bool = False, mask: Any = None, scale: float | None = None,
              dropout: float = 0.0) -> Node:
    """softmax(q kᵀ · scale, masked) @ v over the last two axes, leading dims broadcast:
    torch.nn.functional.scaled_dot_product_attention with q (..., T, d), k (..., S, d),
    v (..., S, dv). scale defaults to 1/sqrt(d); `causal` masks keys j > i; `mask` (a bool
    array or int graph tensor broadcasting to (..., T, S)) masks where it is False. A query
    with no allowed key gets zeros. `dropout` drops attention weights in training calls."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _need_float(_check_tensor(t, f"attention {name}"), f"attention {name}")
        if t.ndim < 2:
            raise ShapeError(f"attention: {name} must be at least 2-D (..., length, dim), got {shape_str(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"attention: q {shape_str(q.shape)} and k {shape_str(k.shape)} need the same last dim")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"attention: k {shape_str(k.shape)} and v {shape_str(v.shape)} need the same length "
                         "(second-to-last dim)")
    d = q.shape[-1]
    if scale is None:
        if not isinstance(d, int):
            raise ShapeError(f"attention: give scale= when the head dim is a runtime size ({d!r})")
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if scale <= 0:
        raise ValueError(f"attention: scale must be positive, got {scale}")
    if mask is None and not dropout:
        from .attention_fused import fused_attention
        fused = fused_attention(q, k, v, causal, scale)
        if fused is not None:
            return fused
    scores = bmatmul(q, k, tb=True)  # kᵀ read by the GEMM, never copied; the softmax kernel scales
    if mask is not None:
        mask = _as_condition(mask)
        try:
            broadcast_shapes([mask.shape, scores.shape], ["mask", "scores"])
        except ShapeError:
            raise ShapeError(f"attention: mask {shape_str(mask.shape)} does not broadcast to the scores "
                             f"{shape_str(scores.shape)}") from None
        scores = where(mask, scores, -math.inf)
    probs = masked_softmax(scores, scale, causal)
    if dropout:
        from .regularization import dropout as drop
        probs = drop(probs, dropout)
    return probs @ v


def masked_softmax(scores: Node, scale: float = 1.0, causal: bool = False) -> Node:
    """softmax(scale · scores) over the last axis where -inf scores (and, with `causal`, keys
    j > i) get probability 0 and a row with no allowed key gets all zeros: attention's softmax."""
    _need_float(_check_tensor(scores, "masked_softmax"), "masked_softmax")
    if scores.ndim < 2 or not (math.isfinite(scale) and scale > 0):
        raise ShapeError(f"masked_softmax: needs (..., queries, keys) scores and a positive scale, got "
                         f"{shape_str(scores.shape)} and {scale}")
    return Node("attention_softmax", (scores,), {"causal": bool(causal), "scale": float(scale)}, scores.shape, FLOAT)


def _attention_softmax_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    s = np.array(args[0], dtype=np.float64) * node.attrs["scale"]
    if node.attrs["causal"]:
        t, n = s.shape[-2:]
        s = np.where(np.tril(np.ones((t, n), dtype=bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.where(np.isneginf(m), 0.0, np.exp(s - np.where(np.isneginf(m), 0.0, m)))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def _softmax_vjp(node: Node, g: Node) -> list[Node]:
    """softmax(scale s)'s Jacobian-vector product: scale p (g - Σ g p)."""
    return [mul(node * (g - sum(g * node, axis=-1, keepdims=True)), node.attrs["scale"])]


def _attention_softmax_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """softmax_causal(scale·S): the causal mask as part of the name."""
    name = "softmax_causal" if node.attrs["causal"] else "softmax"
    return n.call(name, f"{number(node.attrs['scale'])}·{n.at_least(args[0], POW)}"), ATOM


register("attention_softmax", vjp=_softmax_vjp, ref=_attention_softmax_ref, kernel="softmax",
         display=_attention_softmax_display)

