"""Model-family ops: convolution, pooling, recurrent layers (LSTM, GRU, tanh RNN), batch
norm, dropout, embeddings, concatenation and slicing.

Each op follows ops.py's pattern: the function that makes the node checks shapes (raising
`ShapeError` naming the operands), a VJP written in graph ops, a NumPy reference for the
interpreter, and a kernel kind rendered from templates/<kind>.c.j2 (registered here with
`codegen.register_kernel`). Where a composition of existing ops does the job, the op is that
composition:

- conv2d = im2col (new op) -> GEMM (matmul with the weight transposed) -> NHWC->NCHW transpose
  -> bias broadcast add; its input gradient is col2im of the GEMM's, its weight gradient a GEMM.
- batch_norm and dropout are graph ops inside `ops.mode_select`; running statistics are
  non-trainable parameters updated through `Graph.update_state`.
- lstm/gru/rnn project the whole input sequence with one GEMM (graph level, so its gradients
  are the ordinary matmul/reduce ones), then run a recurrent core op whose kernel loops over
  time (one `bp_gemm` per step for the hidden-to-hidden product) and whose backward kernel is
  backpropagation through time. The cell's scalar formulas and their derivatives come from
  SymPy: `Cell` differentiates a small program of `symbolic.Fn` steps in reverse mode, every
  partial from `Fn.partial` (sigmoid' = y(1-y), tanh' = 1-y^2 in the stored outputs), and
  `codegen.print_formulas` prints them.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp

from ..errors import ShapeError
from ..ir import graph as ir
from ..ir.graph import FLOAT, INT, Node, Shape, shape_str
from ..ir.kernel import Kernel, Mono
from ..symbolic import functions as sym
from ..symbolic.functions import ARGS, OUT, Fn
from .core import (
    _check_tensor,
    _need_float,
    _no_grad,
    concrete,
    const,
    ew,
    matmul_node,
    mean,
    mode_select,
    random_uniform,
    reduce_,
    reduced_count,
    register,
    register_kernel,
    reshape,
    square,
    transpose,
)

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "lstm", "gru", "rnn", "batch_norm", "dropout", "embedding",
           "concat", "slice", "im2col", "col2im"]


# --- helpers --------------------------------------------------------------------------------

def _pair(v: Any, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        v = (int(v), int(v))
    if (not isinstance(v, tuple | list) or len(v) != 2
            or not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in v)):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {tuple(v)!r}")
    return int(v[0]), int(v[1])


def _dim(shape: Shape, what: str) -> None:
    for d in shape:
        if not isinstance(d, int):
            raise ShapeError(f"{what}: channel and spatial dims must be fixed ints, got {shape_str(shape)}")


def _c(ctx: Context, *dims: Any) -> str:
    """The C text of a product of dims (ints or runtime names)."""
    return ctx.c(Mono.of(tuple(dims)))


def _multi_output(name: str, kernel: str, vjp: Callable | None, ref_all: Callable,
                  aux_specs: Sequence[tuple[str, Callable[[Node], Shape]]]) -> None:
    """Register an op whose kernel also writes extra results (aux nodes, read by its backward).

    An aux node takes (main node, *main inputs) as inputs, so the reference interpreter can
    recompute it; `ref_all(node, args, dims)` returns the main value then every aux value.
    """
    def aux(node: Node) -> list[Node]:
        return [Node(aname, (node, *node.inputs), {}, shape_fn(node), FLOAT) for aname, shape_fn in aux_specs]

    register(name, vjp=vjp, ref=lambda node, args, dims: ref_all(node, args, dims)[0], kernel=kernel, aux=aux)
    for k, (aname, _) in enumerate(aux_specs):
        register(aname, vjp=_no_grad(aname), kernel="aux",
                 ref=lambda node, args, dims, k=k: ref_all(node.inputs[0], args[1:], dims)[k + 1])


def _aux_of(node: Node) -> list[Node]:
    from .core import OPS
    return OPS[node.op].aux(node)


# --- slicing and concatenation ----------------------------------------------------------------

def slice(x: Node, axis: int, start: int | None = None, stop: int | None = None) -> Node:  # noqa: A001
    """x[..., start:stop, ...] along `axis` (step 1), as Python slicing.

    On a fixed dim, indices are clamped like Python's and the result must be non-empty. On a
    runtime dim (e.g. "time") the window must have a fixed length: start and stop both counted
    from the front (0 <= start < stop) or both from the end (start < 0, stop < 0 or None), e.g.
    slice(x, 1, -1) for the last time step; a too short runtime dim is rejected at run time.
    """
    _need_float(_check_tensor(x, "slice"), "slice")
    if x.ndim == 0:
        raise ShapeError("slice: cannot slice a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"slice: axis {axis} is out of range for a tensor of shape {shape_str(x.shape)}")
    axis %= x.ndim
    n = x.shape[axis]
    for v in (start, stop):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
            raise TypeError(f"slice: start and stop must be ints or None, got {v!r}")
    if isinstance(n, int):
        s, e, _ = builtins.slice(start, stop).indices(n)
        if e <= s:
            raise ShapeError(f"slice: [{start}:{stop}] of axis {axis} of {shape_str(x.shape)} is empty")
        if s == 0 and e == n:
            return x
        begin, length = s, e - s
    else:
        if start is None and stop is None:
            return x
        if start is not None and start < 0 and (stop is None or stop < 0):
            begin, length = int(start), (0 if stop is None else int(stop)) - int(start)
        elif (start is None or start >= 0) and stop is not None and stop > 0:
            begin, length = int(start or 0), int(stop) - int(start or 0)
        else:
            raise ShapeError(f"slice: axis {axis} of {shape_str(x.shape)} has runtime size {n!r}; the window "
                             f"[{start}:{stop}] must have a fixed length (both ends from the front or both "
                             "from the end)")
        if length <= 0:
            raise ShapeError(f"slice: [{start}:{stop}] of axis {axis} of {shape_str(x.shape)} is empty")
    shape = tuple(length if i == axis else d for i, d in enumerate(x.shape))
    return Node("slice", (x,), {"axis": axis, "begin": begin}, shape, x.dtype)


def _pad(g: Node, shape: Shape, axis: int, begin: int) -> Node:
    """The adjoint of slice: `g` placed at `begin` along `axis` of zeros of `shape`."""
    return Node("pad", (g,), {"axis": axis, "begin": begin}, tuple(shape), FLOAT)


def _window(shape: tuple[int, ...], axis: int, begin: int, length: int) -> tuple:
    n = shape[axis]
    s = begin if begin >= 0 else n + begin
    if s < 0 or s + length > n:
        raise ValueError(f"slice window [{begin}, +{length}) is outside axis {axis} of size {n}")
    return tuple(builtins.slice(s, s + length) if i == axis else builtins.slice(None) for i in range(len(shape)))


def _slice_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    x = args[0]
    return x[_window(x.shape, node.attrs["axis"], node.attrs["begin"], node.shape[node.attrs["axis"]])].copy()


def _pad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    out = np.zeros(concrete(node.shape, dims))
    g = args[0]
    out[_window(out.shape, node.attrs["axis"], node.attrs["begin"], g.shape[node.attrs["axis"]])] = g
    return out


register("slice", vjp=lambda node, g: [_pad(g, node.inputs[0].shape, node.attrs["axis"], node.attrs["begin"])],
         ref=_slice_ref, kernel="slice")
register("pad", vjp=lambda node, g: [slice(g, node.attrs["axis"], node.attrs["begin"],
                                           _stop(node.attrs["begin"], node.inputs[0].shape[node.attrs["axis"]]))],
         ref=_pad_ref, kernel="slice")


def _stop(begin: int, length: int) -> int | None:
    stop = begin + length
    return None if begin < 0 and stop == 0 else stop


def _slice_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    pad = node.op == "pad"
    big = node.shape if pad else node.inputs[0].shape
    axis, begin = node.attrs["axis"], node.attrs["begin"]
    length = (node.inputs[0] if pad else node).shape[axis]
    n = big[axis]
    return {"pad": pad, "outer": _c(ctx, *big[:axis]), "inner": _c(ctx, *big[axis + 1:]), "n": _c(ctx, n),
            "length": length, "begin": begin, "from_end": begin < 0, "checked": isinstance(n, str)}


register_kernel("slice", _slice_builder, failing=True)


def concat(tensors: Sequence[Node], axis: int = 0) -> Node:
    """Join tensors along `axis` (whose sizes must be fixed ints); other dims must match."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    for t in tensors:
        _need_float(_check_tensor(t, "concat"), "concat")
    if len(tensors) == 1:
        return tensors[0]
    first = tensors[0]
    if first.ndim == 0:
        raise ShapeError("concat: cannot concatenate scalars")
    if not -first.ndim <= axis < first.ndim:
        raise ShapeError(f"concat: axis {axis} is out of range for tensors of rank {first.ndim}")
    axis %= first.ndim
    shapes = ", ".join(shape_str(t.shape) for t in tensors)
    for t in tensors:
        if t.dtype != first.dtype:
            raise ShapeError(f"concat: tensors must share a dtype, got shapes {shapes} with dtypes "
                             f"{[x.dtype for x in tensors]}")
        if t.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
            raise ShapeError(f"concat: shapes {shapes} differ outside axis {axis}")
        if not isinstance(t.shape[axis], int):
            raise ShapeError(f"concat: axis {axis} must have fixed sizes, got shapes {shapes}")
    total = builtins.sum(t.shape[axis] for t in tensors)
    shape = tuple(total if i == axis else d for i, d in enumerate(first.shape))
    return Node("concat", tuple(tensors), {"axis": axis}, shape, first.dtype)


