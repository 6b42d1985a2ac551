"""Scalar functions as SymPy expressions: the elementwise functions (`Fn`) with their
SymPy-derived partial derivatives, the built-in activations, and the symbols that stand for
arguments, outputs and runtime dimensions. Ops, autodiff and codegen read them."""

from .functions import (
    ARGS,
    BUILTIN,
    OUT,
    Fn,
    Partial,
    builtin,
    cost,
    dim_name,
    dim_symbol,
    is_dim_symbol,
    make_fn,
)

__all__ = ["ARGS", "BUILTIN", "OUT", "Fn", "Partial", "builtin", "cost", "dim_name", "dim_symbol", "is_dim_symbol",
           "make_fn"]
