"""Dropout: an elementwise mask from the model's counter-based generator in training calls, the
identity in `forward` (a graph op inside `ops.mode_select`)."""

from __future__ import annotations

import sympy as sp

from ..ir import graph as ir
from ..ir.graph import Node
from ..symbolic.functions import ARGS, Fn
from .core import _check_tensor, _need_float, ew, mode_select, random_uniform

__all__ = ["dropout"]


def dropout(x: Node, p: float, salt: int = 0) -> Node:
    """Zero each element with probability p and scale the rest by 1/(1-p) in training calls
    (loss, loss_and_grad, train_step); the identity in `forward`. The mask comes from the
    model's counter-based generator (model seed, step, and a salt from what `x` computes plus
    `salt`), so a run is reproducible; pass different salts to drop one tensor twice
    independently."""
    _need_float(_check_tensor(x, "dropout"), "dropout")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    u = random_uniform(x.shape, (ir.structural_hash(x) ^ (int(salt) * 0x9E3779B1)) & 0xFFFFFFFF)
    keep = sp.Piecewise((ARGS[0] * sp.Float(1.0 / (1.0 - p)), ARGS[1] >= sp.Float(p)), (0, True))
    return mode_select(ew(Fn("dropout", keep, 2), x, u), x)
