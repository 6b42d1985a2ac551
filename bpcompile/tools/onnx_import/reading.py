"""Reading an ONNX model: which initializers the outputs depend on as data (the trainable
ones), what torch.export marks a tensor as, graph input dim names, plain attribute values."""

from __future__ import annotations

from typing import Any

import numpy as np

from .values import Value

# The inputs of an operator its output is differentiable in (all when not listed): an
# initializer that reaches an output only through the others (a mask, a shape, indices) is a
# constant, not a trainable parameter.
_DATA_INPUTS = {
    **{op: () for op in ("Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
                         "Or", "Xor", "IsInf", "IsNaN", "ConstantOfShape", "Range", "ArgMax", "ArgMin")},
    **{op: (0,) for op in ("Reshape", "Slice", "Gather", "Expand", "Tile", "Squeeze", "Unsqueeze", "Split", "Trilu",
                           "Dropout", "Pad", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")},
    "Where": (1, 2),
}


def _data_inputs(onnx: Any, node: Any) -> tuple[int, ...]:
    if node.op_type == "Cast":  # a cast to bool or int is a test, not a value
        to = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
        kind = onnx.helper.tensor_dtype_to_np_dtype(to).kind if to is not None else "f"
        return (0,) if kind == "f" else ()
    return _DATA_INPUTS.get(node.op_type, tuple(range(len(node.input))))


def _differentiable(onnx: Any, graph: Any) -> set[str]:
    """The tensor names the graph outputs depend on through data inputs (not through shapes,
    conditions or indices)."""
    live = {value.name for value in graph.output}
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            live.update(node.input[i] for i in _data_inputs(onnx, node) if i < len(node.input))
    return live


def _torch_kinds(graph: Any) -> dict[str, str]:
    """What torch.export says a tensor is (PARAMETER, BUFFER, ...), where the dynamo exporter
    wrote it down. In its models an initializer it does not mark is a folded parameter (a
    transposed weight) unless it has one element: a constant it stored, such as attention's
    sqrt(1/sqrt(d)) (the TorchScript exporter and bp.to_onnx write those as Constant nodes)."""
    kinds = {}
    for value in graph.value_info:
        for prop in getattr(value, "metadata_props", ()):
            if prop.key.endswith("InputSpec.kind"):
                kinds[value.name] = prop.value
    return kinds


def _settle(value: Value) -> Value:
    """Runtime sizes (an object array) that turned out to be all fixed become int64."""
    if isinstance(value, np.ndarray) and value.dtype == object and not any(isinstance(v, str) for v in value.flat):
        return value.astype(np.int64)
    return value


def _dim_name(text: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return name if name and not name[0].isdigit() else f"d_{name}"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
