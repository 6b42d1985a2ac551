"""The binary parameter file: the exported C library's `params.bin` and `bp_model_save`'s
files, which `CompiledModel.save`/`load` read and write too. Part of the runtime, so loading one
needs no SymPy, Jinja2 or compiler.

The parameter file ("BPPARAM1", version 1, or 2 with per-loss step counts; all integers
little-endian)::

    offset 0   8 bytes  magic b"BPPARAM1"
           8   u32      format version: 1, or 2 when the file holds loss step records (kind 2)
          12   u32      bytes per value: 4 (float32) or 8 (float64), little-endian IEEE 754
          16   u32      number of records
          20   u32      reserved, 0
          24   u64      optimizer step count (of a model with several losses: all of their updates)
          32   records: u32 kind (0 parameter, 1 optimizer state), u32 name length, the UTF-8
               name (a state record is named "<slot>/<parameter>", e.g. "m/W1"), u32 rank,
               rank x u64 dimensions, then the values, row-major;
               or u32 kind 2 (a named loss's own step count), u32 name length, the loss's
               name, u64 its step count (Adam's bias correction, the schedule of that loss).

`read_param_file` / `write_param_file` read and write it; `CompiledModel.load(path)` accepts it
as well as its own .npz checkpoints (`load_into_model`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CheckpointError
from .checkpoint import write_atomic

MAGIC = b"BPPARAM1"
VERSION, VERSION_LOSS_STEPS = 1, 2  # version 2: a file with loss step records
HEADER = struct.Struct("<8sIIIIQ")
KIND_PARAM, KIND_STATE, KIND_LOSS_STEP = 0, 1, 2


# --- the parameter file ---------------------------------------------------------------------

@dataclass
class ParamFile:
    """The contents of a parameter file: parameters, optimizer state per slot, step counts."""

    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # slot -> parameter -> values
    step: int = 0
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    loss_steps: dict[str, int] = field(default_factory=dict)  # loss name -> its own step count


def is_param_file(path: str | os.PathLike) -> bool:
    """Whether `path` starts with the parameter file's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def write_param_file(path: str | os.PathLike, params: Mapping[str, Any], *, dtype: Any = None,
                     state: Mapping[str, Mapping[str, Any]] | None = None, step: int = 0,
                     loss_steps: Mapping[str, int] | None = None) -> None:
    """Write parameters (and optionally optimizer state, {slot: {param: array}}, and each named
    loss's step count, {loss: count}: a version 2 file) atomically.

    `dtype` (float32 or float64) defaults to the first parameter's float type."""
    write_atomic(Path(path), param_file_writer(params, dtype=dtype, state=state, step=step, loss_steps=loss_steps))


def param_file_writer(params: Mapping[str, Any], *, dtype: Any = None,
                       state: Mapping[str, Mapping[str, Any]] | None = None,
                       step: int = 0, loss_steps: Mapping[str, int] | None = None) -> Callable[[BinaryIO], None]:
    """A function writing the parameter file of `params` to an open binary file (checked first)."""
    arrays = {str(k): np.asarray(v) for k, v in params.items()}
    if dtype is None:
        first = next(iter(arrays.values()), np.zeros(0, np.float32))
        dtype = first.dtype if first.dtype in (np.float32, np.float64) else np.float32
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameter files hold float32 or float64 values, not {dtype}")
    records: list[tuple[int, str, np.ndarray]] = [(KIND_PARAM, k, v) for k, v in arrays.items()]
    for slot, values in (state or {}).items():
        if "/" in slot:
            raise ValueError(f"optimizer slot name {slot!r} must not contain '/'")
        records += [(KIND_STATE, f"{slot}/{k}", np.asarray(v)) for k, v in values.items()]
    counts = {str(k): _step_count(v, f"loss {k!r}'s step count") for k, v in (loss_steps or {}).items()}
    version = VERSION_LOSS_STEPS if counts else VERSION

    def write(f) -> None:
        f.write(HEADER.pack(MAGIC, version, dtype.itemsize, len(records) + len(counts), 0, int(step)))
        for kind, name, value in records:
            if value.dtype.kind not in "fiub":
                raise ValueError(f"{name}: values must be numbers, got {value.dtype}")
            raw = name.encode("utf-8")
            f.write(struct.pack("<II", kind, len(raw)) + raw + struct.pack("<I", value.ndim))
            f.write(struct.pack(f"<{value.ndim}Q", *value.shape))
            f.write(np.ascontiguousarray(value, dtype=dtype.newbyteorder("<")).tobytes())
        for name, count in counts.items():
            raw = name.encode("utf-8")
            f.write(struct.pack("<II", KIND_LOSS_STEP, len(raw)) + raw + struct.pack("<Q", count))

    return write


def _step_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < 2**63:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    return int(value)


