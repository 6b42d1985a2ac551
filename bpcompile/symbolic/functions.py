"""Elementwise functions as SymPy expressions, and their derivatives as SymPy derives them.

Every elementwise op in bpcompile - arithmetic, activations, a user's own function - is an
`Fn`: a SymPy expression of canonical real argument symbols `a0, a1, ...`. Its partial
derivatives come from `sympy.diff`, are simplified, and, where that is cheaper, rewritten in
terms of the function's own output `y` (sigmoid' = y(1-y), tanh' = 1-y^2, exp' = y) so the
backward pass reuses what the forward pass stored. Nothing here is a hand-written derivative.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import mpmath
import sympy as sp

from ..errors import CompileError
from . import stored

ARGS = tuple(sp.Symbol(f"a{i}", real=True) for i in range(16))
OUT = sp.Symbol("y", real=True)  # the function's own output, for derivatives rewritten in it

_FNS: dict[tuple, Fn] = {}


def dim_symbol(name: str) -> sp.Symbol:
    """The SymPy symbol of a named runtime dimension (used by mean's 1/count)."""
    return sp.Symbol(f"n[{name}]", positive=True, integer=True)


def is_dim_symbol(sym: sp.Symbol) -> bool:
    return sym.name.startswith("n[") and sym.name.endswith("]")


def dim_name(sym: sp.Symbol) -> str:
    return sym.name[2:-1]


@dataclass(frozen=True)
class Partial:
    """One derived partial derivative: as `sympy.diff` gave it, as used, and whether it uses y."""

    raw: sp.Expr
    expr: sp.Expr
    uses_output: bool


# --- size limits ------------------------------------------------------------------------------

# SymPy walks an expression as a tree: a value used twice is walked twice, so `e = e + sin(e)`
# repeated 40 times (80 distinct nodes) is a tree of 2**40 nodes that no SymPy call finishes.
# Every function's expression (a user's, or a derivative) is measured as a DAG first and refused
# above this many tree nodes with a CompileError that names the function. Deriving, folding,
# fusing and printing cost a few milliseconds per node: a function at the limit takes ~20 s.
MAX_EXPR_NODES = 5_000
MAX_EXPR_DEPTH = 120  # SymPy recurses a few frames per level: 200 levels exceed Python's limit


def dag_postorder(expr: sp.Basic) -> list[sp.Basic]:
    """Each distinct subexpression of `expr` once, arguments before the expressions using them
    (sympy.postorder_traversal walks the tree, each shared subexpression as often as it is used)."""
    order: list[sp.Basic] = []
    seen: set[sp.Basic] = set()
    stack: list[tuple[sp.Basic, bool]] = [(expr, False)]
    while stack:
        e, expanded = stack.pop()
        if expanded:
            order.append(e)
            continue
        if e in seen:
            continue
        seen.add(e)
        stack.append((e, True))
        stack.extend((a, False) for a in reversed(e.args) if a not in seen)
    return order


def tree_size(expr: sp.Basic, cap: int = MAX_EXPR_NODES) -> tuple[int, int]:
    """How many nodes SymPy walks in `expr` as a tree (at most `cap` + 1), and how deeply they
    nest, counted on the DAG."""
    size: dict[sp.Basic, tuple[int, int]] = {}
    for e in dag_postorder(expr):
        parts = [size[a] for a in e.args]
        size[e] = (min(1 + sum(n for n, _ in parts), cap + 1), 1 + max((d for _, d in parts), default=0))
    return size[expr]


def check_size(name: str, expr: sp.Basic, what: str = "expression") -> None:
    """Refuse an expression too large for SymPy to derive, simplify and print in bounded time, or
    nested too deeply for its recursive algorithms."""
    nodes, depth = tree_size(expr)
    if nodes > MAX_EXPR_NODES:
        raise CompileError(f"elementwise function {name!r}: its {what} has more than {MAX_EXPR_NODES:,} "
                           "operations written out as a tree (each use of a subexpression counts in full); "
                           "split it into several elementwise ops")
    if depth > MAX_EXPR_DEPTH:
        raise CompileError(f"elementwise function {name!r}: its {what} nests {depth} levels deep, more than "
                           f"the {MAX_EXPR_DEPTH} SymPy's recursive algorithms allow; split it into several "
                           "elementwise ops")


class Fn:
    """A scalar function of `nargs` arguments given by a SymPy expression of `ARGS[:nargs]`.

    Interned: the same (name, expression) gives the same object, so graph nodes that hold it
    intern too.
    """

    __slots__ = ("name", "expr", "nargs", "display", "_key")

    def __new__(cls, name: str, expr: sp.Expr, nargs: int, display: tuple[str, ...] | None = None) -> Fn:
        expr = sp.sympify(expr)
        check_size(name, expr)
        key = (name, sp.srepr(expr), nargs)
        fn = _FNS.get(key)
        if fn is not None:
            return fn
        extra = [s for s in expr.free_symbols if s not in ARGS[:nargs] and not is_dim_symbol(s)]
        if extra:
            raise ValueError(f"elementwise function {name!r}: free symbols {sorted(map(str, extra))} "
                             "are not among its arguments")
        fn = object.__new__(cls)
        fn.name, fn.expr, fn.nargs, fn._key = name, expr, nargs, key
        fn.display = display or tuple(f"a{i}" for i in range(nargs))
        _FNS[key] = fn
        return fn

    def __repr__(self) -> str:
        return f"Fn({self.name}: {self.pretty()})"

    def __reduce__(self):
        return (Fn, (self.name, self.expr, self.nargs, self.display))

    def pretty(self, expr: sp.Expr | None = None) -> str:
        """The expression with the user's argument names."""
        names = {ARGS[i]: sp.Symbol(n) for i, n in enumerate(self.display)}
        if "y" in self.display:
            names[OUT] = sp.Symbol("out")
        return str((self.expr if expr is None else expr).xreplace(names))

    def partial(self, i: int) -> Partial:
        """d fn / d a_i, derived by SymPy, simplified, possibly in terms of the output y."""
        return _derive(self, i)


def make_fn(name: str, expr: sp.Expr, symbols: tuple[sp.Symbol, ...]) -> Fn:
    """Build an Fn from an expression over a user's own symbols (any assumptions)."""
    if len(symbols) > len(ARGS):
        raise ValueError(f"elementwise function {name!r}: at most {len(ARGS)} arguments")
    if len(set(symbols)) != len(symbols) or not all(isinstance(s, sp.Symbol) for s in symbols):
        raise ValueError(f"elementwise function {name!r}: arguments must be distinct SymPy symbols, got {symbols}")
    expr = sp.sympify(expr)
    if not isinstance(expr, sp.Expr):
        raise ValueError(f"elementwise function {name!r}: {expr!r} is not a scalar SymPy expression")
    check_size(name, expr)
    extra = expr.free_symbols - set(symbols)
    if extra:
        raise ValueError(f"elementwise function {name!r}: free symbols {sorted(map(str, extra))} "
                         f"are not among its arguments {[str(s) for s in symbols]}")
    canon = expr.xreplace({s: ARGS[i] for i, s in enumerate(symbols)})
    if canon.has(sp.I) or canon.has(sp.zoo) or canon.has(sp.nan):
        raise ValueError(f"elementwise function {name!r}: {expr} is not a real-valued expression")
    return Fn(name, canon, len(symbols), tuple(str(s) for s in symbols))


# --- derivation ---------------------------------------------------------------------------

_TRANSCENDENTAL = (sp.exp, sp.log, sp.tanh, sp.cosh, sp.sinh, sp.erf, sp.sin, sp.cos, sp.atan, sp.LambertW)


def cost(expr: sp.Expr) -> int:
    """A rough evaluation cost: operations, plus extra weight for transcendental calls."""
    calls = sum(1 for f in expr.atoms(sp.Function) if isinstance(f, _TRANSCENDENTAL))
    calls += sum(1 for p in expr.atoms(sp.Pow) if not p.exp.is_Integer)
    piecewise = sum(len(p.args) for p in expr.atoms(sp.Piecewise))
    return int(sp.count_ops(expr)) + 8 * calls + 4 * piecewise


def degree_bound(expr: sp.Expr) -> int:
    """An upper bound of the degree of the polynomials `sympy.simplify`, `factor` or `cancel` make
    of `expr` over a common denominator (each symbol, function call or non-integer power one
    generator), found without expanding anything: their cost grows with it without bound
    ((1 + x)**50 nested twice is a polynomial of degree 2,500)."""
    cap = 10**6
    degree: dict[sp.Basic, tuple[int, int]] = {}  # (numerator, denominator) degrees
    for e in dag_postorder(expr):
        if e.is_number:
            d = (0, 0)
        elif e.is_Add:
            parts = [degree[a] for a in e.args]
            den = sum(q for _, q in parts)
            d = (max(p - q for p, q in parts) + den, den)
        elif e.is_Mul:
            parts = [degree[a] for a in e.args]
            d = (sum(p for p, _ in parts), sum(q for _, q in parts))
        elif e.is_Pow and e.exp.is_Integer:
            p, q = degree[e.base]
            n = int(e.exp)
            d = (n * p, n * q) if n >= 0 else (-n * q, -n * p)
        else:
            d = (1, 0)
        degree[e] = (min(d[0], cap), min(d[1], cap))
    return max(degree[expr])


# sympy.simplify is tried only on derivatives within these sizes: its cost grows without bound
# with each (48 operations with 25 calls take 3 s, trigsimp of exp(exp(exp(exp(x)))) tanh(..)**9
# 6 s, 16 fractions 3 s, a power of degree 2,500 never finishes). The derivatives of the built-in
# functions and the tests' own have at most 24 operations, 10 calls and degree 6.
SIMPLIFY_MAX_OPS = 60
SIMPLIFY_MAX_CALLS = 16
SIMPLIFY_MAX_DEGREE = 16


def _simplifiable(expr: sp.Expr) -> bool:
    if sp.count_ops(expr) > SIMPLIFY_MAX_OPS or degree_bound(expr) > SIMPLIFY_MAX_DEGREE:
        return False
    return sum(1 for e in sp.preorder_traversal(expr) if isinstance(e, sp.Function)) <= SIMPLIFY_MAX_CALLS


def _simplified(expr: sp.Expr) -> sp.Expr:
    """The cheaper of `expr` and `sympy.simplify(expr)` (only tried within SIMPLIFY_MAX_*)."""
    if not _simplifiable(expr):
        return expr
    try:
        simple = sp.simplify(expr)
    except Exception:  # SymPy gives up on some piecewise forms: keep the plain derivative
        return expr
    return simple if cost(simple) < cost(expr) else expr


FIT_MAX_OPS = 100  # derivatives longer than this are not fitted in the output (built-ins: at most 24)

# at least 7 positive points, so functions defined for x > 0 only (sqrt, log) can be fitted too
_SAMPLE_POINTS = ("-2.31", "-1.13", "-0.37", "0.29", "0.83", "1.71", "2.93", "0.061", "-0.59", "0.47", "1.29",
                  "3.61")


def _fit_in_output(fn: Fn, deriv: sp.Expr) -> sp.Expr | None:
    """Express a one-argument derivative as c0 + c1 y + c2 y^2 + c3/y, if it is one.

    The coefficients are fitted at sample points in 30-digit arithmetic, rationalized, and the
    result accepted only if it matches the derivative at every sample point.
    """
    x = ARGS[0]
    if deriv.has(sp.Piecewise, sp.Heaviside, sp.sign, sp.Max, sp.Min, sp.Abs) or not deriv.has(x):
        return None
    if sp.count_ops(deriv) > FIT_MAX_OPS:  # 24 evaluations in 30 digits: seconds for a long formula
        return None
    basis = (sp.Integer(1), OUT, OUT**2, 1 / OUT)
    rows, rhs = [], []
    in_float = _float_function(fn.expr, deriv)
    if in_float is None:
        return None
    with mpmath.workdps(30):
        for point in _SAMPLE_POINTS:
            if not in_float(float(point)):
                continue  # overflows on the way: 30 digits of exp(exp(exp(20))) would never finish
            try:
                y = sp.N(fn.expr.subs(x, sp.Float(point, 30)), 30)
                d = sp.N(deriv.subs(x, sp.Float(point, 30)), 30)
            except (TypeError, ValueError, ZeroDivisionError):
                continue
            if not (y.is_real and d.is_real and y.is_finite and d.is_finite) or y == 0:
                continue
            rows.append([mpmath.mpf(str(b.subs(OUT, y))) for b in basis])
            rhs.append(mpmath.mpf(str(d)))
        if len(rows) < 7:
            return None
        try:
            coef = mpmath.lu_solve(mpmath.matrix(rows[:4]), mpmath.matrix(rhs[:4]))
        except ZeroDivisionError:
            return None
        coefs = [sp.nsimplify(sp.Float(str(c), 30), tolerance=1e-20, rational=True) for c in coef]
        fitted = sum(c * b for c, b in zip(coefs, basis))
        for row, want in zip(rows, rhs):
            got = sum(mpmath.mpf(str(c)) * r for c, r in zip(coefs, row))
            if abs(got - want) > mpmath.mpf("1e-22") * (1 + abs(want)):
                return None
    return sp.expand(fitted) if fitted != 0 else None


def _float_function(*exprs: sp.Expr):
    """A test of a point: do `exprs` of ARGS[0] evaluate there in double precision with every
    intermediate finite (Python's math raises OverflowError)? None if they cannot be evaluated so."""
    try:
        f = sp.lambdify(ARGS[0], list(exprs), modules="math")
    except Exception:  # a function Python's math lacks
        return None

    def finite(point: float) -> bool:
        try:
            return all(isinstance(v, float | int) and abs(v) < 1e300 for v in f(point))
        except (ArithmeticError, ValueError, TypeError, NameError):
            return False
    return finite


def without_dirac(expr: sp.Expr) -> sp.Expr:
    """`expr` with every DiracDelta (and its derivatives) taken as 0, as PyTorch and JAX do.

    Derivatives of Heaviside, sign, Abs and Max/Min are DiracDelta terms that vanish almost
    everywhere; dropping them here, where partials are made, gives every consumer (the C
    printer, the NumPy reference, `show --grad`, exported C) the same expression.
    """
    if not expr.has(sp.DiracDelta):
        return expr
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))


