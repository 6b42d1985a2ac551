"""YAML specs: a stack of layers read from a YAML document into a Graph."""

from __future__ import annotations

import ast
import inspect
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bpcompile as bp

from ...errors import BPError
from .common import DTYPES, Spec, SpecError
from .expressions import _SYMPY_CONSTANTS, parse_sympy
from .layers import LAYERS, Place
from .limits import MAX_SEED
from .reader import _describe, _import_yaml, _Reader, _yaml_lines

TOP_KEYS = {
    "name": "the graph's name", "dtype": "float32 or float64", "seed": "the parameter seed",
    "inputs": "the model's inputs", "input": "the input the layers read", "functions": "custom elementwise ops",
    "layers": "the list of layers", "output": "the name of the last layer's output", "loss": "the loss",
    "optimizer": "the optimizer",
}
INPUT_KEYS = {"shape": "a list of ints and dim names", "dtype": "float (default) or int32"}
FUNCTION_KEYS = {"expr": "a SymPy expression (a string)", "symbols": "the list of its symbols"}
LOSSES = {"softmax_cross_entropy": "softmax_cross_entropy", "mse": "mse",
          "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits"}


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
        self.embedding: Any = None  # the last embedding layer's bp.nn.Embedding, for a tied lm_head

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
            if name in LAYERS:
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
        """The layer kinds a spec may name: the built-in ones of LAYERS, then its own functions."""
        return [*LAYERS, *self.functions]

    def activation_kinds(self) -> list[str]:
        """The kinds a dense layer's `activation` may name: elementwise layers and functions."""
        return [kind for kind, layer in LAYERS.items() if layer.activation] + list(self.functions)

    def layers(self, g, x) -> Any:
        r = self.r
        layers = self.doc["layers"]
        if not isinstance(layers, list) or not layers:
            raise r.error(("layers",), f"expected a non-empty list of layers, got {_describe(layers)}")
        counts: Counter[str] = Counter()
        for i, layer in enumerate(layers):
            where = ("layers", i)
            kind, settings, _ = r.settings(layer, where, "layer")
            r.choice(kind, where + ("type",) if isinstance(layer, dict) else where, self.layer_kinds(), "layer")
            counts[kind] += 1
            x = self.layer(kind, settings, x, Place(g, kind, where, i, counts[kind]))
        return x

    def layer(self, kind: str, settings: dict, x, at: Place) -> Any:
        """One layer (or activation) of a known kind: a function of `functions`, or the LAYERS
        entry's builder once the settings' keys are checked against the entry."""
        if kind in self.functions:
            return self.function_layer(kind, settings, x, at.where)
        layer = LAYERS[kind]
        self.r.mapping(settings, at.where, {"type": kind, **layer.settings}, required=layer.required)
        return layer.build(self, x, settings, at)

    def function_layer(self, kind: str, settings: dict, x, where: tuple) -> Any:
        """A function of the spec's `functions`: the stack is its first symbol, `args` the others."""
        r = self.r
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
        from ...ir.graph import topo_order
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
