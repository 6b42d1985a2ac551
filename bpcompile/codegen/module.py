"""Codegen: scheduled kernels -> C source, through Jinja2 templates and a SymPy C99 printer.

Scalar formulas are printed by `CPrinter` after `sympy.cse`; every loop, signature, load and
store is in `templates/`. Python only computes the data the templates fill in: names, sizes,
index expressions and printed formulas. Each kernel's comment lists the graph nodes it computes.
"""

from __future__ import annotations

import functools
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.codegen.cfunctions import log1p
from sympy.codegen.rewriting import ReplaceOptim, expm1_opt, optimize
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from ..errors import CompileError
from ..ir.graph import INT, Node, Shape
from ..ir.kernel import Kernel, Mono, broadcast_strides, coalesce, contiguous_strides, packed_strides
from ..ops.core import BUILDERS, FAILING_KINDS, register_kernel
from ..passes.pipeline import Schedule, Storage, view_root
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS

# --- identifiers and comments ----------------------------------------------------------------

C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern float for goto
if inline int long register restrict return short signed sizeof static struct switch typedef union unsigned void
volatile while _Bool _Complex _Imaginary bool true false NULL main""".split())


def c_identifier(name: str, taken: set[str]) -> str:
    """A valid C identifier for a user name, distinct from every name in `taken` (then added)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    if base[0].isdigit():
        base = "_" + base
    if base in C_KEYWORDS or keyword.iskeyword(base) or base.startswith("__"):
        base = base + "_"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def comment_text(text: str) -> str:
    """Text safe as one line of a comment, C block comment or `#` line of a Makefile/shell script: no
    comment terminator or opener, no line break or other control character (each becomes a space),
    no trailing backslash (a line continuation)."""
    one_line = "".join(c if c.isprintable() else " " for c in str(text))
    return one_line.replace("*/", "* /").replace("/*", "/ *").rstrip("\\")


def file_stem(name: str, default: str = "model") -> str:
    """A file name stem made from a user name that stays inside the folder it is joined to: only
    letters, digits, `_`, `-` and inner dots (no separators, no `..`, no leading dot), at most 64 characters."""
    stem = re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip(".")[:64].strip(".")
    return re.sub(r"\.{2,}", ".", stem) or default


# --- printing scalar formulas -----------------------------------------------------------------

class CPrinter(C99CodePrinter):
    """SymPy's C99 printer with bpcompile's symbol names, float32 or float64 math, and
    NaN-propagating max/min, one-line ternaries and Heaviside as x > 0 (PyTorch's relu')."""

    def __init__(self, dtype: str, names: dict[sp.Symbol, str]):
        super().__init__({"type_aliases": {real: float32 if dtype == "float32" else float64}, "math_macros": {}})
        self.names = names
        self.one = "1.0F" if dtype == "float32" else "1.0"
        self.zero = "0.0F" if dtype == "float32" else "0.0"

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if expr in self.names:
            return self.names[expr]
        return super()._print_Symbol(expr)

    def _print_Pow(self, expr) -> str:
        """x**2 .. x**4 as products (no pow call); printed here, not rewritten in the expression,
        so that Max/Min/Abs around them keep their SymPy meaning."""
        if expr.exp.is_Integer and 2 <= int(expr.exp) <= 4:
            base = self.parenthesize(expr.base, PRECEDENCE["Mul"])
            return "(" + "*".join([base] * int(expr.exp)) + ")"
        return super()._print_Pow(expr)

    def _print_Integer(self, expr) -> str:
        """Integers beyond int's range as floating literals: gcc would truncate 10**20 to 64 bits."""
        if abs(int(expr)) >= 2**31:
            return self._print(sp.Float(expr, 20))
        return super()._print_Integer(expr)

    def _print_NumberSymbol(self, expr) -> str:
        return self._print(sp.Float(expr.evalf(20), 20))  # pi, E: a literal, not a macro or global

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Heaviside(self, expr) -> str:
        return f"(({self._print(expr.args[0])}) > 0 ? {self.one} : {self.zero})"

    def _print_sign(self, expr) -> str:
        x = self._print(expr.args[0])
        return f"(bp_real)((({x}) > 0) - (({x}) < 0))"

    def _print_Piecewise(self, expr) -> str:
        *branches, (last, cond) = expr.args
        if cond is not sp.true:
            branches.append((last, cond))
            last = sp.nan
        text = self._print(last)
        for value, c in reversed(branches):
            text = f"(({self._print(c)}) ? ({self._print(value)}) : ({text}))"
        return text

    def _minmax(self, expr, op: str) -> str:
        # c OP x ? c : x keeps a NaN x (fmax would drop it)
        args = sorted(expr.args, key=lambda a: (not a.is_number, sp.default_sort_key(a)))
        text = self._print(args[-1])
        for a in reversed(args[:-1]):
            pa = self._print(a)
            text = f"(({pa}) {op} ({text}) ? ({pa}) : ({text}))"
        return text

    def _print_Max(self, expr) -> str:
        return self._minmax(expr, ">")

    def _print_Min(self, expr) -> str:
        return self._minmax(expr, "<")


