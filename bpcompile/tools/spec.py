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

import ast
import difflib
import importlib.util
import inspect
import itertools
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bpcompile as bp

from ..errors import BPError

DTYPES = ("float32", "float64")


class SpecError(BPError, ValueError):
    """A model spec that cannot be loaded: the message is one line naming file, place and problem."""

    def __init__(self, path: str | Path, where: str, message: str, line: int | None = None):
        self.path, self.where, self.line = str(path), where, line
        self.message = " ".join(str(message).split())  # always one line
        loc = self.path + (f":{line}" if line else "")
        super().__init__(f"{loc}: {where + ': ' if where else ''}{self.message}")


@dataclass
class Spec:
    """A loaded model spec: the graph and the settings the commands default to."""

    path: Path
    kind: str  # "python", "yaml" or "onnx"
    graph: Any  # bp.Graph
    dtype: str = "float32"
    optimizer: Any = None  # bp.optim.Optimizer or None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.graph.name


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


# --- ONNX models ------------------------------------------------------------------------------

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
    from .onnx_import import from_onnx
    graph = from_onnx(path, name="".join(c if c.isalnum() or c == "_" else "_" for c in path.stem))
    if loss is not None:
        onnx_loss(graph, loss, path)
    return Spec(path, "onnx", graph)


# --- Python specs -----------------------------------------------------------------------------

_counter = itertools.count()


