"""Parameter initializers, by name: the spec is checked when a parameter is declared."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Init = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out): (in, out) matrices as used by `x @ W`; PyTorch's layout beyond 2-D."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def _glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in, fan_out = fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape)


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in, _ = fans(shape)
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)


INITIALIZERS: dict[str, Init] = {
    "zeros": lambda rng, shape: np.zeros(shape),
    "ones": lambda rng, shape: np.ones(shape),
    "normal": lambda rng, shape: rng.normal(0.0, 0.05, shape),
    "uniform": lambda rng, shape: rng.uniform(-0.05, 0.05, shape),
    "glorot_uniform": _glorot_uniform,
    "he_normal": _he_normal,
}


def check_init(init: Any, shape: tuple[int, ...], name: str) -> Any:
    """Return a valid init spec (a name or an array of the right shape) or raise ValueError."""
    if init is None:
        return "zeros" if len(shape) <= 1 else "glorot_uniform"
    if isinstance(init, str):
        if init not in INITIALIZERS:
            raise ValueError(f"parameter {name!r}: unknown init {init!r}; expected one of {sorted(INITIALIZERS)} "
                             "or an ndarray")
        return init
    array = np.asarray(init)
    if array.dtype.kind not in "fiub" or array.shape != shape:
        raise ValueError(f"parameter {name!r}: init array must be numeric with shape {shape}, "
                         f"got {array.dtype} {array.shape}")
    return array.astype(np.float64)


def initial_value(init: Any, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw a parameter's starting value (float64) from its spec."""
    if isinstance(init, str):
        return np.asarray(INITIALIZERS[init](rng, shape), dtype=np.float64)
    return np.array(init, dtype=np.float64)
