"""Dims and shapes as plain values: a dim is an int (fixed) or a str (a runtime size such as
"batch", or a product of such sizes made by a reshape, in one canonical form: the fixed factor
first, then the names sorted, joined by "*": "8*batch", "T*batch"). Pure Python with no
imports of bpcompile: the graph IR and the runtime (which sizes outputs) both read it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Union

Dim = Union[int, str]
Shape = tuple[Dim, ...]

PRODUCT = "*"  # joins the factors of a product dim
_DIGITS = re.compile(r"[0-9]+")


def dim_factors(d: Dim) -> tuple[int, tuple[str, ...]]:
    """One dim as (fixed factor, sorted named factors): "8*T*batch" -> (8, ("T", "batch"))."""
    if isinstance(d, int):
        return d, ()
    coef, names = 1, []
    for part in d.split(PRODUCT):
        if _DIGITS.fullmatch(part):
            coef *= int(part)
        else:
            names.append(part)
    return coef, tuple(sorted(names))


def size_factors(shape: Iterable[Dim]) -> tuple[int, tuple[str, ...]]:
    """The element count of a shape as (fixed factor, sorted named factors)."""
    coef, names = 1, []
    for d in shape:
        c, n = dim_factors(d)
        coef *= c
        names.extend(n)
    return coef, tuple(sorted(names))


def product_dim(coef: int, names: Iterable[str]) -> Dim:
    """The canonical dim of coef * product(names): an int, a plain name, or e.g. "8*T*batch"."""
    names = sorted(names)
    if not names:
        return coef
    if coef == 1 and len(names) == 1:
        return names[0]
    return PRODUCT.join(([str(coef)] if coef != 1 else []) + names)


def canonical_dim(d: Dim) -> Dim:
    """A dim in canonical form ("batch*T" -> "T*batch", "1*batch" -> "batch", "2*3" -> 6)."""
    return d if isinstance(d, int) else product_dim(*dim_factors(d))


def named_dims(shape: Iterable[Dim]) -> set[str]:
    """The runtime names a shape's size depends on (the factors of its product dims too)."""
    return set(size_factors(shape)[1])


def dim_size(d: Dim, dims: Mapping[str, int]) -> int:
    """A dim's size given the runtime sizes of the named dims."""
    coef, names = dim_factors(d)
    for n in names:
        coef *= dims[n]
    return coef
