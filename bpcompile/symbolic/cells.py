"""Recurrent cells as scalar programs differentiated by SymPy: `Cell` runs reverse mode over a
small program of `symbolic.Fn` steps, every partial from `Fn.partial` (sigmoid' = y(1-y),
tanh' = 1-y^2 in the stored outputs); the LSTM, GRU and tanh RNN cells are such programs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy as sp

from . import functions as sym
from .functions import ARGS, OUT, Fn

__all__ = ["Cell", "lstm_cell", "gru_cell", "rnn_cell"]


class Cell:
    """A recurrent cell as a small program of scalar `Fn` steps.

    `forward(outputs)` gives each output as one SymPy expression of the leaves (for printing
    after CSE); `backward(seeds, wrt, stored)` runs reverse mode over the steps: each step's
    partials are `Fn.partial` (derived and simplified by SymPy, in terms of the step's own
    output where cheaper), evaluated with the values the backward kernel has (`stored`).
    """

    def __init__(self) -> None:
        self.steps: list[tuple[sp.Symbol, Fn, tuple[sp.Expr, ...]]] = []
        self.defs: dict[sp.Symbol, tuple[Fn, tuple[sp.Expr, ...]]] = {}

    @staticmethod
    def leaf(name: str) -> sp.Symbol:
        return sp.Symbol(f"s_{name}", real=True)

    def __call__(self, name: str, op: str, *args: Any) -> sp.Symbol:
        fn = sym.builtin(op)
        out = self.leaf(name)
        args_ = tuple(sp.sympify(a) for a in args)
        for a in args_:
            if not (a.is_Symbol or a.is_Number):
                raise ValueError(f"cell step {name}: arguments must be symbols or numbers, got {a}")
        self.steps.append((out, fn, args_))
        self.defs[out] = (fn, args_)
        return out

    def expr(self, s: sp.Expr) -> sp.Expr:
        if s in self.defs:
            fn, args = self.defs[s]
            return fn.expr.xreplace({ARGS[k]: self.expr(a) for k, a in enumerate(args)})
        return s

    def value(self, s: sp.Expr, stored: set[sp.Symbol]) -> sp.Expr:
        """`s` in terms of the stored values (recomputing steps that are not stored)."""
        if s.is_Number or s in stored:
            return s
        if s not in self.defs:
            raise ValueError(f"cell: the backward pass needs {s}, which is neither stored nor computable")
        fn, args = self.defs[s]
        return fn.expr.xreplace({ARGS[k]: self.value(a, stored) for k, a in enumerate(args)})

    def backward(self, seeds: dict[sp.Symbol, sp.Expr], wrt: Sequence[sp.Symbol],
                 stored: set[sp.Symbol]) -> list[sp.Expr]:
        adj: dict[sp.Symbol, sp.Expr] = dict(seeds)
        for out, fn, args in reversed(self.steps):
            a = adj.get(out)
            if a is None:
                continue
            for k, arg in enumerate(args):
                if arg.is_Number:
                    continue
                partial = fn.partial(k).expr
                subs = {}
                for s in partial.free_symbols:
                    if s == OUT:
                        subs[s] = self.value(out, stored)
                    elif s in ARGS[:fn.nargs]:
                        subs[s] = self.value(args[ARGS.index(s)], stored)
                term = a * partial.xreplace(subs)
                adj[arg] = term if arg not in adj else adj[arg] + term
        return [adj.get(w, sp.Integer(0)) for w in wrt]


def lstm_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    """PyTorch's LSTM cell (gates i, f, g, o) and its symbols by name."""
    c = Cell()
    L = Cell.leaf
    xi, xf, xg, xo, hi, hf, hg, ho, cp = (L(n) for n in ("xi", "xf", "xg", "xo", "hi", "hf", "hg", "ho", "cp"))
    ai, af, ag, ao = c("ai", "add", xi, hi), c("af", "add", xf, hf), c("ag", "add", xg, hg), c("ao", "add", xo, ho)
    i, f, g, o = c("i", "sigmoid", ai), c("f", "sigmoid", af), c("g", "tanh", ag), c("o", "sigmoid", ao)
    cell = c("c", "add", c("fc", "mul", f, cp), c("ig", "mul", i, g))
    h = c("h", "mul", o, c("tc", "tanh", cell))
    return c, {"xi": xi, "xf": xf, "xg": xg, "xo": xo, "hi": hi, "hf": hf, "hg": hg, "ho": ho, "cp": cp,
               "ai": ai, "af": af, "ag": ag, "ao": ao, "i": i, "f": f, "g": g, "o": o, "c": cell, "h": h}


def gru_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    """PyTorch's GRU cell (gates r, z, n; b_hh's n part inside r * (...)) and its symbols by name."""
    c = Cell()
    L = Cell.leaf
    xr, xz, xn, hr, hz, hnr, br, bz, bn, hp = (L(n) for n in ("xr", "xz", "xn", "hr", "hz", "hnr", "br", "bz", "bn",
                                                            "hp"))
    ar = c("ar", "add", c("ar0", "add", xr, hr), br)
    az = c("az", "add", c("az0", "add", xz, hz), bz)
    r, z = c("r", "sigmoid", ar), c("z", "sigmoid", az)
    hn = c("hn", "add", hnr, bn)
    n = c("n", "tanh", c("an", "add", xn, c("rhn", "mul", r, hn)))
    h = c("h", "add", c("zn", "mul", c("omz", "sub", 1, z), n), c("zh", "mul", z, hp))
    return c, {"xr": xr, "xz": xz, "xn": xn, "hr": hr, "hz": hz, "hnr": hnr, "br": br, "bz": bz, "bn": bn,
               "hp": hp, "ar": ar, "az": az, "r": r, "z": z, "hn": hn, "n": n, "h": h}


def rnn_cell() -> tuple[Cell, dict[str, sp.Symbol]]:
    """The tanh RNN cell, h = tanh(x + hh), and its symbols by name."""
    c = Cell()
    x, hh = Cell.leaf("x"), Cell.leaf("hh")
    a = c("a", "add", x, hh)
    h = c("h", "tanh", a)
    return c, {"x": x, "hh": hh, "a": a, "h": h}
