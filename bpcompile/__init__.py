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
from .runtime.model import CompiledModel, load

__version__ = "0.1.0"

_LAZY = {
    "Graph": "ir", "Tensor": "ir",
    "compile": "compiler", "lower": "compiler",
    "elementwise": "ops", "matmul": "ops", "relu": "ops", "leaky_relu": "ops", "elu": "ops",
    "sigmoid": "ops", "tanh": "ops", "softplus": "ops", "gelu": "ops", "silu": "ops", "exp": "ops",
    "log": "ops", "sqrt": "ops", "square": "ops", "abs": "ops", "sum": "ops", "mean": "ops",
    "reshape": "ops", "transpose": "ops", "flatten": "ops", "softmax": "ops", "log_softmax": "ops",
    "mse": "ops", "softmax_cross_entropy": "ops", "binary_cross_entropy_with_logits": "ops", "nll_loss": "ops",
    "add": "ops", "sub": "ops", "mul": "ops", "div": "ops", "power": "ops", "neg": "ops", "const": "ops",
    "grad": "autodiff", "evaluate": "ops.reference", "set_num_threads": "runtime.threads",
    "num_threads": "runtime.threads", "to_onnx": "tools.onnx_export",
    "from_onnx": "tools.onnx_import",
    **{name: "ops.slicing" for name in ("concat", "slice")},
    "conv2d": "ops.conv", "max_pool2d": "ops.pool", "avg_pool2d": "ops.pool", "embedding": "ops.embeddings",
    "dropout": "ops.regularization", "batch_norm": "ops.normalization",
    **{name: "ops.recurrent" for name in ("lstm", "gru", "rnn")},
    **{name: "ops.transformer" for name in ("constant", "where", "masked_fill", "max", "min", "layer_norm",
                                            "attention")},
}
# bp.<name> for the stage packages and, under their old flat names, the modules inside them
_SUBMODULES = {name: name for name in ("ir", "symbolic", "ops", "autodiff", "passes", "codegen", "build", "compiler",
                                       "runtime", "train", "tools", "nn")}
_SUBMODULES.update({"nn_ops": "ops", "reference": "ops.reference", "blas": "runtime.blas",
                    "threads": "runtime.threads", "optim": "train.optim", "schedules": "train.schedules",
                    "init": "train.init", "training": "train.fit", "callbacks": "train.callbacks",
                    "distributed": "train.distributed", "cli": "tools.cli", "spec": "tools.spec",
                    "explain": "tools.explain", "export": "tools.export"})

__all__ = ["BPError", "CheckpointError", "CompileError", "InputError", "ShapeError", "CompiledModel", "load",
           *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bpcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
