"""Learning-rate schedules: lr as a function of the step (counted from 1). Changing the rate
needs no recompilation: it is passed to the native train step on every call.

Each schedule writes its rate once, as `formula(step, m)` over the namespaces of
`bpcompile.train.formula`: evaluated in Python at run time, printed to C by the export."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .formula import NUMERIC


class Schedule:
    """lr(step) for step = 1, 2, ..."""

    def __call__(self, step: int) -> float:
        return float(self.formula(step, NUMERIC))

    def formula(self, step: Any, m: Any) -> Any:
        """The rate at `step` in the math of namespace `m` (a float, or a SymPy expression)."""
        raise NotImplementedError(f"learning-rate schedule {type(self).__name__} has no formula(step, m)")

    def config(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **vars(self)}


class Constant(Schedule):
    def __init__(self, lr: float):
        if not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self.lr = float(lr)

    def formula(self, step: Any, m: Any) -> Any:
        return self.lr


class StepDecay(Schedule):
    """lr * gamma ** (number of completed `step_size` periods)."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr, self.step_size, self.gamma = float(lr), int(step_size), float(gamma)
        if self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size!r}")

    def formula(self, step: Any, m: Any) -> Any:
        return self.lr * self.gamma ** m.floor_div(step - 1, self.step_size)


class Cosine(Schedule):
    """Cosine annealing from lr to min_lr over total_steps, then min_lr."""

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        self.lr, self.total_steps, self.min_lr = float(lr), int(total_steps), float(min_lr)
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")

    def formula(self, step: Any, m: Any) -> Any:
        t = m.min(step - 1, self.total_steps) / self.total_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + m.cos(m.pi * t))


class LinearWarmup(Schedule):
    """Linear ramp from 0 to the wrapped schedule's value over `warmup_steps`, then that schedule."""

    def __init__(self, schedule: Any, warmup_steps: int):
        self.schedule = as_schedule(schedule)
        self.warmup_steps = int(warmup_steps)

    def formula(self, step: Any, m: Any) -> Any:
        base = self.schedule(step) if m is NUMERIC else self.schedule.formula(step, m)  # a user's __call__ too
        return base * m.min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else base

    def config(self) -> dict[str, Any]:
        return {"kind": "LinearWarmup", "schedule": self.schedule.config(), "warmup_steps": self.warmup_steps}


class FromFunction(Schedule):
    """A user's own function of the step (not stored with a built model: its first value is)."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn

    def formula(self, step: Any, m: Any) -> Any:
        """The function's value at run time; printed (the export), its first value, as its config
        stores it: a Python function has no formula to print."""
        return float(self.fn(step if m is NUMERIC else 1))

    def config(self) -> dict[str, Any]:
        return {"kind": "Constant", "lr": float(self.fn(1))}


SCHEDULES = {c.__name__: c for c in (Constant, StepDecay, Cosine, LinearWarmup)}


def as_schedule(lr: Any) -> Schedule:
    if isinstance(lr, Schedule):
        return lr
    if callable(lr):
        return FromFunction(lr)
    return Constant(lr)


def schedule_from_config(cfg: dict[str, Any]) -> Schedule:
    cfg = dict(cfg)
    cls = SCHEDULES[cfg.pop("kind")]
    if cls is LinearWarmup:
        cfg["schedule"] = schedule_from_config(cfg["schedule"])
    return cls(**cfg)
