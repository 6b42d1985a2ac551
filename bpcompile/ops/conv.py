"""2-D convolution. conv2d builds im2col (an op of its own) -> GEMM (matmul with the weight
transposed) -> NHWC->NCHW transpose -> bias broadcast add; its input gradient is col2im of the
GEMM's, its weight gradient a GEMM (im2col and col2im share the `im2col` kernel kind). That is
the form the graph, autodiff, `show --grad` and ONNX export see.

Where `conv_lowering` picks them (few input channels, stride 1), a simplify rewrite
(`_direct_rewrite`) replaces those pieces by direct kernels that write no column buffer:
`conv2d_direct`, its input gradient as a direct transposed convolution (`conv2d_input_grad`)
and its weight gradient summed over the batch (`conv2d_weight_grad`). The three share the
`conv` kernel kind (templates/conv.c.j2) and are each other's VJPs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, shape_str
from ..ir.kernel import Kernel
from .core import _check_tensor, matmul_node, register, register_kernel, register_rewrite, reshape, transpose
from .display import called
from .shared import _c, _check_nchw, _conv_geometry, _pair

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["conv2d", "im2col", "col2im", "conv_lowering"]


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
         ref=lambda node, args, dims: _im2col_ref(args[0], *_geom(node)), kernel="im2col",
         display=called())
register("col2im", vjp=lambda node, g: [im2col(g, *_geom(node))],
         ref=lambda node, args, dims: _col2im_ref(args[0], node.attrs["image"], *_geom(node)), kernel="im2col",
         display=called())


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


# The direct kernels win while the GEMM's inner dimension (C*kh*kw) is too small for BLAS and
# im2col's copy is most of the work. Measured on W5 (one thread, CPU time, medians of 5, in one
# run): with the 1-channel layer (K = 9) direct, a step takes 0.73x the all-GEMM time; making
# the 8-channel layer (K = 72) direct as well is slower than leaving it to BLAS (0.86x: its
# weight gradient is the cost), so it keeps GEMM, as do strided layers, wide ones and images
# whose padded planes would not fit the kernel's stack.
DIRECT_MAX_K = 36  # C*kh*kw
DIRECT_MAX_OUT = 32
DIRECT_MAX_STACK = 128 * 1024  # bytes of the kernels' stack buffers: well inside any thread's stack (macOS: 512 KiB)


def conv_lowering(image: tuple[int, int, int], out_ch: int, kernel: tuple[int, int], stride: Any = 1,
                  padding: Any = 0) -> str:
    """'direct' or 'gemm': how conv2d lowers a layer of this (C, H, W) image, out channels and geometry."""
    c, h, w = image
    kernel, stride, padding = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding", 0)
    small = (stride == (1, 1) and c * kernel[0] * kernel[1] <= DIRECT_MAX_K and out_ch <= DIRECT_MAX_OUT
             and _plan(c, h, w, out_ch, kernel, padding)["stack"] <= DIRECT_MAX_STACK)
    return "direct" if small else "gemm"


def conv2d_direct(x: Node, w: Node, attrs: dict[str, Any]) -> Node:
    """The convolution of NCHW `x` with `w` (out, in, kh, kw), computed in place of im2col+GEMM;
    `attrs` as im2col's (kernel, stride, padding, image)."""
    oh, ow = _conv_geometry(x.shape, attrs["kernel"], attrs["stride"], attrs["padding"], "conv2d")
    return Node("conv2d_direct", (x, w), dict(attrs), (x.shape[0], w.shape[0], oh, ow), FLOAT)


def conv2d_input_grad(g: Node, w: Node, attrs: dict[str, Any]) -> Node:
    """The transposed convolution of `g` (N, out, OH, OW) with `w`: the input gradient, (N, *image)."""
    return Node("conv2d_input_grad", (g, w), dict(attrs), (g.shape[0], *attrs["image"]), FLOAT)


