"""Graph IR: immutable, interned SSA nodes and the user-facing `Graph` that names them.

A node is `(op, inputs, attrs, shape, dtype)`. Building the same node twice returns the same
object, so common subexpressions merge as the graph is written and every traversal is
deterministic. Shapes hold ints (fixed at compile time) and strs (named runtime sizes such as
"batch"); they are checked when a node is made. A reshape may merge named dims with others into
a product dim, a str in one canonical form: the fixed factor first, then the names sorted, joined
by "*" ("8*batch", "T*batch"); `dim_factors` reads it back. Inputs declare plain names only.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .dims import (  # noqa: F401  (re-exported: the IR's shape vocabulary)
    _DIGITS,
    PRODUCT,
    Dim,
    Shape,
    canonical_dim,
    dim_factors,
    dim_size,
    named_dims,
    product_dim,
    size_factors,
)

# keyword arguments of the model's methods (train_step(loss=..., lr=...), fit(data, batch_size=...))
RESERVED_INPUT_NAMES = frozenset({"loss", "lr", "data", "batch_size", "self", "training"})

FLOAT = "float"  # the model's float dtype, chosen at compile time (float32 or float64)
INT = "int32"

_INTERNED: weakref.WeakValueDictionary[tuple, Node] = weakref.WeakValueDictionary()
_GRAPHS: weakref.WeakValueDictionary[int, Graph] = weakref.WeakValueDictionary()
_graph_ids = itertools.count(1)


def _freeze(value: Any) -> Any:
    """Make an attribute value hashable (lists become tuples, arrays become bytes keys)."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    return value


class Node:
    """One SSA value of the graph. Use the ops in `bpcompile` to make nodes, not this class."""

    __slots__ = ("op", "inputs", "attrs", "shape", "dtype", "_key", "__weakref__")

    op: str
    inputs: tuple[Node, ...]
    attrs: dict[str, Any]
    shape: Shape
    dtype: str

    def __new__(cls, op: str, inputs: Sequence[Node], attrs: dict[str, Any] | None,
                shape: Shape, dtype: str = FLOAT) -> Node:
        attrs = dict(attrs or {})
        key = (op, tuple(id(i) for i in inputs), tuple(sorted((k, _freeze(v)) for k, v in attrs.items())),
               tuple(shape), dtype)
        node = _INTERNED.get(key)
        if node is not None:
            return node
        node = object.__new__(cls)
        object.__setattr__(node, "op", op)
        object.__setattr__(node, "inputs", tuple(inputs))
        object.__setattr__(node, "attrs", attrs)
        object.__setattr__(node, "shape", tuple(shape))
        object.__setattr__(node, "dtype", dtype)
        object.__setattr__(node, "_key", key)
        _INTERNED[key] = node
        return node

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("graph nodes are immutable")

    def __reduce__(self):
        raise TypeError("graph nodes cannot be pickled; rebuild the graph in Python")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        label = self.attrs.get("name") or self.attrs.get("fn") or ""
        return f"<{self.op}{' ' + str(label) if label else ''} {shape_str(self.shape)} {self.dtype}>"

    # Operators follow NumPy's broadcasting rules; the ops live in ops.py.
    def __add__(self, other): return _ops().add(self, other)
    def __radd__(self, other): return _ops().add(other, self)
    def __sub__(self, other): return _ops().sub(self, other)
    def __rsub__(self, other): return _ops().sub(other, self)
    def __mul__(self, other): return _ops().mul(self, other)
    def __rmul__(self, other): return _ops().mul(other, self)
    def __truediv__(self, other): return _ops().div(self, other)
    def __rtruediv__(self, other): return _ops().div(other, self)
    def __pow__(self, other): return _ops().power(self, other)
    def __rpow__(self, other): return _ops().power(other, self)
    def __neg__(self): return _ops().neg(self)
    def __pos__(self): return self
    def __matmul__(self, other): return _ops().matmul(self, other)
    def __rmatmul__(self, other): return _ops().matmul(other, self)

    def sum(self, axis=None, keepdims: bool = False) -> Node:
        return _ops().sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> Node:
        return _ops().mean(self, axis, keepdims)

    def reshape(self, *shape) -> Node:
        return _ops().reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape)

    def transpose(self, *axes) -> Node:
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        return _ops().transpose(self, axes or None)

    @property
    def T(self) -> Node:
        return _ops().transpose(self)

    def __bool__(self) -> bool:
        raise TypeError("a symbolic tensor has no truth value; use bp ops instead of Python control flow")

    def __array__(self, *args, **kwargs):
        raise TypeError("a symbolic tensor is not an array: compile the graph and call the model")


Tensor = Node  # the name users see in type hints


def _ops():
    from ..ops import core as ops
    return ops


# --- shapes -------------------------------------------------------------------------------

