"""Random well-typed bpcompile graphs (a hypothesis strategy) and the check every one must pass.

`graph_cases()` draws a `GraphCase`: a small program over the public API (`bp.*`, `g.input`,
`g.param`, `bp.elementwise`) whose text is kept and is exactly what runs, so a failure prints a
script that rebuilds the graph. Programs mix elementwise builtins, broadcasting arithmetic with
scalars and broadcast shapes (params of broadcast shapes, inputs with the runtime "batch" dim),
fan-out (any earlier value may be reused), sum/mean over random axes with and without keepdims,
matmul (vector, matrix, rank-3, contraction over the batch), reshape (including moving the
batch dim), flatten, transpose, softmax/log_softmax, custom SymPy elementwise functions (a
fixed library plus random smooth expressions) and every loss. Shapes use 1 and odd sizes.

Inputs stay in safe domains: log and sqrt see softplus(x) + 0.1, divisors are softplus(x) +
0.5, powers have positive bases, exp sees bounded arguments. A rough magnitude bound is kept for
every value and values that could grow large are scaled down first, so no float32 overflow is
expected and finite differences stay meaningful.

`check_case(case)` compiles the graph (float64, and float32 when drawn) and, for two batch
sizes, compares outputs, loss and every gradient with the NumPy reference interpreter
(`bp.reference`): float64 tightly, float32 loosely; the tolerance of each array grows with the
float32 rounding error of the reference itself (an empirical condition number), so an
ill-conditioned graph does not fail spuriously and a wrong index or broadcast still does.
float64 gradients are also checked against central finite differences along a random
direction, with the step checked not to cross a kink of relu/abs/leaky_relu/elu. The workspace
arena is then filled with NaN bytes and every call repeated: results must be bit-identical
(no kernel reads workspace it did not write). One SGD train_step must equal p - lr * grad.
"""

from __future__ import annotations

import itertools
import math
import random
import textwrap
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp
from hypothesis import strategies as st

import bpcompile as bp
from bpcompile.tools import gradcheck

SIZES = (1, 2, 3, 4, 5, 7)
BATCHES = (1, 2, 3, 5, 7, 8)
MAX_RANK = 4
LIMIT = 6.0  # values whose magnitude bound exceeds this are scaled down before growing ops
KINKED = ("relu", "abs", "leaky_relu", "elu")

Z, W = sp.Symbol("z"), sp.Symbol("w")

# custom elementwise functions: SymPy text over z (and w); all smooth and finite on the reals
CUSTOM_1 = (
    "z*sp.tanh(sp.log(1 + sp.exp(z)))",  # mish
    "sp.sin(z)*z + sp.cos(2*z)",
    "z/(1 + z**2)",
    "sp.atan(z) + z**3/10",
    "sp.erf(z/2)*sp.exp(-z**2/8)",
    "sp.sqrt(1 + z**2) - 1",
    "sp.log(1 + z**2)",
)
CUSTOM_2 = (
    "z*sp.exp(-w**2) + sp.sin(z*w)",
    "z*w/(1 + w**2)",
    "sp.sqrt(z**2 + w**2 + 1)",
    "sp.tanh(z - w)*w",
    "z**2*sp.cos(w) - w",
)
# random smooth expressions are built from these (one "{}" per argument)
WRAP_1 = ("sp.sin({})", "sp.cos({})", "sp.tanh({})", "sp.atan({})", "sp.erf({})", "sp.exp(sp.tanh({}))",
          "sp.log(1 + ({})**2)", "sp.sqrt(1 + ({})**2)", "({0})/(1 + ({0})**2)", "1/(1 + sp.exp(-({})))",
          "({})**2", "3*({})")
WRAP_2 = ("({}) + ({})", "({}) - ({})", "({})*({})")
SCALARS = (0.5, -1.5, 2, 3, -0.25, 1.75, -1)
POWERS = (2, 3, 0.5, 1.5, -1, -0.5)


def init(shape: tuple, seed: int, scale: float = 1.0) -> np.ndarray:
    """A parameter's initial values: normal * scale (never exactly at a kink)."""
    return np.random.default_rng(seed).normal(size=shape) * scale


def namespace() -> dict[str, Any]:
    return {"bp": bp, "sp": sp, "np": np, "init": init, "z": Z, "w": W}


@dataclass
class Value:
    name: str
    node: Any
    mag: float

    @property
    def shape(self) -> tuple:
        return self.node.shape


@dataclass
class GraphCase:
    """A drawn graph: `source` rebuilds it (exec with `namespace()`; the graph is `g`)."""

    source: str
    data: dict[str, tuple]  # input name -> ("normal",) | ("unit",) | ("labels", classes)
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    seed: int
    ops: list[str] = field(default_factory=list)

    def build(self) -> bp.Graph:
        ns = namespace()
        exec(self.source, ns)
        return ns["g"]

    def inputs(self, graph: bp.Graph, batch: int, salt: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, batch, salt])
        shapes = {name: node.shape for name, node in graph.inputs.items()}
        dims = {d: batch for shape in shapes.values() for d in shape if isinstance(d, str)}
        return gradcheck.random_inputs(shapes, self.data, dims, rng)

    def __repr__(self) -> str:
        return (f"GraphCase(dtypes={self.dtypes}, batches={self.batches}, seed={self.seed}, data={self.data})\n"
                + textwrap.indent(self.source, "    "))


