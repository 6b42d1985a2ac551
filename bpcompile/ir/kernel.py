"""The kernel IR that the scheduler hands to code generation, and its size algebra.

A `Kernel` is one generated C function call: the graph nodes it computes, what it reads and
writes. Sizes and strides are `Mono`s, products of a constant and runtime dims, so that kernel
builders (the op families' included) compute index expressions without knowing the C printer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .graph import Node, Shape, size_factors


@dataclass
class Kernel:
    """One generated C function call: the nodes it computes, what it reads and writes."""

    kind: str
    nodes: list[Node]
    inputs: list[Node]
    outputs: list[Node]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mono:
    """coef * product(dims): a size or stride that may involve runtime dims."""

    coef: int
    dims: tuple[str, ...] = ()

    def __mul__(self, other: Mono) -> Mono:
        return Mono(self.coef * other.coef, tuple(sorted(self.dims + other.dims)))

    @staticmethod
    def of(shape: Shape) -> Mono:
        coef, dims = size_factors(shape)
        return Mono(coef, dims)


def packed_strides(sizes: list[Mono]) -> list[Mono]:
    """Row-major strides of a contiguous array with these dim sizes."""
    strides, acc = [], Mono(1)
    for size in reversed(sizes):
        strides.append(acc)
        acc = acc * size
    return list(reversed(strides))


def contiguous_strides(shape: Shape) -> list[Mono]:
    return packed_strides([Mono.of((d,)) for d in shape])


def broadcast_strides(shape: Shape, out_shape: Shape) -> list[Mono]:
    """Strides of `shape` read as if broadcast to `out_shape` (0 where it is broadcast)."""
    lead = len(out_shape) - len(shape)
    own = contiguous_strides(shape)
    out = []
    for i, d in enumerate(out_shape):
        j = i - lead
        out.append(Mono(0) if j < 0 or (shape[j] == 1 and d != 1) else own[j])
    return out


def coalesce(sizes: list[Mono], strides: list[list[Mono]]) -> tuple[list[Mono], list[list[Mono]]]:
    """Merge adjacent loop dims that every operand walks contiguously; drop size-1 dims."""
    keep = [i for i, s in enumerate(sizes) if s != Mono(1)]
    sizes = [sizes[i] for i in keep]
    strides = [[st[i] for i in keep] for st in strides]
    d = len(sizes) - 2
    while d >= 0:
        if all(st[d] == st[d + 1] * sizes[d + 1] or (st[d].coef == 0 and st[d + 1].coef == 0) for st in strides):
            sizes[d:d + 2] = [sizes[d] * sizes[d + 1]]
            for st in strides:
                st[d:d + 2] = [st[d + 1]]
        d -= 1
    return sizes, strides