def _stable_softplus(expr: sp.Expr) -> sp.Expr:
    """log(exp(a) + 1) -> max(a, 0) + log(1 + exp(-|a|)): finite where exp(a) overflows."""
    def rewrite(e):
        arg = e.args[0]
        if arg.is_Add and len(arg.args) == 2 and sp.S.One in arg.args:
            other = arg.args[0] if arg.args[1] == 1 else arg.args[1]
            if isinstance(other, sp.exp):
                a = other.args[0]
                return sp.Max(a, 0) + sp.log(1 + sp.exp(-sp.Abs(a)))
        return e
    return expr.replace(lambda e: isinstance(e, sp.log), rewrite)


def _stable_logistic(expr: sp.Expr) -> sp.Expr:
    """exp(a) (exp(a) + 1)^-1 -> 1 / (1 + exp(-a)) inside a product (and the squared form):
    no inf/inf for large a."""
    def rewrite(e):
        factors = list(e.args)
        for f in factors:
            if isinstance(f, sp.exp):
                denom = sp.Pow(f + 1, -1)
                if denom in factors:
                    factors.remove(f)
                    factors.remove(denom)
                    return sp.Mul(*factors) / (1 + sp.exp(-f.args[0]))
                denom2 = sp.Pow(f + 1, -2)  # exp(a) / (exp(a) + 1)^2 = 1 / ((1 + exp(a)) (1 + exp(-a)))
                if denom2 in factors:
                    factors.remove(f)
                    factors.remove(denom2)
                    return sp.Mul(*factors) / ((1 + f) * (1 + sp.exp(-f.args[0])))
        return e
    return expr.replace(lambda e: e.is_Mul, rewrite)


@functools.lru_cache(maxsize=4096)  # kernels of a model repeat the same formulas
def stable_form(expr: sp.Expr) -> sp.Expr:
    """Overflow-free forms of softplus and the logistic function (before CSE splits them)."""
    return _stable_logistic(_stable_softplus(expr))


def _log1p(expr: sp.Expr) -> sp.Expr:
    """log(1 + x) -> log1p(x) as written (SymPy's own rule factors x first, and can turn a
    stable log(1 + exp(-|a|)) into log1p(exp(|a|)) - |a|, which overflows)."""
    def is_log_one_plus(e) -> bool:
        return isinstance(e, sp.log) and e.args[0].is_Add and sp.S.One in e.args[0].args
    return expr.replace(is_log_one_plus, lambda e: log1p(e.args[0] - 1))


# `sympy.factor`, which SymPy's expm1_opt tries on every formula, costs without bound in a
# formula's size and degree (minutes and gigabytes for a few chained cubes): it is tried only on
# formulas at most this many operations and this polynomial degree, where it can only save a
# multiplication (a*b + a*c -> a*(b + c)) or find an expm1 hidden in an expanded sum.
FACTOR_MAX_OPS = 24
FACTOR_MAX_DEGREE = 8


def _expm1(expr: sp.Expr) -> sp.Expr:
    """exp(x) - 1 -> expm1(x) in each sum as written (c exp(x) - c too), and in the factored
    formula only for small ones (FACTOR_MAX_OPS, FACTOR_MAX_DEGREE): linear in the formula."""
    if sp.count_ops(expr) <= FACTOR_MAX_OPS and ew_mod.degree_bound(expr) <= FACTOR_MAX_DEGREE:
        return optimize(expr, [expm1_opt])  # SymPy's own: as written and factored, the cheaper
    return expm1_opt.cheapest(expr, ReplaceOptim.__call__(expm1_opt, expr))


