"""Callbacks of `fit` (`bp.callbacks`), as Keras defines them.

A callback is any object with some of these methods (a plain function is taken as its
`on_epoch_end`); `fit` calls each one that is there:

    set_model(model)               before training: the model fit trains (or its DataParallel)
    on_train_begin(logs)           logs is {}
    on_epoch_begin(epoch, logs)    epoch counts from 0, as Keras; logs is {}
    on_batch_end(batch, logs)      batch counts from 0 in each epoch; logs {"loss", "size"}: that
                                   batch's loss and rows; returning True ends the epoch there and
                                   stops training after it
    on_epoch_end(epoch, logs)      logs: the epoch's values ("loss", "val_loss", metrics, ...);
                                   returning True stops training (after every callback has seen
                                   the epoch)
    on_train_end(logs)             logs: the last epoch's

`EarlyStopping` stops when a monitored value stops improving and puts back the best epoch's
parameters; `Checkpoint` saves the model (atomically, with `model.save`) every few epochs, or
only when the monitored value improves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Callback", "EarlyStopping", "Checkpoint", "HOOKS"]

HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_end", "on_epoch_end", "on_train_end")
MAX_WORDS = ("acc", "auc", "precision", "recall", "f1")  # mode="auto": these monitors should grow


class Callback:
    """A base class with every hook doing nothing; `self.model` is the model being trained."""

    model: Any = None
    required_keys: tuple[str, ...] = ()  # epoch log keys the callback reads: fit checks them first

    def set_model(self, model: Any) -> None:
        self.model = model

    def on_train_begin(self, logs: dict | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_batch_end(self, batch: int, logs: dict | None = None) -> bool | None:
        return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> bool | None:
        return None

    def on_train_end(self, logs: dict | None = None) -> None:
        pass


class _Monitor:
    """Whether a monitored value improved on the best so far, "min" or "max" by `mode`."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged value (e.g. 'val_loss'), got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or not min_delta >= 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        if mode == "auto":
            mode = "max" if any(word in monitor.lower() for word in MAX_WORDS) else "min"
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self.best = math.inf if mode == "min" else -math.inf

    def value(self, logs: dict | None) -> float:
        if not logs or self.monitor not in logs:
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, which the epoch did not log "
                           f"(it logged {sorted(logs or {})})")
        return float(logs[self.monitor])

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _parameters(model: Any) -> dict[str, np.ndarray]:
    """The parameter views of a model, or of the model a DataParallel trains."""
    return getattr(model, "model", model).params


class EarlyStopping(_Monitor, Callback):
    """Stop training once `monitor` has not improved by more than `min_delta` for `patience`
    epochs (Keras's EarlyStopping: patience 0 stops at the first epoch without improvement);
    `mode` "min", "max" or "auto" (max for names with acc, auc, precision, recall or f1). With
    `restore_best`, the parameters of the best epoch (running statistics included; not the
    optimizer state) are put back when training ends, stopped early or not.
    After training: `best`, `best_epoch` and `stopped_epoch` (None if it did not stop it)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 restore_best: bool = True, mode: str = "auto"):
        super().__init__(monitor, mode, min_delta)
        self.patience = _count("patience", patience, 0)
        self.restore_best = bool(restore_best)
        self.required_keys = (self.monitor,)
        self.on_train_begin()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self.best_weights: dict[str, np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> bool:
        value = self.value(logs)
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_weights = {k: v.copy() for k, v in _parameters(self.model).items()}
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.restore_best and self.best_weights is not None:
            params = _parameters(self.model)
            for name, value in self.best_weights.items():
                params[name][...] = value


class Checkpoint(_Monitor, Callback):
    """Save the model with `model.save` (atomically; .npz or .safetensors by the extension) at the
    end of every `every`-th epoch. `path` may hold Keras's fields: "ckpt-{epoch:03d}.npz" (epoch
    counted from 1) or any logged value ("{val_loss:.3f}"). With `best`, it saves only when
    `monitor` improved on the best it saved so far, in this fit or an earlier one (Keras's
    save_best_only). Folders are created.
    `saved` lists the paths written."""

    def __init__(self, path: str | os.PathLike, every: int = 1, best: bool = False, monitor: str = "val_loss",
                 mode: str = "auto", min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"Checkpoint path must be a str or path, got {type(path).__name__}")
        self.path = os.fspath(path)
        self.every = _count("every", every, 1)
        self.save_best = bool(best)
        self.required_keys = (self.monitor,) if self.save_best else ()
        self.saved: list[Path] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        if self.save_best:
            value = self.value(logs)
            if not self.improved(value):
                return
            self.best = value
        path = Path(self.path.format(epoch=epoch + 1, **(logs or {})) if "{" in self.path else self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(path)
        self.saved.append(path)
