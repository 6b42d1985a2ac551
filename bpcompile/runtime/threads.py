"""How many threads bpcompile's native modules use.

Every compiled module has its own small thread pool (templates/module.c.j2): large matrix
products are split across it by rows or columns, long elementwise loops by ranges, recurrent
layers by batch rows. bpcompile's copy of OpenBLAS runs single-threaded inside those pieces, so
no two thread pools compete for the cores. A pool's workers start at its first large piece of
work, so models whose work is all small never start a thread.

  BPCOMPILE_NUM_THREADS=<n>   the pool size, the calling thread included (default: the cores
                              this process may run on)

`set_num_threads(n)` changes it at run time, for loaded models and those loaded later.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_LOCK = threading.Lock()
_LIBS: list[Any] = []  # the loaded modules' native libraries
_COUNT: int | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _from_environment() -> int:
    text = os.environ.get("BPCOMPILE_NUM_THREADS", "").strip()
    if not text:
        return _cores()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"BPCOMPILE_NUM_THREADS must be a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise ValueError(f"BPCOMPILE_NUM_THREADS must be >= 1, got {n}")
    return n


def num_threads() -> int:
    """The thread count bpcompile's modules use (the calling thread included)."""
    global _COUNT
    with _LOCK:
        if _COUNT is None:
            _COUNT = _from_environment()
        return _COUNT


def set_num_threads(n: int) -> None:
    """Use `n` threads (the calling thread included) in every loaded and later loaded model;
    1 runs everything on the calling thread."""
    global _COUNT
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be an integer >= 1, got {n!r}")
    with _LOCK:
        _COUNT = n
        for lib in _LIBS:
            lib.bp_set_num_threads(n)


def attach(lib: Any) -> None:
    """Give a newly loaded module the current thread count, and follow later changes."""
    n = num_threads()
    with _LOCK:
        lib.bp_set_num_threads(n)
        _LIBS.append(lib)
