"""Reverse-mode differentiation on the graph: the backward graph is made of ordinary nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..ir.graph import FLOAT, Node, topo_order
from ..ops import core as ops


def grad(loss: Node, wrt: Sequence[Node]) -> list[Node]:
    """d loss / d w for each w in `wrt`, as graph nodes (zeros where w does not reach loss).

    One VJP rule per op (`ops.OPS`); gradients of a value used several times are summed.
    """
    if loss.shape != ():
        raise ValueError(f"grad needs a scalar loss, got shape {loss.shape}")
    cot = cotangents(loss, wrt)
    return [cot.get(w, ops.const(0.0, w.shape)) for w in wrt]


def cotangents(loss: Node, wrt: Sequence[Node], seed: Node | None = None) -> dict[Node, Node]:
    """The gradient of `loss` with respect to every node between it and `wrt` that receives one:
    the one reverse sweep behind `grad`, also read by `bpcompile show --grad` to display it.
    `seed` is the cotangent of `loss` itself (1 for a scalar loss)."""
    order = topo_order([loss])
    needed = _nodes_between(order, set(wrt))
    cot: dict[Node, Node] = {loss: ops.const(1.0) if seed is None else seed}
    for node in reversed(order):
        g = cot.get(node)
        if g is None or not node.inputs or node not in needed:
            continue
        for x, gx in zip(node.inputs, _input_grads(node, g)):
            if gx is not None and x in needed:
                cot[x] = gx if x not in cot else ops.add(cot[x], gx)
    return cot


def vjp_of(y: Node, wrt: Sequence[Node], seed: Node) -> list[Node | None]:
    """seed · dy/dw for each w in `wrt` (None where y does not depend on w)."""
    cot = cotangents(y, wrt, seed)
    return [cot.get(w) for w in wrt]


def _input_grads(node: Node, g: Node) -> list[Node | None]:
    """`node`'s VJP rule applied to its cotangent `g`, checked: one gradient per input, each of
    its input's shape. A fused backward node with an expansion is differentiated through it."""
    expand = ops.OPS[node.op].expand
    grads = _expanded_grads(node, expand, g) if expand is not None else ops.OPS[node.op].vjp(node, g)
    if len(grads) != len(node.inputs):
        raise AssertionError(f"VJP of {node.op} returned {len(grads)} gradients for {len(node.inputs)} inputs")
    for x, gx in zip(node.inputs, grads):
        if gx is not None and gx.shape != x.shape:
            raise AssertionError(f"VJP of {node.op}: gradient shape {gx.shape} != input shape {x.shape}")
    return grads


def _expanded_grads(node: Node, expand: Callable[[Node], Node], g: Node) -> list[Node | None]:
    """The VJP of a node through its expansion: each input's whole gradient, given once where an
    input appears several times (the sweep sums what each position gets)."""
    grads = vjp_of(expand(node), node.inputs, g)
    first = {x: i for i, x in reversed(list(enumerate(node.inputs)))}
    return [gx if first[x] == i else None for i, (x, gx) in enumerate(zip(node.inputs, grads))]


def _nodes_between(order: list[Node], targets: set[Node]) -> set[Node]:
    """The nodes of `order` that depend on a target (only they need a gradient)."""
    reach: set[Node] = set()
    for node in order:
        if node in targets or (node.dtype == FLOAT and any(x in reach for x in node.inputs)):
            reach.add(node)
    return reach
