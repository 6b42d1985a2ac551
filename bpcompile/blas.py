"""bpcompile's own copy of OpenBLAS (from the scipy-openblas32 wheel): which kernels and threads.

OpenBLAS picks its kernels once, when the library loads, and honours OPENBLAS_CORETYPE. That
variable is often preset for NumPy's sake (OPENBLAS_CORETYPE=Haswell holds an AVX-512 machine
to AVX2 kernels at about half the GEMM rate). bpcompile's copy is a separate library, so it
gets its own setting, read when bpcompile first loads a model:

  BPCOMPILE_BLAS_CORETYPE=auto     (default) the best kernels for this CPU, whatever
                                   OPENBLAS_CORETYPE says
  BPCOMPILE_BLAS_CORETYPE=inherit  honour OPENBLAS_CORETYPE as NumPy does
  BPCOMPILE_BLAS_CORETYPE=<name>   a named OpenBLAS core, e.g. Haswell or SkylakeX

The library runs single-threaded: bpcompile splits large products across its own thread pool
(see threads.py), and each piece is one OpenBLAS call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_LIB: Any = None


def load(libdir: str, libname: str) -> Any:
    """Load bpcompile's OpenBLAS (once per process) under the kernel and thread settings."""
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        choice = os.environ.get("BPCOMPILE_BLAS_CORETYPE", "auto")
        saved = os.environ.get("OPENBLAS_CORETYPE")
        try:
            if choice == "auto":
                os.environ.pop("OPENBLAS_CORETYPE", None)
            elif choice != "inherit":
                os.environ["OPENBLAS_CORETYPE"] = choice
            path = Path(libdir) / f"lib{libname}.so"
            _LIB = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        finally:
            if saved is None:
                os.environ.pop("OPENBLAS_CORETYPE", None)
            else:
                os.environ["OPENBLAS_CORETYPE"] = saved
        _LIB.scipy_openblas_set_num_threads(ctypes.c_int(1))
        return _LIB


def info() -> dict[str, Any]:
    """The loaded library's kernel family and its own thread count, always 1 (empty before the
    first model loads)."""
    if _LIB is None:
        return {}
    _LIB.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return {"coretype": _LIB.scipy_openblas_get_corename().decode(),
            "threads": int(_LIB.scipy_openblas_get_num_threads())}
