"""Layout and shape operators: Reshape, Squeeze, Transpose, Concat, Slice, Split, Gather,
Shape and the arithmetic of runtime sizes, constants, Expand, Cast, Identity."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ...ir.graph import FLOAT, Node, broadcast_shapes, dim_factors, product_dim
from ...ops import core as ops
from ...ops import slicing, transformer
from ...ops.embeddings import embedding
from ...symbolic.functions import ARGS, Fn
from .importer import _Importer, _op
from .masks import _condition
from .values import Value, _Causal, _Condition, _widen, _Window


def _size_arithmetic(im: _Importer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mul of runtime sizes, or Div where it is exact, elementwise: bpcompile dims (B * T ->
    "T*batch", "T*batch" / T -> "batch"), as torch writes the target of x.view(B * T, C)."""
    kind = im.node.op_type
    if kind not in ("Mul", "Div"):
        raise im.fail(f"{kind} of runtime sizes {_sizes(a)} and {_sizes(b)} is not supported (only Mul, and Div "
                      "where it is exact, make a bpcompile dim)")
    left, right = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
    out = np.empty(left.shape, dtype=object)
    for index, (x, y) in enumerate(zip(left.flat, right.flat)):
        (cx, nx), (cy, ny) = dim_factors(_dim(x)), dim_factors(_dim(y))
        if kind == "Mul":
            out.flat[index] = product_dim(cx * cy, nx + ny)
            continue
        rest = Counter(nx) - Counter(ny)
        if cy == 0 or cx % cy or Counter(ny) - Counter(nx):
            raise im.fail(f"the runtime size {x!r} divided by {y!r} is not exact, which is not supported")
        out.flat[index] = product_dim(cx // cy, rest.elements())
    return out


def _dim(v: Any) -> int | str:
    """One element of a tensor of runtime sizes as a bpcompile dim."""
    if isinstance(v, str):
        return v
    if v != int(v):
        raise ValueError(f"runtime sizes combined with the non-integer {v!r} are not supported")
    return int(v)


def _sizes(values: np.ndarray) -> list:
    return [_dim(v) for v in np.ravel(values)]


@_op("Flatten")
def _flatten(im: _Importer, args: list) -> Node:
    x = im.tensor(args[0])
    axis = int(im.only({"axis": None}).get("axis", 1))
    if axis % max(x.ndim, 1) != 1:
        raise im.fail(f"attribute axis={axis} is not supported (only 1)")
    return ops.flatten(x)


@_op("Reshape")
def _reshape(im: _Importer, args: list) -> Value:
    """ONNX's target shape: 0 copies the input's size (an empty dim with allowzero=1, which
    bpcompile has not), -1 is inferred, a runtime size is a bpcompile dim (a name or a product
    of names, which bpcompile's reshape merges and splits)."""
    allowzero = int(im.only({"allowzero": None}).get("allowzero", 0))
    x = args[0]
    target = [v if isinstance(v, str) else int(v) for v in np.ravel(im.constant(im.node.input[1], "Reshape's shape"))]
    if allowzero and 0 in target:
        raise im.fail(f"attribute allowzero=1 with a 0 in the shape {target} (an empty dim) is not supported")
    if isinstance(x, np.ndarray):
        return x.reshape(target)
    x = im.tensor(x)
    return ops.reshape(x, tuple(x.shape[i] if d == 0 else d for i, d in enumerate(target)))


def _axes(im: _Importer, args: list, attrs: dict) -> list[int] | None:
    """The axes of a node, from its attribute (older opsets) or its second input (newer ones)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(args) > 1 and args[1] is not None:
        return im.ints(im.node.input[1], "axes")
    return None


@_op("Squeeze", "Unsqueeze")
def _squeeze(im: _Importer, args: list) -> Value:
    x = args[0]
    shape = list(x.shape)
    axes = _axes(im, args, im.only({"axes": None}))
    if im.node.op_type == "Squeeze":
        drop = {i for i, d in enumerate(shape) if d == 1} if axes is None else {a % len(shape) for a in axes}
        new = [d for i, d in enumerate(shape) if i not in drop]
    else:
        if axes is None:
            raise im.fail("Unsqueeze needs axes")
        new = list(shape)
        for a in sorted(a % (len(shape) + len(axes)) for a in axes):
            new.insert(a, 1)
    return x.reshape(new) if isinstance(x, np.ndarray) else ops.reshape(im.tensor(x), tuple(new))


@_op("Transpose")
def _transpose(im: _Importer, args: list) -> Value:
    perm = im.only({"perm": None}).get("perm")
    x = args[0]
    if isinstance(x, np.ndarray):
        return np.transpose(x, perm)
    return ops.transpose(im.tensor(x), perm)


@_op("Concat")
def _concat(im: _Importer, args: list) -> Value:
    axis = int(im.only({"axis": None})["axis"])
    if all(isinstance(a, np.ndarray) for a in args):
        return np.concatenate(args, axis=axis)
    return slicing.concat([im.tensor(a) for a in args], axis=axis)


@_op("Slice")
def _slice(im: _Importer, args: list) -> Value:
    im.only({})
    x = args[0]
    starts = im.ints(im.node.input[1], "Slice's starts")
    ends = _sizes(im.constant(im.node.input[2], "Slice's ends"))
    ndim = len(x.shape)
    axes = im.ints(im.node.input[3], "Slice's axes") if len(args) > 3 and args[3] is not None \
        else list(range(len(starts)))
    steps = im.ints(im.node.input[4], "Slice's steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    x = x if isinstance(x, np.ndarray | _Window) else im.tensor(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % ndim
        if isinstance(end, str) or isinstance(x, _Window):
            x = _cut(im, x, axis, start, end, step)
            continue
        stop = None if end >= 2**62 or (step < 0 and end <= -2**62) else end
        start = None if start <= -2**62 or (step < 0 and start >= 2**62) else start
        if isinstance(x, np.ndarray):
            index = [slice(None)] * ndim
            index[axis] = slice(start, stop, step)
            x = x[tuple(index)]
        elif step == 1:
            x = slicing.slice(x, axis, start, stop)
        elif isinstance(x.shape[axis], int):  # every step-th entry, or reversed (torch.flip): picked
            x = _take(im, x, axis, np.arange(x.shape[axis])[start:stop:step])
        else:
            raise im.fail(f"steps other than 1 along the runtime size {x.shape[axis]!r} are not supported")
    return x.settled() if isinstance(x, _Window) else x


def _cut(im: _Importer, x: Value, axis: int, start: int, end: int | str, step: int) -> Value:
    """x[start:end] along `axis` when end is a runtime size (or x a _Window): the identity where
    it is x's own size there; of a constant buffer, a _Window cut from its front."""
    if step != 1 or start != 0:
        raise im.fail(f"a slice [{start}:{end}:{step}] to a runtime size is supported only from 0 with step 1")
    if x.shape[axis] == end:
        return x
    if isinstance(x, np.ndarray) and x.dtype != object:
        x = _Window(x, {})
    if not isinstance(x, _Window) or axis in x.lengths:
        raise im.fail(f"slicing a tensor of shape {tuple(x.shape)} to the runtime size {end!r} along axis {axis} "
                      "is not supported (only a constant buffer, as a causal mask)")
    if isinstance(end, int):
        return _Window(np.take(x.values, np.arange(min(end, x.values.shape[axis])), axis=axis), x.lengths)
    return _Window(x.values, {**x.lengths, axis: end})


@_op("Split")
def _split(im: _Importer, args: list) -> tuple:
    """Consecutive slices: sizes from the second input, the `split` attribute (before opset 13)
    or equal parts (the last one smaller), as ONNX's Split."""
    attrs = im.only({"axis": None, "split": None, "num_outputs": None})
    x = args[0]
    axis = int(attrs.get("axis", 0)) % len(x.shape)
    if len(args) > 1 and args[1] is not None:
        sizes = im.ints(im.node.input[1], "Split's sizes")
    elif "split" in attrs:
        sizes = [int(v) for v in attrs["split"]]
    else:
        count, n = int(attrs.get("num_outputs", len(im.node.output))), x.shape[axis]
        if not isinstance(n, int):
            raise im.fail(f"splitting the runtime size {n!r} is not supported")
        part = -(-n // count)
        sizes = [part] * (count - 1) + [n - part * (count - 1)]
    parts, begin = [], 0
    for size in sizes:
        if isinstance(x, np.ndarray):
            parts.append(np.take(x, np.arange(begin, begin + size), axis=axis))
        else:
            parts.append(slicing.slice(im.tensor(x), axis, begin, begin + size))
        begin += size
    return tuple(parts)


@_op("Gather")
def _gather(im: _Importer, args: list) -> Value:
    """Rows of a table picked by int inputs (an embedding); slices for constant indices (a
    range of them, e.g. positions), else a product with their one-hot matrix."""
    axis = int(im.only({"axis": None}).get("axis", 0))
    data, indices = args
    if isinstance(data, np.ndarray) and isinstance(indices, np.ndarray):  # runtime sizes
        return np.asarray(np.take(data, indices, axis=axis), dtype=data.dtype)
    x = im.tensor(data)
    axis %= x.ndim
    if isinstance(indices, np.ndarray):
        return _take(im, x, axis, indices)
    if axis == 0 and isinstance(indices, Node) and indices.dtype == "int32" and x.ndim == 2:
        return embedding(indices, x)
    raise im.fail("only a row lookup of integer inputs in a 2-D table (axis 0) or constant indices are supported")


def _take(im: _Importer, x: Node, axis: int, indices: np.ndarray) -> Node:
    """x's entries at constant indices along a fixed axis: a slice for a range of them, else the
    product with their one-hot matrix."""
    n = x.shape[axis]
    if not isinstance(n, int):
        raise im.fail(f"indexing the runtime size {n!r} is not supported")
    picked = indices.astype(np.int64) % n
    if picked.ndim == 0:  # x[..., i, ...]: a slice without the axis
        part = slicing.slice(x, axis, int(picked), int(picked) + 1)
        return ops.reshape(part, tuple(d for k, d in enumerate(part.shape) if k != axis))
    if picked.ndim == 1 and picked.size and np.array_equal(picked, np.arange(picked[0], picked[0] + picked.size)):
        return slicing.slice(x, axis, int(picked[0]), int(picked[0]) + picked.size)
    if not picked.size:
        raise im.fail("an empty list of indices is not supported")
    others = [k for k in range(x.ndim) if k != axis]
    moved = x if axis == x.ndim - 1 else ops.transpose(x, (*others, axis))
    columns = ops.matmul(moved, transformer.constant(np.eye(n)[:, picked.reshape(-1)]))  # (..., picked)
    out = ops.reshape(columns, tuple(x.shape[k] for k in others) + picked.shape)
    r, k = len(others), picked.ndim
    perm = (*range(axis), *range(r, r + k), *range(axis, r))  # the picked dims where the axis was
    return out if perm == tuple(range(out.ndim)) else ops.transpose(out, perm)


@_op("Shape")
def _shape(im: _Importer, args: list) -> np.ndarray:
    attrs = im.only({"start": None, "end": None})
    shape = list(args[0].shape)[int(attrs.get("start", 0)):attrs.get("end")]
    if all(isinstance(d, int) for d in shape):
        return np.asarray(shape, dtype=np.int64)
    return np.asarray(shape, dtype=object)  # runtime sizes by name, for Gather/Concat/Reshape to pass along


@_op("Constant")
def _constant(im: _Importer, args: list) -> np.ndarray:
    attrs = im.attrs()
    if "value" in attrs:
        return im.onnx.numpy_helper.to_array(attrs["value"])
    for key in ("value_float", "value_int"):
        if key in attrs:
            return np.asarray(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return np.asarray(list(attrs[key]))
    raise im.fail(f"attributes {sorted(attrs)} are not supported")


@_op("ConstantOfShape")
def _constant_of_shape(im: _Importer, args: list) -> Node:
    """A filled tensor of a shape holding runtime sizes (constant shapes are folded)."""
    attrs = im.only({"value": None})
    value = im.onnx.numpy_helper.to_array(attrs["value"]).reshape(()) if "value" in attrs else np.zeros(())
    if value.dtype.kind != "f":
        raise im.fail(f"a {value.dtype} tensor of runtime shape is not supported (only float)")
    dims = tuple(v if isinstance(v, str) else int(v) for v in np.ravel(args[0]))
    return ops.const(float(value), dims)


@_op("Expand")
def _expand(im: _Importer, args: list) -> Node:
    """NumPy broadcasting to the target shape (ONNX broadcasts both ways)."""
    im.only({})
    target = tuple(v if isinstance(v, str) else int(v) for v in np.ravel(im.constant(im.node.input[1], "shape")))
    x = args[0]
    if isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind == "f":
        return ops.const(float(x.reshape(())), broadcast_shapes([x.shape, target], ["input", "shape"]))
    x = im.tensor(x)
    return _widen(x, broadcast_shapes([x.shape, target], ["input", "shape"]))


@_op("Range")
def _range(im: _Importer, args: list) -> np.ndarray:
    raise im.fail("a range of runtime sizes is not supported (constant ranges are folded)")


@_op("Cast")
def _cast(im: _Importer, args: list) -> Value:
    to = im.onnx.helper.tensor_dtype_to_np_dtype(im.only({"to": None, "saturate": None})["to"])
    x = args[0]
    if isinstance(x, np.ndarray):
        return x if x.dtype == object else x.astype(to)
    if isinstance(x, _Causal):  # a triangle of ones is its own boolean
        return x
    if isinstance(x, _Window):
        return _Window(x.values.astype(to), x.lengths).settled()
    if to.kind == "b":
        return x if isinstance(x, _Condition) else _condition(im, lambda c: c, [x], logical=True)
    if isinstance(x, _Condition):
        return x.number()
    if (to.kind == "f") == (x.dtype == "float"):
        return x
    if to.kind == "f":  # int -> float: the identity as a float elementwise node (ew() would return x)
        return Node("ew", (x,), {"fn": Fn("float", ARGS[0], 1)}, x.shape, FLOAT)
    raise im.fail(f"a cast of a computed float tensor to {to} is not supported")


@_op("Identity")
def _identity(im: _Importer, args: list) -> Value:
    """The identity; of an initializer, a parameter of its own, as it is when torch's exporter
    writes one copy of initializers with equal values (ln_2.weight = Identity(ln_1.weight))."""
    im.only({})
    x, source, out = args[0], im.node.input[0], im.node.output[0]
    if isinstance(x, Node) and source in im.initial and out not in im.graph.params:
        array = im.initial[source]
        im.initial[out] = array
        return im.graph.param(out, array.shape, init=array.astype(np.float64))
    return x
