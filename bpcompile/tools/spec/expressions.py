"""SymPy strings of a YAML spec's `functions`, parsed with Python's ast and never evaluated."""

from __future__ import annotations

import ast
from typing import Any

from .limits import MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_NUMBER_BITS, MAX_SYMBOLIC_EXPONENT

_SYMPY_FUNCTIONS = {
    "exp": "exp", "log": "log", "sqrt": "sqrt", "tanh": "tanh", "sinh": "sinh", "cosh": "cosh", "sin": "sin",
    "cos": "cos", "tan": "tan", "atan": "atan", "asinh": "asinh", "erf": "erf", "abs": "Abs", "Abs": "Abs",
    "max": "Max", "Max": "Max", "min": "Min", "Min": "Min", "sign": "sign", "Heaviside": "Heaviside",
    "Piecewise": "Piecewise", "log1p": None, "expm1": None,
}
_SYMPY_CONSTANTS = {"pi": "pi", "E": "E", "True": "true"}


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
