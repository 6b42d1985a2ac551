"""The training loop around a compiled model: fit, evaluate, predict.

Datasets are dicts of NumPy arrays keyed by input name, sharing their first (batch) axis. They
are converted to the model's dtype once; each epoch shuffles them into one reused buffer, so
every batch is a contiguous slice (no copy per step).

`fit` follows Keras: callbacks (`bp.callbacks`), user metrics, `verbose` 0 (silent), 1 (a
progress bar on a terminal, through tqdm when it is installed: `pip install bpcompile[progress]`;
one line per epoch elsewhere) or 2 (one line per epoch), and the history as a dict of lists.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from ..errors import InputError
from .callbacks import HOOKS, Checkpoint

MININTERVAL = 0.25  # seconds between two redraws of a progress bar: four a second at most
BAR_WIDTH = 20  # characters of the progress bar drawn without tqdm
# tqdm's default but with the exact sample count ({n}; unit_scale scales the rate only)
TQDM_FORMAT = "{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
TIMING_KEYS = ("seconds", "samples_per_second")

Metric = Callable[[dict, dict], float]


# --- datasets ------------------------------------------------------------------------------

def _dataset(model, data: Mapping[str, Any], what: str) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(data, Mapping) or not data:
        got = "an empty dict" if isinstance(data, Mapping) else type(data).__name__
        raise InputError(f"{what} must be a dict of arrays keyed by input name, got {got}")
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


def _forward_inputs(model) -> list[str]:
    return model._entries["forward"].inputs if "forward" in model._entries else []


# --- metrics -------------------------------------------------------------------------------

def _check_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    """User metrics: {name: fn(outputs, inputs) -> float}."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict {{name: fn(outputs, inputs) -> float}}, got {type(metrics).__name__}")
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if name == "loss" or name.startswith("val_") or name in TIMING_KEYS:
            raise ValueError(f"metric name {name!r} is taken (loss, val_*, seconds and samples_per_second are fit's)")
        if not callable(fn):
            raise TypeError(f"metric {name!r} must be a function of (outputs, inputs), got {type(fn).__name__}")
    return dict(metrics)


def _metric_value(name: str, fn: Metric, outputs: dict, inputs: dict) -> float:
    value = fn(outputs, inputs)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} returned {type(value).__name__}, not a number") from None


def evaluate(model, data: Mapping[str, Any], batch_size: int = 256, loss: str | None = None,
             metrics: Mapping[str, Metric] | None = None) -> dict[str, float]:
    """Mean loss over a dataset (and accuracy for a classifier), in batches, in evaluation mode
    (running statistics, no dropout), as `forward` computes. Each of `metrics`
    ({name: fn(outputs, inputs) -> float}) is called once, on the outputs of the whole dataset
    (a dict as `forward` returns) and its inputs."""
    arrays, n = _dataset(model, data, "evaluate")
    batch_size = _check_batch_size(batch_size)
    metrics = _check_metrics(metrics)
    spec = model._loss_spec(loss)
    total, correct = 0.0, 0
    classifier = spec.get("classifier")
    needed = _forward_inputs(model)
    parts: dict[str, list[np.ndarray]] = {}
    for _, batch in _batches(arrays, n, batch_size):
        rows = len(next(iter(batch.values())))
        total += model.loss(loss=loss, training=False, **batch) * rows
        if classifier or metrics:
            outputs = model.forward(**{k: v for k, v in batch.items() if k in needed})
            if classifier:
                predicted = np.argmax(outputs[classifier["output"]], axis=-1)
                correct += int(np.sum(predicted == batch[classifier["labels"]]))
            if metrics:
                for name, value in outputs.items():
                    parts.setdefault(name, []).append(value)
    results = {"loss": total / n}
    if classifier:
        results["accuracy"] = correct / n
    if metrics:
        results.update(_dataset_metrics(metrics, {k: np.concatenate(v) for k, v in parts.items()}, arrays))
    return results


def _dataset_metrics(metrics: dict[str, Metric], outputs: dict, inputs: dict) -> dict[str, float]:
    return {name: _metric_value(name, fn, outputs, inputs) for name, fn in metrics.items()}


def predict(model, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, np.ndarray]:
    """Named outputs over a dataset, computed in batches and concatenated."""
    arrays, n = _dataset(model, data, "predict")
    batch_size = _check_batch_size(batch_size)
    needed = _forward_inputs(model)
    parts: dict[str, list[np.ndarray]] = {}
    for _, batch in _batches(arrays, n, batch_size):
        for name, value in model.forward(**{k: v for k, v in batch.items() if k in needed}).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


