"""Runtime: a built model as a Python object. NumPy in, NumPy out, one native call per method.

Nothing here imports SymPy or runs a compiler: `bp.load(path)` works from a build folder alone,
once it verifies (runtime.buildfolder); the native module and its call frames are in
runtime.native, checkpoint files in runtime.checkpoint.
Parameters, gradients and optimizer state each live in one flat 64-byte-aligned buffer, with
per-parameter NumPy views. Intermediates live in a workspace arena planned by liveness, one per
runtime shape and thread (the last few shapes kept), so calls from several threads never share
one. The native call releases the GIL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError
from ..train.init import initial_value
from .buildfolder import _damaged, read_meta
from .checkpoint import MAX_STEP, npz_arrays, process_alive, read_npz, restore, signature, write_atomic
from .native import ALIGN, Entry, Frame, _load_module, aligned_empty, plan

__all__ = ["ALIGN", "ARENAS_KEPT", "MAX_STEP", "CompiledModel", "Entry", "Frame", "aligned_empty", "load",
           "process_alive", "read_meta", "write_atomic"]

ARENAS_KEPT = 4  # workspace arenas a thread keeps, for its most recent runtime shapes


class CompiledModel:
    """A compiled graph: call `forward`, `loss`, `loss_and_grad` and `train_step` with NumPy arrays."""

    def __init__(self, build_path: str | Path, seed: int = 0, optimizer: Any = None,
                 init_arrays: Mapping[str, np.ndarray] | None = None):
        self.build_path = Path(build_path)
        self.meta = meta = read_meta(self.build_path)
        self._module = _load_module(self.build_path, meta)  # meta.json verified against the module from here on
        self.name: str = meta["name"]
        self.dtype = np.dtype(meta["dtype"])
        self._ctype = "float[]" if self.dtype == np.float32 else "double[]"
        self._ffi, self._lib = self._module.ffi, self._module.lib
        self._inputs: dict[str, dict] = {i["name"]: i for i in meta["inputs"]}
        self._dims: list[str] = meta["dims"]
        self._entries = {name: Entry(self._lib, name, spec, self._dims) for name, spec in meta["entries"].items()}
        self._losses: dict[str, dict] = {spec["name"]: spec for spec in meta["losses"]}
        self._only_loss = next(iter(self._losses.values()), None)
        self._params_flat = aligned_empty(meta["param_size"], self.dtype)
        self._grads_flat = aligned_empty(meta["param_size"], self.dtype)
        self._state_flat = aligned_empty(max(meta["state_size"], 1), self.dtype)
        self.params: dict[str, np.ndarray] = {p["name"]: self._view(self._params_flat, p) for p in meta["params"]}
        self.grads: dict[str, np.ndarray] = {p["name"]: self._view(self._grads_flat, p) for p in meta["params"]}
        self.optimizer = optimizer if optimizer is not None else self._optimizer_from_meta()
        self.loss_steps: dict[str, int] = dict.fromkeys(self._losses, 0)  # each loss's own optimizer step
        self._step = 0
        self._train_lock = threading.Lock()
        self._plans: dict[tuple, tuple[dict[str, np.ndarray], int]] = {}
        self._tls = threading.local()
        self._init_arrays = dict(init_arrays) if init_arrays is not None else self._arrays_from_folder()
        self.graph: Any = None  # the bp.Graph it was compiled from, set by bp.compile (for bp.to_onnx)
        self.reset_parameters(seed)

    @property
    def step(self) -> int:
        """Updates of all losses so far: the counter of the random streams (dropout). Setting it
        on a model with one loss sets that loss's optimizer step too (`loss_steps`)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        if len(self.loss_steps) == 1:
            self.loss_steps = dict.fromkeys(self.loss_steps, self._step)

    # --- parameters ----------------------------------------------------------------------
    def _view(self, flat: np.ndarray, p: dict) -> np.ndarray:
        size = int(np.prod(p["shape"], dtype=np.int64))
        return flat[p["offset"]:p["offset"] + size].reshape(p["shape"])

    def reset_parameters(self, seed: int = 0) -> None:
        """Draw every parameter from its initializer (in declaration order) and clear optimizer state."""
        self.seed = int(seed)
        self._tls = threading.local()  # call frames hold the seed
        rng = np.random.default_rng(seed)
        for p in self.meta["params"]:
            init = p["init"]
            if init == "array":  # an array given at compile time; bp.load has none: zeros
                init = np.asarray(self._init_arrays.get(p["name"], np.zeros(p["shape"])), dtype=np.float64)
            self.params[p["name"]][...] = initial_value(init, tuple(p["shape"]), rng)
        self._state_flat[...] = 0
        self.loss_steps = dict.fromkeys(self._losses, 0)
        self.step = 0

    def _optimizer_from_meta(self):
        """The optimizer the model was compiled with, learning rate included (the folder is the
        build's code and settings: another compile never changes it)."""
        cfg = self.meta.get("optimizer")
        if not cfg:
            return None
        from ..train.optim import from_config
        try:
            return from_config(cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(self.build_path, f"meta.json field 'optimizer' does not describe an optimizer "
                                            f"({type(e).__name__}: {e})") from None

    def _arrays_from_folder(self) -> dict[str, np.ndarray]:
        """The parameters' initial values that were given as arrays, from the build folder (its
        verified init file), for a model loaded with bp.load."""
        name = self.meta["init_file"]
        if name is None:
            return {}
        try:
            with np.load(self.build_path / name, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise _damaged(self.build_path, f"{name} is unreadable ({e})") from None
        shapes = {p["name"]: tuple(p["shape"]) for p in self.meta["params"] if p["init"] == "array"}
        if {k: v.shape for k, v in arrays.items()} != shapes:
            raise _damaged(self.build_path, f"{name} does not hold the array initial values of {sorted(shapes)}")
        return arrays

    @property
    def c_source(self) -> str:
        """The generated C of the model's kernels, as compiled."""
        return (self.build_path / "model.c").read_text()

    @property
    def param_count(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def workspace_bytes(self, **dims: int) -> int:
        """Bytes of the workspace arena for the given runtime sizes (e.g. batch=128)."""
        return self._plan(tuple(int(dims.get(d, 1)) for d in self._dims))[1]

    # --- validating inputs ---------------------------------------------------------------
    def _prepare(self, entry: Entry, given: Mapping[str, Any]) -> tuple[list[np.ndarray], tuple[int, ...]]:
        unknown = [k for k in given if k not in self._inputs]
        if unknown:
            raise InputError(f"model {self.name!r}: unknown input {unknown[0]!r}; its inputs are "
                             f"{list(self._inputs)}")
        missing = [k for k in entry.inputs if k not in given]
        if missing:
            raise InputError(f"model {self.name!r}: missing input {missing[0]!r} (this call needs "
                             f"{entry.inputs})")
        dims: dict[str, int] = {}
        arrays = []
        for name in entry.inputs:
            arrays.append(self._convert(name, given[name], dims))
        for name, value in given.items():
            if name not in entry.inputs:
                self._convert(name, value, dict(dims))
        return arrays, tuple(dims.get(d, 0) for d in self._dims)

    def _convert(self, name: str, value: Any, dims: dict[str, int]) -> np.ndarray:
        spec = self._inputs[name]
        shape = spec["shape"]
        try:
            array = np.asarray(value)
        except Exception as e:  # ragged lists, objects NumPy cannot hold
            raise InputError(f"input {name!r}: cannot convert {type(value).__name__} to an array ({e})") from None
        kind = array.dtype.kind
        if spec["dtype"] == "int32":
            if kind not in "iub":
                raise InputError(f"input {name!r}: expected integer labels (int32), got {array.dtype}; "
                                 "convert with .astype(int) if the values are whole numbers")
            size = array.dtype.itemsize
            wider = size > 4 or (size == 4 and kind == "u")  # else every value fits
            if wider and array.size and (array.min() < -2**31 or array.max() >= 2**31):
                raise InputError(f"input {name!r}: values do not fit in int32")
            target = np.int32
        else:
            if kind not in "fiub":
                raise InputError(f"input {name!r}: expected numbers convertible to {self.dtype}, got {array.dtype}")
            target = self.dtype
        if array.ndim != len(shape):
            raise InputError(f"input {name!r}: expected shape {tuple(shape)} ({len(shape)} dims), "
                             f"got {array.shape}")
        for axis, (want, got) in enumerate(zip(shape, array.shape)):
            if isinstance(want, str):
                if got < 1:
                    raise InputError(f"input {name!r}: dimension {want!r} is {got}; it must be at least 1")
                if dims.setdefault(want, got) != got:
                    raise InputError(f"input {name!r}: dimension {want!r} is {got} here but {dims[want]} in "
                                     "another input")
            elif want != got:
                raise InputError(f"input {name!r}: expected shape {tuple(shape)}, got {array.shape} "
                                 f"(axis {axis} is {got}, expected {want})")
        converted = np.asarray(array, dtype=target, order="C")  # a third of np.require's time
        return converted if converted.flags.aligned else converted.copy()

    # --- the native call ---------------------------------------------------------------------
    def _plan(self, dims: tuple[int, ...]) -> tuple[dict[str, np.ndarray], int]:
        """The workspace plan for these runtime sizes (native.plan), made once per shape."""
        found = self._plans.get(dims)
        if found is None:
            found = self._plans[dims] = plan(self._module, self._entries, dims, self.dtype.itemsize)
        return found

    def _ready(self, entry_name: str, given: Mapping[str, Any]) -> Frame:
        """The call frame for these inputs, pointed at them: the thread's last one for this entry
        when they match it exactly (Frame.accepts, a cheap check), else after validating and
        converting them (_prepare); a new frame only when the runtime sizes changed."""
        try:
            frame = self._tls.frames[entry_name]
        except (AttributeError, KeyError):
            frame = None
        else:
            if frame.accepts(given):
                return frame
        entry = self._entries[entry_name]
        arrays, dims = self._prepare(entry, given)
        frames = self._tls.__dict__.setdefault("frames", {})
        if frame is None or frame.dims != dims:  # same dims: the same dtypes and shapes
            frame = frames[entry_name] = Frame(self, entry, arrays, dims)
        frame.bind(arrays)
        return frame

    def _arena(self, dims: tuple[int, ...], size: int) -> np.ndarray:
        """This thread's workspace arena for one runtime shape: allocated once and reused, the
        last ARENAS_KEPT shapes kept (many batch sizes must not hold one arena each forever; an
        arena dropped here lives on only in a frame not yet rebuilt)."""
        arenas = self._tls.__dict__.setdefault("arenas", {})
        arena = arenas.pop(dims, None)
        if arena is None:
            arena = aligned_empty(max(size, ALIGN), np.uint8)
        arenas[dims] = arena  # the most recent last
        while len(arenas) > ARENAS_KEPT:
            del arenas[next(iter(arenas))]
        return arena

    def _run(self, entry_name: str, given: Mapping[str, Any], outputs: list[np.ndarray] | None = None,
             grads: np.ndarray | None = None, counter: int | None = None) -> Frame:
        """One native call of an entry point, writing `outputs` (and the gradients into `grads`
        instead of the model's buffer); returns the frame (its `scalar_c[0]` holds a loss)."""
        return self._call(self._ready(entry_name, given), outputs, grads, counter)

    def _call(self, frame: Frame, outputs: list[np.ndarray] | None = None, grads: np.ndarray | None = None,
              counter: int | None = None) -> Frame:
        """The native call of a ready frame (see _run)."""
        if outputs is not None:
            out_ptrs, from_buffer = frame.out_ptrs, self._ffi.from_buffer
            for i, o in enumerate(outputs):
                out_ptrs[i] = from_buffer(o)
        if grads is None:
            status = frame.run(self._step if counter is None else counter)
        else:
            args = list(frame.args)
            args[4] = self._ffi.from_buffer(self._ctype, grads)
            status = frame.run(self._step if counter is None else counter, tuple(args))
        if status:
            raise self._rejected(frame)
        return frame

    def _rejected(self, frame: Frame) -> InputError:
        """The error for a native call that refused its input data (label values out of range)."""
        return InputError(self._label_error(frame.entry, frame.bound))

    def _label_error(self, entry: Entry, arrays: list[np.ndarray | None]) -> str:
        for name, array in zip(entry.inputs, arrays):
            spec = self._inputs[name]
            if spec["dtype"] == "int32" and array.size:
                bound = spec.get("classes")
                return (f"input {name!r}: labels must be class indices in [0, {bound}), got values from "
                        f"{array.min()} to {array.max()}")
        return f"model {self.name!r}: the native call rejected its input data"

    # --- the public calls ----------------------------------------------------------------
    # Inputs go by name (x=X, y=Y), or by position in the order the graph declared the inputs
    # the call reads (or all of its inputs), or as one dict.
    def _named(self, call: str, entry: str, arrays: tuple, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs of a call given positional arrays too (see above)."""
        if len(arrays) == 1 and isinstance(arrays[0], Mapping):
            arrays, inputs = (), {**arrays[0], **inputs}
        reads = self._entries[entry].inputs
        names = [n for n in self._inputs if n in reads]
        if len(arrays) > len(names):
            names = list(self._inputs)
        if len(arrays) > len(names):
            raise TypeError(f"{call}() takes at most {len(names)} input arrays by position ({', '.join(names)}), "
                            f"got {len(arrays)}; pass the inputs by name ({', '.join(f'{n}=...' for n in names)})")
        named = dict(zip(names, arrays))
        both = [n for n in named if n in inputs]
        if both:
            raise TypeError(f"{call}() got input {both[0]!r} both by position and by name; pass the inputs "
                            f"by name ({', '.join(f'{n}=...' for n in names)})")
        named.update(inputs)
        return named

    def forward(self, *arrays: Any, **inputs: Any) -> dict[str, np.ndarray]:
        """Named outputs (eval mode: running statistics, no dropout)."""
        if "forward" not in self._entries:
            raise InputError(f"model {self.name!r} declares no outputs (use g.output(name, tensor))")
        if arrays:
            inputs = self._named("forward", "forward", arrays, inputs)
        frame = self._ready("forward", inputs)
        dtype = self.dtype
        outputs = [np.empty(shape, dtype) for shape in frame.result_shapes]
        self._call(frame, outputs)
        return dict(zip(frame.result_names, outputs))

    def _loss_spec(self, loss: str | None) -> dict:
        if loss is None and len(self._losses) == 1:
            return self._only_loss
        if not self._losses:
            raise InputError(f"model {self.name!r} declares no loss (use g.loss(expr))")
        if loss is None:
            if len(self._losses) > 1:
                raise InputError(f"model {self.name!r} has several losses {list(self._losses)}; pass loss=...")
            return next(iter(self._losses.values()))
        if loss not in self._losses:
            raise InputError(f"model {self.name!r} has no loss {loss!r}; its losses are {list(self._losses)}")
        return self._losses[loss]

    def loss(self, *arrays: Any, loss: str | None = None, training: bool = True, **inputs: Any) -> float:
        """The loss on a batch without gradients: in training mode (batch statistics, dropout),
        as loss_and_grad sees it, or with training=False as forward sees it."""
        spec = self._loss_spec(loss)
        entry = spec["entries"]["loss" if training else "eval"]
        if arrays:
            inputs = self._named("loss", entry, arrays, inputs)
        return self._run(entry, inputs).scalar_c[0]

    def loss_and_grad(self, *arrays: Any, loss: str | None = None,
                      **inputs: Any) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and the gradient of every parameter it trains (fresh arrays each call)."""
        spec = self._loss_spec(loss)
        if arrays:
            inputs = self._named("loss_and_grad", spec["entries"]["grad"], arrays, inputs)
        grads = aligned_empty(self.meta["param_size"], self.dtype)
        value = self._run(spec["entries"]["grad"], inputs, grads=grads).scalar_c[0]
        layout = {p["name"]: p for p in self.meta["params"]}
        return value, {n: self._view(grads, layout[n]) for n in spec["params"]}

    def train_step(self, *arrays: Any, loss: str | None = None, lr: float | None = None, **inputs: Any) -> float:
        """Forward, backward and the optimizer update in one native call; returns the loss
        (computed before the update). `lr` overrides the schedule for this step."""
        if arrays:
            spec = self._loss_spec(loss)
            if "train" in spec["entries"]:  # else _optimizer_call says there is no optimizer
                inputs = self._named("train_step", spec["entries"]["train"], arrays, inputs)
        return self._optimizer_call("train", loss, lr, inputs)

    def backward(self, *arrays: Any, loss: str | None = None, **inputs: Any) -> float:
        """The first half of `train_step`, one native call: the loss, the gradients written into
        the model's gradient buffer (the views `model.grads`, one flat array) and the running
        statistics updated, with the dropout stream of the coming step; no update, step unchanged.
        Then `apply_gradients` completes the step; between the two the gradients may be changed
        in place (e.g. summed across processes by bp.distributed)."""
        spec = self._loss_spec(loss)
        if "backward" not in spec["entries"]:
            raise InputError(f"model {self.name!r} was compiled without an optimizer (optimizer=None): it has the "
                             "forward, loss and gradient calls only")
        if arrays:
            inputs = self._named("backward", spec["entries"]["backward"], arrays, inputs)
        return self._run(spec["entries"]["backward"], inputs, counter=self.step + 1).scalar_c[0]

    def apply_gradients(self, loss: str | None = None, lr: float | None = None) -> None:
        """The second half of `train_step`, one native call: the fused optimizer update of the
        parameters trained by `loss` from the gradients now in the gradient buffer (`model.grads`),
        with the global clip_norm, weight decay and the learning rate of the schedule at the next
        step (or `lr`); then the step count advances. `backward` + `apply_gradients` computes the
        same parameters as `train_step`, bit for bit."""
        self._optimizer_call("update", loss, lr, {})

    def _optimizer_call(self, kind: str, loss: str | None, lr: float | None, inputs: Mapping[str, Any]) -> float:
        """A native call that applies the optimizer update at the next step ("train" or "update").
        Each named loss counts its own steps (Adam's bias correction, the schedule), as one
        torch optimizer per network would; the random streams follow the count of all updates."""
        spec = self._loss_spec(loss)
        if self.optimizer is None:
            raise InputError(f"model {self.name!r} was compiled without an optimizer (optimizer=None): it has the "
                             "forward, loss and gradient calls only; compile it with an optimizer to train it")
        name = spec["name"]
        optimizer = self.optimizer.for_loss(name)
        frame = self._ready(spec["entries"][kind], inputs)  # the thread's own: validated before locking
        lock = self._train_lock
        lock.acquire()  # not `with`: half its cost, on the path of every step
        try:
            step = self.loss_steps[name] + 1
            frame.set_hyper(optimizer, step, optimizer.lr_at(step) if lr is None else float(lr))
            if frame.run(self._step + 1):
                raise self._rejected(frame)
            self._step += 1
            self.loss_steps[name] = step
        finally:
            lock.release()
        return frame.scalar_c[0]

    # --- training loop (bpcompile.training) ----------------------------------------------
    def fit(self, data: Mapping[str, Any], epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            seed: int | None = None, validation: Mapping[str, Any] | None = None, loss: str | None = None,
            verbose: int | bool = 1, checkpoint: str | os.PathLike | None = None, *, stream: Any = None,
            callbacks: Any = None, metrics: Mapping[str, Callable] | None = None, train_metrics: bool = False,
            initial_epoch: int = 0, parallel: Any = None) -> dict[str, list[float]]:
        """Train on a dict of arrays (Keras's fit: callbacks, metrics, verbose 0/1/2); returns the
        history, a dict of lists ("loss", "val_loss", metrics, ...). See bpcompile.training.fit."""
        from ..train.fit import fit
        return fit(self, data, epochs=epochs, batch_size=batch_size, shuffle=shuffle, seed=seed,
                   validation=validation, loss=loss, verbose=verbose, stream=stream, checkpoint=checkpoint,
                   parallel=parallel, callbacks=callbacks, metrics=metrics, train_metrics=train_metrics,
                   initial_epoch=initial_epoch)

    def evaluate(self, data: Mapping[str, Any], batch_size: int = 256, loss: str | None = None,
                 metrics: Mapping[str, Callable] | None = None) -> dict[str, float]:
        """Mean loss (and accuracy for a classifier) over a dataset, and `metrics`
        ({name: fn(outputs, inputs) -> float}) on its outputs."""
        from ..train.fit import evaluate
        return evaluate(self, data, batch_size=batch_size, loss=loss, metrics=metrics)

    def predict(self, data: Mapping[str, Any] | None = None, *arrays: Any, batch_size: int = 256,
                **inputs: Any) -> dict[str, np.ndarray]:
        """Named outputs over a dataset, in batches: what `forward` returns, for any number of rows.
        The dataset is a dict, or arrays by name or position as `forward` takes them."""
        from ..train.fit import predict
        if data is not None and not isinstance(data, Mapping):
            arrays = (data, *arrays)
        elif data is not None:
            if arrays:
                raise TypeError("predict() takes a dataset dict or input arrays, not both")
            inputs = {**data, **inputs}
        if arrays:
            inputs = self._named("predict", "forward", arrays, inputs) if "forward" in self._entries else inputs
        return predict(self, inputs, batch_size=batch_size)

    # --- checkpoints -----------------------------------------------------------------------
    def _signature(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this model (runtime.checkpoint.signature)."""
        return signature(self)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter (running statistics included) as a fresh array under PyTorch's name and
        in PyTorch's layout for the bp.nn layers ("fc1.weight" (out, in), "bn.running_mean", ...)."""
        from .state import state_dict
        return state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Set parameters from a state dict named as `state_dict` gives it: NumPy arrays or torch
        tensors, e.g. a torch module's own `state_dict()`. Missing, unexpected (with strict) or
        misshapen entries are refused together in one InputError, and nothing is changed."""
        from .state import load_state_dict
        load_state_dict(self, state, strict=strict)

    def save(self, path: str | os.PathLike) -> None:
        """Write parameters, optimizer state and step count atomically: to a .safetensors file
        (parameters under their state_dict names) when the name ends so, else to an .npz."""
        from .state import is_safetensors, safetensors_bytes
        path = Path(path)
        with self._train_lock:  # one step's parameters, state and counts, even while another thread trains
            if is_safetensors(path):
                data = safetensors_bytes(self)
                write = lambda f: f.write(data)  # noqa: E731
            else:
                arrays = npz_arrays(self)
                write = lambda f: np.savez(f, **arrays)  # noqa: E731
        write_atomic(path, write)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by `save` (.npz or .safetensors) of a model of the same
        graph, dtype and optimizer, or a binary parameter file (bpcompile.export; e.g. saved by an
        exported C library). Everything is checked before anything changes."""
        from .paramfile import is_param_file, load_into_model
        from .state import is_safetensors, read_safetensors
        if is_param_file(path):
            return load_into_model(self, path)
        files = read_safetensors(self, path) if is_safetensors(path) else read_npz(path)
        restore(self, files, path)

    def set_steps(self, step: int, loss_steps: Any = None) -> None:
        """Set the count of all updates and each loss's own (in the order of the model's losses;
        when not given, as a checkpoint of before per-loss counts: every loss at `step`)."""
        counts = [step] * len(self._losses) if loss_steps is None else [int(n) for n in np.ravel(loss_steps)]
        if len(counts) != len(self._losses) or min(counts + [step]) < 0:
            raise CheckpointError(f"step counts {counts} do not fit this model's losses {list(self._losses)}")
        self._step = int(step)
        self.loss_steps = dict(zip(self._losses, counts))

    def __repr__(self) -> str:
        return (f"<CompiledModel {self.name!r} {self.dtype.name}, {self.param_count} parameters, "
                f"entries {list(self._entries)} at {self.build_path}>")


def load(build_path: str | Path, seed: int = 0) -> CompiledModel:
    """Load a built model from its folder (no SymPy, no compiler); parameters drawn with `seed`."""
    return CompiledModel(build_path, seed=seed)
