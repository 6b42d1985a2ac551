"""Batch normalization, made of graph ops inside `ops.mode_select`: batch statistics in training
calls, running statistics (non-trainable parameters updated through `Graph.update_state`) in
`forward`."""

from __future__ import annotations

import sympy as sp

from ..errors import ShapeError
from ..ir import graph as ir
from ..ir.graph import Node, shape_str
from ..symbolic.functions import ARGS, Fn
from .core import _check_tensor, _need_float, ew, mean, mode_select, reduced_count, reshape, square

__all__ = ["batch_norm"]


def batch_norm(x: Node, gamma: Node, beta: Node, momentum: float = 0.1, eps: float = 1e-5) -> Node:
    """Batch normalization of (N, C) or (N, C, H, W) over every axis but the channel axis 1.

    Training calls normalize with the batch mean and biased variance; `forward` uses the
    running statistics, non-trainable parameters "<gamma>.running_mean" / ".running_var"
    created on gamma's graph (zeros / ones) and updated by every train_step as PyTorch does:
    r <- (1 - momentum) r + momentum s, with the unbiased batch variance for running_var.
    Calling it again with the same gamma (a layer shared between two inputs) shares the
    running statistics; train_step then applies the update of the last call. Every train_*
    entry of a multi-loss graph applies the updates, so they must depend only on inputs that
    each such entry reads.
    """
    _need_float(_check_tensor(x, "batch_norm"), "batch_norm")
    _check_tensor(gamma, "batch_norm gamma")
    _check_tensor(beta, "batch_norm beta")
    if x.ndim not in (2, 4):
        raise ShapeError(f"batch_norm expects (N, C) or (N, C, H, W), got {shape_str(x.shape)}")
    c = x.shape[1]
    if not isinstance(c, int) or gamma.shape != (c,) or beta.shape != (c,):
        raise ShapeError(f"batch_norm: input {shape_str(x.shape)} needs gamma and beta of shape ({c},), got "
                         f"gamma {shape_str(gamma.shape)} and beta {shape_str(beta.shape)}")
    if not 0.0 <= float(momentum) <= 1.0 or float(eps) <= 0:
        raise ValueError(f"batch_norm: momentum must be in [0, 1] and eps > 0, got {momentum}, {eps}")
    graph = ir.graph_of(gamma)
    if graph is None:
        raise ValueError("batch_norm: gamma must depend on a parameter of a graph (the running statistics "
                         "are created on that graph)")
    base = gamma.attrs["name"] if gamma.op == "param" else f"batch_norm{ir.structural_hash(gamma):08x}"
    running = []
    for stat, init in (("running_mean", "zeros"), ("running_var", "ones")):
        name = f"{base}.{stat}"
        if name not in graph.params:
            graph.param(name, (c,), init=init, trainable=False)
        running.append(graph.params[name])
    rmean, rvar = running
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    bshape = (c,) if x.ndim == 2 else (c, 1, 1)
    g_b, b_b = reshape(gamma, bshape), reshape(beta, bshape)
    eps_ = sp.Float(float(eps))

    mu = mean(x, axes, keepdims=True)
    xc = x - mu
    sq = square(xc)
    var = mean(sq, axes, keepdims=True)
    inv_std = ew(Fn("rsqrt_eps", (ARGS[0] + eps_) ** sp.Rational(-1, 2), 1), var)
    train = xc * inv_std * g_b + b_b
    evaluate = ew(Fn("batch_norm_eval", (ARGS[0] - ARGS[1]) * (ARGS[2] + eps_) ** sp.Rational(-1, 2), 3),
                  x, reshape(rmean, bshape), reshape(rvar, bshape)) * g_b + b_b

    m = float(momentum)
    n = reduced_count(x.shape, axes)  # N*H*W as SymPy; N may be a runtime dim
    mom = sp.Float(m)
    new_mean = ew(Fn("running_update", (1 - mom) * ARGS[0] + mom * ARGS[1], 2), rmean, reshape(mu, (c,)))
    # the unbiased variance; the n/(n-1) factor is applied inside the (N, ...) loop, where the
    # runtime batch size is in scope (a batch of one sample leaves the variance 0, not NaN)
    var_u = mean(ew(Fn("unbiased", ARGS[0] * n / sp.Max(n - 1, 1), 1), sq), axes)
    new_var = ew(Fn("running_update", (1 - mom) * ARGS[0] + mom * ARGS[1], 2), rvar, var_u)
    graph.update_state(rmean.attrs["name"], new_mean)
    graph.update_state(rvar.attrs["name"], new_var)
    return mode_select(train, evaluate)
