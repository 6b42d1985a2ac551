"""Fused scaled dot-product attention: one kernel for softmax(scale · q kᵀ, causal) @ v and one
for its backward (dq, dk, dv), used by `transformer.attention` when it applies (no mask, no
dropout, fixed lengths and head dims, the same leading dims on q, k and v).

Operands are strided views: each of q, k, v is a base tensor read through the layout steps
(slice of the last axis, reshape splitting the last axis, transpose) that made it, so the
heads of a fused (B, T, 3C) qkv projection are read in place, never copied. The steps are
kept in the node (`views`), so the reference, the ONNX export and the C strides all derive
from the same description. When q was split into heads ((B, T, H, d) transposed to
(B, H, T, d)), the node writes its output as (B, T, H, dv), the layout the head merge wants,
and `attention` returns it transposed back (a transpose of that transpose folds away).

The forward keeps the probabilities (aux "attention_probs", (..., T, S), in the workspace): at a
GPT's sizes (T 64, head 32) reading them back is faster than recomputing them from a
log-sum-exp (W7, one thread: 19.5 against 19.9 ms a step). The backward is then
    D = rowsum(dO ⊙ O),  ds = scale · p ⊙ (dO vᵀ - D),  dq = ds k,  dk = dsᵀ q,  dv = pᵀ dO.
Every product is one small GEMM of a (batch, head) pair: BLAS when its inner length is at least
16 (faster than generated loops even at 64 x 64 x 32), else plain loops of constant sizes. With
`causal`, queries and keys go in blocks of CAUSAL_BLOCK, and no product reads the masked
blocks above the diagonal.
Each (batch, head) pair is one unit of work on the thread pool; it writes its own rows of
dq, dk and dv only (the views of one base tile it, or each operand has its own base).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..ir.graph import FLOAT, Node, Shape
from ..ir.kernel import Kernel, Mono, contiguous_strides
from .core import OPS, _no_grad, concrete, const, register, register_kernel, reshape, transpose
from .display import ADD, ATOM, MUL, Notation, Shown, number
from .slicing import slice

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["fused_attention", "decompose"]

SCORES_LIMIT = 1 << 14  # queries * keys: the backward's per-thread buffer of ds lives on the stack
CAUSAL_BLOCK = 32  # causal attention works in blocks of queries (and keys): a block's products skip the
                   # keys after its last query (attention at W7's sizes: 6% faster than whole 64 x 64
                   # products; blocks of 16: the same as 32)

Step = tuple  # ("slice", begin, stop) of the last axis | ("reshape", shape) | ("transpose", axes)


# --- views: a base tensor and the layout steps that made the operand ------------------------------

def _peel(x: Node, slices: bool) -> tuple[Node, tuple[Step, ...]]:
    """The base `x` is a view of and the steps from it to `x`: reshapes splitting the last axis,
    transposes, and (with `slices`) one slice of the base's last axis, taken first."""
    steps: list[Step] = []
    while True:
        src = x.inputs[0] if x.inputs else None
        if x.op == "transpose":
            steps.insert(0, ("transpose", tuple(x.attrs["axes"])))
        elif x.op == "reshape" and src.shape[:-1] == x.shape[:-2] and isinstance(src.shape[-1], int) and \
                all(isinstance(d, int) for d in x.shape[-2:]) and x.shape[-2] * x.shape[-1] == src.shape[-1]:
            steps.insert(0, ("reshape", tuple(x.shape)))
        elif slices and x.op == "slice" and x.attrs["axis"] == src.ndim - 1 and isinstance(src.shape[-1], int):
            steps.insert(0, ("slice", x.attrs["begin"], x.attrs["begin"] + x.shape[-1]))
            x = src
            break
        else:
            break
        x = src
    return x, tuple(steps)