def _concat_vjp(node: Node, g: Node) -> list[Node]:
    axis, out, offset = node.attrs["axis"], [], 0
    for t in node.inputs:
        n = t.shape[axis]
        out.append(slice(g, axis, offset, offset + n))
        offset += n
    return out


register("concat", vjp=_concat_vjp, kernel="concat",
         ref=lambda node, args, dims: np.concatenate(args, axis=node.attrs["axis"]))


def _concat_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    axis = node.attrs["axis"]
    inner = Mono.of(node.shape[axis + 1:])
    parts, offset = [], 0
    for i, t in enumerate(node.inputs):
        parts.append({"array": f"in{i}", "offset": ctx.c(Mono(offset) * inner),
                      "count": ctx.c(Mono(t.shape[axis]) * inner)})
        offset += t.shape[axis]
    return {"outer": _c(ctx, *node.shape[:axis]), "row": ctx.c(Mono(node.shape[axis]) * inner), "parts": parts}


register_kernel("concat", _concat_builder)


# --- convolution ------------------------------------------------------------------------------

def _conv_geometry(shape: Shape, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                   what: str) -> tuple[int, int]:
    _, _, h, w = shape
    oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ShapeError(f"{what}: kernel {kernel} with padding {padding} does not fit input {shape_str(shape)}")
    return oh, ow


def _check_nchw(x: Node, what: str) -> None:
    _need_float(_check_tensor(x, what), what)
    if x.ndim != 4:
        raise ShapeError(f"{what} expects an NCHW tensor (4-D), got shape {shape_str(x.shape)}")
    _dim(x.shape[1:], what)


def im2col(x: Node, kernel: Any, stride: Any = 1, padding: Any = 0) -> Node:
    """Patches of an NCHW tensor as rows: (N, C, H, W) -> (N, OH, OW, C*kh*kw), zero padded,
    columns ordered (c, ki, kj) like a PyTorch conv weight flattened to (out, C*kh*kw)."""
    _check_nchw(x, "im2col")
    kernel, stride, padding = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding", 0)
    oh, ow = _conv_geometry(x.shape, kernel, stride, padding, "im2col")
    n, c = x.shape[:2]
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "image": tuple(x.shape[1:])}
    return Node("im2col", (x,), attrs, (n, oh, ow, c * kernel[0] * kernel[1]), FLOAT)


def col2im(cols: Node, image: tuple[int, int, int], kernel: Any, stride: Any = 1, padding: Any = 0) -> Node:
    """The adjoint of im2col: every column entry added back to the pixel it was read from."""
    kernel, stride, padding = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding", 0)
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "image": tuple(image)}
    return Node("col2im", (cols,), attrs, (cols.shape[0], *image), FLOAT)


def _im2col_ref(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.zeros((n, oh, ow, c, kh, kw))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n, oh, ow, c * kh * kw)


def _col2im_ref(cols: np.ndarray, image, kernel, stride, padding) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    c, h, w = image
    n, oh, ow, _ = cols.shape
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    cols = cols.reshape(n, oh, ow, c, kh, kw)
    for i in range(kh):
        for j in range(kw):
            patch = cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
            xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += patch
    return xp[:, :, ph:ph + h, pw:pw + w]


def _geom(node: Node) -> tuple:
    a = node.attrs
    return a["kernel"], a["stride"], a["padding"]


register("im2col", vjp=lambda node, g: [col2im(g, node.attrs["image"], *_geom(node))],
         ref=lambda node, args, dims: _im2col_ref(args[0], *_geom(node)), kernel="im2col")
