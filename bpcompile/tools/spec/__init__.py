"""Model specs for the `bpcompile` command: a Python file or a YAML layer stack -> a Graph.

A **Python spec** is a file that defines a module-level `graph` (a `bp.Graph`) or a `build()`
function returning one. It may also define `optimizer` (a `bp.optim` optimizer), `dtype`
("float32" or "float64") and `seed` (an int), which the commands use as defaults.

A **YAML spec** describes a stack of layers, for people who configure rather than program::

    name: mlp                      # the graph's name (default: the file's stem)
    dtype: float32                 # float32 (default) or float64
    seed: 0                        # initial parameters are drawn with this seed
    inputs:                        # name: {shape: [...], dtype: float | int32}
      x: {shape: [batch, 784]}     #   a str dim is a runtime size, an int is fixed
      y: {shape: [batch], dtype: int32}
    input: x                       # the input the stack reads (default: the only float input)
    functions:                     # your own elementwise functions, as SymPy strings
      mish: {expr: "z * tanh(log(1 + exp(z)))", symbols: [z]}
    layers:
      - {type: dense, units: 256, activation: relu, init: he_normal}
      - mish                       # any elementwise op by name (built in or from `functions`)
      - {type: dense, units: 10}
    output: logits                 # the name of the stack's output (default: output)
    loss: {type: softmax_cross_entropy, target: y}
    optimizer: {type: adam, lr: 0.001}

Layers: `dense` (units, activation, init, bias, bias_init, name), `dropout` (p), `batch_norm`
(momentum, eps, name), the layers of a GPT (`embedding` (vocab, dim, positions, name) reading int32
token ids, `layer_norm` (eps), `transformer_block` (heads, mlp_ratio, dropout, causal), `lm_head`
(units; without units it is tied to the embedding's table): see examples/gpt_spec.yaml), `flatten`,
`softmax`, `log_softmax`, `leaky_relu` (negative_slope), `elu` (alpha), every built-in elementwise op
(relu, sigmoid, tanh, softplus, gelu, silu, exp, log, sqrt, square, abs, neg) and every function
of `functions` (a function of several symbols takes the stack as its first one and constants for
the others: `{type: f, args: {beta: 1.5}}`). A layer with no settings may be written as its name.
Losses: softmax_cross_entropy, mse, binary_cross_entropy_with_logits (`target`: an input).
Optimizers: sgd, adam, adamw, rmsprop, with the keyword arguments of `bp.optim`.

Every mistake is a `SpecError` whose one-line message names the file (and line, for YAML), the
key path and what was expected, e.g. ``mlp.yaml:9: layers[1].units: expected a positive
integer, got 'ten'``.
"""

from __future__ import annotations

from pathlib import Path

from .common import DTYPES, Spec, SpecError
from .expressions import parse_sympy
from .layers import LAYERS, Layer
from .limits import (
    MAX_ELEMENTS,
    MAX_EXPR_CHARS,
    MAX_EXPR_DEPTH,
    MAX_NUMBER_BITS,
    MAX_SEED,
    MAX_SYMBOLIC_EXPONENT,
    MAX_UNITS,
)
from .onnx_file import ONNX_LOSSES, _load_onnx, onnx_loss
from .python_file import _load_python
from .yaml_file import FUNCTION_KEYS, INPUT_KEYS, LOSSES, TOP_KEYS, _load_yaml

__all__ = ["DTYPES", "FUNCTION_KEYS", "INPUT_KEYS", "LAYERS", "LOSSES", "MAX_ELEMENTS", "MAX_EXPR_CHARS",
           "MAX_EXPR_DEPTH", "MAX_NUMBER_BITS", "MAX_SEED", "MAX_SYMBOLIC_EXPONENT", "MAX_UNITS", "ONNX_LOSSES",
           "TOP_KEYS", "Layer", "Spec", "SpecError", "load_spec", "onnx_loss", "parse_sympy"]


def load_spec(path: str | Path, loss: str | None = None) -> Spec:
    """Load a Python (.py) or YAML (.yaml / .yml) model spec, or an ONNX model (.onnx) with the
    loss `loss` added (see `onnx_loss`)."""
    path = Path(path)
    if not path.exists():
        raise SpecError(path, "", "no such file")
    if path.is_dir():
        raise SpecError(path, "", "is a folder; expected a .py or .yaml model spec")
    suffix = path.suffix.lower()
    if loss is not None and suffix != ".onnx":
        raise SpecError(path, "--loss", "adds a loss to an .onnx model only; a .py or .yaml spec declares its own")
    if suffix == ".onnx":
        return _load_onnx(path, loss)
    if suffix == ".py":
        return _load_python(path)
    if suffix in (".yaml", ".yml"):
        return _load_yaml(path)
    raise SpecError(path, "", f"unknown spec type {suffix or '(no extension)'!r}; expected a .py, .yaml or .onnx file")