def read_param_file_full(path: str | os.PathLike) -> ParamFile:
    """Every record of a parameter file; raises CheckpointError on anything malformed."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) < HEADER.size or data[:8] != MAGIC:
        raise CheckpointError(f"{path}: not a bpcompile parameter file (no {MAGIC.decode()} header)")
    _, version, itemsize, count, _, step = HEADER.unpack_from(data)
    if version not in (VERSION, VERSION_LOSS_STEPS):
        raise CheckpointError(f"{path}: parameter file version {version}; this bpcompile reads versions "
                              f"{VERSION} and {VERSION_LOSS_STEPS}")
    if itemsize not in (4, 8):
        raise CheckpointError(f"{path}: {itemsize} bytes per value; expected 4 (float32) or 8 (float64)")
    dtype = np.dtype("<f4" if itemsize == 4 else "<f8")
    out = ParamFile({}, {}, int(step), np.dtype(np.float32 if itemsize == 4 else np.float64))
    pos = HEADER.size
    try:
        for _ in range(count):
            kind, length = struct.unpack_from("<II", data, pos)
            pos += 8
            name = data[pos:pos + length].decode("utf-8")
            if len(name.encode("utf-8")) != length:
                raise struct.error("truncated name")
            pos += length
            if kind == KIND_LOSS_STEP and version == VERSION_LOSS_STEPS:
                (out.loss_steps[name],) = struct.unpack_from("<Q", data, pos)
                pos += 8
                continue
            (ndim,) = struct.unpack_from("<I", data, pos)
            pos += 4
            shape = struct.unpack_from(f"<{ndim}Q", data, pos)
            pos += 8 * ndim
            n = int(np.prod(shape, dtype=np.int64))
            if pos + n * itemsize > len(data):
                raise struct.error("truncated values")
            value = np.frombuffer(data, dtype=dtype, count=n, offset=pos).reshape(shape).astype(out.dtype)
            pos += n * itemsize
            if kind == KIND_PARAM:
                out.params[name] = value
            elif kind == KIND_STATE and "/" in name:
                slot, pname = name.split("/", 1)
                out.state.setdefault(slot, {})[pname] = value
            else:
                raise CheckpointError(f"{path}: record {name!r} has unknown kind {kind}")
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: damaged parameter file ({e})") from None
    if pos != len(data):
        raise CheckpointError(f"{path}: damaged parameter file ({len(data) - pos} unexpected trailing bytes)")
    return out


def read_param_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of a parameter file, by name (in the file's float type)."""
    return read_param_file_full(path).params


def save_model_params(model: Any, path: str | os.PathLike, with_state: bool = True) -> None:
    """Write a CompiledModel's parameters (and optimizer state and step counts: each loss's own
    when it has several) as a parameter file."""
    state = {}
    if with_state and model.meta["state_size"] and model.optimizer is not None:
        size = model.meta["param_size"]
        for k, slot in enumerate(model.optimizer.slots):
            flat = model._state_flat[k * size:(k + 1) * size]
            state[slot] = {p["name"]: model._view(flat, p) for p in model.meta["params"]}
    several = with_state and model.optimizer is not None and len(model.loss_steps) > 1
    loss_steps = dict(model.loss_steps) if several else {}
    write_param_file(path, model.params, dtype=model.dtype, state=state,
                     step=model.step if state or loss_steps else 0, loss_steps=loss_steps)


def load_into_model(model: Any, path: str | os.PathLike) -> None:
    """Restore a CompiledModel from a parameter file: every parameter by name and shape, and the
    optimizer state and step when the file has them (else the state is cleared, step 0)."""
    pf = read_param_file_full(path)
    mine = {p["name"]: tuple(p["shape"]) for p in model.meta["params"]}
    extra = [k for k in pf.params if k not in mine]
    if extra:
        raise CheckpointError(f"{path}: parameter {extra[0]!r} is not a parameter of model {model.name!r} "
                              f"(its parameters: {list(mine)})")
    for name, shape in mine.items():
        if name not in pf.params:
            raise CheckpointError(f"{path}: no values for parameter {name!r} of model {model.name!r}")
        if pf.params[name].shape != shape:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {pf.params[name].shape}, the model's is "
                                  f"{shape}")
    slots = tuple(model.optimizer.slots) if model.optimizer is not None and model.meta["state_size"] else ()
    if pf.state:
        if set(pf.state) != set(slots) or any(set(v) != set(mine) for v in pf.state.values()):
            raise CheckpointError(f"{path}: optimizer state slots {sorted(pf.state)} do not match this model's "
                                  f"optimizer ({list(slots) or 'no state'})")
        for slot, values in pf.state.items():
            for name, value in values.items():
                if value.shape != mine[name]:
                    raise CheckpointError(f"{path}: state {slot}/{name} has shape {value.shape}, expected "
                                          f"{mine[name]}")
    if pf.loss_steps and set(pf.loss_steps) != set(model.loss_steps):
        raise CheckpointError(f"{path}: step counts of losses {sorted(pf.loss_steps)}; model {model.name!r} has "
                              f"losses {sorted(model.loss_steps)}")
    for name, view in model.params.items():
        view[...] = pf.params[name]
    model._state_flat[...] = 0
    size = model.meta["param_size"]
    for k, slot in enumerate(slots):
        if slot in pf.state:
            flat = model._state_flat[k * size:(k + 1) * size]
            for p in model.meta["params"]:
                model._view(flat, p)[...] = pf.state[slot][p["name"]]
    if pf.loss_steps:
        model.set_steps(pf.step, [pf.loss_steps[n] for n in model.loss_steps])
    else:  # one count (a file of one loss, or of before per-loss counts): every loss's
        model.set_steps(pf.step if pf.state else 0)