register("col2im", vjp=lambda node, g: [im2col(g, *_geom(node))],
         ref=lambda node, args, dims: _col2im_ref(args[0], node.attrs["image"], *_geom(node)), kernel="im2col")


def _im2col_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    (kh, kw), (sh, sw), (ph, pw) = _geom(node)
    c, h, w = node.attrs["image"]
    cols = node.inputs[0] if node.op == "col2im" else node
    _, oh, ow, ckk = cols.shape
    batch = _c(ctx, cols.shape[0])
    return {"back": node.op == "col2im", "batch": batch, "C": c, "H": h, "W": w, "OH": oh,
            "OW": ow, "KH": kh, "KW": kw, "SH": sh, "SW": sw, "PH": ph, "PW": pw, "CKK": ckk,
            "split": {"what": "its images", "work": f"({batch})*{oh * ow * ckk}"}}


register_kernel("im2col", _im2col_builder)


def conv2d(x: Node, w: Node, b: Node | None = None, stride: Any = 1, padding: Any = 0) -> Node:
    """2-D convolution (cross-correlation, as PyTorch) of NCHW `x` with `w` of shape
    (out, in, kh, kw) and optional bias `b` (out,): im2col, one GEMM, a layout transpose."""
    _check_nchw(x, "conv2d")
    _check_tensor(w, "conv2d")
    if w.ndim != 4 or not all(isinstance(d, int) for d in w.shape):
        raise ShapeError(f"conv2d: weight must be (out, in, kh, kw) with fixed sizes, got {shape_str(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ShapeError(f"conv2d: input {shape_str(x.shape)} has {x.shape[1]} channels but weight "
                         f"{shape_str(w.shape)} expects {w.shape[1]}")
    out_ch = w.shape[0]
    cols = im2col(x, (w.shape[2], w.shape[3]), stride, padding)
    wmat = reshape(w, (out_ch, cols.shape[-1]))
    y = transpose(matmul_node(cols, wmat, False, True), (0, 3, 1, 2))  # (N, OH, OW, O) -> (N, O, OH, OW)
    if b is not None:
        _check_tensor(b, "conv2d bias")
        if b.shape != (out_ch,):
            raise ShapeError(f"conv2d: bias must have shape ({out_ch},) for weight {shape_str(w.shape)}, "
                             f"got {shape_str(b.shape)}")
        y = y + reshape(b, (out_ch, 1, 1))
    return y


# --- pooling ---------------------------------------------------------------------------------

def _pool_node(op: str, x: Node, kernel: Any, stride: Any) -> Node:
    _check_nchw(x, op)
    kernel = _pair(kernel, f"{op} kernel")
    stride = kernel if stride is None else _pair(stride, f"{op} stride")
    oh, ow = _conv_geometry(x.shape, kernel, stride, (0, 0), op)
    return Node(op, (x,), {"kernel": kernel, "stride": stride}, (*x.shape[:2], oh, ow), FLOAT)


def max_pool2d(x: Node, kernel: Any, stride: Any = None) -> Node:
    """Max over kernel windows of an NCHW tensor (stride defaults to the kernel, as PyTorch);
    the kernel records each window's argmax for the backward pass."""
    return _pool_node("max_pool2d", x, kernel, stride)


def avg_pool2d(x: Node, kernel: Any, stride: Any = None) -> Node:
    """Mean over kernel windows of an NCHW tensor (stride defaults to the kernel)."""
    return _pool_node("avg_pool2d", x, kernel, stride)