def _raw_partial(fn: Fn, i: int) -> sp.Expr:
    """d fn / d a_i as SymPy differentiates it, DiracDelta terms dropped."""
    try:
        raw = without_dirac(sp.diff(fn.expr, ARGS[i]))
    except RecursionError:  # SymPy recurses once per nesting level
        raise CompileError(f"elementwise function {fn.name!r}: its expression is nested too deeply for SymPy "
                           "to differentiate; split it into several elementwise ops") from None
    check_size(fn.name, raw, f"derivative in {fn.display[i] if i < len(fn.display) else ARGS[i]}")
    return raw


@functools.cache
def _derive_cached(key: tuple, i: int) -> Partial:
    fn = _FNS[key]
    raw = _raw_partial(fn, i)
    key_on_disk = stored.entry_key(key[1], str(fn.nargs), str(i))
    symbols = {s.name: s for s in (*ARGS, OUT, *fn.expr.free_symbols)}
    lookups = ((stored.load_shipped, stored.shipped_key(key[1], str(fn.nargs), str(i))),  # a built-in's
               (stored.load, key_on_disk))  # derived by an earlier process building into the same folder
    found = (read(name, symbols) for read, name in lookups)  # the folder read only if the shipped one fails
    for entry in found:
        if entry is not None and entry.get("raw_expr") == raw and _agrees(fn, raw, entry.get("expr"),
                                                                           entry.get("uses_output")):
            return Partial(raw=raw, expr=entry["expr"], uses_output=entry["uses_output"])
    partial = _derived_afresh(fn, raw)
    stored.store(key_on_disk, {"raw_expr": raw, "expr": partial.expr, "uses_output": partial.uses_output}, symbols)
    return partial


