"""The layer vocabulary of YAML specs, in one table: `LAYERS` names every built-in layer kind
with the settings it accepts and the function that builds it from bp.nn / bp ops. A new layer
kind is one entry here (and a line in the spec docstring); the layer list of error messages,
`layers[i].type` checks and `activation:` choices all read this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bpcompile as bp
from bpcompile.symbolic.functions import BUILTIN

if TYPE_CHECKING:
    from .yaml_file import _YamlBuilder


@dataclass(frozen=True)
class Place:
    """Where a layer sits: its graph, its kind, its key path, its index in the stack and its
    number among the layers of its kind so far (1, 2, ...: dense layers name W1, W2, ...)."""

    graph: Any  # bp.Graph
    kind: str
    where: tuple
    index: int
    count: int


Builder = Callable[["_YamlBuilder", Any, dict, Place], Any]  # (the stack, the input, settings, place) -> output


@dataclass(frozen=True)
class Layer:
    """A layer kind: its settings (key -> what it expects, shown when one is missing or
    unknown), those it requires, whether it may be a dense layer's `activation`, and its builder,
    which runs once the settings' keys are checked."""

    settings: dict[str, str]
    build: Builder
    required: tuple[str, ...] = ()
    activation: bool = False


NAME_KEY = {"name": "a prefix for its parameter names"}