def _windows(x: np.ndarray, kernel, stride, oh: int, ow: int) -> np.ndarray:
    """(N, C, OH, OW, kh*kw) view of the pooling windows."""
    (kh, kw), (sh, sw) = kernel, stride
    parts = [x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return np.stack(parts, axis=-1)


def _max_pool_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    x = args[0]
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    oh, ow = node.shape[2:]
    win = _windows(x, (kh, kw), (sh, sw), oh, ow)
    k = np.argmax(win, axis=-1)
    ki, kj = k // kw, k % kw
    rows = np.arange(oh)[:, None] * sh + ki
    cols = np.arange(ow)[None, :] * sw + kj
    return np.max(win, axis=-1), (rows * x.shape[3] + cols).astype(np.float64)


def _max_pool_vjp(node: Node, g: Node) -> list[Node]:
    (argmax,) = _aux_of(node)
    return [Node("max_pool2d_grad", (g, argmax), {}, node.inputs[0].shape, FLOAT)]


def _max_pool_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g, arg = args
    shape = concrete(node.shape, dims)
    n, c, h, w = shape
    out = np.zeros((n * c, h * w))
    idx = arg.reshape(n * c, -1).astype(np.int64)
    for p in range(n * c):
        np.add.at(out[p], idx[p], g.reshape(n * c, -1)[p])
    return out.reshape(shape)


_multi_output("max_pool2d", "pool", _max_pool_vjp, _max_pool_ref, [("max_pool2d_argmax", lambda node: node.shape)])
register("max_pool2d_grad", vjp=_no_grad("max_pool2d_grad"), ref=_max_pool_grad_ref, kernel="pool_grad")


def _avg_pool_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    oh, ow = node.shape[2:]
    return _windows(args[0], node.attrs["kernel"], node.attrs["stride"], oh, ow).mean(axis=-1)


def _avg_pool_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g = args[0]
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    out = np.zeros(concrete(node.shape, dims))
    oh, ow = g.shape[2:]
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += g / (kh * kw)
    return out


register("avg_pool2d", vjp=lambda node, g: [Node("avg_pool2d_grad", (g,), dict(node.attrs), node.inputs[0].shape,
                                                 FLOAT)],
         ref=_avg_pool_ref, kernel="pool")
register("avg_pool2d_grad", vjp=lambda node, g: [avg_pool2d(g, node.attrs["kernel"], node.attrs["stride"])],
         ref=_avg_pool_grad_ref, kernel="pool_grad")


def _pool_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    grad = node.op.endswith("_grad")
    big = node.shape if grad else node.inputs[0].shape
    small = node.inputs[0].shape if grad else node.shape
    if node.op == "max_pool2d_grad":
        kernel, stride = (1, 1), (1, 1)  # unused: the argmax says where each gradient goes
    else:
        kernel, stride = node.attrs["kernel"], node.attrs["stride"]
    planes = _c(ctx, *big[:2])
    return {"grad": grad, "max": node.op.startswith("max"), "planes": planes, "H": big[2], "W": big[3],
            "OH": small[2], "OW": small[3], "KH": kernel[0], "KW": kernel[1], "SH": stride[0], "SW": stride[1],
            "split": {"what": "its planes", "work": f"({planes})*{big[2] * big[3]}"}}


register_kernel("pool", _pool_builder)
register_kernel("pool_grad", _pool_builder)


# --- embedding -------------------------------------------------------------------------------

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


register("embedding", vjp=_embedding_vjp, ref=_embedding_ref, kernel="embedding")
def _embedding_grad_vjp(node: Node, g: Node) -> list[Node | None]:
    """embedding_grad adds rows of its cotangent into the table's rows: linear in it, so its VJP
    picks the rows back out (an embedding lookup of g)."""
    _, ids = node.inputs
    return [embedding(ids, g), None]


register("embedding_grad", vjp=_embedding_grad_vjp, ref=_embedding_grad_ref, kernel="embedding")
register_kernel("embedding", _embedding_builder, failing=True)


# --- dropout ---------------------------------------------------------------------------------

def dropout(x: Node, p: float, salt: int = 0) -> Node:
    """Zero each element with probability p and scale the rest by 1/(1-p) in training calls
    (loss, loss_and_grad, train_step); the identity in `forward`. The mask comes from the
    model's counter-based generator (model seed, step, and a salt from what `x` computes plus
    `salt`), so a run is reproducible; pass different salts to drop one tensor twice
    independently."""
    _need_float(_check_tensor(x, "dropout"), "dropout")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    u = random_uniform(x.shape, (ir.structural_hash(x) ^ (int(salt) * 0x9E3779B1)) & 0xFFFFFFFF)
    keep = sp.Piecewise((ARGS[0] * sp.Float(1.0 / (1.0 - p)), ARGS[1] >= sp.Float(p)), (0, True))
    return mode_select(ew(Fn("dropout", keep, 2), x, u), x)


# --- batch normalization -----------------------------------------------------------------------

def batch_norm(x: Node, gamma: Node, beta: Node, momentum: float = 0.1, eps: float = 1e-5) -> Node:
    """Batch normalization of (N, C) or (N, C, H, W) over every axis but the channel axis 1.

    Training calls normalize with the batch mean and biased variance; `forward` uses the
    running statistics, non-trainable parameters "<gamma>.running_mean" / ".running_var"
    created on gamma's graph (zeros / ones) and updated by every train_step as PyTorch does:
    r <- (1 - momentum) r + momentum s, with the unbiased batch variance for running_var.
    Calling it again with the same gamma (a layer shared between two inputs) shares the
    running statistics; train_step then applies the update of the last call. Every train_*
    entry of a multi-loss graph applies the updates, so they must depend only on inputs that
    each such entry reads.
    """
    _need_float(_check_tensor(x, "batch_norm"), "batch_norm")
    _check_tensor(gamma, "batch_norm gamma")
    _check_tensor(beta, "batch_norm beta")
    if x.ndim not in (2, 4):
        raise ShapeError(f"batch_norm expects (N, C) or (N, C, H, W), got {shape_str(x.shape)}")
    c = x.shape[1]
    if not isinstance(c, int) or gamma.shape != (c,) or beta.shape != (c,):
        raise ShapeError(f"batch_norm: input {shape_str(x.shape)} needs gamma and beta of shape ({c},), got "
                         f"gamma {shape_str(gamma.shape)} and beta {shape_str(beta.shape)}")
    if not 0.0 <= float(momentum) <= 1.0 or float(eps) <= 0:
        raise ValueError(f"batch_norm: momentum must be in [0, 1] and eps > 0, got {momentum}, {eps}")
    graph = ir.graph_of(gamma)
    if graph is None:
        raise ValueError("batch_norm: gamma must depend on a parameter of a graph (the running statistics "
                         "are created on that graph)")
    base = gamma.attrs["name"] if gamma.op == "param" else f"batch_norm{ir.structural_hash(gamma):08x}"
    running = []
    for stat, init in (("running_mean", "zeros"), ("running_var", "ones")):
        name = f"{base}.{stat}"
        if name not in graph.params:
            graph.param(name, (c,), init=init, trainable=False)
        running.append(graph.params[name])
    rmean, rvar = running
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    bshape = (c,) if x.ndim == 2 else (c, 1, 1)
    g_b, b_b = reshape(gamma, bshape), reshape(beta, bshape)
    eps_ = sp.Float(float(eps))

    mu = mean(x, axes, keepdims=True)
    xc = x - mu
    sq = square(xc)
    var = mean(sq, axes, keepdims=True)
    inv_std = ew(Fn("rsqrt_eps", (ARGS[0] + eps_) ** sp.Rational(-1, 2), 1), var)
    train = xc * inv_std * g_b + b_b
    evaluate = ew(Fn("batch_norm_eval", (ARGS[0] - ARGS[1]) * (ARGS[2] + eps_) ** sp.Rational(-1, 2), 3),
                  x, reshape(rmean, bshape), reshape(rvar, bshape)) * g_b + b_b

    m = float(momentum)
    n = reduced_count(x.shape, axes)  # N*H*W as SymPy; N may be a runtime dim
    mom = sp.Float(m)
    new_mean = ew(Fn("running_update", (1 - mom) * ARGS[0] + mom * ARGS[1], 2), rmean, reshape(mu, (c,)))
    # the unbiased variance; the n/(n-1) factor is applied inside the (N, ...) loop, where the
    # runtime batch size is in scope (a batch of one sample leaves the variance 0, not NaN)
    var_u = mean(ew(Fn("unbiased", ARGS[0] * n / sp.Max(n - 1, 1), 1), sq), axes)
    new_var = ew(Fn("running_update", (1 - mom) * ARGS[0] + mom * ARGS[1], 2), rvar, var_u)
    graph.update_state(rmean.attrs["name"], new_mean)
    graph.update_state(rvar.attrs["name"], new_var)
    return mode_select(train, evaluate)


# --- recurrent cells: scalar programs differentiated by SymPy ---------------------------------

class Cell:
    """A recurrent cell as a small program of scalar `Fn` steps.

    `forward(outputs)` gives each output as one SymPy expression of the leaves (for printing
    after CSE); `backward(seeds, wrt, stored)` runs reverse mode over the steps: each step's
    partials are `Fn.partial` (derived and simplified by SymPy, in terms of the step's own
    output where cheaper), evaluated with the values the backward kernel has (`stored`).
    """

    def __init__(self) -> None:
        self.steps: list[tuple[sp.Symbol, Fn, tuple[sp.Expr, ...]]] = []
        self.defs: dict[sp.Symbol, tuple[Fn, tuple[sp.Expr, ...]]] = {}

    @staticmethod
    def leaf(name: str) -> sp.Symbol:
        return sp.Symbol(f"s_{name}", real=True)

    def __call__(self, name: str, op: str, *args: Any) -> sp.Symbol:
        fn = sym.builtin(op)
        out = self.leaf(name)
        args_ = tuple(sp.sympify(a) for a in args)
        for a in args_:
            if not (a.is_Symbol or a.is_Number):
                raise ValueError(f"cell step {name}: arguments must be symbols or numbers, got {a}")
        self.steps.append((out, fn, args_))
        self.defs[out] = (fn, args_)
        return out

    def expr(self, s: sp.Expr) -> sp.Expr:
        if s in self.defs:
            fn, args = self.defs[s]
            return fn.expr.xreplace({ARGS[k]: self.expr(a) for k, a in enumerate(args)})
        return s

    def value(self, s: sp.Expr, stored: set[sp.Symbol]) -> sp.Expr:
        """`s` in terms of the stored values (recomputing steps that are not stored)."""
        if s.is_Number or s in stored:
            return s
        if s not in self.defs:
            raise ValueError(f"cell: the backward pass needs {s}, which is neither stored nor computable")
        fn, args = self.defs[s]
        return fn.expr.xreplace({ARGS[k]: self.value(a, stored) for k, a in enumerate(args)})

    def backward(self, seeds: dict[sp.Symbol, sp.Expr], wrt: Sequence[sp.Symbol],
                 stored: set[sp.Symbol]) -> list[sp.Expr]:
        adj: dict[sp.Symbol, sp.Expr] = dict(seeds)
        for out, fn, args in reversed(self.steps):
            a = adj.get(out)
            if a is None:
                continue
            for k, arg in enumerate(args):
                if arg.is_Number:
                    continue
                partial = fn.partial(k).expr
                subs = {}
                for s in partial.free_symbols:
                    if s == OUT:
                        subs[s] = self.value(out, stored)
                    elif s in ARGS[:fn.nargs]:
                        subs[s] = self.value(args[ARGS.index(s)], stored)
                term = a * partial.xreplace(subs)
                adj[arg] = term if arg not in adj else adj[arg] + term
        return [adj.get(w, sp.Integer(0)) for w in wrt]


def _lstm_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    c = Cell()
    L = Cell.leaf
    xi, xf, xg, xo, hi, hf, hg, ho, cp = (L(n) for n in ("xi", "xf", "xg", "xo", "hi", "hf", "hg", "ho", "cp"))
    ai, af, ag, ao = c("ai", "add", xi, hi), c("af", "add", xf, hf), c("ag", "add", xg, hg), c("ao", "add", xo, ho)
    i, f, g, o = c("i", "sigmoid", ai), c("f", "sigmoid", af), c("g", "tanh", ag), c("o", "sigmoid", ao)
    cell = c("c", "add", c("fc", "mul", f, cp), c("ig", "mul", i, g))
    h = c("h", "mul", o, c("tc", "tanh", cell))
    return c, {"xi": xi, "xf": xf, "xg": xg, "xo": xo, "hi": hi, "hf": hf, "hg": hg, "ho": ho, "cp": cp,
               "ai": ai, "af": af, "ag": ag, "ao": ao, "i": i, "f": f, "g": g, "o": o, "c": cell, "h": h}


def _gru_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    c = Cell()
    L = Cell.leaf
    xr, xz, xn, hr, hz, hnr, br, bz, bn, hp = (L(n) for n in ("xr", "xz", "xn", "hr", "hz", "hnr", "br", "bz", "bn",
                                                            "hp"))
    ar = c("ar", "add", c("ar0", "add", xr, hr), br)
    az = c("az", "add", c("az0", "add", xz, hz), bz)
    r, z = c("r", "sigmoid", ar), c("z", "sigmoid", az)
    hn = c("hn", "add", hnr, bn)
    n = c("n", "tanh", c("an", "add", xn, c("rhn", "mul", r, hn)))
    h = c("h", "add", c("zn", "mul", c("omz", "sub", 1, z), n), c("zh", "mul", z, hp))
    return c, {"xr": xr, "xz": xz, "xn": xn, "hr": hr, "hz": hz, "hnr": hnr, "br": br, "bz": bz, "bn": bn,
               "hp": hp, "ar": ar, "az": az, "r": r, "z": z, "hn": hn, "n": n, "h": h}


def _rnn_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    c = Cell()
    x, hh = Cell.leaf("x"), Cell.leaf("hh")
    a = c("a", "add", x, hh)
    h = c("h", "tanh", a)
    return c, {"x": x, "hh": hh, "a": a, "h": h}


def _formulas(ctx: Context, loads: list[tuple[sp.Symbol, str]], outputs: list[sp.Expr],
              stores: list[str]) -> dict[str, Any]:
    temps, values = ctx.formulas(outputs, [s for s, _ in loads], prefix="e")
    return {"loads": [{"name": s.name, "value": v} for s, v in loads], "temps": temps,
            "stores": [{"target": t, "value": v} for t, v in zip(stores, values)]}


# --- recurrent layers: the graph-level functions ------------------------------------------------

def _check_seq(x: Node, what: str) -> None:
    _need_float(_check_tensor(x, what), what)
    if x.ndim != 3 or not isinstance(x.shape[2], int):
        raise ShapeError(f"{what} expects (batch, time, features) with fixed features, got {shape_str(x.shape)}")


def _recurrent_inputs(what: str, gates: int, x: Node, w_ih: Node, w_hh: Node, b_ih: Node | None,
                      b_hh: Node | None, states: Sequence[tuple[str, Node | None]]) -> tuple[int, list[Node]]:
    _check_seq(x, what)
    for name, t in (("W_ih", w_ih), ("W_hh", w_hh)):
        _need_float(_check_tensor(t, f"{what} {name}"), f"{what} {name}")
    if w_hh.ndim != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ShapeError(f"{what}: W_hh must be ({gates}*hidden, hidden), got {shape_str(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if w_ih.shape != (gates * hidden, x.shape[2]):
        raise ShapeError(f"{what}: input {shape_str(x.shape)} and W_hh {shape_str(w_hh.shape)} need W_ih of shape "
                         f"{shape_str((gates * hidden, x.shape[2]))}, got {shape_str(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and _check_tensor(b, f"{what} {name}").shape != (gates * hidden,):
            raise ShapeError(f"{what}: {name} must have shape ({gates * hidden},), got {shape_str(b.shape)}")
    out = []
    batch = x.shape[0]
    for name, s in states:
        if s is None:
            s = const(0.0, (batch, hidden))
        elif _check_tensor(s, f"{what} {name}").shape != (batch, hidden):
            raise ShapeError(f"{what}: {name} must have shape {shape_str((batch, hidden))} for input "
                             f"{shape_str(x.shape)}, got {shape_str(s.shape)}")
        out.append(s)
    return hidden, out


def _last_step(seq: Node) -> Node:
    return reshape(slice(seq, 1, -1), (seq.shape[0], seq.shape[2]))


def time_shift(x: Node, first: Node) -> Node:
    """(B, T, H) -> (B, T, H) with step t holding x's step t-1 and step 0 holding `first` (B, H):
    the previous hidden state of every step."""
    return Node("time_shift", (x, first), {}, x.shape, FLOAT)


def _time_unshift(g: Node) -> Node:
    return Node("time_unshift", (g,), {}, g.shape, FLOAT)


def _time_shift_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    x, first = args
    return np.concatenate([first[:, None, :], x[:, :-1]], axis=1)


def _time_unshift_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g = args[0]
    return np.concatenate([g[:, 1:], np.zeros_like(g[:, :1])], axis=1)


register("time_shift", vjp=lambda node, g: [_time_unshift(g), _first_step(g)], ref=_time_shift_ref,
         kernel="time_shift")
register("time_unshift", vjp=lambda node, g: [time_shift(g, const(0.0, (g.shape[0], g.shape[2])))],
         ref=_time_unshift_ref, kernel="time_shift")


def _first_step(seq: Node) -> Node:
    return reshape(slice(seq, 1, 0, 1), (seq.shape[0], seq.shape[2]))


def _time_shift_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    b, t, h = node.shape
    return {"unshift": node.op == "time_unshift", "B": _c(ctx, b), "T": _c(ctx, t), "H": h}


register_kernel("time_shift", _time_shift_builder)


def _input_projection(x: Node, w_ih: Node, b_ih: Node | None, b_hh: Node | None) -> Node:
    xp = matmul_node(x, w_ih, False, True)  # (B, T, gates*H): one GEMM for the whole sequence
    bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
    return xp if bias is None else xp + bias


def lstm(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
         h0: Node | None = None, c0: Node | None = None) -> tuple[Node, tuple[Node, Node]]:
    """A one-layer LSTM over (batch, time, features), PyTorch's equations and layouts: gates
    (i, f, g, o), W_ih (4H, in), W_hh (4H, H). Returns (outputs (B, T, H), (h_T, c_T)).
    The time dim may be a runtime size."""
    hidden, (h0, c0) = _recurrent_inputs("lstm", 4, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0), ("c0", c0)))
    xp = _input_projection(x, W_ih, b_ih, b_hh)
    hc = Node("lstm_core", (xp, W_hh, h0, c0), {}, (x.shape[0], x.shape[1], 2 * hidden), FLOAT)
    out = slice(hc, 2, 0, hidden)
    return out, (_last_step(out), _last_step(slice(hc, 2, hidden, 2 * hidden)))


def gru(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
        h0: Node | None = None) -> tuple[Node, Node]:
    """A one-layer GRU, PyTorch's equations (gates r, z, n; b_hh's n part inside r * (...)).
    Returns (outputs (B, T, H), h_T)."""
    hidden, (h0,) = _recurrent_inputs("gru", 3, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0),))
    xp = _input_projection(x, W_ih, b_ih, None)
    bhh = b_hh if b_hh is not None else const(0.0, (3 * hidden,))
    h = Node("gru_core", (xp, W_hh, bhh, h0), {}, (x.shape[0], x.shape[1], hidden), FLOAT)
    return h, _last_step(h)