def _strides(base: Shape, steps: tuple[Step, ...]) -> tuple[list[Mono], Mono]:
    """Element strides of the view's axes in the base's storage, and its offset."""
    strides, offset = contiguous_strides(base), Mono(0)
    for step in steps:
        if step[0] == "slice":
            offset = Mono(step[1]) * strides[-1]
        elif step[0] == "reshape":
            inner = step[1][-1]
            strides = strides[:-1] + [strides[-1] * Mono(inner), strides[-1]]
        else:
            strides = [strides[a] for a in step[1]]
    return strides, offset


def _covers(steps: list[tuple[Step, ...]], width: int) -> bool:
    """Whether the last-axis windows of views of one base tile that axis exactly."""
    windows = sorted((s[0][1], s[0][2]) for s in steps)
    return windows[0][0] == 0 and windows[-1][1] == width and all(a[1] == b[0] for a, b in zip(windows, windows[1:]))


def _views(q: Node, k: Node, v: Node) -> tuple[tuple[Node, ...], tuple[tuple[int, tuple[Step, ...]], ...]]:
    """The node's inputs (bases) and, per operand, (base index, steps): one packed base when
    q, k, v are windows tiling the last axis of one tensor (a fused qkv projection), else one
    base per operand (reshapes and transposes only: each view covers its base once)."""
    peeled = [_peel(x, slices=True) for x in (q, k, v)]
    bases = {b for b, _ in peeled}
    if len(bases) == 1 and all(s and s[0][0] == "slice" for _, s in peeled) and \
            _covers([s for _, s in peeled], peeled[0][0].shape[-1]) and _unit_inner(peeled):
        return (peeled[0][0],), tuple((0, s) for _, s in peeled)
    peeled = [_peel(x, slices=False) for x in (q, k, v)]
    peeled = [(b, s) if _unit_inner([(b, s)]) else (x, ()) for (b, s), x in zip(peeled, (q, k, v))]
    return tuple(b for b, _ in peeled), tuple((i, s) for i, (_, s) in enumerate(peeled))


def _unit_inner(peeled: list[tuple[Node, tuple[Step, ...]]]) -> bool:
    return all(_strides(b.shape, s)[0][-1] == Mono(1) for b, s in peeled)


def _heads_perm(steps: tuple[Step, ...]) -> tuple[int, ...] | None:
    """The transpose swapping the last two axes but one after a split of the last axis (heads
    moved in front of the sequence), when q's view ends with one."""
    if len(steps) >= 2 and steps[-1][0] == "transpose" and steps[-2][0] == "reshape":
        n = len(steps[-1][1])
        if n >= 3 and steps[-1][1] == tuple(range(n - 3)) + (n - 2, n - 3, n - 1):
            return steps[-1][1]
    return None


def fused_attention(q: Node, k: Node, v: Node, causal: bool, scale: float) -> Node | None:
    """softmax(scale · q kᵀ) @ v as one fused node (see the module docstring), or None when the
    fused kernels do not apply (leading dims differ, a length or head dim is a runtime size,
    the per-thread buffers would not fit)."""
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead:
        return None
    sizes = (q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1])
    if not all(isinstance(n, int) for n in sizes) or sizes[0] * sizes[1] > SCORES_LIMIT:
        return None
    bases, views = _views(q, k, v)
    perm = _heads_perm(views[0][1])
    logical = lead + (q.shape[-2], v.shape[-1])
    shape = tuple(logical[a] for a in perm) if perm else logical
    node = Node("attention", bases, {"views": views, "causal": bool(causal), "scale": float(scale),
                                     "perm": perm}, shape, FLOAT)
    return transpose(node, perm) if perm else node


# --- replaying the views: graph nodes (decompose) and NumPy arrays (reference) --------------------

def _replay(x: Any, steps: tuple[Step, ...], graph: bool, dims: dict[str, int] | None = None) -> Any:
    for step in steps:
        if step[0] == "slice":
            x = slice(x, -1, step[1], step[2]) if graph else x[..., step[1]:step[2]]
        elif step[0] == "reshape":
            x = reshape(x, step[1]) if graph else x.reshape(concrete(step[1], dims))
        else:
            x = transpose(x, step[1]) if graph else np.transpose(x, step[1])
    return x


