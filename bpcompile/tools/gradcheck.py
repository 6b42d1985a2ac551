"""Gradient checking, shared by `bpcompile check`, the test suite and the random-graph fuzzer:
random inputs for a model, central finite differences of its loss, and the comparison of its
compiled gradients with the NumPy reference interpreter and with finite differences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..ir.graph import Graph, Shape

if TYPE_CHECKING:
    from ..runtime.model import CompiledModel

# How an input's random data is drawn: ("normal",), ("positive",) uniform in [0.5, 2),
# ("unit",) uniform in [0, 1), or ("labels", classes) integers in [0, classes).
InputKind = tuple


def random_array(shape: tuple[int, ...], kind: InputKind, rng: np.random.Generator, dtype: Any) -> np.ndarray:
    """One input's random data, drawn as `kind` says (labels are int32, the rest `dtype`)."""
    if kind[0] == "labels":
        return rng.integers(0, kind[1], size=shape).astype(np.int32)
    if kind[0] == "positive":
        return rng.uniform(0.5, 2.0, size=shape).astype(dtype)
    if kind[0] == "unit":
        return rng.uniform(0.0, 1.0, size=shape).astype(dtype)
    if kind[0] == "normal":
        return rng.normal(size=shape).astype(dtype)
    raise ValueError(f"unknown input kind {kind!r}: expected normal, positive, unit or labels")


def random_inputs(shapes: Mapping[str, Shape], kinds: Mapping[str, InputKind], dims: Mapping[str, int],
                  rng: np.random.Generator, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """Random data for each named input of the given shape, its named dims sized by `dims`;
    drawn in the order of `shapes`, so a seed gives the same data wherever it is used."""
    out = {}
    for name, shape in shapes.items():
        concrete = tuple(dims[d] if isinstance(d, str) else d for d in shape)
        out[name] = random_array(concrete, kinds[name], rng, dtype)
    return out


def graph_inputs(graph: Graph, batch: int, rng: np.random.Generator, positive: bool = False,
                 classes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random float64 data for a graph's inputs, every named dim `batch`: normal floats (or in
    [0.5, 2) with `positive`), labels below `classes[name]` (default 2)."""
    kinds = {name: ("labels", (classes or {}).get(name, 2)) if node.dtype == "int32"
             else ("positive",) if positive else ("normal",) for name, node in graph.inputs.items()}
    dims = {d: batch for node in graph.inputs.values() for d in node.shape if isinstance(d, str)}
    return random_inputs({name: node.shape for name, node in graph.inputs.items()}, kinds, dims, rng)


def directional_fd(model: CompiledModel, inputs: dict, direction: dict[str, np.ndarray],
                   eps: float = 1e-6, loss: str | None = None) -> float:
    """(L(p + eps d) - L(p - eps d)) / (2 eps) for the parameters named in `direction`,
    restoring them afterwards."""
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


def fd_errors(model: CompiledModel, loss: str, inputs: dict, pname: str, g: np.ndarray,
              rng: np.random.Generator, samples: int, eps: float, floor: float) -> tuple[float, str]:
    """Max relative error of the gradient `g` of one parameter against central differences at
    `samples` sampled elements and along one random unit direction, and what was checked."""
    view = model.params[pname]
    flat = view.reshape(-1)
    saved = view.copy()
    worst = 0.0
    picks = rng.choice(flat.size, size=min(samples, flat.size), replace=False) if flat.size else []
    try:
        for i in picks:
            h = eps * max(1.0, abs(float(saved.reshape(-1)[i])))
            flat[i] = saved.reshape(-1)[i] + h
            plus = model.loss(loss=loss, **inputs)
            flat[i] = saved.reshape(-1)[i] - h
            minus = model.loss(loss=loss, **inputs)
            flat[i] = saved.reshape(-1)[i]
            numeric, analytic = (plus - minus) / (2 * h), float(g.reshape(-1)[i])
            worst = max(worst, abs(numeric - analytic) / max(abs(numeric), abs(analytic), floor))
    finally:
        view[...] = saved
    direction = rng.normal(size=view.shape)
    direction /= max(float(np.linalg.norm(direction)), 1e-300)
    h = eps * max(1.0, float(np.max(np.abs(saved), initial=0)))
    numeric = directional_fd(model, inputs, {pname: direction}, eps=h, loss=loss)
    analytic = float(np.sum(g * direction))
    worst = max(worst, abs(numeric - analytic) / max(abs(numeric), abs(analytic), floor))
    return worst, f"{len(picks)} + 1 dir."


def check_model_gradients(model64: CompiledModel, graph: Graph, inputs: dict, seed: int = 0,
                          fd_tol: float = 1e-6, loss: str | None = None) -> dict[str, np.ndarray]:
    """Check that a float64 model's loss and gradients equal the NumPy reference's and agree with
    central differences along a random direction; AssertionError if not. Returns the gradients."""
    from ..ops import reference  # here: the CLI imports this module, and its light commands need no SymPy
    rng = np.random.default_rng(seed)
    value, grads = model64.loss_and_grad(loss=loss, **inputs)
    ref_value, ref_grads = reference.loss_and_grad(graph, inputs, model64.params, loss=loss or "loss")
    np.testing.assert_allclose(value, ref_value, rtol=1e-10, atol=1e-12)
    if set(grads) != set(ref_grads):
        raise AssertionError(f"gradients of {sorted(grads)}, the reference has {sorted(ref_grads)}")
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-9, atol=1e-11, err_msg=f"gradient of {k}")
    direction = {k: rng.normal(size=v.shape) for k, v in grads.items()}
    fd = directional_fd(model64, inputs, direction, loss=loss)
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in grads)
    if abs(fd - analytic) > fd_tol * max(1.0, abs(fd), abs(analytic)):
        raise AssertionError(f"finite differences {fd} vs gradient {analytic}")
    return grads
