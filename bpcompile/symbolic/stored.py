"""Derived partials kept on disk, in the build folder, so that the processes building into it
derive each elementwise function once: sympy.simplify and the fit in the output take 5-70 ms per
function (gelu 70 ms, softplus 45 ms, tanh 28 ms; a Mish MLP or an LSTM derives several), a stored
partial reads back in about a millisecond.

An entry is a JSON file named by the sha256 of everything that decides it: the function's
expression (srepr), the argument, SymPy's version and the source of the module that derives it
(symbolic.functions). Expressions are stored as trees of SymPy class names with their arguments and
read back through SymPy's classes only (no eval, no pickle); symbols through the caller's table. The
caller uses an entry only once it verifies (functions._derive: the raw derivative equal to
sympy.diff's again, the chosen form equal to it at sample points), so a damaged or foreign entry
is derived afresh and rewritten. Without a folder (`bp.lower`, `bpcompile show`) nothing is stored.

The partials of the built-in functions also ship with bpcompile (builtin_partials.json, written by
`python -m bpcompile.symbolic.write_shipped`; a test keeps it current), so a first compile in an empty
folder derives none of them: they are keyed by the function and argument alone and verified as a
folder's entries are, so a SymPy that differentiates differently derives them afresh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sympy as sp
from sympy.functions.elementary.piecewise import ExprCondPair

FOLDER = ".derivations"  # inside the build folder
SHIPPED = Path(__file__).with_name("builtin_partials.json")
_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bpcompile_derivations", default=None)
_EXTRA_CLASSES = {"ExprCondPair": ExprCondPair}
_FLOAT = re.compile(r"Float\('([-+0-9.e]+)', precision=(\d+)\)")


class NotStorable(ValueError):
    """An expression with a part this module cannot write and read back as itself."""


@contextlib.contextmanager
def stored_in(build_root: Path | str) -> Iterator[None]:
    """Within the block, partials derived are looked up in and written to `build_root`/.derivations."""
    token = _folder.set(Path(build_root) / FOLDER)
    try:
        yield
    finally:
        _folder.reset(token)


def entry_key(*parts: str) -> str:
    h = hashlib.sha256()
    for part in (*parts, sp.__version__, _source_digest()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _source_digest() -> str:
    """The derivation's code: symbolic/functions.py and this module, so a changed rule never reads
    an old entry."""
    here = Path(__file__).resolve().parent
    return hashlib.sha256((here / "functions.py").read_bytes() + Path(__file__).read_bytes()).hexdigest()


def shipped_key(*parts: str) -> str:
    """The key of a partial shipped with bpcompile: what names the function and argument, no more."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@functools.cache
def _shipped() -> dict[str, Any]:
    try:
        data = json.loads(SHIPPED.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load(key: str, symbols: dict[str, sp.Symbol]) -> dict[str, Any] | None:
    """The stored entry of `key` with its expressions read back, or None (no folder, no entry, or
    one that does not read as expressions over `symbols`)."""
    folder = _folder.get()
    if folder is None:
        return None
    try:
        return _read_back(json.loads((folder / f"{key}.json").read_text(encoding="utf-8")), symbols)
    except (OSError, ValueError):
        return None


def load_shipped(key: str, symbols: dict[str, sp.Symbol]) -> dict[str, Any] | None:
    """The shipped entry of `key` (shipped_key), read back as `load` reads a stored one, or None."""
    return _read_back(_shipped().get(key), symbols)


def _read_back(data: Any, symbols: dict[str, sp.Symbol]) -> dict[str, Any] | None:
    try:
        return {k: decode(v, symbols) if k.endswith("expr") else v for k, v in data.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, sp.SympifyError):
        return None


def store(key: str, entry: dict[str, Any], symbols: dict[str, sp.Symbol]) -> None:
    """Write an entry (values named *expr are SymPy expressions) atomically; silently not when there
    is no folder, it cannot be written, or an expression does not read back as itself."""
    folder = _folder.get()
    if folder is None:
        return
    try:
        data = {k: encode(v) if k.endswith("expr") else v for k, v in entry.items()}
        if any(decode(data[k], symbols) != v for k, v in entry.items() if k.endswith("expr")):
            return
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, folder / f"{key}.json")
    except (OSError, NotStorable, RecursionError):
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def encode(e: sp.Basic) -> list:
    """A JSON tree of `e`: [class name, arguments...], numbers and symbols by value."""
    if isinstance(e, sp.Symbol):
        return ["Symbol", e.name]
    if isinstance(e, sp.Integer):
        return ["Integer", str(e.p)]
    if isinstance(e, sp.Rational):
        return ["Rational", str(e.p), str(e.q)]
    if isinstance(e, sp.Float):
        found = _FLOAT.fullmatch(sp.srepr(e))
        if found is None:
            raise NotStorable(f"a float SymPy writes as {sp.srepr(e)}")
        return ["Float", found.group(1), int(found.group(2))]
    name = type(e).__name__
    if not e.args:
        if getattr(sp.S, name, None) is not e:
            raise NotStorable(f"the atom {e!r}")
        return ["S", name]
    if _class(name) is not type(e):
        raise NotStorable(f"the class {name}")
    return [name, *(encode(a) for a in e.args)]


def decode(tree: list, symbols: dict[str, sp.Symbol]) -> sp.Basic:
    kind = tree[0]
    if kind == "Symbol":
        return symbols[tree[1]]
    if kind == "Integer":
        return sp.Integer(int(tree[1]))
    if kind == "Rational":
        return sp.Rational(int(tree[1]), int(tree[2]))
    if kind == "Float":
        return sp.Float(str(tree[1]), precision=int(tree[2]))
    if kind == "S":
        atom = getattr(sp.S, str(tree[1]))
        if not isinstance(atom, sp.Basic):
            raise ValueError(f"not a SymPy atom: {tree[1]!r}")
        return atom
    cls = _class(str(kind))
    if cls is None:
        raise ValueError(f"not a SymPy class: {kind!r}")
    return cls(*(decode(a, symbols) for a in tree[1:]))


def _class(name: str) -> type | None:
    cls = _EXTRA_CLASSES.get(name) or getattr(sp, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, sp.Basic) else None