def operands(node: Node) -> list[Node]:
    """q, k, v of a fused attention node as graph nodes (the layout ops it reads through)."""
    return [_replay(node.inputs[i], steps, True) for i, steps in node.attrs["views"]]


def _composed(node: Node) -> tuple[list[Node], Node, Node, Node]:
    """The fused node as ops with VJP rules: ([q, k, v], scores q kᵀ, probs, out probs v), out in
    the logical (..., T, dv) layout."""
    from .batched import bmatmul
    from .transformer import masked_softmax
    qkv = operands(node)
    scores = bmatmul(qkv[0], qkv[1], tb=True)
    probs = masked_softmax(scores, node.attrs["scale"], node.attrs["causal"])
    return qkv, scores, probs, bmatmul(probs, qkv[2])


def decompose(node: Node) -> Node:
    """The fused node as bmatmul, attention_softmax and bmatmul, in its own layout (what the
    ONNX export writes)."""
    out = _composed(node)[3]
    perm = node.attrs["perm"]
    return transpose(out, perm) if perm else out


def _forward_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, ...]:
    """(out in the node's layout, p, q, k, v) in float64."""
    q, k, v = (np.asarray(_replay(args[i], steps, False, dims), dtype=np.float64) for i, steps in node.attrs["views"])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * node.attrs["scale"]
    if node.attrs["causal"]:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    p = e / e.sum(axis=-1, keepdims=True)
    out = np.matmul(p, v)
    perm = node.attrs["perm"]
    return (np.transpose(out, perm) if perm else out), p, q, k, v


def _grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> list[np.ndarray]:
    """The gradient of every base of the forward node, in float64."""
    fwd = node.inputs[-2]
    out, p, q, k, v = _forward_ref(fwd, args[1:-2], dims)
    perm = fwd.attrs["perm"]
    g = np.transpose(args[0], perm) if perm else args[0]
    o = np.transpose(out, perm) if perm else out
    dv = np.matmul(np.swapaxes(p, -1, -2), g)
    dp = np.matmul(g, np.swapaxes(v, -1, -2))
    ds = p * (dp - (g * o).sum(axis=-1, keepdims=True)) * fwd.attrs["scale"]
    dq, dk = np.matmul(ds, k), np.matmul(np.swapaxes(ds, -1, -2), q)
    grads = [np.zeros(np.shape(a), dtype=np.float64) for a in args[1:-2]]
    for (i, steps), d in zip(fwd.attrs["views"], (dq, dk, dv)):
        window = _replay(grads[i], steps, False, dims)  # a NumPy view of grads[i]
        if not np.shares_memory(window, grads[i]):
            raise AssertionError("a fused attention view is not a view of its base")
        window += d
    return grads


# --- the ops --------------------------------------------------------------------------------------

def _probs_aux(node: Node) -> list[Node]:
    shape = _logical_lead(node) + (operands(node)[1].shape[-2],)
    return [Node("attention_probs", (node, *node.inputs), {}, shape, FLOAT)]


def _logical_lead(node: Node) -> Shape:
    """The (..., T) shape of one value per query: the output's logical shape without dv."""
    perm = node.attrs["perm"]
    shape = tuple(node.shape[a] for a in np.argsort(perm)) if perm else node.shape
    return tuple(shape[:-1])


def _attention_vjp(node: Node, g: Node) -> list[Node]:
    (probs,) = _probs_aux(node)
    first = Node("attention_grad", (g, *node.inputs, node, probs), {}, node.inputs[0].shape, FLOAT)
    return [first] + _grad_aux(first)


def _grad_aux(first: Node) -> list[Node]:
    bases = first.inputs[1:-2]
    return [Node("attention_grad_aux", (first, *first.inputs), {"which": i}, b.shape, FLOAT)
            for i, b in enumerate(bases) if i > 0]