def rnn(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
        h0: Node | None = None) -> tuple[Node, Node]:
    """A one-layer Elman RNN, h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).
    Returns (outputs (B, T, H), h_T)."""
    _, (h0,) = _recurrent_inputs("rnn", 1, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0),))
    xp = _input_projection(x, W_ih, b_ih, b_hh)
    h = Node("rnn_core", (xp, W_hh, h0), {}, xp.shape, FLOAT)
    return h, _last_step(h)


# --- recurrent cores: VJPs ---------------------------------------------------------------------

def _lstm_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, h0, c0 = node.inputs
    hidden = w_hh.shape[1]
    (gates,) = _aux_of(node)
    dxp = Node("lstm_grad", (w_hh, c0, node, gates, g), {}, xp.shape, FLOAT)
    dh0, dc0 = _aux_of(dxp)
    hprev = time_shift(slice(node, 2, 0, hidden), h0)
    return [dxp, matmul_node(dxp, hprev, True, False), dh0, dc0]


def _gru_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, bhh, h0 = node.inputs
    (gates,) = _aux_of(node)
    dxp = Node("gru_grad", (w_hh, h0, node, gates, g), {}, xp.shape, FLOAT)
    dhp, dh0, _ = _aux_of(dxp)
    hprev = time_shift(node, h0)
    return [dxp, matmul_node(dhp, hprev, True, False), reduce_(dhp, (0, 1), keepdims=False, mean=False), dh0]