def _user_error(path: Path, exc: BaseException) -> SpecError:
    """A one-line error for an exception raised by the spec's own code, at its line in the spec."""
    line = None
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path.resolve():
        line = exc.lineno
    else:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename and Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
    text = str(exc.msg if isinstance(exc, SyntaxError) else exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return SpecError(path, "", message, line)


def _load_python(path: Path) -> Spec:
    module_name = f"_bpcompile_spec_{next(_counter)}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(path, "", "cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        graph = getattr(module, "graph", None)
        if graph is None:
            build = getattr(module, "build", None)
            if not callable(build):
                raise SpecError(path, "", "defines neither a module-level 'graph' (a bp.Graph) nor a 'build()' "
                                "function returning one")
            graph = build()
            where = "build()"
        else:
            where = "graph"
    except SpecError:
        raise
    except (Exception, SystemExit) as e:  # the spec's own code failed: report it at its line
        raise _user_error(path, e) from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
        sys.modules.pop(module_name, None)
    if not isinstance(graph, bp.Graph):
        raise SpecError(path, where, f"expected a bp.Graph, got {type(graph).__name__}")
    dtype = getattr(module, "dtype", "float32")
    if dtype not in DTYPES:
        raise SpecError(path, "dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    optimizer = getattr(module, "optimizer", None)
    if optimizer is not None and not isinstance(optimizer, bp.optim.Optimizer):
        raise SpecError(path, "optimizer", f"expected a bp.optim optimizer, got {type(optimizer).__name__}")
    seed = getattr(module, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(path, "seed", f"expected a non-negative integer, got {seed!r}")
    return Spec(path, "python", graph, dtype, optimizer, seed)


# --- YAML specs: reading with line numbers --------------------------------------------------

def _import_yaml():
    try:
        import yaml
    except ImportError:
        raise BPError("YAML specs need PyYAML: pip install 'bpcompile[cli]' (or pip install pyyaml)") from None
    return yaml


def _yaml_lines(yaml, text: str) -> dict[tuple, int]:
    """The line of every key path in the document (for error messages)."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value
                lines[path + (k,)] = key.start_mark.line + 1
                walk(value, path + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _numeric_text(value: Any) -> bool:
    """A string that reads as a number (YAML 1.1 takes `1e20`, without a dot, for text)."""
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Reader:
    """Typed access to the YAML document, raising SpecError with file, line and key path."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines = path, lines

    def error(self, where: tuple, message: str) -> SpecError:
        line = None
        for n in range(len(where), -1, -1):
            if where[:n] in self.lines:
                line = self.lines[where[:n]]
                break
        return SpecError(self.path, _path_str(where), message, line)

    def mapping(self, value: Any, where: tuple, allowed: dict[str, str], required: tuple[str, ...] = ()) -> dict:
        """Check a mapping's keys: every key known, every required key present."""
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping with keys {', '.join(allowed)}, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(where + (key,), f"unknown key {key!r}{hint}; expected one of "
                                 f"{', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.error(where, f"missing key {key!r} ({allowed[key]})")
        return value

    def integer(self, value: Any, where: tuple, minimum: int = 1, maximum: int | None = None) -> int:
        """A whole number in [minimum, maximum] (default MAX_UNITS): not a bool, float or string."""
        maximum = MAX_UNITS if maximum is None else maximum
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            hint = ", a string (write the integer in digits: YAML reads 1e20 as text)" if _numeric_text(value) else ""
            raise self.error(where, f"expected {what}, got {_describe(value)}{hint}; allowed: {minimum} to {maximum}")
        return value

    def units(self, value: Any, where: tuple, *fixed: int) -> int:
        """A count that sizes a weight with the given fixed sizes: in range, the weight too."""
        count = self.integer(value, where)
        self.count_product([*fixed, count], where, "a weight of")
        return count

    def count_product(self, counts: list[int], where: tuple, what: str) -> None:
        """The product of a shape's fixed sizes (a weight's, or an input's row) is at most MAX_ELEMENTS."""
        if math.prod(counts) > MAX_ELEMENTS:
            raise self.error(where, f"{what} {' x '.join(map(str, counts))} = {math.prod(counts)} elements, more "
                                    f"than the limit of {MAX_ELEMENTS}")

    def number(self, value: Any, where: tuple) -> float:
        """A real number; YAML reads 1e-3 (no dot) as a string, so numeric strings are accepted."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(where, f"expected a number, got {_describe(value)}")
        return float(value)

    def name(self, value: Any, where: tuple, what: str = "a name") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"expected {what}, got {_describe(value)}")
        return value

    def choice(self, value: Any, where: tuple, choices: list[str], what: str) -> str:
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(where, f"unknown {what} {_describe(value)}{hint}; expected one of {', '.join(choices)}")
        return value

    def boolean(self, value: Any, where: tuple) -> bool:
        if not isinstance(value, bool):
            raise self.error(where, f"expected true or false, got {_describe(value)}")
        return value

    def settings(self, value: Any, where: tuple, what: str) -> tuple[str, dict, tuple]:
        """A `{type: kind, ...settings}` mapping or a bare `kind` string -> (kind, settings, where)."""
        if isinstance(value, str):
            return value, {}, where
        if isinstance(value, dict):
            if "type" not in value:
                raise self.error(where, f"missing key 'type' (the kind of {what})")
            settings = {k: v for k, v in value.items() if k != "type"}
            return value["type"], settings, where
        raise self.error(where, f"expected a {what} name or a mapping with a 'type' key, got {_describe(value)}")


# --- YAML specs: SymPy strings, parsed without eval -----------------------------------------

_SYMPY_FUNCTIONS = {
    "exp": "exp", "log": "log", "sqrt": "sqrt", "tanh": "tanh", "sinh": "sinh", "cosh": "cosh", "sin": "sin",
    "cos": "cos", "tan": "tan", "atan": "atan", "asinh": "asinh", "erf": "erf", "abs": "Abs", "Abs": "Abs",
    "max": "Max", "Max": "Max", "min": "Min", "Min": "Min", "sign": "sign", "Heaviside": "Heaviside",
    "Piecewise": "Piecewise", "log1p": None, "expm1": None,
}
_SYMPY_CONSTANTS = {"pi": "pi", "E": "E", "True": "true"}
# Limits on spec expressions, so that a spec cannot make the parser (or later SymPy) run forever:
MAX_EXPR_CHARS = 2000        # characters of one expression
MAX_EXPR_DEPTH = 60          # nesting of operators and calls
MAX_NUMBER_BITS = 4096       # bits of an exact number a power of numbers may produce
MAX_SYMBOLIC_EXPONENT = 64   # |n| of a rational power n of an expression with symbols


def _checked_power(base: Any, exponent: Any, text: str) -> Any:
    """base ** exponent, refusing exact powers too large to compute or to differentiate."""
    import math

    import sympy as sp
    if exponent.is_Rational and not exponent.is_Integer or exponent.is_Integer:
        if base.is_Rational and base != 0:
            size = max(abs(base.p), abs(base.q))
            bits = abs(exponent) * math.log2(size) if size > 1 else 0
            if bits > MAX_NUMBER_BITS:
                raise ValueError(f"power {base}**{exponent} in {text!r} is too large to compute exactly (over "
                                 f"{MAX_NUMBER_BITS} bits)")
        elif not base.is_number and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise ValueError(f"exponent {exponent} in {text!r} is too large (at most {MAX_SYMBOLIC_EXPONENT} in "
                             "magnitude for an expression with symbols)")
    return sp.Pow(base, exponent)


def parse_sympy(text: str, symbols: list[str]) -> Any:
    """A SymPy expression from a string of arithmetic, comparisons and the functions above.

    The string is parsed with Python's `ast` and built node by node (never evaluated), so a spec
    file cannot run code. `^` means power, as in SymPy's parser. Raises ValueError.
    """
    import sympy as sp
    syms = {s: sp.Symbol(s, real=True) for s in symbols}
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression of {len(text)} characters is too long (at most {MAX_EXPR_CHARS})")
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid SymPy expression {text!r}: {e.msg} at column {e.offset or 0}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ValueError(f"expression {text!r} is nested too deeply or too large") from None
    binops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: _checked_power(a, b, text)}
    compares = {ast.Gt: sp.Gt, ast.GtE: sp.Ge, ast.Lt: sp.Lt, ast.LtE: sp.Le}

    def depth(node: ast.AST) -> int:
        children = list(ast.iter_child_nodes(node))
        return 1 + max(map(depth, children), default=0)

    try:
        too_deep = depth(tree) > MAX_EXPR_DEPTH
    except RecursionError:
        too_deep = True
    if too_deep:
        raise ValueError(f"expression {text!r} is nested too deeply (at most {MAX_EXPR_DEPTH} levels)")

    def build(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return sp.Integer(node.value) if isinstance(node.value, int) else sp.Float(node.value)
        if isinstance(node, ast.Constant) and node.value is True:
            return sp.true
        if isinstance(node, ast.Name):
            if node.id in syms:
                return syms[node.id]
            if node.id in _SYMPY_CONSTANTS:
                return getattr(sp, _SYMPY_CONSTANTS[node.id])
            raise ValueError(f"unknown name {node.id!r} in {text!r}; its symbols are {symbols}")
        if isinstance(node, ast.BinOp) and type(node.op) in binops:
            return binops[type(node.op)](build(node.left), build(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = build(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in compares:
            return compares[type(node.ops[0])](build(node.left), build(node.comparators[0]))
        if isinstance(node, ast.Tuple):
            return tuple(build(e) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            name = node.func.id
            args = [build(a) for a in node.args]
            if name == "log1p" and len(args) == 1:
                return sp.log(1 + args[0])
            if name == "expm1" and len(args) == 1:
                return sp.exp(args[0]) - 1
            if _SYMPY_FUNCTIONS.get(name):
                try:
                    return getattr(sp, _SYMPY_FUNCTIONS[name])(*args)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"invalid call {name}(...) in {text!r}: {e}") from None
            known = ", ".join(sorted(k for k in _SYMPY_FUNCTIONS))
            raise ValueError(f"unknown function {name!r} in {text!r}; known functions: {known}")
        raise ValueError(f"unsupported syntax {ast.unparse(node)!r} in {text!r} (use numbers, symbols, "
                         "+ - * / ** ^, comparisons and functions)")

    try:
        expr = build(tree)
    except RecursionError:
        raise ValueError(f"expression {text!r} is nested too deeply") from None
    if not isinstance(expr, sp.Expr):
        raise ValueError(f"{text!r} is not a scalar expression")
    return expr


# --- YAML specs: building the graph ---------------------------------------------------------

# Limits on the counts of a YAML spec (each count an integer of 1 to MAX_UNITS, the seed 0 to MAX_SEED):
MAX_UNITS = 1 << 24      # a layer's outputs, a fixed dimension, a vocabulary, heads, the MLP ratio
MAX_ELEMENTS = 1 << 32   # elements of one weight, or of an input's fixed dimensions together
MAX_SEED = 2**63 - 1

TOP_KEYS = {
    "name": "the graph's name", "dtype": "float32 or float64", "seed": "the parameter seed",
    "inputs": "the model's inputs", "input": "the input the layers read", "functions": "custom elementwise ops",
    "layers": "the list of layers", "output": "the name of the last layer's output", "loss": "the loss",
    "optimizer": "the optimizer",
}
INPUT_KEYS = {"shape": "a list of ints and dim names", "dtype": "float (default) or int32"}
FUNCTION_KEYS = {"expr": "a SymPy expression (a string)", "symbols": "the list of its symbols"}
DENSE_KEYS = {"units": "the number of outputs", "activation": "an elementwise op", "init": "the weight init",
              "bias": "true or false", "bias_init": "the bias init", "name": "a prefix for its parameter names"}
LOSSES = {"softmax_cross_entropy": "softmax_cross_entropy", "mse": "mse",
          "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits"}
UNARY = ["relu", "sigmoid", "tanh", "softplus", "gelu", "silu", "exp", "log", "sqrt", "square", "abs", "neg"]
PARAMETRIC = {"leaky_relu": ("negative_slope", "leaky_relu"), "elu": ("alpha", "elu")}
SHAPED = {"flatten": "flatten", "softmax": "softmax", "log_softmax": "log_softmax"}
NAME_KEY = {"name": "a prefix for its parameter names"}
TRANSFORMER_KEYS = {  # the layers of a GPT, as bp.nn builds them
    "embedding": {"vocab": "the number of token ids", "dim": "the embedding width",
                  "positions": "add learned position embeddings for this many steps", **NAME_KEY},
    "layer_norm": {"eps": "a positive number (1e-5)", **NAME_KEY},
    "transformer_block": {"heads": "the number of attention heads", "mlp_ratio": "the MLP width / dim (4)",
                          "dropout": "a probability (0)", "causal": "true (default) or false", **NAME_KEY},
    "lm_head": {"units": "outputs (default: tied to the embedding's table)", **NAME_KEY},
}


def _load_yaml(path: Path) -> Spec:
    yaml = _import_yaml()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(path, "", f"cannot read: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(path, "", f"invalid YAML: {problem}", mark.line + 1 if mark else None) from None
    r = _Reader(path, _yaml_lines(yaml, text))
    doc = r.mapping(doc, (), TOP_KEYS, required=("inputs", "layers"))
    return _YamlBuilder(r, path, doc).spec()


class _YamlBuilder:
    def __init__(self, r: _Reader, path: Path, doc: dict):
        self.r, self.path, self.doc = r, path, doc
        self.functions: dict[str, Callable] = {}
        self.function_nargs: dict[str, list[str]] = {}

    def spec(self) -> Spec:
        r, doc = self.r, self.doc
        name = r.name(doc.get("name", self.path.stem), ("name",), "a graph name")
        dtype = r.choice(doc.get("dtype", "float32"), ("dtype",), list(DTYPES), "dtype")
        seed = r.integer(doc.get("seed", 0), ("seed",), minimum=0, maximum=MAX_SEED)
        g = bp.Graph(name)
        inputs = self.inputs(g)
        self.read_functions()
        x = self.stack_input(g, inputs)
        x = self.layers(g, x)
        out_name = r.name(doc.get("output", "output"), ("output",), "an output name")
        g.output(out_name, x)
        if doc.get("loss") is not None:
            self.loss(g, x, inputs)
        optimizer = self.optimizer() if doc.get("optimizer") is not None else None
        return Spec(self.path, "yaml", g, dtype, optimizer, seed)

    def inputs(self, g) -> dict[str, Any]:
        r = self.r
        spec = self.doc["inputs"]
        if not isinstance(spec, dict) or not spec:
            raise r.error(("inputs",), f"expected a mapping of input names to {{shape: [...]}}, got {_describe(spec)}")
        out = {}
        for name, value in spec.items():
            where = ("inputs", name)
            r.name(name, where, "an input name")
            if isinstance(value, list):
                value = {"shape": value}
            value = r.mapping(value, where, INPUT_KEYS, required=("shape",))
            shape = self.shape(value["shape"], where + ("shape",))
            kind = value.get("dtype", "float")
            r.choice(kind, where + ("dtype",), ["float", "float32", "float64", "int32"], "input dtype")
            out[name] = self.call(where + ("shape",), lambda name=name, shape=shape, kind=kind:
                                  g.input(name, tuple(shape), None if kind.startswith("float") else "int32"),
                                  mismatch=False)
        return out

    def shape(self, shape: Any, where: tuple) -> list[int | str]:
        """An input's shape: fixed sizes (integers of 1 to MAX_UNITS) and runtime dim names."""
        r = self.r
        if not isinstance(shape, list):
            raise r.error(where, f"expected a list of ints and dim names, got {_describe(shape)}")
        for j, d in enumerate(shape):
            if not (isinstance(d, str) and d.isidentifier()):
                r.integer(d, where + (j,))  # a size, or an error naming the allowed range
        r.count_product([d for d in shape if isinstance(d, int)], where, "an input whose fixed dimensions are")
        return shape

    def call(self, where: tuple, fn: Callable[[], Any], mismatch: bool = True) -> Any:
        """Run a graph-building call, turning bpcompile's own errors into spec errors at `where`."""
        try:
            return fn()
        except (BPError, ValueError, TypeError) as e:
            if isinstance(e, SpecError):
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            prefix = "shape mismatch: " if mismatch and isinstance(e, bp.ShapeError) else ""
            raise self.r.error(where, prefix + message) from None

    def read_functions(self) -> None:
        r = self.r
        spec = self.doc.get("functions")
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise r.error(("functions",), f"expected a mapping of names to {{expr, symbols}}, got {_describe(spec)}")
        for name, value in spec.items():
            where = ("functions", name)
            r.name(name, where, "a function name")
            if name in UNARY or name in PARAMETRIC or name in SHAPED or name in ("dense", "dropout", "batch_norm"):
                raise r.error(where, f"{name!r} is a built-in layer; choose another name for your function")
            if isinstance(value, str):
                value = {"expr": value}
            value = r.mapping(value, where, FUNCTION_KEYS, required=("expr",))
            text = value["expr"]
            if not isinstance(text, str):
                if isinstance(text, int | float) and not isinstance(text, bool):
                    text = str(text)
                else:
                    raise r.error(where + ("expr",), f"expected a SymPy expression as a string, got {_describe(text)}")
            symbols = value.get("symbols")
            if symbols is None:
                symbols = self.guess_symbols(text, where)
            if isinstance(symbols, str):
                symbols = [symbols]
            if (not isinstance(symbols, list) or not symbols or
                    not all(isinstance(s, str) and s.isidentifier() for s in symbols)):
                raise r.error(where + ("symbols",), f"expected a list of symbol names, got {_describe(symbols)}")
            if len(set(symbols)) != len(symbols):
                raise r.error(where + ("symbols",), f"repeated symbol in {symbols}")
            try:
                expr = parse_sympy(text, symbols)
            except ValueError as e:
                raise r.error(where + ("expr",), str(e)) from None
            import sympy as sp
            syms = [sp.Symbol(s, real=True) for s in symbols]
            self.functions[name] = self.call(where, lambda name=name, expr=expr, syms=syms:
                                             bp.elementwise(name, expr, *syms))
            self.function_nargs[name] = symbols

    def guess_symbols(self, text: str, where: tuple) -> list[str]:
        try:
            tree = ast.parse(text.replace("^", "**"), mode="eval")
        except SyntaxError as e:
            raise self.r.error(where + ("expr",), f"invalid SymPy expression {text!r}: {e.msg}") from None
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called - set(_SYMPY_CONSTANTS))
        if len(names) != 1:
            raise self.r.error(where, f"missing key 'symbols' (the expression uses {names or 'no symbols'}; "
                               "list the function's arguments, the tensor's first)")
        return names

    def stack_input(self, g, inputs: dict[str, Any]) -> Any:
        r = self.r
        floats = [n for n, node in inputs.items() if node.dtype != "int32"]
        loss = self.doc.get("loss")
        if isinstance(loss, dict) and loss.get("target") in floats and len(floats) > 1:
            floats.remove(loss["target"])  # the loss's targets are not what the layers read
        if "input" in self.doc:
            name = r.choice(self.doc["input"], ("input",), list(inputs), "input")
            return inputs[name]
        if len(floats) != 1:
            raise r.error(("input",), f"missing key 'input': the model has float inputs {floats}; say which one "
                          "the layers read")
        return inputs[floats[0]]

    def layer_kinds(self) -> list[str]:
        return ["dense", "dropout", "batch_norm", *TRANSFORMER_KEYS, *SHAPED, *UNARY, *PARAMETRIC, *self.functions]

    def layers(self, g, x) -> Any:
        r = self.r
        layers = self.doc["layers"]
        if not isinstance(layers, list) or not layers:
            raise r.error(("layers",), f"expected a non-empty list of layers, got {_describe(layers)}")
        dense = norms = 0
        for i, layer in enumerate(layers):
            where = ("layers", i)
            kind, settings, _ = r.settings(layer, where, "layer")
            r.choice(kind, where + ("type",) if isinstance(layer, dict) else where, self.layer_kinds(), "layer")
            if kind == "dense":
                dense += 1
                x = self.dense(g, x, settings, where, dense)
            elif kind == "dropout":
                r.mapping(settings, where, {"type": "dropout", "p": "the probability of zeroing an element"},
                          required=("p",))
                p = r.number(settings["p"], where + ("p",))
                x = self.call(where + ("p",), lambda x=x, p=p: bp.dropout(x, p))
            elif kind == "batch_norm":
                norms += 1
                x = self.batch_norm(g, x, settings, where, norms)
            elif kind in TRANSFORMER_KEYS:
                x = self.transformer_layer(g, x, kind, settings, where, i)
            else:
                x = self.apply(kind, settings, x, where)
        return x

    def dense(self, g, x, settings: dict, where: tuple, k: int) -> Any:
        r = self.r
        r.mapping(settings, where, {"type": "dense", **DENSE_KEYS}, required=("units",))
        if x.ndim < 1 or not isinstance(x.shape[-1], int):
            raise r.error(where, f"shape mismatch: a dense layer needs a fixed last dimension, its input has shape "
                          f"{tuple(x.shape)}")
        units = r.units(settings["units"], where + ("units",), x.shape[-1])
        prefix = settings.get("name")
        if prefix is not None:
            r.name(prefix, where + ("name",), "a parameter name prefix")
        w_name, b_name = (f"{prefix}_W", f"{prefix}_b") if prefix else (f"W{k}", f"b{k}")
        bias = r.boolean(settings.get("bias", True), where + ("bias",))
        init = settings.get("init")
        if init is not None:
            r.name(init, where + ("init",), "an initializer name")
        w = self.call(where + ("init",), lambda: g.param(w_name, (x.shape[-1], units), init=init))
        y = self.call(where, lambda: x @ w)
        if bias:
            b_init = settings.get("bias_init")
            if b_init is not None:
                r.name(b_init, where + ("bias_init",), "an initializer name")
            b = self.call(where + ("bias_init",), lambda: g.param(b_name, (units,), init=b_init))
            y = self.call(where, lambda: y + b)
        if settings.get("activation") is not None:
            act_where = where + ("activation",)
            kind, act_settings, _ = r.settings(settings["activation"], act_where, "activation")
            r.choice(kind, act_where, [k for k in self.layer_kinds()
                                       if k not in ("dense", "flatten", "dropout", "batch_norm")], "activation")
            y = self.apply(kind, act_settings, y, act_where)
        return y

    def transformer_layer(self, g, x, kind: str, settings: dict, where: tuple, i: int) -> Any:
        """embedding (+ positions), layer_norm, transformer_block, lm_head (tied by default)."""
        r = self.r
        r.mapping(settings, where, {"type": kind, **TRANSFORMER_KEYS[kind]},
                  required={"embedding": ("vocab", "dim"), "transformer_block": ("heads",)}.get(kind, ()))
        name = r.name(settings.get("name", {"embedding": "wte", "lm_head": "lm_head"}.get(kind, f"{kind}{i}")),
                      where + ("name",), "a parameter name prefix")
        needs_int = kind == "embedding"
        if (x.dtype == "int32") != needs_int:
            raise r.error(where, f"shape mismatch: {kind} needs {'int32 token ids' if needs_int else 'a float tensor'}"
                          f", its input is {x.dtype} {tuple(x.shape)}")
        if not needs_int and (x.ndim < 1 or not isinstance(x.shape[-1], int)):
            raise r.error(where, f"shape mismatch: {kind} needs a fixed last dimension, its input has shape "
                          f"{tuple(x.shape)}")
        if kind == "embedding":
            vocab = r.integer(settings["vocab"], where + ("vocab",))
            dim = r.units(settings["dim"], where + ("dim",), vocab)
            self.embedding = self.call(where, lambda: bp.nn.Embedding(g, vocab, dim, name=name))
            x = self.call(where, lambda: self.embedding(x))
            if "positions" in settings:
                steps = r.units(settings["positions"], where + ("positions",), dim)
                wpe = self.call(where, lambda: g.param(f"{name}_positions", (steps, dim), init="normal"))
                x = self.call(where + ("positions",), lambda: x + wpe, mismatch=True)
            return x
        if kind == "layer_norm":
            eps = {"eps": r.number(settings["eps"], where + ("eps",))} if "eps" in settings else {}
            return self.call(where, lambda: bp.nn.LayerNorm(g, x.shape[-1], name=name, **eps)(x))
        if kind == "transformer_block":
            options = {"heads": r.integer(settings["heads"], where + ("heads",)),
                       "mlp_ratio": r.units(settings.get("mlp_ratio", 4), where + ("mlp_ratio",),
                                          x.shape[-1], x.shape[-1]),
                       "dropout": r.number(settings.get("dropout", 0.0), where + ("dropout",)),
                       "causal": r.boolean(settings.get("causal", True), where + ("causal",))}
            return self.call(where, lambda: bp.nn.TransformerBlock(g, x.shape[-1], name=name, **options)(x),
                             mismatch=True)
        if "units" in settings:
            units = r.units(settings["units"], where + ("units",), x.shape[-1])
            return self.call(where, lambda: bp.nn.Linear(g, x.shape[-1], units, bias=False, name=name)(x))
        table = getattr(self, "embedding", None)
        if table is None:
            raise r.error(where, "an lm_head without 'units' is tied to an embedding layer, and there is none "
                          "before it")
        return self.call(where, lambda: x @ bp.transpose(table.weight), mismatch=True)

    def batch_norm(self, g, x, settings: dict, where: tuple, k: int) -> Any:
        r = self.r
        r.mapping(settings, where, {"type": "batch_norm", "momentum": "a number in [0, 1] (0.1)",
                                    "eps": "a positive number (1e-5)", "name": "a prefix for its parameter names"})
        prefix = r.name(settings.get("name", f"bn{k}"), where + ("name",), "a parameter name prefix")
        if x.ndim not in (2, 4) or not isinstance(x.shape[1], int):
            raise r.error(where, f"shape mismatch: batch_norm needs (N, C) or (N, C, H, W) with a fixed C, its input "
                          f"has shape {tuple(x.shape)}")
        options = {key: r.number(settings[key], where + (key,)) for key in ("momentum", "eps") if key in settings}
        gamma = self.call(where, lambda: g.param(f"{prefix}_gamma", (x.shape[1],), init="ones"))
        beta = self.call(where, lambda: g.param(f"{prefix}_beta", (x.shape[1],), init="zeros"))
        return self.call(where, lambda: bp.batch_norm(x, gamma, beta, **options))

    def apply(self, kind: str, settings: dict, x, where: tuple) -> Any:
        r = self.r
        if kind in PARAMETRIC:
            key, fname = PARAMETRIC[kind]
            r.mapping(settings, where, {"type": kind, key: "a number"})
            value = {key: r.number(settings[key], where + (key,))} if key in settings else {}
            return self.call(where, lambda: getattr(bp, fname)(x, **value))
        if kind in self.functions:
            symbols = self.function_nargs[kind]
            r.mapping(settings, where, {"type": kind, "args": f"constants for {symbols[1:]}" if symbols[1:]
                                        else "(no arguments)"})
            args = settings.get("args") or {}
            if not isinstance(args, dict):
                raise r.error(where + ("args",), "expected a mapping of symbol names to numbers, got "
                              f"{_describe(args)}")
            for key in args:
                if key not in symbols[1:]:
                    raise r.error(where + ("args", key), f"unknown argument {key!r}; {kind} takes the layer input as "
                                  f"{symbols[0]!r}" + (f" and constants for {symbols[1:]}" if symbols[1:] else ""))
            missing = [s for s in symbols[1:] if s not in args]
            if missing:
                raise r.error(where, f"missing key 'args' values for {missing}: {kind} is a function of {symbols}; "
                              "the layer input is the first and the others need constants")
            consts = [r.number(args[s], where + ("args", s)) for s in symbols[1:]]
            return self.call(where, lambda: self.functions[kind](x, *consts))
        r.mapping(settings, where, {"type": kind})
        if kind in SHAPED:
            return self.call(where, lambda: getattr(bp, SHAPED[kind])(x))
        return self.call(where, lambda: getattr(bp.ops, kind)(x))

    def loss(self, g, x, inputs: dict[str, Any]) -> None:
        r = self.r
        kind, settings, where = r.settings(self.doc["loss"], ("loss",), "loss")
        r.choice(kind, where + ("type",) if isinstance(self.doc["loss"], dict) else where, list(LOSSES), "loss")
        r.mapping(settings, where, {"type": "the loss kind", "target": "the input holding the targets"})
        stack_input = next((n for n, node in inputs.items() if self._reaches(x, node)), None)
        others = [n for n in inputs if n != stack_input]
        if "target" in settings:
            target = r.choice(settings["target"], where + ("target",), list(inputs), "input")
        elif len(others) == 1:
            target = others[0]
        else:
            raise r.error(where, f"missing key 'target' (the input holding the targets: one of {list(inputs)})")
        fn = getattr(bp, LOSSES[kind])
        self.call(where, lambda: g.loss(fn(x, inputs[target])))

    @staticmethod
    def _reaches(x, node) -> bool:
        from ..ir.graph import topo_order
        return node in topo_order([x])

    def optimizer(self) -> Any:
        r = self.r
        kind, settings, where = r.settings(self.doc["optimizer"], ("optimizer",), "optimizer")
        kinds = sorted(bp.optim.OPTIMIZERS)
        r.choice(kind, where + ("type",) if isinstance(self.doc["optimizer"], dict) else where, kinds, "optimizer")
        cls = bp.optim.OPTIMIZERS[kind]
        params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        r.mapping(settings, where, {"type": "the optimizer kind", **{k: "a setting" for k in params}})
        kwargs: dict[str, Any] = {}
        for key, value in settings.items():
            at = where + (key,)
            default = params[key].default
            if key == "betas":
                if not isinstance(value, list) or len(value) != 2:
                    raise r.error(at, f"expected a list of two numbers, got {_describe(value)}")
                kwargs[key] = (r.number(value[0], at + (0,)), r.number(value[1], at + (1,)))
            elif isinstance(default, bool):
                kwargs[key] = r.boolean(value, at)
            elif key == "clip_norm" and value is None:
                kwargs[key] = None
            else:
                kwargs[key] = r.number(value, at)
        return self.call(where, lambda: cls(**kwargs))