# --- display: attention as a person writes it -------------------------------------------------

def _view_texts(fwd: Node, bases: Sequence[Shown], n: Notation) -> list[str]:
    """q, k and v as written: each its base, with the columns it takes when it is a slice."""
    out = []
    for i, steps in fwd.attrs["views"]:
        text = n.at_least(bases[i], ATOM)
        for step in steps:
            if step[0] == "slice":
                text += f"[…, {step[1]}:{step[2]}]"
        out.append(text)
    return out


def _softmax_name(fwd: Node) -> str:
    return "softmax_causal" if fwd.attrs["causal"] else "softmax"


def _attention_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """softmax_causal(scale·q kᵀ) · v, per head, with q, k, v read from their bases."""
    q, k, v = _view_texts(node, args, n)
    scores = f"{number(node.attrs['scale'])}·{q}{n.DOT}{k}{n.TOP}"
    return n.product(n.call(_softmax_name(node), scores), v), MUL


def _base_grad(fwd: Node, base: int, args: Sequence[Shown], n: Notation) -> Shown:
    """The gradient of one base: dq = dS · k, dk = dSᵀ · q, dv = Pᵀ · dO for the views it holds
    (side by side when q, k and v are its slices), dS = scale·P ⊙ (dO vᵀ - rowsum(dO ⊙ O)),
    softmax's Jacobian-vector product."""
    g, *bases, out, probs = args
    g, out, probs = (n.at_least(x, ATOM) for x in (g, out, probs))
    q, k, v = _view_texts(fwd, bases, n)
    pieces = {0: n.product("dS", k), 1: n.product("dS" + n.TOP, q), 2: n.product(probs + n.TOP, g)}
    mine = [pieces[j] for j, (i, _) in enumerate(fwd.attrs["views"]) if i == base]
    text = mine[0] if len(mine) == 1 else "[" + ", ".join(mine) + "]"
    if "dS" in text:
        ds = (f"{number(fwd.attrs['scale'])}·{probs}{n.ODOT}"
              + n.group(f"{g}{n.DOT}{v}{n.TOP} - {n.call('rowsum', g + n.ODOT + out)}"))
        text += (r"\ \text{with}\ dS = " if n.tex else " with dS = ") + ds
    return text, ADD


def _expand_grad(node: Node) -> Node:
    """attention_grad (or one of its aux results: the gradient of one base) in differentiable
    ops, so that a gradient of a gradient (a gradient penalty) goes through the fused backward."""
    first = node if node.op == "attention_grad" else node.inputs[0]
    which = 0 if node.op == "attention_grad" else node.attrs["which"]
    grad = composed_base_grads(first.inputs[-2], first.inputs[0])[which]
    return grad if grad is not None else const(0.0, node.shape)


def composed_base_grads(fwd: Node, seed: Node) -> list[Node | None]:
    """Each base's gradient for the seed `seed` of the fused node `fwd`, written with the VJP
    rules of the composed attention (bmatmul, masked softmax, bmatmul) and of the layout steps
    of each view: q, k and v keep their own parts even when they are one tensor (self-attention
    of x with itself has three bases, x three times, each given its own part, as the kernel does)."""
    (q, k, v), scores, probs, out = _composed(fwd)
    perm = fwd.attrs["perm"]
    g = transpose(seed, tuple(int(a) for a in np.argsort(perm))) if perm else seed
    dprobs, dv = OPS[out.op].vjp(out, g)
    (dscores,) = OPS[probs.op].vjp(probs, dprobs)
    dq, dk = OPS[scores.op].vjp(scores, dscores)
    grads: list[Node | None] = [None] * len(fwd.inputs)
    for (i, _), view, d in zip(fwd.attrs["views"], (q, k, v), (dq, dk, dv)):
        base = fwd.inputs[i]
        while view is not base:  # back through the view's layout steps (slice, reshape, transpose)
            d, view = OPS[view.op].vjp(view, d)[0], view.inputs[0]
        grads[i] = d if grads[i] is None else grads[i] + d
    return grads