def _derived_afresh(fn: Fn, raw: sp.Expr) -> Partial:
    """The cheapest form of the derivative `raw`: as SymPy derived it, simplified, or in the output."""
    best = _simplified(raw)
    uses_output = False
    if fn.nargs == 1:
        in_output = _fit_in_output(fn, raw)
        if in_output is not None and cost(in_output) < cost(best):
            best, uses_output = in_output, True
    return Partial(raw=raw, expr=best, uses_output=uses_output)


def _agrees(fn: Fn, raw: sp.Expr, expr: Any, uses_output: Any) -> bool:
    """Whether a stored partial equals the raw derivative at two points (in 30 digits; with y the
    function's value where it is written in its output): a damaged entry is not used."""
    if not isinstance(expr, sp.Expr) or not isinstance(uses_output, bool):
        return False
    if uses_output:
        expr = expr.xreplace({OUT: fn.expr})
    others = {s: sp.Integer(3) for s in (raw.free_symbols | expr.free_symbols) - set(ARGS)}  # runtime dims
    for k in range(2):
        point = {**others, **{a: sp.Float(0.61 + 0.37 * k + 0.13 * j, 30) for j, a in enumerate(ARGS[:fn.nargs])}}
        try:
            want, got = sp.N(raw.xreplace(point), 20), sp.N(expr.xreplace(point), 20)
            if not (want.is_number and got.is_number):
                return False
            if not (want == got or abs(want - got) <= sp.Float("1e-12") * (1 + abs(want))):
                return False
        except (TypeError, ValueError, ZeroDivisionError):
            return False
    return True


