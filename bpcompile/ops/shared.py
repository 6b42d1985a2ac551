"""What several op families share: argument checks (`_pair`, `_dim`, `_check_nchw`), the output
size of a convolution or pooling window, the C text of a size, and the registration of ops
whose kernel writes extra results (`_multi_output`, `_aux_of`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, Shape, shape_str
from ..ir.kernel import Mono
from .core import _check_tensor, _need_float, _no_grad, register
from .display import ATOM, Display, Notation, Shown, called

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context


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
                  aux_specs: Sequence[tuple[str, Callable[[Node], Shape]]], display: Display | None = None) -> None:
    """Register an op whose kernel also writes extra results (aux nodes, read by its backward).

    An aux node takes (main node, *main inputs) as inputs, so the reference interpreter can
    recompute it; `ref_all(node, args, dims)` returns the main value then every aux value. The op
    is written as name(inputs) unless `display` says otherwise; an aux value as aux_name(main).
    """
    def aux(node: Node) -> list[Node]:
        return [Node(aname, (node, *node.inputs), {}, shape_fn(node), FLOAT) for aname, shape_fn in aux_specs]

    register(name, vjp=vjp, ref=lambda node, args, dims: ref_all(node, args, dims)[0], kernel=kernel, aux=aux,
             display=display or called())
    for k, (aname, _) in enumerate(aux_specs):
        register(aname, vjp=_no_grad(aname), kernel="aux",
                 ref=lambda node, args, dims, k=k: ref_all(node.inputs[0], args[1:], dims)[k + 1],
                 display=aux_display)


def aux_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """An extra result of a kernel, written as what it belongs to: lstm_gates(H1)."""
    return n.call(node.op, args[0][0]), ATOM


def _aux_of(node: Node) -> list[Node]:
    from .core import OPS
    return OPS[node.op].aux(node)


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
