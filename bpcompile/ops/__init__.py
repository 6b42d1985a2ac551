"""The operations: each op's shape rule, vector-Jacobian product and NumPy reference, in the
`OPS` registry (`core`: elementwise, reductions, layout, matmul, softmax, random; `losses`; one
module per model family: `slicing` (slice, concat), `conv` (conv2d, im2col), `pool`,
`embeddings`, `regularization` (dropout), `normalization` (batch norm), `recurrent` (LSTM, GRU,
RNN), with the helpers they share in `shared`; `batched`: the batched matmul; `transformer`:
constant, where/masked_fill, max/min, layer norm, attention, with the fused attention in its own module
(`attention_fused.py`, which `transformer` loads), and the NumPy reference evaluator
(`reference`, behind `bp.evaluate`). The family modules and `reference` load on first use of one
of their names, so using the core ops does not load the C code generator."""

from __future__ import annotations

import importlib
from typing import Any

from . import core, losses
from .core import OPS, OpDef, register

_LAZY_MODULES = ("slicing", "conv", "pool", "embeddings", "regularization", "normalization", "recurrent",
                 "transformer", "reference")

__all__ = ["OPS", "OpDef", "register", "core", "losses", *_LAZY_MODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    for module in (core, losses):
        if not name.startswith("_") and hasattr(module, name):
            return getattr(module, name)
    for module in _LAZY_MODULES:
        mod = importlib.import_module(f".{module}", __name__)
        if not name.startswith("_") and name in vars(mod):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