def _rnn_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, h0 = node.inputs
    dxp = Node("rnn_grad", (w_hh, node, g), {}, xp.shape, FLOAT)
    (dh0,) = _aux_of(dxp)
    return [dxp, matmul_node(dxp, time_shift(node, h0), True, False), dh0]


# --- recurrent cores: NumPy references (independent of the generated C) -----------------------

def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _lstm_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    xp, w_hh, h, c = args
    b, t, g4 = xp.shape
    hid = g4 // 4
    hc, gates = np.zeros((b, t, 2 * hid)), np.zeros((b, t, g4))
    for s in range(t):
        a = xp[:, s] + h @ w_hh.T
        i, f, g, o = _sigmoid(a[:, :hid]), _sigmoid(a[:, hid:2 * hid]), np.tanh(a[:, 2 * hid:3 * hid]), \
            _sigmoid(a[:, 3 * hid:])
        c = f * c + i * g
        h = o * np.tanh(c)
        hc[:, s, :hid], hc[:, s, hid:] = h, c
        gates[:, s] = np.concatenate([i, f, g, o], axis=1)
    return hc, gates


def _lstm_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, ...]:
    w_hh, c0, hc, gates, g = args
    b, t, h2 = hc.shape
    hid = h2 // 2
    dxp = np.zeros((b, t, 4 * hid))
    dh, dc = np.zeros((b, hid)), np.zeros((b, hid))
    for s in reversed(range(t)):
        i, f, gg, o = (gates[:, s, k * hid:(k + 1) * hid] for k in range(4))
        c = hc[:, s, hid:]
        cp = hc[:, s - 1, hid:] if s else c0
        dh = dh + g[:, s, :hid]
        tc = np.tanh(c)
        dc = dc + g[:, s, hid:] + dh * o * (1 - tc ** 2)
        da = np.concatenate([dc * gg * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - gg ** 2),
                             dh * tc * o * (1 - o)], axis=1)
        dxp[:, s] = da
        dh = da @ w_hh
        dc = dc * f
    return dxp, dh, dc