class _Writer:
    """Writes the program line by line, running each line at once (so shapes are bp's own)."""

    def __init__(self, draw):
        self.draw = draw
        # every choice comes from a Random seeded by hypothesis: uniform over the op mix
        # (hypothesis' own draws favour the first options and small numbers strongly); a
        # failure prints the program, which is the reproduction
        self.rnd = random.Random(draw(st.integers(0, 2**64 - 1)))
        self.lines: list[str] = []
        self.ns = namespace()
        self.pool: list[Value] = []
        self.data: dict[str, tuple] = {}
        self.ids = itertools.count()
        self.fns = itertools.count()
        self.ops: list[str] = []
        self.run('g = bp.Graph("rg")')

    def choice(self, options):
        return options[self.rnd.randrange(len(options))]

    def coin(self) -> bool:
        return self.rnd.random() < 0.5

    def run(self, line: str) -> None:
        self.lines.append(line)
        exec(line, self.ns)

    def value(self, expr: str, mag: float, keep: bool = True, prefix: str = "t") -> Value:
        name = f"{prefix}{next(self.ids)}"
        self.run(f"{name} = {expr}")
        v = Value(name, self.ns[name], float(min(mag, 1e30)))
        if keep:
            self.pool.append(v)
        return v

    # --- leaves ---------------------------------------------------------------------------
    def fixed_shape(self, min_rank: int = 0, max_rank: int = 3) -> tuple[int, ...]:
        rank = self.rnd.randint(min_rank, max_rank)
        return tuple(self.choice(SIZES) for _ in range(rank))

    def new_input(self, shape: tuple, kind: tuple = ("normal",), keep: bool = True) -> Value:
        name = f"x{next(self.ids)}"
        dtype = ', dtype="int32"' if kind[0] == "labels" else ""
        self.run(f"{name} = g.input({name!r}, {shape!r}{dtype})")
        self.data[name] = kind
        v = Value(name, self.ns[name], 3.0 if kind[0] == "normal" else 1.0)
        if keep and kind[0] != "labels":
            self.pool.append(v)
        return v

    def new_param(self, shape: tuple, scale: float = 1.0, keep: bool = True) -> Value:
        name = f"p{next(self.ids)}"
        seed = self.rnd.randint(0, 2**16)
        self.run(f"{name} = g.param({name!r}, {shape!r}, init=init({shape!r}, {seed}, {scale!r}))")
        v = Value(name, self.ns[name], 3.0 * scale)
        if keep:
            self.pool.append(v)
        return v

    def pick(self, pred=lambda v: True) -> Value | None:
        choices = [v for v in self.pool if pred(v)]
        if not choices:
            return None
        if self.coin():
            return choices[-1]  # the newest: long chains
        return self.choice(choices)  # any earlier one: fan-out

    def bounded(self, v: Value, limit: float = LIMIT) -> Value:
        """`v`, or `v` scaled so its magnitude bound is at most `limit`."""
        if v.mag <= limit:
            return v
        c = float(f"{limit / v.mag:.3g}")
        return self.value(f"{v.name} * {c!r}", v.mag * c)

    # --- ops ------------------------------------------------------------------------------
    def op_unary(self) -> None:
        v = self.pick()
        kind = self.choice(("relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu",
                                          "silu", "exp", "log", "sqrt", "square", "abs", "neg"))
        self.ops.append(kind)
        if kind == "exp":
            v = self.bounded(v, 3.0)
            self.value(f"bp.exp({v.name})", math.exp(v.mag))
        elif kind == "log":
            self.value(f"bp.log(bp.softplus({v.name}) + 0.1)", max(2.31, math.log(v.mag + 1.0)))
        elif kind == "sqrt":
            self.value(f"bp.sqrt(bp.softplus({v.name}) + 0.1)", math.sqrt(v.mag + 1.0))
        elif kind == "square":
            v = self.bounded(v, 4.0)
            self.value(f"bp.square({v.name})", v.mag**2)
        elif kind == "neg":
            self.value(f"-{v.name}", v.mag)
        elif kind == "leaky_relu":
            slope = self.choice((0.01, 0.2, 0.5, 2.0))
            self.value(f"bp.leaky_relu({v.name}, {slope!r})", v.mag * max(1.0, slope))
        elif kind == "elu":
            alpha = self.choice((1.0, 0.5, 1.7))
            self.value(f"bp.elu({v.name}, alpha={alpha!r})", max(v.mag, alpha))
        elif kind in ("sigmoid", "tanh"):
            self.value(f"bp.{kind}({v.name})", 1.0)
        elif kind == "softplus":
            self.value(f"bp.softplus({v.name})", v.mag + 0.7)
        else:
            self.value(f"bp.{kind}({v.name})", v.mag)

    def partner_shape(self, shape: tuple, allow_batch: bool) -> tuple:
        """A shape that broadcasts with `shape` (a suffix with some dims set to 1, maybe a new
        leading dim)."""
        k = self.rnd.randint(0, len(shape))
        suffix = shape[len(shape) - k:]
        dims = []
        for d in suffix:
            if (isinstance(d, str) and not allow_batch) or self.rnd.randint(0, 2) == 0:
                dims.append(1)
            else:
                dims.append(d)
        if k == len(shape) and len(shape) < MAX_RANK and self.rnd.randint(0, 4) == 0:
            dims.insert(0, self.choice((1, 2, 3)))
        return tuple(dims)

    def operand(self, a: Value) -> tuple[str, float]:
        """The second operand of a binary op on `a`: a scalar, an earlier value, a new param or
        a new input, each of a shape that broadcasts with a's."""
        how = self.choice(("scalar", "pool", "param", "param", "input"))
        if how == "scalar":
            c = self.choice(SCALARS)
            return repr(c), abs(c)
        if how == "pool":
            def fits(v: Value) -> bool:
                try:
                    out = bp.ir.broadcast_shapes([a.shape, v.shape], ["a", "b"])
                except bp.ShapeError:
                    return False
                return len(out) <= MAX_RANK
            b = self.pick(fits)
            if b is not None:
                return b.name, b.mag
        if how == "input":
            b = self.new_input(self.partner_shape(a.shape, allow_batch=True), keep=False)
            return b.name, b.mag
        b = self.new_param(self.partner_shape(a.shape, allow_batch=False), keep=False)
        return b.name, b.mag

    def op_binary(self) -> None:
        a = self.pick()
        op = self.choice(("+", "-", "*", "/", "**"))
        self.ops.append(f"binary{op}")
        swap = self.coin()
        if op in "+-":
            b, mb = self.operand(a)
            x, y = (b, a.name) if swap else (a.name, b)
            self.value(f"{x} {op} {y}", a.mag + mb)
        elif op == "*":
            a = self.bounded(a)
            b, mb = self.operand(a)
            if mb > LIMIT:
                b, mb = f"({b} * {LIMIT / mb:.3g})", LIMIT
            x, y = (b, a.name) if swap else (a.name, b)
            self.value(f"{x} * {y}", a.mag * mb)
        elif op == "/":
            b, mb = self.operand(a)
            if self.coin():  # tensor / (softplus(other) + 0.5)
                den = f"(bp.softplus({b}) + 0.5)" if not _is_number(b) else b
                mag = a.mag / 0.5 if not _is_number(b) else a.mag / abs(float(b))
                self.value(f"{a.name} / {den}", mag)
            else:  # other / (softplus(tensor) + 0.5)
                self.value(f"{b} / (bp.softplus({a.name}) + 0.5)", mb / 0.5)
        else:
            base = self.bounded(a, 3.0)
            how = self.choice(("const", "tensor", "rpow"))
            if how == "const":
                e = self.choice(POWERS)
                self.value(f"(bp.softplus({base.name}) + 0.2) ** {e!r}", max(5.0 ** abs(e), (base.mag + 1) ** abs(e)))
            elif how == "tensor":
                b, _ = self.operand(a)
                e = b if _is_number(b) else f"bp.tanh({b})"
                self.value(f"(bp.softplus({base.name}) + 0.2) ** {e}", max(5.0, base.mag + 1) ** 3)
            else:
                c = self.choice((2.0, 0.5, 1.5))
                self.value(f"{c!r} ** {base.name}", max(c, 1 / c) ** base.mag)

    def op_reduce(self) -> None:
        v = self.pick(lambda v: v.node.ndim >= 1)
        if v is None:
            return self.op_unary()
        kind = self.choice(("sum", "mean"))
        self.ops.append(kind)
        nd = v.node.ndim
        axes = None if self.coin() else self.rnd.sample(range(nd), self.rnd.randint(1, nd))
        if axes is not None:
            axes = [a - nd if self.coin() else a for a in axes]  # negative axes too
            axis_src = repr(axes[0]) if len(axes) == 1 else repr(tuple(axes))
        keep = self.coin()
        count = 1
        for i, d in enumerate(v.shape):
            if axes is None or i in [a % nd for a in axes]:
                count *= max(BATCHES) if isinstance(d, str) else d
        mag = v.mag * (count if kind == "sum" else 1)
        args = ("" if axes is None else f", axis={axis_src}") + (", keepdims=True" if keep else "")
        if self.coin():
            self.value(f"bp.{kind}({v.name}{args})", mag)
        else:
            self.value(f"{v.name}.{kind}({args.lstrip(', ')})", mag)

    def op_matmul(self) -> None:
        v = self.pick(lambda v: v.node.ndim >= 1)
        if v is None:
            return self.op_unary()
        v = self.bounded(v, 3.0)
        self.ops.append("matmul")
        k = v.shape[-1]
        if isinstance(k, str) or (v.node.ndim == 2 and isinstance(v.shape[0], str) and self.coin()):
            # a contraction over the runtime dim: v @ u, or v.T @ u, with u (batch, n)
            lhs = v.name if isinstance(k, str) else f"bp.transpose({v.name})"
            d = k if isinstance(k, str) else v.shape[0]
            u = self.pick(lambda u: u.node.ndim == 2 and u.shape[0] == d)
            if u is None:
                u = self.new_input((d, self.choice(SIZES)), keep=False)
            u = self.bounded(u, 3.0)
            self.value(f"{lhs} @ {u.name}", v.mag * u.mag * max(BATCHES))
            return None
        how = self.choice(("matrix", "matrix", "vector", "left", "pool"))
        if how == "pool":
            u = self.pick(lambda u: u.node.ndim in (1, 2) and u.shape[0] == k)
            if u is not None:
                u = self.bounded(u, 3.0)
                self.value(f"{v.name} @ {u.name}", v.mag * u.mag * k)
                return None
            how = "matrix"
        if how == "left" and v.node.ndim in (1, 2) and isinstance(v.shape[0], int):  # param (m, k0) @ v
            m = self.choice(SIZES)
            p = self.new_param((m, v.shape[0]), scale=1.0 / math.sqrt(v.shape[0]), keep=False)
            self.value(f"bp.matmul({p.name}, {v.name})", v.mag * 3.0 * math.sqrt(v.shape[0]))
            return None
        if how == "vector":
            p = self.new_param((k,), scale=1.0 / math.sqrt(k), keep=False)
            self.value(f"{v.name} @ {p.name}", v.mag * 3.0 * math.sqrt(k))
            return None
        n = self.choice(SIZES)
        p = self.new_param((k, n), scale=1.0 / math.sqrt(k), keep=False)
        self.value(f"{v.name} @ {p.name}", v.mag * 3.0 * math.sqrt(k))
        return None

    def op_layout(self) -> None:
        v = self.pick(lambda v: v.node.ndim >= 1)
        if v is None:
            return self.op_unary()
        kind = self.choice(("reshape", "reshape", "transpose", "flatten"))
        self.ops.append(kind)
        shape = v.shape
        if kind == "transpose":
            if len(shape) < 2:
                return self.op_unary()
            perm = self.rnd.sample(range(len(shape)), len(shape))
            how = self.choice(("perm", "none", "T"))
            if how == "T" and len(shape) == 2:
                self.value(f"{v.name}.T", v.mag)
            elif how == "none":
                self.value(f"bp.transpose({v.name})", v.mag)
            else:
                self.value(f"bp.transpose({v.name}, {tuple(perm)!r})", v.mag)
            return None
        if kind == "flatten":
            if len(shape) < 2 or any(isinstance(d, str) for d in shape[1:]):
                return self.op_unary()
            self.value(f"bp.flatten({v.name})", v.mag)
            return None
        fixed = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
        named = [d for d in shape if isinstance(d, str)]
        factors = _factorizations(fixed, self.rnd.randint(1, 3))
        dims: list[Any] = list(self.choice(factors))
        for d in named:  # the runtime dim goes anywhere (a reshape may move it)
            dims.insert(self.rnd.randint(0, len(dims)), d)
        if len(dims) > MAX_RANK:
            return self.op_unary()
        ints = [i for i, d in enumerate(dims) if isinstance(d, int)]
        if ints and self.rnd.randint(0, 2) == 0:
            dims[self.choice(ints)] = -1
        self.value(f"bp.reshape({v.name}, {tuple(dims)!r})", v.mag)
        return None

    def op_softmax(self) -> None:
        v = self.pick(lambda v: v.node.ndim >= 1)
        if v is None:
            return self.op_unary()
        kind = self.choice(("softmax", "log_softmax"))
        self.ops.append(kind)
        n = v.shape[-1] if isinstance(v.shape[-1], int) else max(BATCHES)
        self.value(f"bp.{kind}({v.name})", 1.0 if kind == "softmax" else 2 * v.mag + math.log(n) + 1)
        return None

    def op_select(self) -> None:
        """where / masked_fill with a constant mask, max / min, layer_norm, self-attention."""
        v = self.pick(lambda v: v.node.ndim >= 1)
        if v is None:
            return self.op_unary()
        kind = self.choice(("where", "masked_fill", "max", "min", "layer_norm", "attention"))
        shape = v.shape
        if kind in ("layer_norm", "attention") and (not isinstance(shape[-1], int) or shape[-1] < 2):
            return self.op_unary()
        if kind == "attention" and v.node.ndim < 2:
            return self.op_unary()
        self.ops.append(kind)
        trailing = []  # a constant mask covers the fixed dims after the last runtime one
        for d in reversed(shape):
            if isinstance(d, str):
                break
            trailing.insert(0, d)
        mask = f"np.random.default_rng({self.rnd.randrange(2**31)}).random({tuple(trailing)!r}) > 0.5"
        if kind == "where":
            b, bmag = self.operand(v)
            self.value(f"bp.where({mask}, {v.name}, {b})", max(v.mag, bmag))
        elif kind == "masked_fill":
            c = self.choice((0.0, -1.5, 2.0))
            self.value(f"bp.masked_fill({v.name}, {mask}, {c!r})", max(v.mag, abs(c)))
        elif kind in ("max", "min"):
            axis = self.rnd.randrange(v.node.ndim)
            keep = ", keepdims=True" if self.coin() else ""
            # distinct offsets break ties (e.g. between relu's zeros), where the gradient jumps
            offsets = f"bp.constant(np.linspace(0.0, 0.05, {int(np.prod(trailing))}).reshape({tuple(trailing)!r}))"
            self.value(f"bp.{kind}({v.name} + {offsets}, axis={axis}{keep})", v.mag + 0.05)
        elif kind == "layer_norm":
            self.value(f"bp.layer_norm({v.name})", math.sqrt(shape[-1]))
        else:
            self.value(f"bp.attention({v.name}, {v.name}, {v.name}, causal={self.coin()})", v.mag)
        return None

    def op_custom(self) -> None:
        nargs = self.choice((1, 1, 2))
        if self.coin():
            text = self.choice(CUSTOM_1 if nargs == 1 else CUSTOM_2)
        else:
            text = self.random_expr(nargs, self.rnd.randint(1, 3))
        self.ops.append(f"custom{nargs}")
        name = f"f{next(self.fns)}"
        syms = "z" if nargs == 1 else "z, w"
        self.run(f"{name} = bp.elementwise({name!r}, {text}, {syms})")
        a = self.bounded(self.pick(), 3.0)
        args = [a.name]
        mags = [a.mag]
        if nargs == 2:
            if self.rnd.randint(0, 3) == 0:
                c = self.choice((0.5, -1.5, 2))
                args.append(repr(c))
                mags.append(abs(c))
            else:
                b, mb = self.operand(a)
                if mb > 3.0:
                    b, mb = f"({b} * {3.0 / mb:.3g})", 3.0
                args.append(b)
                mags.append(mb)
        mag = _sampled_bound(self.ns[name].fn, mags)
        self.value(f"{name}({', '.join(args)})", mag)

    def random_expr(self, nargs: int, depth: int) -> str:
        if depth == 0:
            return self.choice(("z", "w") if nargs == 2 else ("z",))
        if nargs == 2 and self.coin():
            form = self.choice(WRAP_2)
            return form.format(self.random_expr(nargs, depth - 1), self.random_expr(nargs, depth - 1))
        form = self.choice(WRAP_1)
        return form.format(self.random_expr(nargs, depth - 1))

    # --- losses and outputs ---------------------------------------------------------------
    def loss_term(self, v: Value) -> str:
        kinds = ["weighted", "weighted", "mse", "bce", "reduce"]
        if v.node.ndim >= 1 and isinstance(v.shape[-1], int):
            kinds += ["ce", "ce"]
        kind = self.choice(kinds)
        self.ops.append(f"loss-{kind}")
        if kind in ("mse", "bce"):
            v = self.bounded(v, 4.0)
        if kind == "weighted":
            r = self.new_input(v.shape, keep=False)
            return f"bp.{self.choice(('sum', 'mean'))}({v.name} * {r.name})"
        if kind == "mse":
            t = self.new_input(v.shape, keep=False)
            return f"bp.mse({v.name}, {t.name})"
        if kind == "bce":
            t = self.new_input(v.shape, ("unit",), keep=False)
            return f"bp.binary_cross_entropy_with_logits({v.name}, {t.name})"
        if kind == "ce":
            y = self.new_input(v.shape[:-1], ("labels", v.shape[-1]), keep=False)
            return f"bp.softmax_cross_entropy({v.name}, {y.name})"
        return f"bp.{self.choice(('sum', 'mean'))}({v.name})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Ordered factorizations of n into `parts` factors (1s allowed), at most a few dozen."""
    if parts == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorizations(n // d, parts - 1)]
    return out[:40]


def _sampled_bound(fn, mags: list[float]) -> float:
    """A magnitude bound of a custom function over the box of its arguments' bounds, sampled."""
    f = sp.lambdify(list(bp.symbolic.ARGS[:fn.nargs]), fn.expr, modules=["numpy", {"erf": np.vectorize(math.erf)}])
    grids = np.meshgrid(*[np.linspace(-m, m, 41) for m in mags[:fn.nargs]])
    with np.errstate(all="ignore"):
        values = np.asarray(f(*grids), dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return 1e6
    return float(np.max(np.abs(values))) * 1.5 + 0.1


@st.composite
def graph_cases(draw, max_ops: int = 8, float32: str = "drawn") -> GraphCase:
    """A random graph, its data kinds, dtypes (float64 always; float32 "drawn", "always" or
    "never") and two batch sizes."""
    wr = _Writer(draw)
    # leaves: an input with the runtime batch dim, maybe a second input or a parameter
    wr.new_input(("batch", *wr.fixed_shape(0, 2)))
    if wr.coin():
        if wr.coin():
            wr.new_input(("batch", *wr.fixed_shape(0, 2)))
        else:
            wr.new_param(wr.fixed_shape(0, 3))
    ops = (wr.op_unary, wr.op_unary, wr.op_binary, wr.op_binary, wr.op_reduce, wr.op_matmul, wr.op_layout,
           wr.op_softmax, wr.op_custom, wr.op_select)
    for _ in range(wr.rnd.randint(1, max_ops)):
        wr.choice(ops)()
    if not wr.ns["g"].params:
        # at least one parameter, mixed into the newest value
        last = wr.pool[-1]
        p = wr.new_param(wr.partner_shape(last.shape, allow_batch=False), keep=False)
        wr.value(f"{last.name} * {p.name}", last.mag * p.mag)
    # the loss: one term of the newest value, maybe a second term of another value
    terms = [wr.loss_term(wr.pool[-1])]
    if wr.coin():
        terms.append(f"{wr.choice((0.5, 2, -0.75))!r} * {wr.loss_term(wr.pick())}")
    wr.run(f"g.loss({' + '.join(terms)})")
    # named outputs: one or two earlier values (possibly the same one twice, or a parameter)
    for k in range(wr.rnd.randint(1, 2)):
        v = wr.pick()
        wr.run(f"g.output('out{k}', {v.name})")
    if float32 == "always":
        dtypes = ("float64", "float32")
    elif float32 == "never":
        dtypes = ("float64",)
    else:
        dtypes = wr.choice((("float64",), ("float64", "float32")))
    batches = tuple(wr.rnd.sample(BATCHES, 2))
    seed = wr.rnd.randrange(2**31)
    return GraphCase("\n".join(wr.lines), dict(wr.data), dtypes, batches, seed, wr.ops)


# --- the check ------------------------------------------------------------------------------------

@dataclass
class Report:
    """What one check covered (summed over a run)."""

    graphs: int = 0
    models: int = 0
    calls: int = 0
    arrays: int = 0
    fd_checks: int = 0
    fd_skipped: int = 0

    def add(self, other: Report) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _max_abs(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def assert_close(got, ref64, ref32, dtype: str, what: str) -> None:
    """`got` against the float64 reference, with a tolerance from the float32 reference's own
    error (how much rounding this value amplifies)."""
    got = np.asarray(got, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    assert got.shape == ref64.shape, f"{what}: shape {got.shape} != reference {ref64.shape}"
    assert np.all(np.isfinite(ref64)), f"{what}: the reference is not finite (generator bug)"
    assert np.all(np.isfinite(got)), f"{what}: compiled result is not finite: {got}"
    scale = _max_abs(ref64)
    r32 = np.asarray(ref32, dtype=np.float64)
    noise = _max_abs(r32 - ref64) if np.all(np.isfinite(r32)) else scale
    if dtype == "float64":
        tol = 1e-9 * scale + 1e-6 * noise + 1e-13
    else:
        tol = 2e-4 * scale + 30.0 * noise + 1e-6
    err = _max_abs(got - ref64)
    if err > tol:
        i = np.unravel_index(int(np.argmax(np.abs(got - ref64))), got.shape) if got.ndim else ()
        raise AssertionError(f"{what} ({dtype}): max error {err:.3g} > tolerance {tol:.3g} (scale {scale:.3g}, "
                             f"float32 reference error {noise:.3g}); at {i}: {got[i]!r} vs {ref64[i]!r}")


def _kink_inputs(loss_node) -> list:
    out = []
    for node in bp.ir.topo_order([loss_node]):
        if node.op == "ew" and node.inputs:
            fn = node.attrs["fn"]
            if fn.name in KINKED or fn.expr.has(sp.Max, sp.Min, sp.Abs, sp.Piecewise, sp.Heaviside, sp.sign):
                out += [x for x in node.inputs if x.dtype == bp.ir.FLOAT]
        elif node.op in ("amax", "amin"):  # the arg-extreme changes where x - max(x) changes sign
            x = node.inputs[0]
            kept = tuple(1 if i in node.attrs["axes"] else d for i, d in enumerate(x.shape))
            out.append(x - bp.reshape(node, kept))
    return out


def _fd_check(model, graph, inputs, grads, value, loss_noise, rng) -> bool:
    """Central differences along a random direction; False when every step crosses a kink."""
    names = list(grads)
    direction = {k: rng.normal(size=grads[k].shape) for k in names}
    analytic = float(sum(np.sum(grads[k] * direction[k]) for k in names))
    kinks = _kink_inputs(graph.losses["loss"].node)
    saved = {k: v.copy() for k, v in model.params.items()}

    def params_at(eps: float) -> dict:
        return {k: saved[k] + eps * direction[k] if k in direction else saved[k] for k in saved}

    loss_node = graph.losses["loss"].node

    def kink_signs(params: dict) -> list:  # the loss in the roots: it names every runtime dim's source
        return [np.sign(v) for v in bp.reference.evaluate([*kinks, loss_node], inputs, params)[:-1]]

    base_signs = kink_signs(saved) if kinks else []
    tried = []  # directional_fd restores the parameters after each step
    for eps in (1e-6, 1e-5, 1e-7):
        if kinks:
            crossed = False
            for sgn in (1, -1):
                signs = kink_signs(params_at(sgn * eps))
                crossed |= any(np.any(s != b) for s, b in zip(signs, base_signs))
            if crossed:
                continue
        fd = gradcheck.directional_fd(model, inputs, direction, eps)
        # truncation, the rounding of L (about 1e-16 |L|, or more where the float32 reference
        # shows cancellation) divided by the step
        tol = 1e-6 * max(1.0, abs(fd), abs(analytic)) + (1e-15 * abs(value) + 1e-8 * loss_noise) / eps
        tried.append((eps, fd, tol))
        if abs(fd - analytic) <= tol:
            return True
    if not tried:
        return False
    raise AssertionError(f"finite differences disagree with the gradient {analytic!r}: "
                         + ", ".join(f"eps={e:g}: {fd!r} (tol {t:.2g})" for e, fd, t in tried))


def poison_workspace(model) -> int:
    """Fill every workspace arena of this thread's call frames with 0xFF bytes (NaN in float32
    and float64); returns how many arenas were poisoned."""
    arenas = model._tls.__dict__.get("arenas", {})
    for arena in arenas.values():
        arena[...] = 0xFF
    return len(arenas)


def _snapshot(model, inputs, graph) -> tuple:
    out = model.forward(**inputs) if graph.outputs else {}
    value, grads = model.loss_and_grad(**inputs)
    return {k: v.copy() for k, v in out.items()}, value, {k: v.copy() for k, v in grads.items()}, model.loss(**inputs)


def check_case(case: GraphCase, build_dir=None) -> Report:
    """Compile `case` and check it (raises AssertionError naming what disagreed)."""
    report = Report(graphs=1)
    graph = case.build()
    loss_node = graph.losses["loss"].node
    names = graph.trained_params("loss")
    grad_nodes = bp.autodiff.grad(loss_node, [graph.params[n] for n in names])
    out_names = list(graph.outputs)
    out_nodes = [graph.outputs[n] for n in out_names]
    for dtype in case.dtypes:
        lr = 0.1
        model = bp.compile(graph, dtype=dtype, optimizer=bp.optim.SGD(lr=lr), seed=0, build_dir=build_dir)
        report.models += 1
        for batch in case.batches:
            inputs = case.inputs(graph, batch)
            where = f"batch={batch}"
            params = {k: v.copy() for k, v in model.params.items()}
            ref64 = bp.reference.evaluate([loss_node, *grad_nodes], inputs, params)
            ref32 = bp.reference.evaluate([loss_node, *grad_nodes], inputs, params, dtype=np.float32)
            out64 = bp.reference.evaluate(out_nodes, inputs, params, training=False)
            out32 = bp.reference.evaluate(out_nodes, inputs, params, dtype=np.float32, training=False)
            outputs, value, grads, loss_only = _snapshot(model, inputs, graph)
            report.calls += 3
            assert set(outputs) == set(out_names)
            for k, r64, r32 in zip(out_names, out64, out32):
                assert outputs[k].dtype == model.dtype, f"output {k}: dtype {outputs[k].dtype}"
                assert_close(outputs[k], r64, r32, dtype, f"output {k!r} at {where}")
            assert_close(value, ref64[0], ref32[0], dtype, f"loss at {where}")
            assert_close(loss_only, ref64[0], ref32[0], dtype, f"model.loss at {where}")
            assert set(grads) == set(names)
            for k, r64, r32 in zip(names, ref64[1:], ref32[1:]):
                assert grads[k].dtype == model.dtype
                assert_close(grads[k], r64, r32, dtype, f"gradient of {k!r} at {where}")
            report.arrays += len(out_names) + 1 + len(names)
            # poisoned workspace: every call must give the same bits again
            assert poison_workspace(model) > 0, "no workspace arena found to poison"
            outputs2, value2, grads2, loss2 = _snapshot(model, inputs, graph)
            report.calls += 3
            for k in outputs:
                np.testing.assert_array_equal(outputs2[k], outputs[k], err_msg=f"output {k!r}: workspace poisoned")
            assert (value2, loss2) == (value, loss_only) or np.isnan(value), "loss changed with a poisoned workspace"
            for k in grads:
                np.testing.assert_array_equal(grads2[k], grads[k], err_msg=f"gradient of {k!r}: workspace poisoned")
            if dtype == "float64":
                rng = np.random.default_rng([case.seed, batch, 7])
                noise = abs(float(ref32[0]) - float(ref64[0]))
                if _fd_check(model, graph, inputs, grads, value, noise, rng):
                    report.fd_checks += 1
                else:
                    report.fd_skipped += 1
                report.calls += 6
            # one fused SGD step: p <- p - lr * g, and the loss it returns is the loss before it
            step_loss = model.train_step(**inputs)
            report.calls += 1
            assert_close(step_loss, ref64[0], ref32[0], dtype, f"train_step loss at {where}")
            for k in names:
                want = params[k] - model.dtype.type(lr) * grads[k]
                tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(model.params[k], want, err_msg=f"SGD update of {k!r}", **tol)
            for k, v in params.items():
                model.params[k][...] = v
    return report


# --- bugs this generator found that are not fixed yet ---------------------------------------------
# Each has a minimal reproduction (only `bp.lower`, no C compiler) and the text its error carries.
# A case failing with that text is reported as that known bug (not a new failure) only while the
# reproduction still fails, so once the bug is fixed the random-graph run holds it to account again.

def _repro_piecewise_cse() -> None:
    g = bp.Graph("bug_piecewise_cse")
    x = g.input("x", ("batch",))
    p = g.param("p", (), init=np.array(0.7))
    g.loss(bp.sum(bp.tanh(bp.elu(x * p))))  # elu and elu' fused: sympy.cse pulls out "v0 > 0"
    bp.lower(g, "float64")


def _repro_max_expand_pow() -> None:
    g = bp.Graph("bug_max_expand_pow")
    x = g.input("x", ("batch",))
    p = g.param("p", (), init=np.array(0.7))
    g.loss(bp.sum(bp.relu(x * x * p + x)))  # Max(v0 + v1*v0**2, 0): v0**2 expanded inside Max
    bp.lower(g, "float64")


def _repro_folded_named_dim() -> None:
    g = bp.Graph("bug_folded_named_dim")
    x = g.input("x", ("batch",))
    p = g.param("p", (), init=np.array(0.7))
    g.loss(bp.mean((x - x) + p))  # x - x folds to a constant of shape (batch,): batch then has no source
    bp.lower(g, "float64")


def _repro_abs_expand_pow() -> None:
    g = bp.Graph("bug_abs_expand_pow")
    x = g.input("x", ("batch",))
    p = g.param("p", (), init=np.array(0.7))
    f = bp.elementwise("f", sp.sqrt(1 + Z**2) - 1, Z)
    g.loss(bp.sum(bp.abs(f(x * p))))  # Abs(sqrt(1 + v0**2*v1**2) - 1): expanded powers are not real: re/im
    bp.lower(g, "float64")


def _repro_unused_load() -> None:
    import os
    import tempfile
    g = bp.Graph("bug_unused_load")
    x = g.input("x", ("batch",))
    c = g.input("c", ())
    p = g.param("p", (), init=np.array(0.7))
    t = x * p
    g.loss(bp.sum(bp.sqrt(bp.softplus(t - (t + c)) + 0.1)))  # fused to -c: v0 = t is loaded, unused
    old = os.environ.get("BPCOMPILE_WERROR")
    os.environ["BPCOMPILE_WERROR"] = "1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bp.compile(g, dtype="float64", build_dir=tmp)
    finally:
        if old is None:
            del os.environ["BPCOMPILE_WERROR"]
        else:
            os.environ["BPCOMPILE_WERROR"] = old


# found by this generator and fixed since: their reproductions must keep working
FIXED_BUGS = {
    "piecewise-cse": _repro_piecewise_cse,  # elu/leaky_relu followed by another op: CSE'd "v0 > 0" crashed c99_form
    "max-expand-pow": _repro_max_expand_pow,  # powers expanded inside Max: now products at print time
    "abs-expand-pow": _repro_abs_expand_pow,  # powers expanded inside Abs: now products at print time
    "unused-load": _repro_unused_load,  # a load that simplification left unused: (void) after each load
    "folded-named-dim": _repro_folded_named_dim,  # x - x: the input giving the batch size is passed
}

KNOWN_BUGS: dict[str, tuple[Any, str]] = {}
_STILL_FAILING: dict[str, bool] = {}


def still_failing(name: str) -> bool:
    """Whether the known bug's reproduction still fails with its error text."""
    if name not in _STILL_FAILING:
        repro, text = KNOWN_BUGS[name]
        try:
            repro()
            _STILL_FAILING[name] = False
        except Exception as e:  # the bug's own exception, whatever its type
            _STILL_FAILING[name] = text in str(e)
    return _STILL_FAILING[name]


def known_bug(exc: BaseException) -> str | None:
    for name, (_, text) in KNOWN_BUGS.items():
        if text in str(exc) and still_failing(name):
            return name
    return None


def run_case(case: GraphCase, build_dir=None) -> tuple[Report, str | None]:
    """`check_case`, except that a failure that is a known, unfixed bug returns its name."""
    try:
        return check_case(case, build_dir), None
    except Exception as e:
        name = known_bug(e)
        if name is None:
            raise
        return Report(), name
