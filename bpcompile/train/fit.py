"""The training loop around a compiled model: fit, evaluate, predict.

Datasets are dicts of NumPy arrays keyed by input name, sharing their first (batch) axis. They
are converted to the model's dtype once; each epoch shuffles them into one reused buffer, so
every batch is a contiguous slice (no copy per step).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from ..errors import InputError


def _dataset(model, data: Mapping[str, Any], what: str) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(data, Mapping) or not data:
        raise InputError(f"{what} must be a dict of arrays keyed by input name, got {type(data).__name__}")
    arrays, n = {}, None
    for name, value in data.items():
        spec = model._inputs.get(name)
        if spec is None:
            raise InputError(f"{what}: unknown input {name!r}; the model's inputs are {list(model._inputs)}")
        if not spec["shape"] or not isinstance(spec["shape"][0], str):
            raise InputError(f"{what}: input {name!r} has no runtime batch dimension to split along")
        array = model._convert(name, value, {})
        if n is not None and len(array) != n:
            raise InputError(f"{what}: input {name!r} has {len(array)} samples, others have {n}")
        n = len(array)
        arrays[name] = array
    return arrays, int(n)


def _batches(arrays: dict[str, np.ndarray], n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, {k: v[start:start + batch_size] for k, v in arrays.items()}


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def evaluate(model, data: Mapping[str, Any], batch_size: int = 256, loss: str | None = None) -> dict[str, float]:
    """Mean loss over a dataset (and accuracy for a classifier), in batches, in evaluation mode
    (running statistics, no dropout), as `forward` computes."""
    arrays, n = _dataset(model, data, "evaluate")
    batch_size = _check_batch_size(batch_size)
    spec = model._loss_spec(loss)
    total, correct = 0.0, 0
    classifier = spec.get("classifier")
    for _, batch in _batches(arrays, n, batch_size):
        rows = len(next(iter(batch.values())))
        total += model.loss(loss=loss, training=False, **batch) * rows
        if classifier:
            logits = model.forward(**{k: v for k, v in batch.items() if k in model._entries["forward"].inputs})
            predicted = np.argmax(logits[classifier["output"]], axis=-1)
            correct += int(np.sum(predicted == batch[classifier["labels"]]))
    metrics = {"loss": total / n}
    if classifier:
        metrics["accuracy"] = correct / n
    return metrics


def predict(model, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, np.ndarray]:
    """Named outputs over a dataset, computed in batches and concatenated."""
    arrays, n = _dataset(model, data, "predict")
    batch_size = _check_batch_size(batch_size)
    needed = model._entries["forward"].inputs if "forward" in model._entries else []
    parts: dict[str, list[np.ndarray]] = {}
    for _, batch in _batches(arrays, n, batch_size):
        for name, value in model.forward(**{k: v for k, v in batch.items() if k in needed}).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def fit(model, data: Mapping[str, Any], epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
        seed: int = 0, validation: Mapping[str, Any] | None = None, loss: str | None = None,
        verbose: bool = True, stream: TextIO | None = None, checkpoint: str | os.PathLike | None = None,
        parallel: Any = None) -> dict[str, list[float]]:
    """Train for `epochs` passes over `data`; returns the history of losses and metrics per epoch.
    With `checkpoint`, the model is saved there after each epoch. `parallel` (a
    bp.distributed.DataParallel) splits every batch across its ranks and takes the steps."""
    arrays, n = _dataset(model, data, "fit")
    batch_size = _check_batch_size(batch_size)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    val_arrays = _dataset(model, validation, "validation")[0] if validation is not None else None
    trainer = parallel if parallel is not None else model
    rng = np.random.default_rng(seed)
    shuffled = {k: np.empty_like(v) for k, v in arrays.items()} if shuffle and parallel is None else None
    history: dict[str, list[float]] = {"loss": [], "seconds": [], "samples_per_second": []}
    stream = stream or sys.stderr
    show = verbose and (parallel is None or parallel.rank == 0)
    steps = -(-n // batch_size)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n) if shuffle else np.arange(n)
        if parallel is not None:
            batches = parallel.epoch_batches(arrays, order, batch_size)
        else:
            batches = _epoch_batches(arrays, n, order if shuffle else None, batch_size, shuffled)
        start, total, seen = time.perf_counter(), 0.0, 0
        for step, (batch, rows) in enumerate(batches, 1):
            total += trainer.train_step(loss=loss, **batch) * rows
            seen += rows
            if show and stream.isatty():
                _progress(stream, epoch, epochs, step, steps, total / seen, seen, time.perf_counter() - start,
                          end="\r")
        seconds = time.perf_counter() - start
        if parallel is not None:
            parallel.sync_running_statistics()
        history["loss"].append(total / n)
        history["seconds"].append(seconds)
        history["samples_per_second"].append(n / seconds if seconds > 0 else float("inf"))
        if val_arrays is not None:
            for key, value in trainer.evaluate(val_arrays, loss=loss).items():
                history.setdefault(f"val_{key}", []).append(value)
        if show:
            extra = "".join(f"  {k} {v[-1]:.4f}" for k, v in history.items() if k.startswith("val_"))
            _progress(stream, epoch, epochs, steps, steps, total / n, n, seconds, extra=extra, end="\n")
        if checkpoint is not None:
            trainer.save(checkpoint)
    return history


def _epoch_batches(arrays: dict[str, np.ndarray], n: int, order: np.ndarray | None, batch_size: int,
                   shuffled: dict[str, np.ndarray] | None):
    """One epoch's (batch, rows): contiguous slices of the data, taken in `order` into the
    reused buffers `shuffled` first (one copy per epoch, none per step)."""
    if order is not None:
        for k, v in arrays.items():
            np.take(v, order, axis=0, out=shuffled[k])
        arrays = shuffled
    for start, batch in _batches(arrays, n, batch_size):
        yield batch, min(batch_size, n - start)


def _progress(stream: TextIO, epoch: int, epochs: int, step: int, steps: int, loss: float, seen: int,
              seconds: float, extra: str = "", end: str = "\n") -> None:
    width = 20
    filled = int(width * step / max(steps, 1))
    rate = seen / seconds if seconds > 0 else 0.0
    stream.write(f"epoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] loss {loss:.4f}"
                 f"  {rate:,.0f} samples/s{extra}{' ' * 4}{end}")
    stream.flush()
