"""2-D convolution: conv2d = im2col (an op of its own) -> GEMM (matmul with the weight
transposed) -> NHWC->NCHW transpose -> bias broadcast add. The input gradient is col2im of
the GEMM's, the weight gradient a GEMM; im2col and col2im share the `im2col` kernel kind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, shape_str
from ..ir.kernel import Kernel
from .core import _check_tensor, matmul_node, register, register_kernel, reshape, transpose
from .display import called
from .shared import _c, _check_nchw, _conv_geometry, _pair

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["conv2d", "im2col", "col2im"]


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
