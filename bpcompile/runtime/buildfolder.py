"""Verifying a build folder before anything in it runs or is trusted.

`read_meta` parses meta.json with every field of its type; `check_target` refuses a build made
for another Python, system, architecture or CPU; `check_files` compares the size and sha256 of
every recorded file (the module among them); `check_record` compares meta.json with the
module's own record of it (`bp_layout()`, see build.cffi_build), so neither a damaged module
nor a damaged meta.json is ever run or trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CompileError
from .target import cpu_flags, this_target, without_lr

REBUILD = "recompile the model (bp.compile replaces a damaged build)"
# meta.json's top-level fields and the JSON types each may hold: all are required
META_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "name": (str,), "dtype": (str,), "dims": (list,), "inputs": (list,), "params": (list,),
    "param_size": (int,), "state_size": (int,), "optimizer": (dict, type(None)), "outputs": (list,),
    "losses": (list,), "entries": (dict,), "module": (str,), "module_file": (str,), "key": (str,),
    "blas": (dict, type(None)), "files": (dict,), "init_file": (str, type(None)), "target": (dict,),
}
# meta.json's "target" (build.cffi_build.target): where the build runs, each entry against this process
TARGET_FIELDS = {"system": "the operating system", "machine": "the machine architecture",
                 "python": "the Python implementation", "ext_suffix": "the Python extension ABI"}


def _damaged(folder: Path, what: str) -> CompileError:
    return CompileError(f"damaged build folder {folder}: {what}; {REBUILD}")


def read_meta(folder: Path) -> dict:
    """A build folder's meta.json, parsed, with every top-level field present and of its type."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a bpcompile build folder (no such folder)")
    try:
        text = (folder / "meta.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompileError(f"{folder} is not a bpcompile build folder, or a damaged one: it has no meta.json; "
                           f"{REBUILD}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(folder, f"meta.json is unreadable ({e})") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise _damaged(folder, f"meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _damaged(folder, f"meta.json holds {_json_kind(meta)}, not an object")
    for key, kinds in META_FIELDS.items():
        if key not in meta:
            raise _damaged(folder, f"meta.json has no field {key!r}")
        if not _of_kind(meta[key], kinds):
            raise _damaged(folder, f"meta.json field {key!r} is {_short(meta[key])}, not "
                                   f"{' or '.join(_json_kind(k) for k in kinds)}")
    if meta["init_file"] is not None and meta["init_file"] not in meta["files"]:
        raise _damaged(folder, f"meta.json records no size and sha256 of {meta['init_file']!r}")
    if not _file_name(meta["module_file"]):
        raise _damaged(folder, f"meta.json field 'module_file' is {meta['module_file']!r}, not a file name")
    if not meta["module"].isidentifier():
        raise _damaged(folder, f"meta.json field 'module' is {meta['module']!r}, not a module name")
    if meta["blas"] is not None and not all(isinstance(meta["blas"].get(k), str) for k in ("name", "libdir", "file")):
        raise _damaged(folder, f"meta.json field 'blas' is {_short(meta['blas'])}, not a library's record")
    return meta


def check_files(folder: Path, meta: dict) -> None:
    """Every file meta.json records (the module file among them) is there with the recorded size
    and sha256; else a CompileError naming the file and what differs."""
    files = meta["files"]
    if meta["module_file"] not in files:
        raise _damaged(folder, f"meta.json records no size and sha256 of the module {meta['module_file']}")
    for name, want in files.items():
        if not (_file_name(name) and isinstance(want, dict) and _of_kind(want.get("size"), (int,))
                and isinstance(want.get("sha256"), str)):
            raise _damaged(folder, f"meta.json's record of file {name!r} is malformed ({_short(want)})")
        path = Path(folder) / name
        if not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise _damaged(folder, f"{name} has {size} bytes, the build wrote {want['size']} (size mismatch)")
        if _sha256(path) != want["sha256"]:
            raise _damaged(folder, f"{name} does not have the sha256 the build recorded (hash mismatch: its "
                                   "content is damaged)")


def check_record(folder: Path, meta: dict, built: dict) -> None:
    """meta.json against the module's own record of it: a CompileError naming the first field
    that differs, types included (so an edited state_size or buffer list never sizes a buffer)."""
    mine = {k: v for k, v in meta.items() if k != "files"}  # the record holds the module's hash: not in it
    mine["optimizer"] = without_lr(mine.get("optimizer"))  # nor the learning rates, not part of the build
    found = _difference(mine, built, "")
    if found is None:
        return
    field, given, want = found
    if given is _ABSENT:
        what = f"meta.json has no field {field!r} (the module was built with {_short(want)})"
    elif want is _ABSENT:
        what = f"meta.json field {field!r} is not in the module's record of its metadata"
    else:
        what = f"meta.json field {field!r} is {_short(given)}, but the module was built with {_short(want)}"
    raise _damaged(folder, what)


_ABSENT = object()


def _difference(given: Any, want: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first (path, given, wanted) where two JSON values differ, types included; else None."""
    if isinstance(want, dict) and isinstance(given, dict):
        for key in list(want) + [k for k in given if k not in want]:
            found = _difference(given.get(key, _ABSENT), want.get(key, _ABSENT), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(given, list) and len(want) == len(given):
        for i, (g, w) in enumerate(zip(given, want)):
            found = _difference(g, w, f"{path}[{i}]")
            if found:
                return found
        return None
    if type(given) is type(want) and (given == want or given != given and want != want):  # NaN is NaN
        return None
    return path, given, want


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_name(name: str) -> bool:
    return Path(name).name == name and name not in ("", ".", "..")


def _of_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    return any(type(value) is k for k in kinds)  # type(): true is no integer here


def _json_kind(value: Any) -> str:
    kind = value if isinstance(value, type) else type(value)
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true/false", type(None): "null"}.get(kind, kind.__name__)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_target(folder: Path, meta: dict) -> None:
    """The build was made for this Python, system, architecture and a CPU with every feature this
    one has; else a CompileError naming the folder, what the build needs and what is here (a
    module compiled with -march=native for another CPU may die of an illegal instruction)."""
    want = meta["target"]
    for key in TARGET_FIELDS:
        if not isinstance(want.get(key), str):
            raise _damaged(folder, f"meta.json field 'target.{key}' is {_short(want.get(key))}, not a string")
    needed = want.get("cpu_features")
    if needed is not None and not (isinstance(needed, list) and all(isinstance(f, str) for f in needed)):
        raise _damaged(folder, f"meta.json field 'target.cpu_features' is {_short(needed)}, not a list of names")
    here = this_target()
    for key, what in TARGET_FIELDS.items():
        if want[key] != here[key]:
            raise CompileError(f"{folder} was built for {what} {want[key]!r}, but this process runs on "
                               f"{here[key]!r}; {REBUILD_HERE}")
    flags = cpu_flags()
    missing = sorted(set(needed) - flags) if needed and flags is not None else []
    if missing:
        raise CompileError(f"{folder} was compiled (-march=native) for a CPU with {', '.join(missing)} (and "
                           f"{len(needed) - len(missing)} more features this one has), but this machine's CPU "
                           f"lacks {'it' if len(missing) == 1 else 'them'} (not among its {len(flags)} /proc/cpuinfo "
                           f"flags): the module could die of an illegal instruction; {REBUILD_HERE}")


REBUILD_HERE = "recompile the model on this machine (bp.compile builds it for this one)"