@functools.lru_cache(maxsize=4096)
def c99_form(expr: sp.Expr) -> sp.Expr:
    """Rewrite for C: log(1+x) -> log1p, exp(x)-1 -> expm1 (small integer powers become products
    in CPrinter). Conditions (which CSE may pull out of a Piecewise) are printed as they are."""
    if not isinstance(expr, sp.Expr) or expr.is_Relational:
        return expr
    return _log1p(_expm1(expr))


def print_formulas(outputs: list[sp.Expr], printer: CPrinter,
                   prefix: str = "x") -> tuple[list[tuple[str, str]], list[str]]:
    """Common subexpressions as (temp name, C expression), then the outputs' C expressions."""
    temps = sp.numbered_symbols(prefix, real=True)
    replacements, reduced = sp.cse([stable_form(e) for e in outputs], symbols=temps)
    lines = []
    for sym, value in replacements:
        printer.names[sym] = sym.name
        lines.append((sym.name, printer.doprint(c99_form(value))))
    return lines, [printer.doprint(c99_form(e)) for e in reduced]


# --- what kernel builders get: the model's dims, dtype and printer (sizes: ir.kernel.Mono) -------

@dataclass
class Context:
    """What kernel builders need from the model: dtype, the C names of dims, the printer.

    `dims[len(dim_index)]` and `dims[len(dim_index) + 1]` hold the model seed and the step
    counter, for kernels that draw random numbers (`rng_decls`)."""

    dtype: str
    dim_index: dict[str, int]
    dim_c: dict[str, str]
    used_dims: set[str] = field(default_factory=set)
    node_ids: dict[Node, int] = field(default_factory=dict)
    printed: dict[tuple, tuple[list[tuple[str, str]], list[str]]] = field(default_factory=dict)

    def formulas(self, outputs: list[sp.Expr], leaves: list[sp.Symbol],
                 prefix: str = "x") -> tuple[list[tuple[str, str]], list[str]]:
        """print_formulas of `outputs` over the leaf symbols `leaves` (printed as their names),
        once per module: a model's repeated layers (and a loss over 1,000 parameters) repeat the
        same few formulas."""
        key = (tuple(outputs), tuple(leaves), prefix)
        if key not in self.printed:
            printer = self.printer()
            for s in leaves:
                printer.names[s] = s.name
            self.printed[key] = print_formulas(outputs, printer, prefix)
        return self.printed[key]

    def rng_decls(self) -> dict[str, int]:
        return {"seed_index": len(self.dim_index), "counter_index": len(self.dim_index) + 1}

    def c(self, m: Mono) -> str:
        """A Mono as C text, recording which dims the kernel must declare."""
        self.used_dims.update(m.dims)
        parts = [self.dim_c[d] for d in m.dims]
        if m.coef != 1 or not parts:
            parts.insert(0, str(m.coef))
        return "*".join(parts)

    def size(self, shape: Shape) -> str:
        return self.c(Mono.of(shape))

    def printer(self) -> CPrinter:
        names = {ew_mod.dim_symbol(d): c for d, c in self.dim_c.items()}
        return CPrinter(self.dtype, names)

    def dim_decls(self) -> list[dict[str, Any]]:
        return [{"c": self.dim_c[d], "index": self.dim_index[d]} for d in sorted(self.used_dims)]


def index_expr(ctx: Context, loop_vars: list[str], strides: list[Mono]) -> str:
    terms = []
    for var, st in zip(loop_vars, strides):
        if st.coef == 0:
            continue
        terms.append(var if st == Mono(1) else f"{var}*{ctx.c(st)}")
    return " + ".join(terms) or "0"


