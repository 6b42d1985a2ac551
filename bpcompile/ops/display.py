"""How each op is written in formulas, declared with the op (`register(..., display=rule)`).

`bpcompile show` writes the forward and backward passes with these rules, as plain text and as
LaTeX, and the code generator comments every kernel with them, so an op reads the same in the
explanation and in the C it became. A rule gets the node, its operands already written as
(text, precedence) pairs, and a `Notation` (text or LaTeX), and returns the node's own pair::

    def _matmul_display(node, args, n):
        return n.product(n.side(args[0], node.attrs["ta"]), n.side(args[1], node.attrs["tb"])), MUL

Elementwise nodes carry SymPy formulas: the notation prints those (`Notation.formula`), since how
a SymPy expression becomes text is the printer's business, not the op's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..ir.graph import size_factors

if TYPE_CHECKING:
    from ..ir.graph import Node

# precedence of a written formula: an operand binding looser than its place needs gets parentheses
ADD, MUL, UNARY, POW, ATOM = 1, 2, 3, 4, 5
Shown = tuple[str, int]
Display = Callable[["Node", Sequence[Shown], "Notation"], Shown]


def number(value: float) -> str:
    """A constant as a person writes it: 2 rather than 2.0."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def tex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped."""
    return re.sub(r"([_#%&$\\{}^~])", r"\\\1", text)


def row_factors(shape: Sequence[object]) -> list[str]:
    """The factors of a shape's element count: its number (unless 1) and its named dims, a
    product dim (T*batch) by its factors."""
    coef, names = size_factors(tuple(shape))
    return ([str(coef)] if coef != 1 or not names else []) + list(names)


class Notation:
    """Plain text with Unicode operators (x · W, a ⊙ b, Σ_batch, Wᵀ); `TexNotation` is LaTeX.
    The user of a notation supplies `formula` for elementwise nodes."""

    tex = False
    DOT, ODOT, TOP = " · ", " ⊙ ", "ᵀ"

    def formula(self, node: Node, args: Sequence[Shown]) -> Shown:
        """An elementwise node's SymPy formula over its written operands."""
        raise NotImplementedError(f"{type(self).__name__} does not print elementwise formulas")

    def group(self, text: str) -> str:
        return f"({text})"

    def at_least(self, shown: Shown, level: int) -> str:
        """An operand's text, in parentheses when it binds looser than `level`."""
        text, prec = shown
        return text if prec >= level else self.group(text)

    def call(self, name: str, *args: str) -> str:
        return f"{name}({', '.join(args)})"

    def product(self, a: str, b: str) -> str:
        return a + self.DOT + b

    def side(self, shown: Shown, transposed: bool) -> str:
        """A matrix product's operand, transposed (ᵀ) or not."""
        if transposed:
            return self.at_least(shown, ATOM) + self.TOP
        return self.at_least(shown, MUL + 1)

    def label(self, text: object) -> str:
        """A name or dimension set upright in a subscript (as is, in text)."""
        return str(text)

    @staticmethod
    def axes(x: Node, axes: Sequence[int]) -> list[str]:
        """Labels of x's axes: a named dim by its name, others as axisK."""
        return [str(x.shape[a]) if isinstance(x.shape[a], str) else f"axis{a}" for a in axes]

    def reduction(self, head: str, labels: Sequence[str], operand: str) -> str:
        """head_{labels} operand (Σ_batch x, mean x)."""
        return head + ("_" + ",".join(labels) if labels else "") + " " + operand

    def rows(self, shape: Sequence[object]) -> str:
        """The row count of a batch of labels, e.g. batch or T·batch."""
        return "·".join(row_factors(shape))

    def fraction(self, num: str, den: str) -> Shown:
        return f"({num}) / {den}", MUL


class TexNotation(Notation):
    """LaTeX: \\cdot, \\odot, ^\\top, \\operatorname{name}(...)."""

    tex = True
    DOT, ODOT, TOP = r" \cdot ", r" \odot ", r"^\top"

    def group(self, text: str) -> str:
        return rf"\left({text}\right)"

    def call(self, name: str, *args: str) -> str:
        return rf"\operatorname{{{tex_escape(name)}}}({', '.join(args)})"

    def label(self, dim: object) -> str:
        return rf"\mathrm{{{tex_escape(str(dim))}}}"

    def reduction(self, head: str, labels: Sequence[str], operand: str) -> str:
        tex_head = {"Σ": r"\sum", "mean": r"\operatorname{mean}"}.get(head, rf"\operatorname{{{head}}}")
        sub = "_{" + ",".join(self.label(s) for s in labels) + "}" if labels else ""
        return f"{tex_head}{sub} {operand}"

    def rows(self, shape: Sequence[object]) -> str:
        factors = row_factors(shape)
        return r" \cdot ".join(rf"N_{{\mathrm{{{tex_escape(d)}}}}}" if not d.isdigit() else d for d in factors)

    def fraction(self, num: str, den: str) -> Shown:
        return rf"\frac{{{num}}}{{{den}}}", ATOM


# --- rules several ops share -------------------------------------------------------------------

def called(name: str | None = None) -> Display:
    """The rule `name(operands...)`: for ops a person writes as a function (defaults to the op's name)."""
    def rule(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
        return n.call(name or node.op, *(a for a, _ in args)), ATOM
    return rule


def leaf(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """Inputs and parameters: their names."""
    return n.label(node.attrs["name"]), ATOM
