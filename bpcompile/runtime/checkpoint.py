"""Checkpoint files: reading an .npz checkpoint, and writing any file atomically."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import CheckpointError


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
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