def _unprintable(k: Kernel, ctx: Context, error: Exception) -> CompileError:
    """A CompileError naming the function the C printer failed on, its elementwise op and node."""
    for m in k.nodes:
        fn = m.attrs["fn"]
        try:
            print_formulas([fn.expr], ctx.printer())
        except Exception as e:
            funcs = sorted({type(f).__name__ for f in fn.expr.atoms(sp.Function)
                            if type(f).__name__ in str(e)}) or [str(e).splitlines()[0]]
            return CompileError(f"cannot print {', '.join(funcs)} in C: elementwise op {fn.name!r} "
                                f"({fn.pretty()}) of node {m}")
    return CompileError(f"cannot print the elementwise kernel of {k.nodes[-1]} in C: {error}")


# --- kernel builders: one per kernel kind, each returning its template's context --------------

def _elementwise(k: Kernel, ctx: Context) -> dict[str, Any]:
    root = k.nodes[-1]
    shape = root.shape
    leaf_sym = {x: sp.Symbol(f"v{i}", real=True) for i, x in enumerate(k.inputs)}
    exprs: dict[Node, sp.Expr] = {}
    for m in k.nodes:
        fn = m.attrs["fn"]
        exprs[m] = fn.expr.xreplace({ARGS[j]: exprs.get(x, leaf_sym.get(x)) for j, x in enumerate(m.inputs)})
    for o in k.outputs:  # runtime sizes used inside formulas (a mean's 1/n) must be declared too
        ctx.used_dims.update(ew_mod.dim_name(s) for s in exprs[o].free_symbols if ew_mod.is_dim_symbol(s))
    try:
        temps, values = ctx.formulas([exprs[o] for o in k.outputs], list(leaf_sym.values()))
    except Exception as e:  # SymPy's printer cannot print some function: name it, its op and node
        raise _unprintable(k, ctx, e) from None
    sizes = [Mono.of((d,)) for d in shape]
    operand_strides = [broadcast_strides(x.shape, shape) for x in k.inputs] + \
                      [contiguous_strides(shape) for _ in k.outputs]
    sizes, operand_strides = coalesce(sizes, operand_strides)
    loop_vars = [f"i{d}" for d in range(len(sizes))]
    loops = [{"var": v, "size": ctx.c(s)} for v, s in zip(loop_vars, sizes)]
    hoisted, loads = [], []
    for i, x in enumerate(k.inputs):
        st = operand_strides[i]
        load = {"name": leaf_sym[x].name, "array": f"in{i}", "index": index_expr(ctx, loop_vars, st),
                "cast": x.dtype == INT}
        (hoisted if all(s.coef == 0 for s in st) else loads).append(load)
    stores = [{"array": f"out{j}", "index": index_expr(ctx, loop_vars, operand_strides[len(k.inputs) + j]),
               "value": v} for j, v in enumerate(values)]
    split = {"what": f"its outer loop ({loops[0]['var']})", "work": ctx.size(shape),
             "grain": 16 if len(loops) == 1 else 1} if loops else None
    return {"loops": loops, "hoisted": hoisted, "loads": loads, "temps": temps, "stores": stores, "split": split}