def _gru_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    xp, w_hh, bhh, h = args
    b, t, g3 = xp.shape
    hid = g3 // 3
    out, gates = np.zeros((b, t, hid)), np.zeros((b, t, 4 * hid))
    for s in range(t):
        hp = h @ w_hh.T + bhh
        r = _sigmoid(xp[:, s, :hid] + hp[:, :hid])
        z = _sigmoid(xp[:, s, hid:2 * hid] + hp[:, hid:2 * hid])
        hn = hp[:, 2 * hid:]
        n = np.tanh(xp[:, s, 2 * hid:] + r * hn)
        h = (1 - z) * n + z * h
        out[:, s] = h
        gates[:, s] = np.concatenate([r, z, n, hn], axis=1)
    return out, gates


def _gru_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, ...]:
    w_hh, h0, hs, gates, g = args
    b, t, hid = hs.shape
    dxp, dhp = np.zeros((b, t, 3 * hid)), np.zeros((b, t, 3 * hid))
    dh = np.zeros((b, hid))
    for s in reversed(range(t)):
        r, z, n, hn = (gates[:, s, k * hid:(k + 1) * hid] for k in range(4))
        hprev = hs[:, s - 1] if s else h0
        dh = dh + g[:, s]
        dn = dh * (1 - z) * (1 - n ** 2)
        dz = dh * (hprev - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dxp[:, s] = np.concatenate([dr, dz, dn], axis=1)
        dhp[:, s] = np.concatenate([dr, dz, dn * r], axis=1)
        dh = dhp[:, s] @ w_hh + dh * z
    return dxp, dhp, dh, np.zeros((b, hid))


def _rnn_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    xp, w_hh, h = args
    out = np.zeros(xp.shape)
    for s in range(xp.shape[1]):
        h = np.tanh(xp[:, s] + h @ w_hh.T)
        out[:, s] = h
    return out


def _rnn_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    w_hh, hs, g = args
    dxp = np.zeros(hs.shape)
    dh = np.zeros((hs.shape[0], hs.shape[2]))
    for s in reversed(range(hs.shape[1])):
        da = (dh + g[:, s]) * (1 - hs[:, s] ** 2)
        dxp[:, s] = da
        dh = da @ w_hh
    return dxp, dh


def _state_shape(node: Node) -> Shape:
    """(B, H) of a recurrent backward node (its first input is W_hh)."""
    return (node.shape[0], node.inputs[0].shape[1])


def _seq_shape(width: Callable[[int], int]) -> Callable[[Node], Shape]:
    def shape(node: Node) -> Shape:
        return (node.shape[0], node.shape[1], width(node.inputs[1].shape[1] if node.op.endswith("_core")
                                                    else node.inputs[0].shape[1]))
    return shape


_multi_output("lstm_core", "lstm", _lstm_vjp, _lstm_ref, [("lstm_gates", _seq_shape(lambda h: 4 * h))])
_multi_output("lstm_grad", "lstm_grad", _no_grad("lstm_grad"), _lstm_grad_ref,
              [("lstm_grad_h0", _state_shape), ("lstm_grad_c0", _state_shape)])
_multi_output("gru_core", "gru", _gru_vjp, _gru_ref, [("gru_gates", _seq_shape(lambda h: 4 * h))])
_multi_output("gru_grad", "gru_grad", _no_grad("gru_grad"), _gru_grad_ref,
              [("gru_grad_hp", _seq_shape(lambda h: 3 * h)), ("gru_grad_h0", _state_shape),
               ("gru_grad_scratch", _state_shape)])
register("rnn_core", vjp=_rnn_vjp, ref=_rnn_ref, kernel="rnn")
_multi_output("rnn_grad", "rnn_grad", _no_grad("rnn_grad"), _rnn_grad_ref, [("rnn_grad_h0", _state_shape)])


# --- recurrent cores: kernel builders -------------------------------------------------------------
#
# Index expressions use the template's locals: b (batch row), t (time step), j (hidden unit),
# B, T (sizes), and the kernel's in*/out* arrays.

def _seq(array: str, width: int, offset: int = 0, step: str = "t") -> str:
    """Element j (plus `offset`) of row (b, step) of a (B, T, width) array."""
    return f"{array}[(b*T + {step})*{width} + {offset} + j]" if offset else f"{array}[(b*T + {step})*{width} + j]"


def _state(array: str, hidden: int) -> str:
    return f"{array}[b*{hidden} + j]"


def _sizes(k: Kernel, ctx: Context, hidden: int, gates: int) -> dict[str, Any]:
    """Sizes of a recurrent kernel, and its split across the thread pool by batch rows (each
    row's recurrence is independent of the others')."""
    node = k.nodes[0]
    B, T = _c(ctx, node.shape[0]), _c(ctx, node.shape[1])
    return {"B": B, "T": T, "H": hidden, "GH": gates * hidden,
            "split": {"what": "its batch rows", "work": f"({B})*({T})*{gates * hidden * hidden // 16}"}}


def _lstm_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,4H), in1 W_hh, in2 h0, in3 c0; outputs: out0 hc (B,T,2H), out1 gates (B,T,4H)
    hidden = k.nodes[0].inputs[1].shape[1]
    cell, s = _lstm_cell()
    H = hidden
    loads = [(s["xi"], _seq("in0", 4 * H)), (s["xf"], _seq("in0", 4 * H, H)), (s["xg"], _seq("in0", 4 * H, 2 * H)),
             (s["xo"], _seq("in0", 4 * H, 3 * H)), (s["hi"], _seq("out1", 4 * H)),
             (s["hf"], _seq("out1", 4 * H, H)), (s["hg"], _seq("out1", 4 * H, 2 * H)),
             (s["ho"], _seq("out1", 4 * H, 3 * H)),
             (s["cp"], f"(t ? {_seq('out0', 2 * H, H, 't - 1')} : {_state('in3', H)})")]
    outs = [s["i"], s["f"], s["g"], s["o"], s["c"], s["h"]]
    stores = [_seq("out1", 4 * H), _seq("out1", 4 * H, H), _seq("out1", 4 * H, 2 * H), _seq("out1", 4 * H, 3 * H),
              _seq("out0", 2 * H, H), _seq("out0", 2 * H)]
    body = _formulas(ctx, loads, [cell.expr(o) for o in outs], stores)
    return {**_sizes(k, ctx, H, 4), "kind": "LSTM", "seq": "out0", "seq_width": 2 * H, "h0": "in2",
            "whh": "in1", "dst": "out1", "dst_width": 4 * H, **body}