def shape_str(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_shape(shape: Any, what: str, allow_named: bool = True) -> Shape:
    """Validate a user-given shape: a tuple of positive ints and (if allowed) non-empty strs."""
    if isinstance(shape, int | str):
        shape = (shape,)
    if not isinstance(shape, tuple | list):
        raise ShapeError(f"{what}: a shape must be a tuple of ints and names, got {shape!r}")
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int | str | np.integer):
            raise ShapeError(f"{what}: dimension {d!r} in {tuple(shape)!r} is neither an int nor a name")
        if isinstance(d, str):
            if not allow_named:
                raise ShapeError(f"{what}: dimension {d!r} must be a fixed int here, got shape {tuple(shape)!r}")
            if not d or "\0" in d:
                raise ShapeError(f"{what}: a named dimension must be a non-empty string, got {d!r}")
            if PRODUCT in d or _DIGITS.fullmatch(d):
                raise ShapeError(f"{what}: dimension {d!r} in {tuple(shape)!r} must be a plain name (no {PRODUCT!r}, "
                                 "not only digits): a product of dims such as 'batch*T' only comes from bp.reshape")
            out.append(d)
        else:
            if int(d) < 1:
                raise ShapeError(f"{what}: dimension sizes must be >= 1, got {tuple(shape)!r}")
            out.append(int(d))
    return tuple(out)


def broadcast_shapes(shapes: Sequence[Shape], names: Sequence[str]) -> Shape:
    """NumPy broadcasting of several shapes; a named dim matches itself or 1."""
    ndim = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(ndim):
        dim: Dim = 1
        for s in shapes:
            d = s[axis - ndim + len(s)] if axis - ndim + len(s) >= 0 else 1
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
                continue
            operands = ", ".join(f"{n} {shape_str(s)}" for n, s in zip(names, shapes))
            raise ShapeError(f"cannot broadcast {operands}: dimension {dim!r} does not match {d!r}")
        out.append(dim)
    return tuple(out)


# --- the user's graph ---------------------------------------------------------------------

class LossSpec:
    """A named scalar loss and the parameters it trains (None: all of them)."""

    def __init__(self, name: str, node: Node, params: tuple[str, ...] | None):
        self.name, self.node, self.params = name, node, params


