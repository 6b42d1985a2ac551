"""YAML specs: a stack of layers read from a YAML document into a Graph."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bpcompile as bp

from ...errors import BPError
from .common import DTYPES, Spec, SpecError
from .expressions import _SYMPY_CONSTANTS, parse_sympy
from .layers import DENSE_KEYS, PARAMETRIC, SHAPED, TRANSFORMER_KEYS, UNARY
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
