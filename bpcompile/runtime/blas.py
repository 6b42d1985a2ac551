"""Loading the BLAS bpcompile's models call (chosen at build time, see build.blas): Intel MKL
from the `mkl` wheel, or bpcompile's own copy of OpenBLAS from scipy-openblas32.

Either runs single-threaded: bpcompile splits large products across its own thread pool (see
threads.py), and each piece is one BLAS call. MKL is switched to its sequential layer before
its first call.

OpenBLAS picks its kernels once, when the library loads, and honours OPENBLAS_CORETYPE. That
variable is often preset for NumPy's sake (OPENBLAS_CORETYPE=Haswell holds an AVX-512 machine
to AVX2 kernels at about half the GEMM rate). bpcompile's copy is a separate library, so it
gets its own setting, read when bpcompile first loads a model:

  BPCOMPILE_BLAS_CORETYPE=auto     (default) the best kernels for this CPU, whatever
                                   OPENBLAS_CORETYPE says
  BPCOMPILE_BLAS_CORETYPE=inherit  honour OPENBLAS_CORETYPE as NumPy does
  BPCOMPILE_BLAS_CORETYPE=<name>   a named OpenBLAS core, e.g. Haswell or SkylakeX
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_LIBS: dict[str, Any] = {}  # library name ("mkl", "openblas") -> the loaded library
MKL_THREADING_SEQUENTIAL = 1


def load(info: dict[str, str]) -> Any:
    """Load a model's BLAS (once per process), single-threaded. `info` is the build's record
    (build.blas()); records of builds older than the MKL choice name no library: OpenBLAS."""
    name = info.get("name", "openblas")
    with _LOCK:
        if name not in _LIBS:
            path = Path(info["libdir"]) / info.get("file", f"lib{info.get('lib', 'scipy_openblas')}.so")
            if not path.is_file():
                package = "mkl" if name == "mkl" else "scipy-openblas32"
                raise FileNotFoundError(f"the model was built against {path}, which is missing: reinstall "
                                        f"{package}, or rebuild the model (BPCOMPILE_BLAS chooses the library)")
            _LIBS[name] = _load_mkl(path) if name == "mkl" else _load_openblas(path)
        return _LIBS[name]


def _load_mkl(path: Path) -> Any:
    lib = ctypes.CDLL(str(path))
    lib.MKL_Set_Threading_Layer(ctypes.c_int(MKL_THREADING_SEQUENTIAL))
    return lib


def _load_openblas(path: Path) -> Any:
    choice = os.environ.get("BPCOMPILE_BLAS_CORETYPE", "auto")
    saved = os.environ.get("OPENBLAS_CORETYPE")
    try:
        if choice == "auto":
            os.environ.pop("OPENBLAS_CORETYPE", None)
        elif choice != "inherit":
            os.environ["OPENBLAS_CORETYPE"] = choice
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    finally:
        if saved is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = saved
    lib.scipy_openblas_set_num_threads(ctypes.c_int(1))
    return lib


def info() -> dict[str, Any]:
    """Each loaded library's name, version or kernel family, and its own thread count, always 1
    (empty before the first model with BLAS loads)."""
    out: dict[str, Any] = {}
    if "mkl" in _LIBS:
        lib = _LIBS["mkl"]
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, ctypes.c_int(len(buf)))
        lib.MKL_Get_Max_Threads.restype = ctypes.c_int
        out["mkl"] = {"version": buf.value.decode(errors="replace").strip(), "threads": lib.MKL_Get_Max_Threads()}
    if "openblas" in _LIBS:
        lib = _LIBS["openblas"]
        lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
        out["openblas"] = {"coretype": lib.scipy_openblas_get_corename().decode(),
                           "threads": int(lib.scipy_openblas_get_num_threads())}
    return out