register("attention", vjp=_attention_vjp, kernel="attention", aux=_probs_aux,
         ref=lambda node, args, dims: _forward_ref(node, args, dims)[0], display=_attention_display)
register("attention_probs", vjp=_no_grad("attention_probs"), kernel="aux",
         ref=lambda node, args, dims: _forward_ref(node.inputs[0], args[1:], dims)[1],
         display=lambda node, args, n: (n.call("P", args[0][0]), ATOM))  # the probabilities attention T kept
register("attention_grad", vjp=_no_grad("attention_grad"), kernel="attention", aux=_grad_aux,
         ref=lambda node, args, dims: _grad_ref(node, args, dims)[0],
         display=lambda node, args, n: _base_grad(node.inputs[-2], 0, args, n), expand=_expand_grad)
register("attention_grad_aux", vjp=_no_grad("attention_grad_aux"), kernel="aux",
         ref=lambda node, args, dims: _grad_ref(node.inputs[0], args[1:], dims)[node.attrs["which"]],
         display=lambda node, args, n: _base_grad(node.inputs[0].inputs[-2], node.attrs["which"], args[1:], n),
         expand=_expand_grad)


# --- lowering -------------------------------------------------------------------------------------

def _operand(ctx: Context, array: str, strides: list[Mono], offset: Mono) -> dict[str, Any]:
    """An operand's pointer and strides: per leading dim, then the row (query/key) stride."""
    return {"array": array, "offset": ctx.c(offset) if offset.coef else "",
            "lead": [ctx.c(s) if s.coef else "" for s in strides[:-2]], "row": ctx.c(strides[-2])}


def _attention_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    grad = node.op == "attention_grad"
    fwd = node.inputs[-2] if grad else node
    bases = fwd.inputs
    first = 1 if grad else 0  # kernel inputs: (g, bases..., out, probs) or (bases...)
    perm = fwd.attrs["perm"]
    lead = _logical_lead(fwd)[:-1]
    views = []
    for i, steps in fwd.attrs["views"]:
        strides, offset = _strides(bases[i].shape, steps)
        views.append((i, strides, offset))
    out_strides = contiguous_strides(fwd.shape)
    if perm:
        out_strides = [out_strides[a] for a in perm]
    q, k, _ = operands(fwd)
    T, S, D, DV = q.shape[-2], k.shape[-2], q.shape[-1], fwd.shape[-1]
    p_strides = contiguous_strides(_logical_lead(fwd) + (S,))
    ops = {name: _operand(ctx, f"in{first + i}", st, off) for name, (i, st, off) in zip("qkv", views)}
    if grad:
        ops["o"] = _operand(ctx, f"in{first + len(bases)}", out_strides, Mono(0))
        ops["g"] = _operand(ctx, "in0", out_strides, Mono(0))
        ops["p"] = _operand(ctx, f"in{first + len(bases) + 1}", p_strides, Mono(0))
        for name, (i, st, off) in zip(("dq", "dk", "dv"), views):
            ops[name] = _operand(ctx, f"out{i}", st, off)
    else:
        ops["o"] = _operand(ctx, "out0", out_strides, Mono(0))
        ops["p"] = _operand(ctx, "out1", p_strides, Mono(0))
    count = ctx.c(Mono.of(lead))
    return {"grad": grad, "causal": fwd.attrs["causal"], "scale": repr(fwd.attrs["scale"]),
            "T": T, "S": S, "D": D, "DV": DV, "count": count, "ops": ops,
            "QB": CAUSAL_BLOCK if fwd.attrs["causal"] else T,
            "lead": [ctx.c(Mono.of((d,))) for d in lead],
            "split": {"what": "its (batch, head) pairs", "work": f"({count})*{T * S * (D + DV) // 16}"}}


register_kernel("attention", _attention_builder)