def _derive(fn: Fn, i: int) -> Partial:
    if not 0 <= i < fn.nargs:
        raise IndexError(f"{fn.name} has {fn.nargs} arguments, no argument {i}")
    return _derive_cached(fn._key, i)


# --- the built-in functions ----------------------------------------------------------------

a0, a1 = ARGS[0], ARGS[1]

BUILTIN: dict[str, tuple[sp.Expr, int]] = {
    "neg": (-a0, 1),
    "add": (a0 + a1, 2),
    "sub": (a0 - a1, 2),
    "mul": (a0 * a1, 2),
    "div": (a0 / a1, 2),
    "pow": (a0**a1, 2),
    "relu": (sp.Max(a0, 0), 1),
    "sigmoid": (1 / (1 + sp.exp(-a0)), 1),
    "tanh": (sp.tanh(a0), 1),
    # max(x, 0) + log1p(exp(-|x|)): finite for every x, unlike log(1 + exp(x))
    "softplus": (sp.Max(a0, 0) + sp.log(1 + sp.exp(-sp.Abs(a0))), 1),
    "gelu": (a0 / 2 * (1 + sp.erf(a0 / sp.sqrt(2))), 1),
    "silu": (a0 / (1 + sp.exp(-a0)), 1),
    "exp": (sp.exp(a0), 1),
    "log": (sp.log(a0), 1),
    "sqrt": (sp.sqrt(a0), 1),
    "square": (a0**2, 1),
    "abs": (sp.Abs(a0), 1),
    # binary cross-entropy with logits z and targets t, in its stable form
    "bce_with_logits": (sp.Max(a0, 0) - a0 * a1 + sp.log(1 + sp.exp(-sp.Abs(a0))), 2),
}


