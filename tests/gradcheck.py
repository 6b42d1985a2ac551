"""Gradient checks used across the tests: compiled vs the NumPy reference interpreter, and
compiled gradients vs float64 central finite differences along a random direction."""

from __future__ import annotations

import numpy as np

import bpcompile as bp


def random_inputs(graph: bp.Graph, batch: int, rng: np.random.Generator, positive: bool = False,
                  classes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    out = {}
    for name, node in graph.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in node.shape)
        if node.dtype == "int32":
            out[name] = rng.integers(0, (classes or {}).get(name, 2), size=shape).astype(np.int32)
        elif positive:
            out[name] = rng.uniform(0.5, 2.0, size=shape)
        else:
            out[name] = rng.normal(size=shape)
    return out


def directional_fd(model: bp.CompiledModel, inputs: dict, direction: dict[str, np.ndarray],
                   eps: float = 1e-6, loss: str | None = None) -> float:
    """(L(p + eps d) - L(p - eps d)) / (2 eps), restoring p afterwards."""
    saved = {k: v.copy() for k, v in model.params.items()}
    try:
        for k in direction:
            model.params[k][...] = saved[k] + eps * direction[k]
        plus = model.loss(loss=loss, **inputs)
        for k in direction:
            model.params[k][...] = saved[k] - eps * direction[k]
        minus = model.loss(loss=loss, **inputs)
    finally:
        for k, v in saved.items():
            model.params[k][...] = v
    return (plus - minus) / (2 * eps)


def check_model_gradients(model64: bp.CompiledModel, graph: bp.Graph, inputs: dict, seed: int = 0,
                          fd_tol: float = 1e-6, loss: str | None = None) -> dict[str, np.ndarray]:
    """Assert float64 compiled loss/grads equal the reference and agree with finite differences."""
    rng = np.random.default_rng(seed)
    value, grads = model64.loss_and_grad(loss=loss, **inputs)
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, model64.params, loss=loss or "loss")
    np.testing.assert_allclose(value, ref_value, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(ref_grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-9, atol=1e-11, err_msg=f"gradient of {k}")
    direction = {k: rng.normal(size=v.shape) for k, v in grads.items()}
    fd = directional_fd(model64, inputs, direction, loss=loss)
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in grads)
    scale = max(1.0, abs(fd), abs(analytic))
    assert abs(fd - analytic) <= fd_tol * scale, f"finite differences {fd} vs gradient {analytic}"
    return grads