# --- fit -----------------------------------------------------------------------------------

def fit(model, data: Mapping[str, Any], epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
        seed: int | None = None, validation: Mapping[str, Any] | None = None, loss: str | None = None,
        verbose: int | bool = 1, stream: TextIO | None = None, checkpoint: str | os.PathLike | None = None,
        parallel: Any = None, *, callbacks: Sequence[Any] | None = None,
        metrics: Mapping[str, Metric] | None = None, train_metrics: bool = False,
        initial_epoch: int = 0) -> dict[str, list[float]]:
    """Train for the epochs `initial_epoch` .. `epochs` - 1 (Keras's counting) over `data`.

    Returns the history, a dict of lists with one entry per epoch trained: "loss" (the mean
    training loss of the epoch), the `metrics` on the training batches (with `train_metrics`),
    "val_loss", "val_accuracy" (a classifier's) and "val_<metric>" on `validation`, then
    "seconds" and "samples_per_second" of the training.

    - `shuffle`: each epoch's order is drawn from the model's generator `model.shuffle_rng`,
      made from the model's seed on the first fit and continued by every later one (so
      `fit(epochs=1)` called twice trains as `fit(epochs=2)`); `seed` restarts it from that seed.
    - `metrics`: {name: fn(outputs, inputs) -> float}, `outputs` a dict as `forward` returns.
      On `validation`, each is called once on the outputs of the whole set (so any metric is
      exact). With `train_metrics=True` also on every training batch before its step (in
      evaluation mode: one more forward per step), logged as the row-weighted mean.
    - `callbacks`: see bp.callbacks (on_epoch_end returning True stops training; EarlyStopping,
      Checkpoint). `checkpoint=path` is Checkpoint(path): the model is saved after each epoch.
    - `verbose`: 0 silent, 1 a progress bar on a terminal (tqdm when installed, at most four
      redraws a second, with the ETA and samples/s) and one line per epoch when `stream` is not
      a terminal, 2 one line per epoch. `stream` defaults to sys.stderr.
    - `parallel` (a bp.distributed.DataParallel) splits every batch across its ranks and takes
      the steps; rank 0 prints.
    """
    arrays, n = _dataset(model, data, "fit")
    batch_size = _check_batch_size(batch_size)
    epochs = _whole("epochs", epochs)
    initial_epoch = _whole("initial_epoch", initial_epoch)
    verbose = _check_verbose(verbose)
    metrics = _check_metrics(metrics)
    hooks = _callbacks(callbacks, checkpoint)
    val_arrays = _dataset(model, validation, "validation")[0] if validation is not None else None
    if metrics and val_arrays is None and not train_metrics:
        raise ValueError("metrics are computed on the validation data: pass validation=..., or train_metrics=True "
                         "to compute them on the training batches")
    if train_metrics and parallel is not None:
        raise ValueError("train_metrics is not available with parallel=: each rank sees only its part of a batch")
    trainer = parallel if parallel is not None else model
    history = _empty_history(model, loss, metrics if train_metrics else {}, metrics, val_arrays is not None)
    _check_required_keys(hooks, history)
    rng = _shuffle_rng(model, seed, parallel) if shuffle else None
    shuffled = {k: np.empty_like(v) for k, v in arrays.items()} if shuffle and parallel is None else None
    stream = stream if stream is not None else sys.stderr
    show = verbose if parallel is None or parallel.rank == 0 else 0
    bar = show == 1 and _is_terminal(stream)
    per_batch = [cb.on_batch_end for cb in hooks if hasattr(cb, "on_batch_end")]
    for cb in hooks:
        if hasattr(cb, "set_model"):
            cb.set_model(trainer)
    _call(hooks, "on_train_begin", {})
    logs: dict[str, float] = {}  # the last epoch's
    for epoch in range(initial_epoch, epochs):
        _call(hooks, "on_epoch_begin", epoch, {})
        order = rng.permutation(n) if rng is not None else np.arange(n)
        if parallel is not None:
            batches = parallel.epoch_batches(arrays, order, batch_size)
        else:
            batches = _epoch_batches(arrays, n, order if shuffle else None, batch_size, shuffled)
        title = f"epoch {epoch + 1}/{epochs}"
        progress = _progress_bar(stream, title, n) if bar else None
        start, done = time.perf_counter(), None  # done: the epoch's logs, once it is done
        try:
            total, seen, sums, stopped = _train_epoch(trainer, model, batches, loss, metrics if train_metrics else {},
                                                      progress, per_batch)
            seconds = time.perf_counter() - start
            if parallel is not None:
                parallel.sync_running_statistics()
            done = {"loss": total / seen, **{name: s / seen for name, s in sums.items()}}
            if val_arrays is not None:
                done.update({f"val_{k}": v for k, v in _validate(trainer, model, val_arrays, loss, metrics).items()})
            done.update({"seconds": seconds, "samples_per_second": seen / seconds if seconds > 0 else math.inf})
        finally:
            if progress is not None:
                progress.close(done)
        logs = done
        for key, value in logs.items():
            history[key].append(value)
        if show and not bar:
            stream.write(f"{title} - {_summary(logs)}\n")
            stream.flush()
        votes = [cb.on_epoch_end(epoch, dict(logs)) for cb in hooks if hasattr(cb, "on_epoch_end")]
        if stopped or any(votes):
            if show:
                stream.write(f"{title}: training stopped by a callback\n")
                stream.flush()
            break
    _call(hooks, "on_train_end", dict(logs))
    return history


