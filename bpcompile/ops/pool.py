"""Max and average pooling over NCHW windows. The max pooling kernel also writes each window's
argmax (an aux node), which its backward reads; both backward ops share the `pool_grad` kind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..ir.graph import FLOAT, Node
from ..ir.kernel import Kernel
from .core import _no_grad, concrete, register, register_kernel
from .display import called
from .shared import _aux_of, _c, _check_nchw, _conv_geometry, _multi_output, _pair

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["max_pool2d", "avg_pool2d"]


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
register("max_pool2d_grad", vjp=_no_grad("max_pool2d_grad"), ref=_max_pool_grad_ref, kernel="pool_grad",
         display=called())


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
         ref=_avg_pool_ref, kernel="pool", display=called())
register("avg_pool2d_grad", vjp=lambda node, g: [avg_pool2d(g, node.attrs["kernel"], node.attrs["stride"])],
         ref=_avg_pool_grad_ref, kernel="pool_grad", display=called())


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
register_kernel("pool_grad", _pool_builder, template="pool.c.j2")
