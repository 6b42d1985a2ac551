"""bpcompile: a graph compiler for backpropagation.

Declare a network as a symbolic graph, and `bp.compile` differentiates it (SymPy derives every
elementwise derivative), fuses it into C kernels, builds them with cffi and returns a model
whose `train_step` is one native call.

`import bpcompile` is light: the compiler (and SymPy) load on first use of the graph API, so
`bp.load(build_path)` of an already built model needs neither SymPy nor a C compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import BPError, CheckpointError, CompileError, InputError, ShapeError
from .runtime import CompiledModel, load

__version__ = "0.1.0"

_LAZY = {
    "Graph": "ir", "Tensor": "ir",
    "compile": "compiler", "lower": "compiler",
    "elementwise": "ops", "matmul": "ops", "relu": "ops", "leaky_relu": "ops", "elu": "ops",
    "sigmoid": "ops", "tanh": "ops", "softplus": "ops", "gelu": "ops", "silu": "ops", "exp": "ops",
    "log": "ops", "sqrt": "ops", "square": "ops", "abs": "ops", "sum": "ops", "mean": "ops",
    "reshape": "ops", "transpose": "ops", "flatten": "ops", "softmax": "ops", "log_softmax": "ops",
    "mse": "ops", "softmax_cross_entropy": "ops", "binary_cross_entropy_with_logits": "ops",
    "add": "ops", "sub": "ops", "mul": "ops", "div": "ops", "power": "ops", "neg": "ops", "const": "ops",
    "grad": "autodiff", "evaluate": "reference", "set_num_threads": "threads", "num_threads": "threads",
    "conv2d": "nn_ops", "max_pool2d": "nn_ops", "avg_pool2d": "nn_ops", "lstm": "nn_ops", "gru": "nn_ops",
    "rnn": "nn_ops", "batch_norm": "nn_ops", "dropout": "nn_ops", "embedding": "nn_ops", "concat": "nn_ops",
    "slice": "nn_ops",
}
_SUBMODULES = {"blas", "training", "optim", "schedules", "reference", "ops", "ir", "autodiff", "passes", "codegen",
               "build", "runtime", "symbolic", "init", "compiler", "nn_ops", "nn", "threads"}

__all__ = ["BPError", "CheckpointError", "CompileError", "InputError", "ShapeError", "CompiledModel", "load",
           *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bpcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