def _gemm(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    lead_a = Mono.of(a.shape[:-1])
    m = Mono.of(a.shape[-1:]) if ta else lead_a
    kk = lead_a if ta else Mono.of(a.shape[-1:])
    n = Mono.of(b.shape[:1]) if tb else Mono.of(b.shape[-1:])
    return {"ta": int(ta), "tb": int(tb), "M": ctx.c(m), "N": ctx.c(n), "K": ctx.c(kk),
            "lda": ctx.c(Mono.of(a.shape[-1:])), "ldb": ctx.c(Mono.of(b.shape[-1:])), "ldc": ctx.c(n)}


REDUCE_BLOCK = 512  # columns summed at once when reducing leading axes


REDUCE_COMBINE = {"reduce": "sum", "amax": "max", "amin": "min"}


def _reduce(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    axes = node.attrs["axes"]
    mean = node.attrs.get("mean", False)
    combine = REDUCE_COMBINE[node.op]
    lead = len(axes)
    cols = x.shape[lead:]
    if axes == tuple(range(lead)) and cols and all(isinstance(d, int) for d in cols):
        # (rows, cols) with the rows summed: read each row contiguously into a block of
        # double accumulators (a bias gradient summed over the batch)
        ncols = int(np.prod(cols))
        rows = ctx.c(Mono.of(x.shape[:lead]))
        return {"columns": True, "rows": rows, "cols": ncols, "combine": combine,
                "block": min(ncols, REDUCE_BLOCK), "mean": mean,
                "count": rows if mean else "",
                "split": {"what": "its columns", "work": f"({rows})*{ncols}"} if ncols >= 32 else None}
    strides = contiguous_strides(x.shape)
    kept = [(Mono.of((d,)), strides[i]) for i, d in enumerate(x.shape) if i not in axes]
    red = [(Mono.of((d,)), strides[i]) for i, d in enumerate(x.shape) if i in axes]
    kept_sizes, (kept_strides,) = coalesce([s for s, _ in kept], [[st for _, st in kept]])
    red_sizes, (red_strides,) = coalesce([s for s, _ in red], [[st for _, st in red]])
    outer = [f"i{d}" for d in range(len(kept_sizes))]
    inner = [f"j{d}" for d in range(len(red_sizes))]
    # a contiguous innermost reduced dim is summed with 8 partial sums, so that it vectorizes
    contiguous = bool(red_strides) and red_strides[-1] == Mono(1) and (red_sizes[-1].dims or red_sizes[-1].coef >= 8)
    return {
        "combine": combine,
        "contiguous_last": contiguous,
        "row_offset": index_expr(ctx, inner[:-1], red_strides[:-1]) if contiguous else "",
        "last_size": ctx.c(red_sizes[-1]) if contiguous else "",
        "columns": False,
        "outer": [{"var": v, "size": ctx.c(s)} for v, s in zip(outer, kept_sizes)],
        "inner": [{"var": v, "size": ctx.c(s)} for v, s in zip(inner, red_sizes)],
        "base": index_expr(ctx, outer, kept_strides),
        "offset": index_expr(ctx, inner, red_strides),
        "out_index": index_expr(ctx, outer, packed_strides(kept_sizes)),
        "count": ctx.c(Mono.of(tuple(x.shape[a] for a in axes))) if mean else "",
        "mean": mean,
    }


def _softmax(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    return {"rows": ctx.c(Mono.of(x.shape[:-1])), "cols": ctx.c(Mono.of(x.shape[-1:])),
            "log": node.op == "log_softmax", "masked": node.op == "attention_softmax",
            "causal": node.attrs.get("causal", False), "queries": ctx.c(Mono.of(x.shape[-2:-1])),
            "scale": repr(node.attrs.get("scale", 1.0))}


def _softmax_ce(k: Kernel, ctx: Context) -> dict[str, Any]:
    logits = k.nodes[0].inputs[0]
    return {"rows": ctx.c(Mono.of(logits.shape[:-1])), "cols": ctx.c(Mono.of(logits.shape[-1:])),
            "grad": k.nodes[0].op == "softmax_ce_grad"}


def _transpose(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    x = node.inputs[0]
    perm = node.attrs["axes"]
    in_strides = contiguous_strides(x.shape)
    sizes = [Mono.of((d,)) for d in node.shape]
    sizes, (src, dst) = coalesce(sizes, [[in_strides[p] for p in perm], contiguous_strides(node.shape)])
    loop_vars = [f"i{d}" for d in range(len(sizes))]
    return {"loops": [{"var": v, "size": ctx.c(s)} for v, s in zip(loop_vars, sizes)],
            "src": index_expr(ctx, loop_vars, src), "dst": index_expr(ctx, loop_vars, dst)}


def _copy(k: Kernel, ctx: Context) -> dict[str, Any]:
    return {"count": ctx.size(k.nodes[0].shape)}


def _random(k: Kernel, ctx: Context) -> dict[str, Any]:
    return {"count": ctx.size(k.nodes[0].shape), "salt": k.nodes[0].attrs["salt"], **ctx.rng_decls()}


Builder = Callable[[Kernel, Context], dict[str, Any]]
for _kind, _builder in {"elementwise": _elementwise, "gemm": _gemm, "reduce": _reduce, "softmax": _softmax,
                        "transpose": _transpose, "copy": _copy, "random": _random}.items():
    register_kernel(_kind, _builder)
register_kernel("softmax_ce", _softmax_ce, failing=True)  # validates the labels: may return an error code


# --- describing nodes (kernel comments, `bpcompile show`) -------------------------------------

def describe(node: Node, name: Callable[[Node], str]) -> str:
    """A one-line formula for what a node computes, in terms of its inputs' names."""
    args = [name(x) for x in node.inputs]
    op = node.op
    if op == "ew":
        fn = node.attrs["fn"]
        if not args:
            return f"fill({fn.expr})"
        if fn.name in ew_mod.BUILTIN and fn.expr == ew_mod.BUILTIN[fn.name][0]:
            return f"{fn.name}({', '.join(args)})"
        return str(fn.expr.xreplace({ARGS[i]: sp.Symbol(a) for i, a in enumerate(args)}))
    if op == "matmul":
        a = args[0] + ("ᵀ" if node.attrs["ta"] else "")
        b = args[1] + ("ᵀ" if node.attrs["tb"] else "")
        return f"{a} @ {b}"
    if op == "reduce":
        f = "mean" if node.attrs["mean"] else "sum"
        return f"{f}({args[0]}, axes={node.attrs['axes']}{', keepdims' if node.attrs['keepdims'] else ''})"
    if op == "reshape":
        return f"reshape({args[0]})"
    if op == "transpose":
        return f"transpose({args[0]}, {node.attrs['axes']})"
    return f"{op}({', '.join(args)})"


# --- rendering a whole module ------------------------------------------------------------------

@dataclass
class EntryCode:
    """An entry point to render: its name, doc line, and schedule."""

    name: str
    doc: str
    schedule: Schedule
    update: dict[str, Any] | None = None


def template_dir() -> Path:
    """The C templates: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the bpcompile package folder
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "module.c.j2").is_file():
            return candidate
    raise FileNotFoundError(f"bpcompile's C templates are missing (looked in {here / 'templates'})")


@functools.cache
def runtime_c() -> str:
    """templates/bp_runtime.h, the runtime support every module starts with (real C, not a template)."""
    return (template_dir() / "bp_runtime.h").read_text()


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir()), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


class ModuleRenderer:
    """Renders kernels (deduplicated across entries) and entry functions into one C file."""

    def __init__(self, model_name: str, dtype: str, dim_names: list[str], node_names: dict[Node, str],
                 param_c: dict[str, str], input_c: dict[str, str], options: dict[str, Any]):
        self.env = environment()
        self.model_name = model_name
        self.dtype = dtype
        self.dim_index = {d: i for i, d in enumerate(dim_names)}
        taken: set[str] = set()
        self.dim_c = {d: "n_" + c_identifier(d, taken) for d in dim_names}
        self.node_names = node_names
        self.param_c = param_c
        self.input_c = input_c
        self.options = options
        self.kernel_texts: list[str] = []
        self.kernel_by_text: dict[str, str] = {}
        self.kernel_uses: dict[str, int] = {}
        self.kernel_by_nodes: dict[tuple, tuple[str, list[str]]] = {}
        self._node_ids: dict[Node, int] | None = None
        self._printed: dict[tuple, tuple[list[tuple[str, str]], list[str]]] = {}

    def _render(self, template: str, **context: Any) -> str:
        """A template rendered; one that fails is a CompileError naming the model and the template."""
        try:
            return self.env.get_template(template).render(**context)
        except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError) as e:
            raise CompileError(f"model {self.model_name!r}: rendering the C template {template} failed "
                               f"({type(e).__name__}: {e})") from e

    def name(self, node: Node) -> str:
        if node in self.node_names:
            return self.node_names[node]
        if node.inputs:  # an extra result of a multi-output kernel
            return f"{self.name(node.inputs[0])}.{node.op}"
        return "?"

    def context(self) -> Context:
        if self._node_ids is None:  # once per module: once per kernel made compiling quadratic
            self._node_ids = {n: int(v[1:]) for n, v in self.node_names.items()
                              if v.startswith("t") and v[1:].isdigit()}
        return Context(self.dtype, self.dim_index, self.dim_c, node_ids=self._node_ids, printed=self._printed)

    def kernel(self, k: Kernel, sched: Schedule) -> tuple[str, list[str]]:
        """Render a kernel function (or reuse an identical one); returns its name and comment lines.
        The entries of a model (loss, gradient, train step, ...) share most kernels: each is built once."""
        key = (k.kind, tuple(k.nodes), tuple(k.inputs), tuple(k.outputs))
        if key not in self.kernel_by_nodes:
            self.kernel_by_nodes[key] = self._new_kernel(k)
            self.kernel_uses[self.kernel_by_nodes[key][0]] += 1
        return self.kernel_by_nodes[key]

    def _new_kernel(self, k: Kernel) -> tuple[str, list[str]]:
        ctx = self.context()
        body = BUILDERS[k.kind](k, ctx)
        lines = [f"{self.name(n)} = {describe(n, self.name)}  {_shape(n.shape)}" for n in k.nodes]
        if k.kind == "copy":
            lines = [f"copy of {self.name(k.nodes[0])}  {_shape(k.nodes[0].shape)}"]
        params = [{"decl": _decl(x, "in", i, const=True), "name": f"in{i}"} for i, x in enumerate(k.inputs)]
        if k.kind != "copy":
            params += [{"decl": _decl(o, "out", j, const=False), "name": f"out{j}"} for j, o in enumerate(k.outputs)]
        else:
            params += [{"decl": _decl(k.nodes[0], "out", 0, const=False), "name": "out0"}]
        split = body.pop("split", None)
        failing = k.kind in FAILING_KINDS
        common = {"fname": "KERNEL_NAME", "params": params, "real": "bp_real",
                  "whole_signature": kernel_signature(params, failing, split=False)}
        text = self._render(f"{k.kind}.c.j2",
            comment=[COMMENT_SLOT], dims=ctx.dim_decls(), failing=failing, split=split,
            signature=kernel_signature(params, failing, split=bool(split)), **common, **body)
        if split:  # the kernel's body takes (part, parts); this wrapper runs it on the pool
            text += self._render("parallel.c.j2", dims=ctx.dim_decls(), **common, **split)
        return self._function(text, k.kind, [comment_text(s) for s in lines]), lines

    def _function(self, text: str, kind: str, comment: list[str] | None = None) -> str:
        """The name of a rendered function (text naming itself KERNEL_NAME and holding COMMENT_SLOT
        where its comment goes), added once. Kernels equal but for the nodes their comment names (a
        loss summing 1,000 squared parameters has 1,000 of them) share one function: each call site
        is commented with its own nodes, and the function's comment names the first."""
        fname = self.kernel_by_text.get(text)
        if fname is None:
            fname = f"k{len(self.kernel_texts)}_{kind}"
            self.kernel_by_text[text] = fname
            self.kernel_uses[fname] = 0
            lines = "\n *   ".join(comment or [])
            self.kernel_texts.append(text.replace("KERNEL_NAME", fname).replace(COMMENT_SLOT, lines))
        return fname

    def update(self, context: dict[str, Any]) -> str:
        """The optimizer update of a train entry as a function on the thread pool; its name."""
        params = [{"decl": "bp_real *restrict params", "name": "params"},
                  {"decl": "const bp_real *restrict grads", "name": "grads"},
                  {"decl": "bp_real *restrict state", "name": "state"},
                  {"decl": "const double *restrict hyper", "name": "hyper"}]
        common = {"fname": "KERNEL_NAME", "params": params, "real": "bp_real",
                  "whole_signature": kernel_signature(params, failing=False, split=False)}
        count = sum(end - start for start, end in context["ranges"])
        text = self._render("update.c.j2",
            signature=kernel_signature(params, failing=False, split=True), **common, **context)
        text += self._render("parallel.c.j2",
            dims=[], what="each parameter range", work="0" if context["clip"] else str(count), **common)
        return self._function(text, "update")

    def entry(self, entry: EntryCode) -> str:
        sched = entry.schedule
        pointers = self._pointer_vars(sched)
        calls = []
        for k in sched.kernels:
            fname, lines = self.kernel(k, sched)
            args = [pointers[view_root(x)]["var"] for x in k.inputs]
            if k.kind == "copy":
                args.append(self._dest_expr(k.extra["dest"], k.nodes[0]))
            else:
                args += [pointers[o]["var"] for o in k.outputs]
            calls.append({"fname": fname, "args": args, "comment": [comment_text(s) for s in lines],
                          "failing": k.kind in FAILING_KINDS})
        update = self.update(entry.update) if entry.update is not None else None
        return self._render("entry.c.j2",
            name=entry.name, doc=comment_text(entry.doc), pointers=list(pointers.values()), calls=calls,
            update=update, real="bp_real")

    def _pointer_vars(self, sched: Schedule) -> dict[Node, dict[str, str]]:
        out: dict[Node, dict[str, str]] = {}
        for node, st in sched.storage.items():
            ctype = "int32_t" if node.dtype == INT else "bp_real"
            const = "const " if st.kind in ("input",) else ""
            var, expr, what = self._storage_c(node, st, ctype, const)
            out[node] = {"var": var, "decl": f"{const}{ctype} *", "expr": expr,
                         "comment": comment_text(f"{what} {_shape(node.shape)}")}
        return out

    def _storage_c(self, node: Node, st: Storage, ctype: str, const: str) -> tuple[str, str, str]:
        n = self.name(node)
        if st.kind == "input":
            return f"in_{self.input_c[st.name]}", f"({const}{ctype} *)inputs[{st.index}]", f"input {st.name!r}"
        if st.kind == "param":
            return f"p_{self.param_c[st.name]}", f"params + {st.index}", f"parameter {st.name!r}"
        if st.kind == "grad":
            return f"g_{self.param_c[st.name]}", f"grads + {st.index}", f"{n}: gradient of {st.name!r}"
        if st.kind == "output":
            return f"out{st.index}", f"({ctype} *)outputs[{st.index}]", f"{n}: output {st.name!r}"
        return c_identifier(n, set()), f"({ctype} *)(ws + ws_off[{st.index}])", f"{n}: workspace buffer {st.index}"

    def _dest_expr(self, dest: Storage, node: Node) -> str:
        ctype = "int32_t" if node.dtype == INT else "bp_real"
        return self._storage_c(node, dest, ctype, "")[1]

    def module(self, entries: list[EntryCode]) -> str:
        entry_texts = [self.entry(e) for e in entries]
        return self._render("module.c.j2",
            model_name=comment_text(self.model_name), dtype=self.dtype, kernels=self._shared_noted(),
            runtime_c=runtime_c(),
            entries=entry_texts, options=self.options)

    def _shared_noted(self) -> list[str]:
        """The kernel texts, each shared one saying how many node groups call it."""
        texts = []
        for text, (fname, uses) in zip(self.kernel_texts, self.kernel_uses.items()):
            if uses > 1:
                text = f"/* {fname}: called for {uses} node groups, each call commented with its own */\n{text}"
            texts.append(text)
        return texts

    def header(self, entries: list[EntryCode]) -> str:
        return self._render("model.h.j2",
            model_name=comment_text(self.model_name), entries=[e.name for e in entries], dtype=self.dtype)


def kernel_signature(params: list[dict[str, str]], failing: bool, split: bool) -> str:
    """The C signature of a kernel function (named KERNEL_NAME until it is added): it takes the
    runtime dims, then (part, parts) when it is the body a thread-pool piece runs, then its arrays;
    it returns int (non-zero: bad data) when `failing`. Kept out of line: gcc inlining every small
    kernel into its entry function made the register allocation of a 1,000-kernel entry take minutes."""
    args = ["const int64_t *dims", *(["int64_t part", "int64_t parts"] if split else []), *(p["decl"] for p in params)]
    return (f"__attribute__((noinline)) static {'int' if failing else 'void'} "
            f"KERNEL_NAME{'_part' if split else ''}({', '.join(args)})")


POOL_PROTOTYPE = "int bp_set_num_threads(int n);"
COMMENT_SLOT = "@KERNEL_COMMENT@"  # where a kernel's comment lines go once its text is known to be new


def entry_prototype(name: str, dtype: str) -> str:
    """The C declaration of an entry point (for cffi's cdef)."""
    real = "float" if dtype == "float32" else "double"
    return (f"int bp_{name}(const int64_t *dims, char *ws, const int64_t *ws_off, {real} *params, "
            f"{real} *grads, {real} *state, void *const *inputs, void *const *outputs, const double *hyper);")


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _decl(node: Node, prefix: str, i: int, const: bool) -> str:
    ctype = "int32_t" if node.dtype == INT else "bp_real"
    return f"{'const ' if const else ''}{ctype} *restrict {prefix}{i}"
