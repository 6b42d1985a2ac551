"""ONNX models as specs: bp.from_onnx, with the loss a command's --loss names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpcompile as bp

from ...errors import BPError
from .common import Spec, SpecError

ONNX_LOSSES = ("cross_entropy", "nll", "mse")


def onnx_loss(graph: Any, text: str, path: Path) -> None:
    """Add the loss `KIND:NAME` on the graph's first output: cross_entropy:LABELS (logits and int
    labels), nll:LABELS (log-probabilities, as torch's nll_loss) or mse:TARGET; NAME becomes a
    new input."""
    kind, _, name = text.partition(":")
    if kind not in ONNX_LOSSES or not name:
        raise SpecError(path, "--loss", f"expected KIND:INPUT with KIND one of {', '.join(ONNX_LOSSES)} "
                        f"(e.g. cross_entropy:labels), got {text!r}")
    if not graph.outputs:
        raise SpecError(path, "--loss", "the model has no output to put a loss on")
    out = next(iter(graph.outputs.values()))
    try:
        if kind == "mse":
            graph.loss(bp.mse(out, graph.input(name, out.shape)))
        else:
            labels = graph.input(name, out.shape[:-1], dtype="int32")
            graph.loss((bp.nll_loss if kind == "nll" else bp.softmax_cross_entropy)(out, labels))
    except (ValueError, BPError) as e:
        raise SpecError(path, "--loss", str(e)) from None


def _load_onnx(path: Path, loss: str | None) -> Spec:
    from ..onnx_import import from_onnx
    graph = from_onnx(path, name="".join(c if c.isalnum() or c == "_" else "_" for c in path.stem))
    if loss is not None:
        onnx_loss(graph, loss, path)
    return Spec(path, "onnx", graph)
