"""Build: generated C -> a native module, cached by content in build/<name>-<hash>/.

The key hashes everything that decides the binary: the generated sources, the cffi interface,
compiler flags, the compiler's version, the CPU (for -march=native), cffi's version, the Python
ABI and bpcompile's version. A build happens in a temporary folder that is renamed into place
when complete, so a reader never sees a half-written module and two processes building the same
model at once both succeed (the second rename finds the first one's result).

cffi (API mode) writes the Python wrapper; gcc compiles it and the model's own C (which has no
Python in it) as two translation units, so the model's C is held to -Wall -Wextra on its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CompileError

MODEL_FLAGS = ["-std=c99", "-O3", "-march=native", "-fno-math-errno", "-fPIC", "-pthread", "-Wall", "-Wextra"]
WRAPPER_FLAGS = ["-O2", "-fPIC", "-fno-strict-aliasing", "-w"]
STALE_SECONDS = 3600


@dataclass
class Sources:
    """What to build: the model's C and header, the cffi declarations, and metadata to store."""

    name: str
    model_c: str
    model_h: str
    cdef: str
    meta: dict
    defines: dict[str, str] = field(default_factory=dict)


def default_build_root() -> Path:
    return Path(os.environ.get("BPCOMPILE_BUILD_DIR") or "build")


@functools.cache
def compiler() -> tuple[str, str]:
    """The C compiler command and its version line."""
    cc = os.environ.get("CC", "gcc")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompileError(f"no working C compiler: running {cc!r} failed ({e}); install gcc or set CC") from None
    if out.returncode != 0:
        raise CompileError(f"no working C compiler: {cc!r} --version exited {out.returncode}", None, out.stderr)
    return cc, out.stdout.splitlines()[0] if out.stdout else cc


@functools.cache
def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


BLAS_CHOICES = ("auto", "mkl", "openblas", "none")


@functools.cache
def blas() -> dict[str, str] | None:
    """The BLAS that products at or above the BLAS threshold call, by BPCOMPILE_BLAS:
    `auto` (default) Intel MKL when the `mkl` package is installed (bpcompile[mkl]; about 10%
    faster than OpenBLAS on large products here, 1.5x on an LSTM's small per-step ones), else
    OpenBLAS from scipy-openblas32; `mkl` or `openblas` to insist on one; `none` for generated
    loops only (as does BPCOMPILE_NO_BLAS=1). Returns what the build and the loader need: name,
    lib dir, library file, the GEMM symbols and version."""
    choice = "none" if os.environ.get("BPCOMPILE_NO_BLAS") else os.environ.get("BPCOMPILE_BLAS", "auto").lower()
    if choice not in BLAS_CHOICES:
        raise CompileError(f"BPCOMPILE_BLAS must be one of {', '.join(BLAS_CHOICES)}, got {choice!r}")
    if choice == "none":
        return None
    found = _mkl() if choice in ("auto", "mkl") else None
    if found is None and choice != "mkl":
        found = _openblas()
    if found is None and choice != "auto":
        raise CompileError(f"BPCOMPILE_BLAS={choice} but that library is not installed "
                           f"(pip install {'mkl' if choice == 'mkl' else 'scipy-openblas32'})")
    return found


def _mkl() -> dict[str, str] | None:
    """MKL's single dynamic library from the `mkl` wheel (its name carries a version, .so.2 or .so.3).
    The upper-case GEMM names are MKL's own aliases: a CBLAS of another library loaded with global
    symbols cannot stand in for them."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = sorted((Path(f.locate()).resolve() for f in files if re.fullmatch(r"libmkl_rt\.so\.\d+", f.name)),
                   key=lambda path: path.name)
    paths = [path for path in paths if path.is_file()]
    if not paths or platform.system() != "Linux":
        return None
    return {"name": "mkl", "libdir": str(paths[-1].parent), "file": paths[-1].name,
            "sgemm": "CBLAS_SGEMM", "dgemm": "CBLAS_DGEMM", "version": importlib.metadata.version("mkl")}


def _openblas() -> dict[str, str] | None:
    """OpenBLAS from the scipy-openblas32 wheel, found without importing the package: its
    helpers load the library, and it must first be loaded by bpcompile.blas, which chooses its
    kernels."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    if not (libdir / "libscipy_openblas.so").is_file():
        return None
    return {"name": "openblas", "libdir": str(libdir), "file": "libscipy_openblas.so",
            "sgemm": "scipy_cblas_sgemm", "dgemm": "scipy_cblas_dgemm",
            "version": importlib.metadata.version("scipy-openblas32")}


@functools.cache
def libmvec() -> bool:
    """Whether glibc's vector math library is there to link (x86-64 Linux)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if os.environ.get("BPCOMPILE_NO_LIBMVEC"):
        return False
    return any(Path(d, "libmvec.so").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                                                       "/usr/lib64", "/lib64", "/usr/lib"))


def model_flags() -> list[str]:
    flags = list(MODEL_FLAGS)
    if os.environ.get("BPCOMPILE_WERROR"):
        flags.append("-Werror")
    if os.environ.get("BPCOMPILE_SANITIZE"):
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    return flags


@functools.cache
def compiler_fingerprint() -> str:
    """A hash of bpcompile's own code and templates: a changed compiler never reuses old builds."""
    from ..codegen.module import template_dir
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent  # the bpcompile package, subpackages included
    for path in sorted(list(here.rglob("*.py")) + list(template_dir().glob("*.j2"))):
        h.update(str(path.relative_to(here) if path.is_relative_to(here) else path.name).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def safe_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)[:40] or "model"