class Graph:
    """A network declared symbolically: inputs, parameters, named outputs and losses."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ValueError(f"a graph needs a non-empty name, got {name!r}")
        self.name = name
        self.uid = next(_graph_ids)
        self.inputs: dict[str, Node] = {}
        self.params: dict[str, Node] = {}
        self.param_init: dict[str, Any] = {}
        self.outputs: dict[str, Node] = {}
        self.losses: dict[str, LossSpec] = {}
        self.trainable: set[str] = set()
        # non-trainable parameters (running statistics) and the values train_step writes to them
        self.state_updates: dict[str, Node] = {}
        # parameter -> (its key in model.state_dict(), whether that layout is its transpose)
        self.state_names: dict[str, tuple[str, bool]] = {}
        _GRAPHS[self.uid] = self

    def _check_new_name(self, name: str, kind: str) -> None:
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
        if name in self.inputs or name in self.params:
            raise ValueError(f"graph {self.name!r} already has an input or parameter named {name!r}")

    def input(self, name: str, shape: Any, dtype: str | None = None) -> Node:
        """Declare an input; str dims (e.g. "batch") are sizes given at run time."""
        self._check_new_name(name, "input")
        if name in RESERVED_INPUT_NAMES:
            raise ValueError(f"input name {name!r} is taken by the model's call methods "
                             f"({', '.join(sorted(RESERVED_INPUT_NAMES))}); choose another name")
        kind = _input_dtype(dtype, name)
        node = Node("input", (), {"name": name, "graph": self.uid}, check_shape(shape, f"input {name!r}"), kind)
        self.inputs[name] = node
        return node

    def param(self, name: str, shape: Any, init: Any = None, trainable: bool = True) -> Node:
        """Declare a parameter of fixed shape with its initializer. A non-trainable one (model
        state such as running statistics) is saved in checkpoints but never given a gradient."""
        self._check_new_name(name, "parameter")
        shape = check_shape(shape, f"parameter {name!r}", allow_named=False)
        from ..train.init import check_init
        self.param_init[name] = check_init(init, shape, name)
        node = Node("param", (), {"name": name, "graph": self.uid}, shape, FLOAT)
        self.params[name] = node
        if trainable:
            self.trainable.add(name)
        return node

    def name_in_state_dict(self, param: str, key: str, transpose: bool = False) -> None:
        """How `model.state_dict()` names a parameter (PyTorch's name for the layer's tensor, e.g.
        "fc1.weight"), and whether it holds the transpose (PyTorch's (out, in) of a (in, out) weight)."""
        if param not in self.params:
            raise ValueError(f"graph {self.name!r} has no parameter {param!r}")
        if not isinstance(key, str) or not key or "\0" in key:
            raise ValueError(f"state_dict key must be a non-empty string, got {key!r}")
        if transpose and self.params[param].ndim != 2:
            raise ShapeError(f"only a 2-D parameter can be transposed in the state dict, {param!r} is "
                             f"{shape_str(self.params[param].shape)}")
        taken = {k: p for p, (k, _) in self.state_names.items() if p != param}
        if key in taken or (key in self.params and key != param and key not in self.state_names):
            raise ValueError(f"state_dict key {key!r} of {param!r} is already the key of {taken.get(key, key)!r}")
        self.state_names[param] = (key, bool(transpose))

    def update_state(self, name: str, value: Node) -> None:
        """Have every train_step write `value` (computed in training mode) to a non-trainable parameter."""
        _check_node(value, f"state update of {name!r}")
        if name not in self.params or name in self.trainable:
            raise ValueError(f"{name!r} is not a non-trainable parameter of graph {self.name!r}")
        if value.shape != self.params[name].shape:
            raise ShapeError(f"state update of {name!r}: value shape {shape_str(value.shape)} != parameter "
                             f"shape {shape_str(self.params[name].shape)}")
        self.state_updates[name] = value

    def trained_params(self, loss: str) -> list[str]:
        """The parameters a loss trains: its own list, or every trainable parameter."""
        spec = self.losses[loss]
        return list(spec.params) if spec.params is not None else [n for n in self.params if n in self.trainable]

    def output(self, name: str, value: Node) -> Node:
        """Name a forward output; `model.forward` returns it."""
        _check_node(value, f"output {name!r}")
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"output name must be a non-empty string, got {name!r}")
        if name in self.outputs:
            raise ValueError(f"graph {self.name!r} already has an output named {name!r}")
        self.outputs[name] = value
        return value

    def loss(self, value: Node, name: str = "loss", params: Sequence[Any] | None = None) -> Node:
        """Declare a scalar loss; `params` limits which parameters it trains (default: all)."""
        _check_node(value, f"loss {name!r}")
        if value.shape != () or value.dtype != FLOAT:
            raise ShapeError(f"loss {name!r} must be a float scalar, got shape {shape_str(value.shape)}; "
                             "reduce it with bp.mean or bp.sum")
        if name in self.losses:
            raise ValueError(f"graph {self.name!r} already has a loss named {name!r}")
        names = None
        if params is not None:
            names = []
            for p in params:
                pname = p.attrs.get("name") if isinstance(p, Node) and p.op == "param" else p
                if pname not in self.params or pname not in self.trainable:
                    raise ValueError(f"loss {name!r}: {p!r} is not a trainable parameter of graph {self.name!r}")
                names.append(pname)
            names = tuple(names)
        self.losses[name] = LossSpec(name, value, names)
        return value

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}, inputs={list(self.inputs)}, params={list(self.params)}, "
                f"outputs={list(self.outputs)}, losses={list(self.losses)})")


def _input_dtype(dtype: Any, name: str) -> str:
    if dtype is None or dtype in ("float", "float32", "float64", np.float32, np.float64):
        return FLOAT
    if dtype in ("int32", "int64", "int", np.int32, np.int64):
        return INT
    raise ValueError(f"input {name!r}: dtype must be float or int32, got {dtype!r}")


def _check_node(value: Any, what: str) -> None:
    if not isinstance(value, Node):
        raise TypeError(f"{what} must be a graph tensor, got {type(value).__name__}")


def graphs_newest_first() -> list[Graph]:
    """The live graphs, the most recently declared first: a shape's named dims that no input
    carries are looked up in the graph that declared the inputs."""
    return list(reversed(list(_GRAPHS.values())))


def graph_of(node: Node) -> Graph | None:
    """The Graph a node's inputs and parameters were declared in (None for constants)."""
    for x in topo_order([node]):
        if x.op in ("input", "param"):
            return _GRAPHS.get(x.attrs["graph"])
    return None


def structural_hash(node: Node) -> int:
    """A hash of what a node computes (ops, attrs, shapes, leaf names) that is the same from
    run to run, unlike id() or Python's hash(); used to salt random streams."""
    import zlib
    memo: dict[Node, int] = {}
    for x in topo_order([node]):
        attrs = sorted((k, repr(v)) for k, v in x.attrs.items() if k != "graph")
        text = repr((x.op, attrs, x.shape, x.dtype, [memo[i] for i in x.inputs]))
        memo[x] = zlib.crc32(text.encode())
    return memo[node]


def topo_order(roots: Sequence[Node]) -> list[Node]:
    """Nodes reachable from `roots`, inputs before users, in a deterministic order."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in roots:
        stack: list[tuple[Node, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0 and id(node) in seen:
                continue
            if i < len(node.inputs):
                stack.append((node, i + 1))
                child = node.inputs[i]
                if id(child) not in seen:
                    stack.append((child, 0))
            else:
                if id(node) not in seen:
                    seen.add(id(node))
                    order.append(node)
    return order