def builtin(name: str) -> Fn:
    expr, nargs = BUILTIN[name]
    return Fn(name, expr, nargs)


def leaky_relu_fn(negative_slope: float) -> Fn:
    slope = sp.Float(negative_slope) if not float(negative_slope).is_integer() else sp.Integer(int(negative_slope))
    return Fn("leaky_relu", sp.Piecewise((a0, a0 > 0), (slope * a0, True)), 1)


def elu_fn(alpha: float) -> Fn:
    alpha_ = sp.Float(alpha) if not float(alpha).is_integer() else sp.Integer(int(alpha))
    return Fn("elu", sp.Piecewise((a0, a0 > 0), (alpha_ * (sp.exp(a0) - 1), True)), 1)


def shipped_partials() -> dict[str, dict[str, Any]]:
    """The partials of every built-in function, derived afresh, as stored.SHIPPED holds them."""
    entries = {}
    for name in sorted(BUILTIN):
        fn = builtin(name)
        for i in range(fn.nargs):
            partial = _derived_afresh(fn, _raw_partial(fn, i))
            entries[stored.shipped_key(fn._key[1], str(fn.nargs), str(i))] = {
                "function": name, "argument": i, "raw_expr": stored.encode(partial.raw),
                "expr": stored.encode(partial.expr), "uses_output": partial.uses_output}
    return entries


def shipped_text() -> str:
    """stored.SHIPPED's text as this code and SymPy derive it."""
    return json.dumps(shipped_partials(), indent=1, sort_keys=True) + "\n"