def _dense(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """x @ W (+ b), then the activation; parameters W{count} and b{count}, or {name}_W and {name}_b."""
    r, g, where = stack.r, at.graph, at.where
    if x.ndim < 1 or not isinstance(x.shape[-1], int):
        raise r.error(where, f"shape mismatch: a dense layer needs a fixed last dimension, its input has shape "
                      f"{tuple(x.shape)}")
    units = r.units(settings["units"], where + ("units",), x.shape[-1])
    prefix = settings.get("name")
    if prefix is not None:
        r.name(prefix, where + ("name",), "a parameter name prefix")
    w_name, b_name = (f"{prefix}_W", f"{prefix}_b") if prefix else (f"W{at.count}", f"b{at.count}")
    bias = r.boolean(settings.get("bias", True), where + ("bias",))
    init = settings.get("init")
    if init is not None:
        r.name(init, where + ("init",), "an initializer name")
    w = stack.call(where + ("init",), lambda: g.param(w_name, (x.shape[-1], units), init=init))
    y = stack.call(where, lambda: x @ w)
    if bias:
        b_init = settings.get("bias_init")
        if b_init is not None:
            r.name(b_init, where + ("bias_init",), "an initializer name")
        b = stack.call(where + ("bias_init",), lambda: g.param(b_name, (units,), init=b_init))
        y = stack.call(where, lambda: y + b)
    if settings.get("activation") is not None:
        act_where = where + ("activation",)
        kind, act_settings, _ = r.settings(settings["activation"], act_where, "activation")
        r.choice(kind, act_where, stack.activation_kinds(), "activation")
        y = stack.layer(kind, act_settings, y, Place(g, kind, act_where, at.index, at.count))
    return y


def _dropout(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    p = stack.r.number(settings["p"], at.where + ("p",))
    return stack.call(at.where + ("p",), lambda: bp.dropout(x, p))


def _batch_norm(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """bp.batch_norm with parameters bn{count}_gamma and bn{count}_beta (or {name}_...)."""
    r, g, where = stack.r, at.graph, at.where
    prefix = r.name(settings.get("name", f"bn{at.count}"), where + ("name",), "a parameter name prefix")
    if x.ndim not in (2, 4) or not isinstance(x.shape[1], int):
        raise r.error(where, f"shape mismatch: batch_norm needs (N, C) or (N, C, H, W) with a fixed C, its input "
                      f"has shape {tuple(x.shape)}")
    options = {key: r.number(settings[key], where + (key,)) for key in ("momentum", "eps") if key in settings}
    gamma = stack.call(where, lambda: g.param(f"{prefix}_gamma", (x.shape[1],), init="ones"))
    beta = stack.call(where, lambda: g.param(f"{prefix}_beta", (x.shape[1],), init="zeros"))
    return stack.call(where, lambda: bp.batch_norm(x, gamma, beta, **options))


# --- the layers of a GPT, as bp.nn builds them ----------------------------------------------------

def _gpt_prefix(stack: _YamlBuilder, x: Any, settings: dict, at: Place, default: str | None = None) -> str:
    """The layer's parameter name prefix, once its input is what it needs: int32 token ids for an
    embedding, else a float tensor with a fixed last dimension."""
    r, kind, where = stack.r, at.kind, at.where
    name = r.name(settings.get("name", default or f"{kind}{at.index}"), where + ("name",), "a parameter name prefix")
    needs_int = kind == "embedding"
    if (x.dtype == "int32") != needs_int:
        raise r.error(where, f"shape mismatch: {kind} needs {'int32 token ids' if needs_int else 'a float tensor'}"
                      f", its input is {x.dtype} {tuple(x.shape)}")
    if not needs_int and (x.ndim < 1 or not isinstance(x.shape[-1], int)):
        raise r.error(where, f"shape mismatch: {kind} needs a fixed last dimension, its input has shape "
                      f"{tuple(x.shape)}")
    return name


def _embedding(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """bp.nn.Embedding of the token ids (+ learned positions); an lm_head after it may tie to it."""
    r, g, where = stack.r, at.graph, at.where
    name = _gpt_prefix(stack, x, settings, at, default="wte")
    vocab = r.integer(settings["vocab"], where + ("vocab",))
    dim = r.units(settings["dim"], where + ("dim",), vocab)
    stack.embedding = stack.call(where, lambda: bp.nn.Embedding(g, vocab, dim, name=name))
    x = stack.call(where, lambda: stack.embedding(x))
    if "positions" in settings:
        steps = r.units(settings["positions"], where + ("positions",), dim)
        wpe = stack.call(where, lambda: g.param(f"{name}_positions", (steps, dim), init="normal"))
        x = stack.call(where + ("positions",), lambda: x + wpe, mismatch=True)
    return x


def _layer_norm(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    name = _gpt_prefix(stack, x, settings, at)
    eps = {"eps": stack.r.number(settings["eps"], at.where + ("eps",))} if "eps" in settings else {}
    return stack.call(at.where, lambda: bp.nn.LayerNorm(at.graph, x.shape[-1], name=name, **eps)(x))


def _transformer_block(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    r, where = stack.r, at.where
    name = _gpt_prefix(stack, x, settings, at)
    options = {"heads": r.integer(settings["heads"], where + ("heads",)),
               "mlp_ratio": r.units(settings.get("mlp_ratio", 4), where + ("mlp_ratio",), x.shape[-1], x.shape[-1]),
               "dropout": r.number(settings.get("dropout", 0.0), where + ("dropout",)),
               "causal": r.boolean(settings.get("causal", True), where + ("causal",))}
    return stack.call(where, lambda: bp.nn.TransformerBlock(at.graph, x.shape[-1], name=name, **options)(x),
                      mismatch=True)


def _lm_head(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """A bias-free bp.nn.Linear with `units`, else the product with the embedding's table (tied)."""
    r, where = stack.r, at.where
    name = _gpt_prefix(stack, x, settings, at, default="lm_head")
    if "units" in settings:
        units = r.units(settings["units"], where + ("units",), x.shape[-1])
        return stack.call(where, lambda: bp.nn.Linear(at.graph, x.shape[-1], units, bias=False, name=name)(x))
    table = stack.embedding
    if table is None:
        raise r.error(where, "an lm_head without 'units' is tied to an embedding layer, and there is none before it")
    return stack.call(where, lambda: x @ bp.transpose(table.weight), mismatch=True)


# --- functions of the whole tensor, elementwise ops ------------------------------------------------

def _bp_function(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """bp.flatten, bp.softmax, bp.log_softmax, or a parametric activation with its numbers."""
    numbers = {key: stack.r.number(value, at.where + (key,)) for key, value in settings.items()}
    return stack.call(at.where, lambda: getattr(bp, at.kind)(x, **numbers))


def _elementwise(stack: _YamlBuilder, x: Any, settings: dict, at: Place) -> Any:
    """A built-in elementwise op of bp.ops by its name."""
    return stack.call(at.where, lambda: getattr(bp.ops, at.kind)(x))


# the elementwise layers: every one-argument built-in function of bpcompile.symbolic, by its name
UNARY = sorted(name for name, spec in BUILTIN.items() if spec[1] == 1)

LAYERS: dict[str, Layer] = {
    "dense": Layer({"units": "the number of outputs", "activation": "an elementwise op", "init": "the weight init",
                    "bias": "true or false", "bias_init": "the bias init", **NAME_KEY}, _dense, required=("units",)),
    "dropout": Layer({"p": "the probability of zeroing an element"}, _dropout, required=("p",)),
    "batch_norm": Layer({"momentum": "a number in [0, 1] (0.1)", "eps": "a positive number (1e-5)", **NAME_KEY},
                        _batch_norm),
    "embedding": Layer({"vocab": "the number of token ids", "dim": "the embedding width",
                        "positions": "add learned position embeddings for this many steps", **NAME_KEY},
                       _embedding, required=("vocab", "dim")),
    "layer_norm": Layer({"eps": "a positive number (1e-5)", **NAME_KEY}, _layer_norm),
    "transformer_block": Layer({"heads": "the number of attention heads", "mlp_ratio": "the MLP width / dim (4)",
                                "dropout": "a probability (0)", "causal": "true (default) or false", **NAME_KEY},
                               _transformer_block, required=("heads",)),
    "lm_head": Layer({"units": "outputs (default: tied to the embedding's table)", **NAME_KEY}, _lm_head),
    "flatten": Layer({}, _bp_function),
    "softmax": Layer({}, _bp_function, activation=True),
    "log_softmax": Layer({}, _bp_function, activation=True),
    **{name: Layer({}, _elementwise, activation=True) for name in UNARY},
    "leaky_relu": Layer({"negative_slope": "a number"}, _bp_function, activation=True),
    "elu": Layer({"alpha": "a number"}, _bp_function, activation=True),
}
