"""The runtime support compiled once and linked into every module: templates/runtime.c.j2 (the thread
pool, the products that are not inline, the workspace plan) depends on the dtype, the thresholds
and the build's settings, not on the model, and it was most of a small model's compile (gcc -O3
takes 0.35 s of CPU over it, the 2-16-1 MLP's kernels 0.15 s). `start` has gcc compile it on
another core while Python lowers the graph; `get` gives the object file the module links.

An object is cached as <build root>/.runtime/<key>.o, the key hashing its source, the compiler and
its flags, the macros and the CPU, beside <key>.json with its size and sha256: an object that does
not verify is compiled again, and written by rename, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..errors import CompileError
from . import cffi_build

FOLDER = ".runtime"  # inside the build root
SOURCE = "runtime.c"
OBJECT = "runtime.o"

_pending: dict[tuple[str, Path], tuple[subprocess.Popen, Path]] = {}  # begun by `start`: gcc, its folder
_lock = threading.Lock()


def start(runtime_c: str, dtype: str, root: Path) -> None:
    """Start gcc on `runtime_c` for `root` and return at once, unless the object is cached or begun.
    A failure to start is left for `get`, which compiles again and reports it."""
    with contextlib.suppress(CompileError, OSError):
        defines = cffi_build.build_defines(dtype)
        where = (key(runtime_c, defines), Path(root).resolve())
        obj, record = _paths(Path(root), where[0])
        with _lock:
            if where in _pending or _verifies(obj, record):
                return
            _pending[where] = _begin(runtime_c, Path(root), defines)


def get(runtime_c: str, root: Path, defines: dict[str, str]) -> tuple[Path, list[str]]:
    """The compiled runtime (its cached object file) and the command that compiled it: the compile
    `start` began for these sources and settings, once done, else one run now."""
    name = key(runtime_c, defines)
    obj, record = _paths(Path(root), name)
    with _lock:
        begun = _pending.pop((name, Path(root).resolve()), None)
    if begun is None:
        if _verifies(obj, record):
            return obj, command(defines)
        begun = _begin(runtime_c, Path(root), defines)
    proc, tmp = begun
    try:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise CompileError("the C compiler failed on bpcompile's runtime support (runtime.c)", None, err)
        built = tmp / OBJECT
        os.chmod(built, 0o644)
        meta = json.dumps(cffi_build.file_record(built))
        os.replace(built, obj)  # the object first, its record after: a record never names a missing object
        _write_atomically(record, meta, obj.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return obj, command(defines)


def _begin(runtime_c: str, root: Path, defines: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    (tmp / SOURCE).write_text(runtime_c, encoding="utf-8")
    cmd = command(defines)
    try:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompileError(f"the C compiler {cmd[0]!r} could not be started for the runtime support ({e})") from e
    return proc, tmp


def _remove_stale_temporaries(folder: Path) -> None:
    """Drop the folders of compiles a killed process (or one whose compile failed before it linked)
    left, once they are an hour old."""
    now = time.time()
    for p in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > cffi_build.STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def _paths(root: Path, name: str) -> tuple[Path, Path]:
    return root / FOLDER / f"{name}.o", root / FOLDER / f"{name}.json"


def command(defines: dict[str, str]) -> list[str]:
    """gcc's command line for runtime.c, run in the folder that holds it."""
    defs = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    return [cffi_build.compiler()[0], *cffi_build.model_flags(), *defs, "-DBP_PART=-1", "-DBP_RUNTIME_APART=1",
            "-c", SOURCE, "-o", OBJECT]


def key(runtime_c: str, defines: dict[str, str]) -> str:
    h = hashlib.sha256()
    for part in (runtime_c, json.dumps(command(defines)), cffi_build.compiler()[1], cffi_build.cpu_signature()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _verifies(obj: Path, record: Path) -> bool:
    try:
        return cffi_build.file_record(obj) == json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _write_atomically(path: Path, text: str, folder: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private: a shared cache serves other users too
    os.replace(tmp, path)