def _train_epoch(trainer, model, batches, loss: str | None, metrics: dict[str, Metric], progress: Any,
                 per_batch: list[Callable]) -> tuple[float, int, dict[str, float], bool]:
    """One epoch's steps: (sum of the batch losses times their rows, rows trained, the same sums
    of the `metrics` (each batch's outputs taken before its step), whether a callback stopped it)."""
    needed = _forward_inputs(model)
    total, seen, sums = 0.0, 0, dict.fromkeys(metrics, 0.0)
    for step, (batch, rows) in enumerate(batches):
        if metrics:
            outputs = model.forward(**{k: v for k, v in batch.items() if k in needed})
            for name, fn in metrics.items():
                sums[name] += _metric_value(name, fn, outputs, batch) * rows
        value = trainer.train_step(loss=loss, **batch)
        total += value * rows
        seen += rows
        if progress is not None:
            progress.update(rows, total, seen)
        if per_batch and any([hook(step, {"loss": value, "size": rows}) for hook in per_batch]):
            return total, seen, sums, True
    return total, seen, sums, False


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_verbose(verbose: Any) -> int:
    if verbose is True or verbose is False:
        return int(verbose)
    if isinstance(verbose, int | np.integer) and verbose in (0, 1, 2):
        return int(verbose)
    raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {verbose!r}")


def _shuffle_rng(model, seed: Any, parallel: Any) -> np.random.Generator:
    """The model's shuffle generator: continued across fits, restarted by an explicit `seed`;
    with `parallel`, rank 0's (every rank must draw the same orders)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        model.shuffle_rng = np.random.default_rng(int(seed))
    elif getattr(model, "shuffle_rng", None) is None:
        model.shuffle_rng = np.random.default_rng(model.seed)
    if parallel is not None:
        model.shuffle_rng.bit_generator.state = parallel.comm.bcast(model.shuffle_rng.bit_generator.state, root=0)
    return model.shuffle_rng


def _empty_history(model, loss: str | None, train: dict, metrics: dict, validation: bool) -> dict[str, list]:
    """The history's keys, in the order they are logged, each with no epoch yet."""
    keys = ["loss", *train]
    if validation:
        keys.append("val_loss")
        if model._loss_spec(loss).get("classifier") and "accuracy" not in metrics:
            keys.append("val_accuracy")
        keys += [f"val_{name}" for name in metrics]
    return {key: [] for key in [*keys, *TIMING_KEYS]}


def _callbacks(callbacks: Sequence[Any] | None, checkpoint: str | os.PathLike | None) -> list[Any]:
    """The callbacks, each checked to have a hook (a function becomes an on_epoch_end)."""
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, list | tuple):
        callbacks = [callbacks]
    hooks = []
    for cb in callbacks:
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            if not callable(cb):
                raise TypeError(f"a callback needs one of the methods {', '.join(HOOKS)}, or must be a function "
                                f"(epoch, logs); got {type(cb).__name__}")
            cb = _EpochFunction(cb)
        hooks.append(cb)
    if checkpoint is not None:
        hooks.append(Checkpoint(checkpoint))
    return hooks


class _EpochFunction:
    """A plain function given as a callback: its on_epoch_end."""

    def __init__(self, fn: Callable[[int, dict], bool | None]):
        self.on_epoch_end = fn


