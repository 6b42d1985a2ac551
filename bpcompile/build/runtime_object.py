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
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import CompileError
from . import cffi_build

FOLDER = ".runtime"  # inside the build root
SOURCE = "runtime.c"
OBJECT = "runtime.o"

_started: dict[tuple[str, Path], threading.Thread] = {}
_lock = threading.Lock()


def start(runtime_c: str, dtype: str, root: Path) -> None:
    """Begin compiling `runtime_c` for `root` on a thread of its own, unless it is cached or begun.
    A failure is left for `get`, which compiles again and reports it."""
    where = (hashlib.sha256(runtime_c.encode()).hexdigest(), Path(root).resolve())
    with _lock:
        if where in _started:
            return
        thread = threading.Thread(target=_compile_quietly, args=(runtime_c, dtype, Path(root)), daemon=True,
                                  name="bpcompile-runtime")
        _started[where] = thread
    thread.start()


def get(runtime_c: str, root: Path, defines: dict[str, str]) -> tuple[Path, list[str]]:
    """The compiled runtime (its cached object file) and the command that compiled it: the one `start`
    began for these sources, once it is done, else compiled now."""
    where = (hashlib.sha256(runtime_c.encode()).hexdigest(), Path(root).resolve())
    with _lock:
        thread = _started.pop(where, None)
    if thread is not None:
        thread.join()
    return _compiled(runtime_c, Path(root), defines)


def _compile_quietly(runtime_c: str, dtype: str, root: Path) -> None:
    with contextlib.suppress(CompileError, OSError):
        _compiled(runtime_c, root, cffi_build.build_defines(dtype))


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


def _compiled(runtime_c: str, root: Path, defines: dict[str, str]) -> tuple[Path, list[str]]:
    folder = root / FOLDER
    name = key(runtime_c, defines)
    obj, record = folder / f"{name}.o", folder / f"{name}.json"
    cmd = command(defines)
    if _verifies(obj, record):
        return obj, cmd
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as tmp:
        (Path(tmp) / SOURCE).write_text(runtime_c, encoding="utf-8")
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        except OSError as e:
            raise CompileError(f"the C compiler {cmd[0]!r} could not be started for the runtime support ({e})",
                               str(Path(tmp) / SOURCE)) from e
        if done.returncode != 0:
            raise CompileError("the C compiler failed on bpcompile's runtime support (runtime.c)", None, done.stderr)
        built = Path(tmp) / OBJECT
        os.chmod(built, 0o644)
        meta = json.dumps(cffi_build.file_record(built))
        os.replace(built, obj)  # the object first, its record after: a record never names a missing object
        _write_atomically(record, meta, folder)
    return obj, cmd


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