def _gru_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,3H), in1 W_hh, in2 b_hh, in3 h0; outputs: out0 h (B,T,H), out1 gates (B,T,4H)
    H = k.nodes[0].inputs[1].shape[1]
    cell, s = _gru_cell()
    loads = [(s["xr"], _seq("in0", 3 * H)), (s["xz"], _seq("in0", 3 * H, H)), (s["xn"], _seq("in0", 3 * H, 2 * H)),
             (s["hr"], _seq("out1", 4 * H)), (s["hz"], _seq("out1", 4 * H, H)), (s["hnr"], _seq("out1", 4 * H, 2 * H)),
             (s["br"], "in2[j]"), (s["bz"], f"in2[{H} + j]"), (s["bn"], f"in2[{2 * H} + j]"),
             (s["hp"], f"(t ? {_seq('out0', H, 0, 't - 1')} : {_state('in3', H)})")]
    outs = [s["r"], s["z"], s["n"], s["hn"], s["h"]]
    stores = [_seq("out1", 4 * H), _seq("out1", 4 * H, H), _seq("out1", 4 * H, 2 * H), _seq("out1", 4 * H, 3 * H),
              _seq("out0", H)]
    body = _formulas(ctx, loads, [cell.expr(o) for o in outs], stores)
    return {**_sizes(k, ctx, H, 3), "kind": "GRU", "seq": "out0", "seq_width": H, "h0": "in3",
            "whh": "in1", "dst": "out1", "dst_width": 4 * H, **body}


def _rnn_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,H), in1 W_hh, in2 h0; output: out0 h (B,T,H)
    H = k.nodes[0].inputs[1].shape[1]
    cell, s = _rnn_cell()
    loads = [(s["x"], _seq("in0", H)), (s["hh"], _seq("out0", H))]
    body = _formulas(ctx, loads, [cell.expr(s["h"])], [_seq("out0", H)])
    return {**_sizes(k, ctx, H, 1), "kind": "tanh RNN", "seq": "out0", "seq_width": H, "h0": "in2",
            "whh": "in1", "dst": "out0", "dst_width": H, **body}


def _lstm_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 c0, in2 hc, in3 gates, in4 g (B,T,2H);
    # outputs: out0 dxp (B,T,4H), out1 dh (running; dh0 at the end), out2 dc (running; dc0)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = _lstm_cell()
    dh, dc = Cell.leaf("dh"), Cell.leaf("dc")
    stored = [s["i"], s["f"], s["g"], s["o"], s["c"], s["cp"]]
    loads = [(s["i"], _seq("in3", 4 * H)), (s["f"], _seq("in3", 4 * H, H)), (s["g"], _seq("in3", 4 * H, 2 * H)),
             (s["o"], _seq("in3", 4 * H, 3 * H)), (s["c"], _seq("in2", 2 * H, H)),
             (s["cp"], f"(t ? {_seq('in2', 2 * H, H, 't - 1')} : {_state('in1', H)})"),
             (dh, f"{_seq('in4', 2 * H)} + {_state('out1', H)}"),
             (dc, f"{_seq('in4', 2 * H, H)} + {_state('out2', H)}")]
    grads = cell.backward({s["h"]: dh, s["c"]: dc}, [s["xi"], s["xf"], s["xg"], s["xo"], s["cp"]], set(stored))
    stores = [_seq("out0", 4 * H), _seq("out0", 4 * H, H), _seq("out0", 4 * H, 2 * H), _seq("out0", 4 * H, 3 * H),
              _state("out2", H)]
    body = _formulas(ctx, loads, grads, stores)
    return {"kind": "LSTM", **_sizes(k, ctx, H, 4),
            "whh": "in0", "dh": "out1", "dc": "out2", "dpre": "out0", "scratch": None, **body}


def _gru_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 h0, in2 h (B,T,H), in3 gates (B,T,4H), in4 g (B,T,H);
    # outputs: out0 dxp (B,T,3H), out1 dhp (B,T,3H), out2 dh (running; dh0), out3 scratch (B,H)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = _gru_cell()
    dh = Cell.leaf("dh")
    stored = [s["r"], s["z"], s["n"], s["hn"], s["hp"]]
    loads = [(s["r"], _seq("in3", 4 * H)), (s["z"], _seq("in3", 4 * H, H)), (s["n"], _seq("in3", 4 * H, 2 * H)),
             (s["hn"], _seq("in3", 4 * H, 3 * H)),
             (s["hp"], f"(t ? {_seq('in2', H, 0, 't - 1')} : {_state('in1', H)})"),
             (dh, f"{_seq('in4', H)} + {_state('out2', H)}")]
    d = cell.backward({s["h"]: dh}, [s["xr"], s["xz"], s["xn"], s["hnr"], s["hp"]], set(stored))
    outs = [d[0], d[1], d[2], d[0], d[1], d[3], d[4]]
    stores = [_seq("out0", 3 * H), _seq("out0", 3 * H, H), _seq("out0", 3 * H, 2 * H),
              _seq("out1", 3 * H), _seq("out1", 3 * H, H), _seq("out1", 3 * H, 2 * H), _state("out3", H)]
    body = _formulas(ctx, loads, outs, stores)
    return {"kind": "GRU", **_sizes(k, ctx, H, 3),
            "whh": "in0", "dh": "out2", "dc": None, "dpre": "out1", "scratch": "out3", **body}


def _rnn_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 h (B,T,H), in2 g; outputs: out0 dxp (B,T,H), out1 dh (running; dh0)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = _rnn_cell()
    dh = Cell.leaf("dh")
    loads = [(s["h"], _seq("in1", H)), (dh, f"{_seq('in2', H)} + {_state('out1', H)}")]
    (da,) = cell.backward({s["h"]: dh}, [s["x"]], {s["h"]})
    body = _formulas(ctx, loads, [da], [_seq("out0", H)])
    return {"kind": "tanh RNN", **_sizes(k, ctx, H, 1),
            "whh": "in0", "dh": "out1", "dc": None, "dpre": "out0", "scratch": None, **body}


for _kind, _builder in (("lstm", _lstm_builder), ("gru", _gru_builder), ("rnn", _rnn_builder)):
    register_kernel(_kind, _builder)
for _kind, _builder in (("lstm_grad", _lstm_grad_builder), ("gru_grad", _gru_grad_builder),
                        ("rnn_grad", _rnn_grad_builder)):
    register_kernel(_kind, _builder)