def _check_required_keys(hooks: list[Any], history: dict[str, list]) -> None:
    for cb in hooks:
        for key in getattr(cb, "required_keys", ()):
            if key not in history:
                hint = " (pass validation=...)" if key.startswith("val_") else ""
                raise ValueError(f"{type(cb).__name__} monitors {key!r}, which this fit does not log{hint}; "
                                 f"it logs {[k for k in history if k not in TIMING_KEYS]}")


def _call(hooks: list[Any], name: str, *args: Any) -> None:
    for cb in hooks:
        method = getattr(cb, name, None)
        if method is not None:
            method(*args)


def _validate(trainer, model, val_arrays: dict, loss: str | None, metrics: dict) -> dict[str, float]:
    """Validation loss (and accuracy) and metrics, in evaluation mode; with DataParallel the loss
    is reduced across the ranks and every rank computes the metrics (same parameters)."""
    if trainer is model:
        return evaluate(model, val_arrays, loss=loss, metrics=metrics)
    results = trainer.evaluate(val_arrays, loss=loss)
    if metrics:
        results.update(_dataset_metrics(metrics, predict(model, val_arrays), val_arrays))
    return results


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


# --- progress --------------------------------------------------------------------------------

def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def _tqdm() -> Any:
    """tqdm's progress bar class, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _number(value: float) -> str:
    return f"{value:.4e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"


def _summary(logs: dict[str, float]) -> str:
    """'loss 0.1234 - val_loss 0.2345 - 0.05 s - 4,000 samples/s'"""
    values = " - ".join(f"{k} {_number(v)}" for k, v in logs.items() if k not in TIMING_KEYS)
    return f"{values} - {logs['seconds']:.2f} s - {logs['samples_per_second']:,.0f} samples/s"


def _progress_bar(stream: TextIO, title: str, total: int) -> Any:
    tqdm = _tqdm()
    return _TqdmBar(tqdm, stream, title, total) if tqdm is not None else _TextBar(stream, title, total)


class _Throttle:
    """Rows seen since the last redraw; `due` once MININTERVAL has passed (one clock read a step)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.pending = 0

    def due(self, rows: int) -> bool:
        self.pending += rows
        now = time.perf_counter()
        if now - self.last < MININTERVAL:
            return False
        self.last = now
        return True


class _TqdmBar(_Throttle):
    """An epoch's tqdm bar over its samples (ETA and samples/s are tqdm's), fed at most every
    MININTERVAL, and redrawn each time it is fed (so tqdm's own throttle is off: it would skip a
    redraw due a microsecond early); the loss is its postfix, the epoch's summary at the end."""

    def __init__(self, tqdm: Any, stream: TextIO, title: str, total: int):
        super().__init__()
        self.bar = tqdm(total=total, desc=title, unit=" samples", unit_scale=True, file=stream, mininterval=0,
                        miniters=1, leave=True, dynamic_ncols=True, bar_format=TQDM_FORMAT)

    def update(self, rows: int, total: float, seen: int) -> None:
        if self.due(rows):
            self.bar.set_postfix_str(f"loss {_number(total / seen)}", refresh=False)
            self.bar.update(self.pending)
            self.pending = 0

    def close(self, logs: dict[str, float] | None) -> None:
        if logs is not None:
            self.bar.set_postfix_str(" - ".join(f"{k} {_number(v)}" for k, v in logs.items()
                                                if k not in TIMING_KEYS), refresh=False)
        self.bar.update(self.pending)
        self.bar.close()


class _TextBar(_Throttle):
    """The progress bar drawn without tqdm: redrawn in place at most every MININTERVAL."""

    def __init__(self, stream: TextIO, title: str, total: int):
        super().__init__()
        self.stream, self.title, self.total = stream, title, total
        self.start, self.seen = self.last, 0

    def _bar(self, seen: int) -> str:
        filled = int(BAR_WIDTH * seen / max(self.total, 1))
        return f"{self.title} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {seen}/{self.total}"

    def update(self, rows: int, total: float, seen: int) -> None:
        self.seen = seen
        if not self.due(rows):
            return
        elapsed = self.last - self.start
        rate = seen / elapsed if elapsed > 0 else 0.0
        eta = (self.total - seen) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self._bar(seen)} - loss {_number(total / seen)} - ETA {_clock(eta)} - "
                          f"{rate:,.0f} samples/s   ")
        self.stream.flush()

    def close(self, logs: dict[str, float] | None) -> None:
        end = f" - {_summary(logs)}" if logs is not None else ""
        self.stream.write(f"\r{self._bar(self.seen)}{end}   \n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:02d}:{secs:02d}"
