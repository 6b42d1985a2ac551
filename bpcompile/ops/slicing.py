"""Slicing (`slice`, with its adjoint `pad`) and concatenation (`concat`): shape rules, VJPs,
NumPy references and the kernel builders of the `slice` and `concat` kinds."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, Shape, shape_str
from ..ir.kernel import Kernel, Mono
from .core import _check_tensor, _need_float, concrete, register, register_kernel
from .display import called
from .shared import _c

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["slice", "concat"]


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
         ref=_slice_ref, kernel="slice", display=called())
register("pad", vjp=lambda node, g: [slice(g, node.attrs["axis"], node.attrs["begin"],
                                           _stop(node.attrs["begin"], node.inputs[0].shape[node.attrs["axis"]]))],
         ref=_pad_ref, kernel="slice", display=called())


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
         ref=lambda node, args, dims: np.concatenate(args, axis=node.attrs["axis"]), display=called())


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
