"""The machine's float32 GEMM peak, as NumPy's OpenBLAS reaches it: best of N 2048^3 matmuls.

    python bench/gemm_peak.py        # prints one JSON line

The peak is the machine's, so OpenBLAS picks the CPU's best kernels here even where the
environment presets OPENBLAS_CORETYPE (Haswell holds an AVX-512 machine to AVX2 kernels at
about half the rate; the NumPy runner keeps the preset). Reports the kernel set used and the
preset it set aside.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

PRESET_CORETYPE = os.environ.pop("OPENBLAS_CORETYPE", "")  # read when NumPy's OpenBLAS loads, just below

import numpy as np  # noqa: E402

N, RUNS = 2048, 10
CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_", "openblas_get_corename")


def openblas_corename() -> str:
    """The kernel set NumPy's bundled OpenBLAS picked at load time, if it can be found."""
    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for lib_path in sorted(libs.glob("*openblas*")):
        lib = ctypes.CDLL(str(lib_path))
        for symbol in CORENAME_SYMBOLS:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def gemm_gflops(n: int = N, runs: int = RUNS) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = a @ b  # warm-up: threads, pages
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9, best


def main() -> None:
    gflops, seconds = gemm_gflops()
    print(json.dumps({
        "gflops": gflops, "n": N, "best_s": seconds, "numpy": np.__version__,
        "openblas_core": openblas_corename(),
        "openblas_coretype_env": PRESET_CORETYPE,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
