"""SymPy's printers for formulas over tensors, as `bpcompile show` writes them: ⊙ for elementwise
products, 𝟙[x > 0] for Heaviside, x² for small powers, tensor names for argument symbols."""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from ..ops.display import number, tex_escape
from ..symbolic import functions as ew_mod

# --- printing SymPy expressions over tensors --------------------------------------------------

class TextPrinter(StrPrinter):
    """SymPy's str printer for tensor formulas: ⊙ for elementwise products, 𝟙[x > 0] for
    Heaviside, x² for small powers, and tensor names for the argument symbols."""

    def __init__(self, names: dict[sp.Symbol, str], lead: Sequence[sp.Symbol] = ()):
        super().__init__({"order": "none"})
        self.names, self.lead = names, list(lead)

    def _print_Symbol(self, expr) -> str:
        if expr in self.names:
            return self.names[expr]
        if ew_mod.is_dim_symbol(expr):
            return ew_mod.dim_name(expr)
        return expr.name

    def _print_Float(self, expr) -> str:
        return number(float(expr))

    def _print_Heaviside(self, expr) -> str:
        return f"𝟙[{self._print(expr.args[0])} > 0]"

    def _print_Abs(self, expr) -> str:
        return f"|{self._print(expr.args[0])}|"

    def _print_Piecewise(self, expr) -> str:
        *branches, (last, cond) = expr.args
        text = self._print(last) if cond is sp.true else f"where({self._print(cond)}, {self._print(last)}, nan)"
        for value, c in reversed(branches):
            text = f"where({self._print(c)}, {self._print(value)}, {text})"
        return text

    def _print_Max(self, expr) -> str:
        return "max(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Min(self, expr) -> str:
        return "min(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Pow(self, expr, rational=False) -> str:
        base, exp = expr.args
        b = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
        if exp == sp.Rational(1, 2):
            return f"√{b}" if base.is_Atom else f"√({self._print(base)})"
        if exp == 2:
            return f"{b}²"
        if exp == 3:
            return f"{b}³"
        if exp.is_Rational and exp.is_negative:
            return f"1 / {self._print(base ** -exp) if base.is_Atom or -exp != 1 else b}"
        return f"{b}^{self.parenthesize(exp, PRECEDENCE['Pow'], strict=True)}"

    def _print_Mul(self, expr) -> str:
        coeff, rest = expr.as_coeff_Mul()
        tensors, scalars, den = [], [], []
        for f in sp.Mul.make_args(rest):
            if f.is_Pow and f.exp.is_Rational and f.exp.is_negative:
                den.append(f.base ** -f.exp)
            elif f.is_Symbol and ew_mod.is_dim_symbol(f):
                scalars.append(f)
            elif f != 1:
                tensors.append(f)
        if coeff.is_Rational and coeff.q != 1:
            den.insert(0, sp.Integer(coeff.q))
            coeff = sp.Integer(coeff.p)
        sign = ""
        if coeff.is_negative:
            sign, coeff = "-", -coeff
        tensors.sort(key=lambda f: (0, self.lead.index(f)) if f in self.lead else (1, 0))
        scalar = [self._print(coeff)] if coeff != 1 else []
        scalar += [self._print(f) for f in scalars]
        tensor = " ⊙ ".join(self.parenthesize(f, PRECEDENCE["Mul"]) for f in tensors)
        text = "·".join(scalar + ([tensor] if tensor else [])) or "1"
        if den:
            d = den[0] if len(den) == 1 else sp.Mul(*den, evaluate=False)
            dtext = self._print(d)
            text = f"{text} / {dtext if len(den) == 1 and (d.is_Atom or isinstance(d, sp.Function)) else f'({dtext})'}"
        return sign + text


class TexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with ⊙ products, 𝟙[x > 0] for Heaviside and tensor names."""

    def __init__(self, names: dict[sp.Symbol, str]):
        super().__init__({"mul_symbol": r" \odot ", "symbol_names": names})

    def _print_Symbol(self, expr, style="plain") -> str:
        if ew_mod.is_dim_symbol(expr):
            return rf"N_{{\mathrm{{{tex_escape(ew_mod.dim_name(expr))}}}}}"
        return super()._print_Symbol(expr, style)

    def _print_Heaviside(self, expr, exp=None) -> str:
        return rf"\mathbb{{1}}\left[{self._print(expr.args[0])} > 0\right]"
