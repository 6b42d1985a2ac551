"""Optimizers, with PyTorch's update formulas, fused into the native train step.

An optimizer is data: its per-element state slots, the scalar hyperparameters it needs each
step (computed here in Python: learning rate, bias corrections), and its update written as
SymPy expressions of p, g, the slots and the hyperparameters. The code generator prints those
expressions into one loop over the flat parameter buffer. This module imports SymPy only when
an update is generated, so a built model loads without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .schedules import Schedule, as_schedule, schedule_from_config

Exprs = Any  # sympy expressions (SymPy is imported lazily)


class Optimizer:
    """Base class: subclasses set `kind`, `slots` and implement `hyper` and `update`."""

    kind = ""
    slots: tuple[str, ...] = ()
    step_dependent = False  # whether hyper() changes with the step at a fixed learning rate

    def __init__(self, lr: float | Schedule | Callable[[int], float], weight_decay: float = 0.0,
                 clip_norm: float | None = None):
        self.lr = as_schedule(lr)
        self.weight_decay = _non_negative(weight_decay, "weight_decay")
        if clip_norm is not None and not (isinstance(clip_norm, int | float) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
        self.clip_norm = None if clip_norm is None else float(clip_norm)

    # --- what the generated code needs ---------------------------------------------------
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(self.hyper(1, 1.0))

    def hyper(self, step: int, lr: float) -> dict[str, float]:
        """Scalar hyperparameters of step `step` (counted from 1), passed to C each call."""
        return {"lr": lr}

    def update(self, p, g, state: dict, h: dict) -> tuple[Exprs, dict]:
        """(new p, {slot: new value}) as SymPy expressions."""
        raise NotImplementedError

    def regularized(self, p, g):
        """The gradient with L2 weight decay folded in (PyTorch's weight_decay for SGD/Adam/RMSprop)."""
        return g + self.weight_decay * p if self.weight_decay else g

    # --- description and persistence -----------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = {"kind": self.kind, "lr": self.lr.config(), "weight_decay": self.weight_decay,
               "clip_norm": self.clip_norm}
        cfg.update(self._settings())
        return cfg

    def _settings(self) -> dict[str, Any]:
        return {}

    def lr_at(self, step: int) -> float:
        return float(self.lr(step))

    def describe(self) -> str:
        """The settings that shape the generated update (not the learning rate, a runtime value)."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("kind", "lr"))
        return f"{type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe().replace("(", f"(lr={self.lr.config()!r}, ", 1)


def _non_negative(value: float, name: str) -> float:
    if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _unit(value: float, name: str) -> float:
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class SGD(Optimizer):
    """p -= lr * d, with d = g (+ momentum buffer, Nesterov), as torch.optim.SGD."""

    kind = "sgd"

    def __init__(self, lr: Any = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 clip_norm: float | None = None, dampening: float = 0.0):
        super().__init__(lr, weight_decay, clip_norm)
        self.momentum = _non_negative(momentum, "momentum")
        self.dampening = _non_negative(dampening, "dampening")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        self.slots = ("buf",) if self.momentum else ()
        self.step_dependent = bool(self.momentum)  # the first step starts the buffer

    def hyper(self, step: int, lr: float) -> dict[str, float]:
        if not self.momentum:
            return {"lr": lr}
        first = step <= 1  # PyTorch starts the buffer at the first gradient, undamped
        return {"lr": lr, "mom": 0.0 if first else self.momentum, "damp": 1.0 if first else 1.0 - self.dampening}

    def update(self, p, g, state, h):
        g = self.regularized(p, g)
        if not self.momentum:
            return p - h["lr"] * g, {}
        buf = h["mom"] * state["buf"] + h["damp"] * g
        direction = g + self.momentum * buf if self.nesterov else buf
        return p - h["lr"] * direction, {"buf": buf}

    def _settings(self):
        return {"momentum": self.momentum, "nesterov": self.nesterov, "dampening": self.dampening}


class Adam(Optimizer):
    """Adam with bias correction, as torch.optim.Adam (weight_decay is L2 added to g)."""

    kind = "adam"
    slots = ("m", "v")
    decoupled = False
    step_dependent = True  # bias corrections

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float | None = None):
        super().__init__(lr, weight_decay, clip_norm)
        self.betas = (_unit(betas[0], "betas[0]"), _unit(betas[1], "betas[1]"))
        self.eps = _non_negative(eps, "eps")

    def hyper(self, step: int, lr: float) -> dict[str, float]:
        b1, b2 = self.betas
        h = {"lr": lr, "step_size": lr / (1 - b1**step), "sqrt_bc2": math.sqrt(1 - b2**step)}
        if self.decoupled:
            h["decay"] = 1 - lr * self.weight_decay
        return h

    def update(self, p, g, state, h):
        import sympy as sp
        b1, b2 = self.betas
        if self.decoupled:
            p = p * h["decay"]
        else:
            g = self.regularized(p, g)
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g**2
        return p - h["step_size"] * m / (sp.sqrt(v) / h["sqrt_bc2"] + self.eps), {"m": m, "v": v}

    def _settings(self):
        return {"betas": list(self.betas), "eps": self.eps}


class AdamW(Adam):
    """Adam with decoupled weight decay p *= 1 - lr * wd, as torch.optim.AdamW."""

    kind = "adamw"
    decoupled = True

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, clip_norm: float | None = None):
        super().__init__(lr, betas, eps, weight_decay, clip_norm)


class RMSprop(Optimizer):
    """v = alpha v + (1-alpha) g^2; p -= lr g / (sqrt(v) + eps), optional momentum; as torch.optim.RMSprop."""

    kind = "rmsprop"

    def __init__(self, lr: Any = 1e-2, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0, clip_norm: float | None = None):
        super().__init__(lr, weight_decay, clip_norm)
        self.alpha = _unit(alpha, "alpha")
        self.eps = _non_negative(eps, "eps")
        self.momentum = _non_negative(momentum, "momentum")
        self.slots = ("v", "buf") if self.momentum else ("v",)

    def update(self, p, g, state, h):
        import sympy as sp
        g = self.regularized(p, g)
        v = self.alpha * state["v"] + (1 - self.alpha) * g**2
        step = g / (sp.sqrt(v) + self.eps)
        if not self.momentum:
            return p - h["lr"] * step, {"v": v}
        buf = self.momentum * state["buf"] + step
        return p - h["lr"] * buf, {"v": v, "buf": buf}

    def _settings(self):
        return {"alpha": self.alpha, "eps": self.eps, "momentum": self.momentum}


OPTIMIZERS: dict[str, type[Optimizer]] = {c.kind: c for c in (SGD, Adam, AdamW, RMSprop)}


def from_config(cfg: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from `Optimizer.config()` (as stored beside a built model)."""
    cfg = dict(cfg)
    cls = OPTIMIZERS[cfg.pop("kind")]
    cfg["lr"] = schedule_from_config(cfg["lr"])
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cls(**cfg)