def cache_key(src: Sources, dtype_defs: dict[str, str]) -> str:
    import cffi

    from .. import __version__
    h = hashlib.sha256()
    blas_info = blas()
    for part in (src.model_c, src.model_h, src.cdef, _meta_key(src.meta), json.dumps(dtype_defs, sort_keys=True),
                 " ".join(model_flags()), " ".join(WRAPPER_FLAGS), compiler()[1], cpu_signature(),
                 cffi.__version__, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 json.dumps(blas_info, sort_keys=True), __version__, compiler_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _meta_key(meta: dict) -> str:
    """The stored metadata, less the learning rate (a runtime value that needs no rebuild)."""
    meta = dict(meta)
    if meta.get("optimizer"):
        meta["optimizer"] = {k: v for k, v in meta["optimizer"].items() if k != "lr"}
    return json.dumps(meta, sort_keys=True, default=str)


def build(src: Sources, root: Path | str | None = None) -> Path:
    """The folder of the built module for `src`, compiling it only when no build is cached."""
    root = Path(root) if root is not None else default_build_root()
    root.mkdir(parents=True, exist_ok=True)
    defines = dict(src.defines)
    if libmvec():
        defines["BP_USE_LIBMVEC"] = "1"
    blas_info = blas()
    if blas_info:
        defines["BP_USE_BLAS"] = "1"
        defines["BP_CBLAS_GEMM"] = blas_info["sgemm" if src.meta["dtype"] == "float32" else "dgemm"]
    digest = cache_key(src, defines)
    final = root / f"{safe_name(src.name)}-{digest[:16]}"
    if (final / "meta.json").is_file():
        return final
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{safe_name(src.name)}-", dir=root))
    _as_umask_allows(tmp)  # mkdtemp makes it private: a shared cache must serve other users too
    try:
        module = f"_bp_{safe_name(src.name)}_{digest[:16]}"
        _compile(src, tmp, module, defines, blas_info)
        meta = dict(src.meta, module=module, module_file=module + sysconfig.get_config_var("EXT_SUFFIX"),
                    key=digest, blas=blas_info)
        _write(tmp / "meta.json", json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same build first
    except CompileError as e:
        failed = root / f"{final.name}.failed"  # kept for inspection; replaced by the next failure
        shutil.rmtree(failed, ignore_errors=True)
        os.rename(tmp, failed)
        source = str(failed / Path(e.source_path).name) if e.source_path else None
        raise CompileError(e.message, source, e.compiler_output) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _compile(src: Sources, out: Path, module: str, defines: dict[str, str], blas_info: dict | None) -> None:
    import cffi
    cc, _ = compiler()
    _write(out / "model.c", src.model_c)
    _write(out / "model.h", src.model_h)
    ffi = cffi.FFI()
    ffi.cdef(src.cdef)
    ffi.set_source(module, '#include "model.h"')
    with contextlib.redirect_stdout(io.StringIO()):  # cffi announces the file it writes
        ffi.emit_c_code(str(out / "wrapper.c"))
    include = [f"-I{out}"]
    defs = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    flags = model_flags()
    jobs = [
        [cc, *flags, *defs, *include, "-c", "model.c", "-o", "model.o"],
        [cc, *WRAPPER_FLAGS, *include, f"-I{sysconfig.get_paths()['include']}", "-c", "wrapper.c", "-o", "wrapper.o"],
    ]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in jobs]
    results = [p.communicate() for p in procs]
    for cmd, p, (_, err) in zip(jobs, procs, results):
        if p.returncode != 0:
            raise CompileError(f"the C compiler failed on the generated code of model {src.name!r}",
                               str(out / cmd[-3]), err)
    _write(out / "compile.log", results[0][1])
    link = [cc, "-shared", *(["-fsanitize=address,undefined"] if "-g" in flags else []),
            "model.o", "wrapper.o", "-o", module + sysconfig.get_config_var("EXT_SUFFIX"),
            *(["-lmvec"] if defines.get("BP_USE_LIBMVEC") else []), "-lm", "-pthread"]
    if blas_info:
        link += [f"-L{blas_info['libdir']}", f"-l:{blas_info['file']}", f"-Wl,-rpath,{blas_info['libdir']}"]
    p = subprocess.run(link, cwd=out, capture_output=True, text=True)
    if p.returncode != 0:
        raise CompileError(f"linking the native module of model {src.name!r} failed", str(out / "model.c"), p.stderr)
    _write(out / "build.json", json.dumps({"compile_seconds": time.perf_counter() - start,
                                           "commands": jobs + [link]}, indent=1))


def _as_umask_allows(folder: Path) -> None:
    """Give a folder the mode a plain mkdir would (0777 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _remove_stale_temporaries(root: Path) -> None:
    """Drop temporary build folders left by killed processes (older than an hour)."""
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