def conv2d_weight_grad(g: Node, x: Node, attrs: dict[str, Any]) -> Node:
    """sum over images and output pixels of `g` times the input pixels each tap read: (out, in, kh, kw)."""
    return Node("conv2d_weight_grad", (g, x), dict(attrs), (g.shape[1], x.shape[1], *attrs["kernel"]), FLOAT)


# Each op is bilinear; its VJPs are the other two (<h, conv(x, w)> = <x, input_grad(h, w)> = <w, weight_grad(h, x)>)
register("conv2d_direct", ref=lambda node, args, dims: _conv_ref(node, *args),
         vjp=lambda node, g: [conv2d_input_grad(g, node.inputs[1], node.attrs),
                              conv2d_weight_grad(g, node.inputs[0], node.attrs)],
         kernel="conv", display=called())
register("conv2d_input_grad", ref=lambda node, args, dims: _input_grad_ref(node, *args),
         vjp=lambda node, h: [conv2d_direct(h, node.inputs[1], node.attrs),
                              conv2d_weight_grad(node.inputs[0], h, node.attrs)],
         kernel="conv", display=called())
register("conv2d_weight_grad", ref=lambda node, args, dims: _weight_grad_ref(node, *args),
         vjp=lambda node, h: [conv2d_direct(node.inputs[1], h, node.attrs),
                              conv2d_input_grad(node.inputs[0], h, node.attrs)],
         kernel="conv", display=called())


