"""SGD and Adam as pure functions over a dict of arrays, for NumPy and jax.numpy alike.

Adam follows PyTorch's formulation (betas 0.9/0.999, eps 1e-8, bias correction), so the
hand-written runners track torch.optim step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workloads import Optimizer

Arrays = dict[str, Any]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def init_state(opt: Optimizer, params: Arrays, zeros_like: Callable[[Any], Any]) -> Arrays:
    if opt.name == "sgd":
        return {}
    if opt.name == "adam":
        return {"t": 0, "m": {k: zeros_like(p) for k, p in params.items()},
                "v": {k: zeros_like(p) for k, p in params.items()}}
    raise ValueError(f"unknown optimizer {opt.name!r}")


def update(opt: Optimizer, params: Arrays, grads: Arrays, state: Arrays,
           sqrt: Callable[[Any], Any]) -> tuple[Arrays, Arrays]:
    """One optimizer step; returns new (params, state)."""
    if opt.name == "sgd":
        return {k: p - opt.lr * grads[k] for k, p in params.items()}, state
    t = state["t"] + 1
    m = {k: BETA1 * state["m"][k] + (1 - BETA1) * g for k, g in grads.items()}
    v = {k: BETA2 * state["v"][k] + (1 - BETA2) * g * g for k, g in grads.items()}
    step_size = opt.lr / (1 - BETA1**t)
    root_bc2 = (1 - BETA2**t) ** 0.5
    new = {k: p - step_size * m[k] / (sqrt(v[k]) / root_bc2 + EPS) for k, p in params.items()}
    return new, {"t": t, "m": m, "v": v}
