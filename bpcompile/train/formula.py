"""The scalar math of optimizer hyperparameters and learning-rate schedules, written once for two
readers. A formula is a Python function of the step, the learning rate and a namespace `m`
giving its functions (`m.cos`, `m.min`, `m.where`, ...): called with `NUMERIC` it computes a
float without SymPy (the runtime's learning rate and running products, each training step);
called with `symbolic()` on SymPy symbols it gives the SymPy expression that the C printer
prints (an update kernel's hyperparameters, the exported library's schedule). The two readers
cannot drift apart, because there is one formula.

Running products over steps (NAdam's mu_1 ... mu_t) are `m.product(name, factor, step)`: the
numeric namespace multiplies them in step order, carried from step to step in a cache that
restarts when the step goes back (a load); the symbolic one returns a symbol `name` (an entry of
the update's hyper array) and keeps the factor's expression, for the C library to carry the same
product from step to step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

PRODUCTS_KEPT = 4  # (step, product) pairs a running product keeps


class Numeric:
    """Formulas evaluated as Python floats (the runtime's per-step learning rate and products)."""

    pi = math.pi
    cos = staticmethod(math.cos)
    sqrt = staticmethod(math.sqrt)
    min = staticmethod(min)

    @staticmethod
    def floor_div(a: int, b: int) -> int:
        return a // b

    @staticmethod
    def where(condition: bool, then: float, otherwise: float) -> float:
        return then if condition else otherwise

    @staticmethod
    def product(cache: dict[str, tuple[tuple[int, float], ...]], name: str, factor: Callable[[Any, Any], Any],
                step: int) -> float:
        """factor(1) * ... * factor(step), multiplied in step order (the same float whatever the
        start). `cache[name]` holds the latest few (step, product) pairs: this continues the
        latest one not past `step`, so a run costs one factor a step, and so do losses that
        share one optimizer with step counts of their own."""
        known = cache.get(name, ())
        if known and known[0][0] == step - 1:  # the latest, one step back: a count stepping on
            value = known[0][1] * factor(step, NUMERIC)
            cache[name] = ((step, value), *known[1:])
            return value
        start = max((e for e in known if e[0] <= step), default=(0, 1.0))
        done, value = start
        if done == step:
            return value
        for k in range(done + 1, step + 1):
            value *= factor(k, NUMERIC)
        cache[name] = ((step, value), *(e for e in known if e is not start))[:PRODUCTS_KEPT]
        return value


NUMERIC = Numeric()


class Symbolic:
    """Formulas as SymPy expressions of the symbols `step` (an integer from 1) and `lr`."""

    def __init__(self) -> None:
        import sympy as sp
        self.sp = sp
        self.step = sp.Symbol("step", integer=True, positive=True)
        self.lr = sp.Symbol("lr", positive=True)
        self.pi, self.cos, self.sqrt = sp.pi, sp.cos, sp.sqrt
        self.min = sp.Min
        self.products: dict[str, Any] = {}  # name -> its factor as an expression of `step`

    def floor_div(self, a: Any, b: int) -> Any:
        return self.sp.floor(a / b)

    def where(self, condition: Any, then: Any, otherwise: Any) -> Any:
        if condition is True or condition is False:
            return then if condition else otherwise
        return self.sp.Piecewise((then, condition), (otherwise, True))

    def product(self, cache: Any, name: str, factor: Callable[[Any, Any], Any], step: Any) -> Any:
        """The symbol `name`: the product of factor(k) over k = 1 .. step (see self.products)."""
        if step != self.step:
            raise ValueError(f"running product {name!r} is only defined at the current step")
        self.products[name] = self.sp.sympify(factor(self.step, self))
        return self.sp.Symbol(name, positive=True)


def symbolic() -> Symbolic:
    """A fresh symbolic namespace (imports SymPy; for code generation only)."""
    return Symbolic()