def _conv_ref(node: Node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    cols = _im2col_ref(x, *_geom(node))  # (N, OH, OW, C*kh*kw)
    return (cols @ w.reshape(w.shape[0], -1).T).transpose(0, 3, 1, 2)


def _input_grad_ref(node: Node, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    cols = g.transpose(0, 2, 3, 1) @ w.reshape(w.shape[0], -1)
    return _col2im_ref(cols, node.attrs["image"], *_geom(node))


def _weight_grad_ref(node: Node, g: np.ndarray, x: np.ndarray) -> np.ndarray:
    cols = _im2col_ref(x, *_geom(node))
    return np.einsum("nohw,nhwk->ok", g, cols).reshape(node.shape)


VECTOR = 32  # plane values a forward or input-gradient block sums in registers (four AVX2 registers of float32)
WEIGHT_VECTOR = 16  # partial sums per weight-gradient tap (one AVX-512 register of float32)


def _plan(c: int, h: int, w: int, o: int, kernel: tuple[int, int], padding: tuple[int, int]) -> dict[str, int]:
    """The padded-plane geometry of the stride-1 direct kernels (templates/conv.c.j2) and the most
    bytes of stack buffers one of them needs (at float64)."""
    (kh, kw), (ph, pw) = kernel, padding
    hp, wp = h + 2 * ph, w + 2 * pw
    length = (hp - kh + 1) * wp  # an output plane in padded row width
    lv = -(-length // VECTOR) * VECTOR
    jv = -(-hp * wp // VECTOR) * VECTOR  # a padded image plane, rounded up
    front = (kh - 1) * wp + kw - 1  # the largest tap offset
    xp = max(front + lv, jv)
    gp = max(lv, front + jv)
    stack = 8 * (c * xp + o * gp + o * c * kh * kw * WEIGHT_VECTOR)
    return {"HP": hp, "WP": wp, "L": length, "LV": lv, "JV": jv, "F": front, "XP": xp, "GP": gp, "V": VECTOR,
            "WV": WEIGHT_VECTOR, "stack": stack}


def _conv_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    (kh, kw), stride, (ph, pw) = _geom(node)
    assert stride == (1, 1), "direct convolution kernels are stride 1 (conv_lowering)"
    c, h, w = node.attrs["image"]
    mode = {"conv2d_direct": "forward", "conv2d_input_grad": "input", "conv2d_weight_grad": "weight"}[node.op]
    grad = node.inputs[0] if mode != "forward" else node  # the (N, O, OH, OW) operand
    n, o, oh, ow = grad.shape
    plan = _plan(c, h, w, o, (kh, kw), (ph, pw))
    batch = _c(ctx, n)
    titles = {"forward": "Direct convolution", "input": "Convolution input gradient: a direct transposed convolution",
              "weight": "Convolution weight gradient: summed over the batch, no column buffer"}
    work = f"({batch})*{o * c * kh * kw * plan['L']}"
    return {"mode": mode, "title": titles[mode], "batch": batch, "C": c, "H": h, "W": w, "O": o, "OH": oh, "OW": ow,
            "KH": kh, "KW": kw, "PH": ph, "PW": pw, **plan, "XC": 1 if mode == "input" else c,
            "split": {"what": "its output channels" if mode == "weight" else "its images", "work": work}}


register_kernel("conv", _conv_builder)


def _nhwc_of(node: Node) -> Node | None:
    """g where node = transpose(g, (0, 2, 3, 1)): an NCHW gradient read as GEMM rows."""
    return node.inputs[0] if node.op == "transpose" and tuple(node.attrs["axes"]) == (0, 2, 3, 1) else None


def _weight_of(wmat: Node, cols: Node) -> Node | None:
    """w where wmat = reshape(w, (out, C*kh*kw)) of a 4-D weight matching these columns' geometry."""
    if wmat.op != "reshape" or wmat.inputs[0].ndim != 4:
        return None
    w = wmat.inputs[0]
    c = cols.attrs["image"][0]
    return w if w.shape[1:] == (c, *cols.attrs["kernel"]) else None


def _direct(cols: Node, out_ch: int) -> bool:
    a = cols.attrs
    return conv_lowering(a["image"], out_ch, a["kernel"], a["stride"], a["padding"]) == "direct"


def _direct_rewrite(node: Node) -> Node | None:
    """The im2col + GEMM pieces of conv2d and of its two gradients, where `conv_lowering` picks the
    direct kernels, as one direct op each (the graph keeps conv2d's GEMM form until this pass):
      transpose(im2col(x) · wmatᵀ, (0, 3, 1, 2))  -> conv2d_direct(x, w)
      col2im(nhwc(g) · wmat)                    -> conv2d_input_grad(g, w)
      nhwc(g)ᵀ · im2col(x)                      -> reshape(conv2d_weight_grad(g, x), wmat's shape)"""
    if node.op == "transpose" and tuple(node.attrs["axes"]) == (0, 3, 1, 2) and node.inputs[0].op == "matmul":
        product = node.inputs[0]
        cols, wmat = product.inputs
        if (cols.op == "im2col" and not product.attrs["ta"] and product.attrs["tb"]
                and (w := _weight_of(wmat, cols)) is not None and _direct(cols, w.shape[0])):
            return conv2d_direct(cols.inputs[0], w, cols.attrs)
    if node.op == "col2im" and node.inputs[0].op == "matmul":
        product = node.inputs[0]
        g, wmat = _nhwc_of(product.inputs[0]), product.inputs[1]
        if (g is not None and not product.attrs["ta"] and not product.attrs["tb"]
                and (w := _weight_of(wmat, node)) is not None and _direct(node, w.shape[0])):
            return conv2d_input_grad(g, w, node.attrs)
    if node.op == "matmul" and node.attrs["ta"] and not node.attrs["tb"]:
        g, cols = _nhwc_of(node.inputs[0]), node.inputs[1]
        if g is not None and cols.op == "im2col" and _direct(cols, g.shape[1]):
            return reshape(conv2d_weight_grad(g, cols.inputs[0], cols.attrs), node.shape)
    return None


register_rewrite(_direct_rewrite)


def conv2d(x: Node, w: Node, b: Node | None = None, stride: Any = 1, padding: Any = 0) -> Node:
    """2-D convolution (cross-correlation, as PyTorch) of NCHW `x` with `w` of shape
    (out, in, kh, kw) and optional bias `b` (out,): im2col, one GEMM, a layout transpose (the
    form the graph, its gradients and ONNX see; `_direct_rewrite` lowers few channels to the
    direct kernels)."""
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
