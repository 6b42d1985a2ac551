"""The importer: reads an ONNX graph node by node, folding nodes of constant inputs, and hands
each other node to the rule registered for its operator in IMPORTERS (the rules live in the
modules of their operator family)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import CompileError, ShapeError
from ...ir.graph import Graph, Node
from ...ops import core as ops
from ...ops import transformer
from ..onnx_export import DEFAULT_OPSET, _onnx
from .reading import _differentiable, _dim_name, _plain, _settle, _torch_kinds
from .values import _CAUSAL, _INFINITE, _WINDOW, Value, _Causal, _Condition, _Infinite, _Window


class _Importer:
    """One import: the ONNX model, the Graph being built, the value of every ONNX tensor so far
    (`env`) and the node being imported, which the rules read and report errors against."""

    def __init__(self, proto: Any, name: str | None):
        self.onnx = _onnx()
        self.proto = proto
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
        self.graph = Graph(name or proto.graph.name or "onnx_model")
        self.env: dict[str, Value] = {}
        self.initial: dict[str, np.ndarray] = {}  # the initializers that became parameters
        self.node: Any = None  # the ONNX node being imported, for error messages

    # --- errors and attributes -------------------------------------------------------------
    def fail(self, what: str) -> CompileError:
        n = self.node
        return CompileError(f"from_onnx: node {n.name or n.output[0]!r} ({n.op_type}): {what}")

    def attrs(self) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in self.node.attribute}

    def only(self, allowed: dict[str, Any]) -> dict[str, Any]:
        """The node's attributes, refusing any that is not in `allowed` or has another value
        than the one bpcompile computes (None: any value)."""
        attrs = self.attrs()
        for key, value in attrs.items():
            if key not in allowed:
                raise self.fail(f"attribute {key!r} is not supported")
            expected = allowed[key]
            if expected is not None and _plain(value) != expected:
                raise self.fail(f"attribute {key}={_plain(value)!r} is not supported (only {expected!r})")
        return attrs

    # --- values --------------------------------------------------------------------------
    def get(self, name: str) -> Value | None:
        if name == "":
            return None
        if name not in self.env:
            raise self.fail(f"input {name!r} is not computed by any earlier node")
        return self.env[name]

    def constant(self, name: str, what: str) -> np.ndarray:
        value = self.get(name)
        if not isinstance(value, np.ndarray):
            raise self.fail(f"{what} must be a constant (an initializer or Constant), it is computed by the graph")
        return value

    def ints(self, name: str, what: str) -> list[int]:
        """A constant list of sizes or indices, refused when it holds runtime sizes (names)."""
        values = np.ravel(self.constant(name, what))
        if any(isinstance(v, str) for v in values):
            raise self.fail(f"{what} {[str(v) for v in values]} hold runtime sizes, which is not supported")
        return [int(v) for v in values]

    def tensor(self, value: Value) -> Node:
        """A graph tensor for a value: constants become bp.constant (scalars a filled tensor)."""
        if isinstance(value, Node):
            return value
        if isinstance(value, _Condition):
            return value.number()
        if isinstance(value, _Infinite):
            raise self.fail(_INFINITE)
        if isinstance(value, _Causal):
            raise self.fail(_CAUSAL)
        if isinstance(value, _Window):
            raise self.fail(_WINDOW)
        if value.dtype == object:
            raise self.fail("runtime sizes (from Shape) used as a tensor are not supported")
        if not np.all(np.isfinite(value)):
            raise self.fail("a constant holding inf or NaN is supported only as a Where branch or an Add/Sub "
                            "operand (a mask)")
        if value.ndim == 0:
            return ops.const(float(value))
        return transformer.constant(value)

    def operand(self, value: Value, like: Value = None) -> Node | float:
        """A number for a constant of one element that broadcasting against `like` does not
        widen, else a graph tensor."""
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype != object and np.isfinite(value).all():
            ndim = len(like.shape) if like is not None and not isinstance(like, np.ndarray) else 0
            if value.ndim <= ndim:
                return float(value.reshape(()))
        return self.tensor(value)

    def fold(self, args: list) -> tuple[np.ndarray, ...]:
        """Evaluate a node whose inputs are all constants, with ONNX's reference evaluator."""
        from onnx.reference import ReferenceEvaluator
        feeds = {name: value for name, value in zip(self.node.input, args) if name}
        try:
            results = ReferenceEvaluator(self.node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:  # noqa: BLE001 - reported with the node
            raise self.fail(f"evaluating it on its constant inputs failed: {e}") from None
        return tuple(np.asarray(r) for r in results)

    # --- the model -------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.proto.graph
        numpy_helper = self.onnx.numpy_helper
        live = _differentiable(self.onnx, g)
        kinds = _torch_kinds(g)
        for init in g.initializer:
            array = numpy_helper.to_array(init)
            unmarked = "CONSTANT" if kinds and array.size == 1 else "PARAMETER"
            trainable = kinds.get(init.name, unmarked) == "PARAMETER"
            if array.dtype.kind == "f" and array.ndim > 0 and init.name in live and trainable:
                self.env[init.name] = self.graph.param(init.name, array.shape, init=array.astype(np.float64))
                self.initial[init.name] = array
            else:
                self.env[init.name] = array
        for value in g.input:
            if value.name not in self.env:
                self.env[value.name] = self.input(value)
        for node in g.node:
            self.node = node
            args = [self.get(i) for i in node.input]
            if args and all(isinstance(a, np.ndarray) and a.dtype != object for a in args if a is not None) \
                    and node.op_type not in _NO_FOLD:
                results = self.fold(args)
            else:
                handler = IMPORTERS.get(node.op_type)
                if handler is None:
                    raise self.fail(f"operator {node.op_type} is not supported (supported: "
                                    f"{', '.join(sorted(IMPORTERS))})")
                try:
                    results = handler(self, args)
                except (ShapeError, ValueError, TypeError) as e:  # a bpcompile op refused the operands
                    raise self.fail(str(e)) from e
            results = results if isinstance(results, tuple) else (results,)
            for out, value in zip(node.output, results):
                if out:
                    self.env[out] = _settle(value)
        for value in g.output:
            result = self.env[value.name]
            self.graph.output(value.name, result if isinstance(result, Node) else self.tensor(result))
        return self.graph

    def input(self, value: Any) -> Node:
        t = value.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(_dim_name(d.dim_param))
            else:
                dims.append("batch" if i == 0 else f"{_dim_name(value.name)}_{i}")
        kind = self.onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        return self.graph.input(value.name, tuple(dims), dtype="int32" if kind.kind in "iub" else None)


_NO_FOLD = {"Identity"}  # evaluated by their own rule even on constants


# ONNX operator -> its rule: (the importer, the node's input values) -> its output value(s)
IMPORTERS: dict[str, Callable[[_Importer, list], Any]] = {}


def _op(*names: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the rule of these ONNX operators."""
    def register(fn):
        for name in names:
            IMPORTERS[name] = fn
        return fn
    return register


def from_onnx(model: str | os.PathLike | Any, name: str | None = None) -> Graph:
    """A bp.Graph computing an ONNX model (a path or an onnx.ModelProto): add a loss to train it,
    or compile it as it is for inference."""
    onnx = _onnx()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes only help; the import checks its own
        pass
    return _Importer(proto, name).run()
