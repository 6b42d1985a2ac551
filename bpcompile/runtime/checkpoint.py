"""Checkpoints of a CompiledModel: what an .npz holds (`npz_arrays`), the signature a checkpoint
must match (`signature`), restoring one with everything checked before anything changes
(`restore`), and writing any file atomically (`write_atomic`). The .safetensors form and the
state dict are in runtime.state, the exported C library's parameter file in runtime.paramfile."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .model import CompiledModel

MAX_STEP = 2**53  # step counts beyond it lose their integer in the float64 hyperparameters


def signature(model: CompiledModel) -> dict[str, Any]:
    """What a checkpoint records of its model, and must match to be loaded into another."""
    return {"graph": model.name, "dtype": model.dtype.name,
            "params": [[p["name"], p["shape"]] for p in model.meta["params"]],
            "state_size": model.meta["state_size"],
            "optimizer": (model.meta.get("optimizer") or {}).get("kind")}


def npz_arrays(model: CompiledModel) -> dict[str, np.ndarray]:
    """The arrays of an .npz checkpoint of `model` (copies): parameters, optimizer state, step
    counts and the signature."""
    arrays = {f"param/{k}": v.copy() for k, v in model.params.items()}
    arrays["state"] = model._state_flat[:model.meta["state_size"]].copy()
    arrays["step"] = np.asarray(model.step, dtype=np.int64)
    arrays["loss_steps"] = np.asarray([model.loss_steps[n] for n in model._losses], dtype=np.int64)
    arrays["signature"] = np.asarray(json.dumps(signature(model)))
    return arrays


def restore(model: CompiledModel, files: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Set parameters, optimizer state and step from a checkpoint's arrays, all checked first."""
    if "signature" not in files:
        raise CheckpointError(f"{path}: not a bpcompile checkpoint (no signature)")
    try:
        theirs = json.loads(str(files["signature"]))
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{path}: damaged checkpoint (unreadable signature)")
    mine = signature(model)
    for key in ("graph", "dtype", "params", "state_size", "optimizer"):
        if theirs.get(key) != mine[key]:
            raise CheckpointError(f"{path}: checkpoint {key} {theirs.get(key)!r} does not match this "
                                  f"model's {mine[key]!r}")
    expected = {f"param/{name}": view.shape for name, view in model.params.items()}
    expected["state"] = (model.meta["state_size"],)
    expected["step"] = ()
    for key, shape in expected.items():  # check everything before changing anything
        if key not in files:
            raise CheckpointError(f"{path}: damaged checkpoint, {key!r} is missing")
        if files[key].shape != shape or files[key].dtype.kind not in "fi":
            raise CheckpointError(f"{path}: {key!r} has shape {files[key].shape} and dtype {files[key].dtype}, "
                                  f"this model needs shape {shape} numbers")
    if "loss_steps" in files and files["loss_steps"].shape != (len(model._losses),):
        raise CheckpointError(f"{path}: 'loss_steps' has shape {files['loss_steps'].shape}, this model has "
                              f"{len(model._losses)} losses")
    for key in ("step", "loss_steps"):
        counts = np.ravel(files.get(key, np.zeros(0)))
        if counts.size and not (np.all(np.isfinite(counts)) and np.all(counts == np.round(counts))
                                and counts.min() >= 0 and counts.max() < MAX_STEP):
            raise CheckpointError(f"{path}: {key!r} holds {counts.tolist()}; step counts are whole numbers "
                                  f"from 0 to {MAX_STEP - 1}")
    for name, view in model.params.items():
        view[...] = files[f"param/{name}"]
    model._state_flat[:model.meta["state_size"]] = files["state"]
    model.set_steps(int(files["step"]), files.get("loss_steps"))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz checkpoint; a CheckpointError when it is unreadable or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    except Exception as e:  # zipfile.BadZipFile and friends on truncated files
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write` writes to a file, so that a reader (or a crash) sees the
    old or the new content, never a part: temporary file, fsync, rename."""
    path = Path(path)
    _remove_orphaned_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(f.fileno(), 0o666 & ~mask)  # mkstemp makes it private; this is an ordinary file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_orphaned_temporaries(path: Path) -> None:
    """Delete the temporary files of earlier writes of `path` whose process is gone (killed
    mid-save): their names carry the writer's process id."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass  # another writer removed it first, or it is not ours to remove


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a temporary file named after a live writer is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
