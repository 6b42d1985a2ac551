"""Build: generated C -> a native module, cached by content in build/<name>-<hash>/.

The key hashes everything that decides the binary: the generated sources, the cffi interface,
compiler flags, the compiler's version, the CPU (for -march=native), cffi's version, the Python
ABI and bpcompile's version. A build happens in a temporary folder, fsynced and then renamed into
place, so a reader never sees a half-written module (not even after a power loss) and two
processes building the same model at once both succeed (the second rename finds the first one's
result).

A cached build is trusted only once it verifies: meta.json records the size and sha256 of the
module file, and the module carries its own copy of meta.json (`bp_layout()`, less that record),
so a damaged module and a damaged or edited meta.json are both caught before a buffer is sized
from them. `build` replaces a cached folder that does not verify; `bp.load` refuses it
(runtime.model: read_meta, check_files, check_record).

cffi (API mode) writes the Python wrapper; gcc compiles it and the model's own C (which has no
Python in it) as two translation units, so the model's C is held to -Wall -Wextra on its own.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CompileError
from ..runtime.target import cpu_flags, cpu_vendor, this_target, without_lr

MODEL_FLAGS = ["-std=c99", "-O3", "-march=native", "-fno-math-errno", "-fPIC", "-pthread", "-Wall", "-Wextra"]
# cffi's wrapper converts a call's arguments and calls the entry point: -O0 (0.07 s of CPU to compile
# here, -O2 0.2 s) measured the same per step as -O2 on a 3.7 us step
WRAPPER_FLAGS = ["-O0", "-fPIC", "-fno-strict-aliasing", "-w"]
STALE_SECONDS = 3600
LAYOUT_PROTOTYPE = "const char *bp_layout(void);"  # the module's own copy of its meta.json (module.c.j2)


@dataclass
class Sources:
    """What to build: the model's C and header, the cffi declarations, and metadata to store."""

    name: str
    model_c: str
    model_h: str
    cdef: str
    meta: dict
    runtime_c: str  # the runtime support alone (build.runtime_object): compiled apart, linked into the module
    defines: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)  # parameters' initial values given as arrays
    parts: int = 1  # translation units model.c compiles as, in parallel (BP_PART=0, 1, ...; bp_runtime.h)


INIT_FILE = "init.npz"  # a build folder's array initial values (meta.json's "init_file")


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


# The compiler's ISA macros (__AVX2__) whose /proc/cpuinfo flag is not the macro's name in lower case
CPUINFO_NAMES = {"SSE3": "pni", "LZCNT": "abm", "PCLMUL": "pclmulqdq", "RDRND": "rdrand", "SHA": "sha_ni",
                 "BMI": "bmi1", "LAHF_SAHF": "lahf_lm", "PRFCHW": "3dnowprefetch", "AVXVNNI": "avx_vnni",
                 **{f"AVX512{x}": f"avx512_{x.lower()}" for x in ("VNNI", "BF16", "VBMI2", "BITALG", "VPOPCNTDQ",
                                                                   "FP16", "VP2INTERSECT")}}


def target() -> dict:
    """Where a build can run, recorded in meta.json (and checked by bp.load, runtime.model's
    check_target): the Python ABI, the system and architecture, and the CPU features the model's
    C was compiled for."""
    return {**this_target(), "cpu_features": targeted_cpu_features(compiler()[0], tuple(model_flags()))}


@functools.cache
def targeted_cpu_features(cc: str, flags: tuple[str, ...]) -> list[str] | None:
    """The CPU features (as /proc/cpuinfo names them) the compiler targets with the model's flags
    (-march=native): its __AVX2__-style macros that are flags of this CPU, so a copy of the build
    can be checked against another CPU's flags without a compiler. None where /proc/cpuinfo is not
    there to name them; [] when the compiler does not answer (the build then fails with its message)."""
    flags_here = cpu_flags()
    if flags_here is None:
        return None
    try:
        out = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    macros = re.findall(r"^#define __([A-Z0-9_]+)__ 1$", out.stdout if out.returncode == 0 else "", re.MULTILINE)
    return sorted({CPUINFO_NAMES.get(m, m.lower()) for m in macros} & flags_here)


_probing: threading.Thread | None = None


def start_probes() -> None:
    """Ask the C compiler its version and the CPU features it targets (both cached) on a thread of
    their own, while the caller lowers the graph: `build` then finds the answers ready instead of
    waiting ~30 ms for two compiler runs. A failure is left for `build` to raise. Once per
    process: the answers stay cached, so later compiles start no thread."""
    global _probing
    if _probing is not None:
        return
    _probing = threading.Thread(target=_probe, name="bpcompile-probe-cc", daemon=True)
    _probing.start()


def _probe() -> None:
    with contextlib.suppress(CompileError):
        targeted_cpu_features(compiler()[0], tuple(model_flags()))


def _wait_for_probes() -> None:
    if _probing is not None:
        _probing.join()


BLAS_CHOICES = ("auto", "mkl", "openblas", "none")


@functools.cache
def blas() -> dict[str, str] | None:
    """The BLAS that products at or above the BLAS threshold call, by BPCOMPILE_BLAS:
    `auto` (default) Intel MKL on an Intel CPU when the `mkl` package is installed (bpcompile[mkl];
    on an Intel Xeon 10-25% faster than OpenBLAS a step), else OpenBLAS from scipy-openblas32 (on
    an AMD EPYC MKL takes its slow paths: 1.6-2x OpenBLAS's step time on W3, W6 and W7); `mkl` or
    `openblas` to insist on one; `none` for generated loops only (as does BPCOMPILE_NO_BLAS=1).
    Returns what the build and the loader need: name, lib dir, library file, the GEMM symbols
    and version."""
    choice = "none" if os.environ.get("BPCOMPILE_NO_BLAS") else os.environ.get("BPCOMPILE_BLAS", "auto").lower()
    if choice not in BLAS_CHOICES:
        raise CompileError(f"BPCOMPILE_BLAS must be one of {', '.join(BLAS_CHOICES)}, got {choice!r}")
    if choice == "none":
        return None
    order = {"mkl": (_mkl,), "openblas": (_openblas,)}.get(choice) or (
        (_mkl, _openblas) if cpu_vendor() == "GenuineIntel" else (_openblas, _mkl))
    found = next((lib for lib in (find() for find in order) if lib is not None), None)
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


@functools.cache
def linker_flags() -> list[str]:
    """-fuse-ld=gold where gold is installed: linking against MKL's 15 MB libmkl_rt takes it 0.03 s
    of CPU (0.06 s wall) here, GNU ld 0.08 s (0.15 s). Not under the sanitizers; a link gold
    fails is retried with the compiler's own linker (_link)."""
    if os.environ.get("BPCOMPILE_SANITIZE") or not shutil.which("ld.gold"):
        return []
    return ["-fuse-ld=gold"]


def wide_vector_flags() -> list[str]:
    """512-bit vectors where the CPU has AVX-512 (gcc's -march=native otherwise keeps 256-bit ones,
    and libmvec's 8-wide erf/exp): measured on an Intel Xeon, W4 (Mish) 1.41 -> 1.32 ms a step,
    W6 (LSTM) 2.31 -> 2.13 ms, W7 (GPT) 11.5 -> 11.2 ms."""
    flags = cpu_flags() or set()
    return ["-mprefer-vector-width=512"] if "avx512f" in flags and platform.machine() == "x86_64" else []


def model_flags() -> list[str]:
    flags = list(MODEL_FLAGS) + wide_vector_flags()
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
    for part in (src.model_c, src.runtime_c, str(src.parts), src.model_h, src.cdef, _meta_key(src.meta), json.dumps(dtype_defs, sort_keys=True),
                 " ".join(model_flags()), " ".join(WRAPPER_FLAGS), " ".join(linker_flags()), compiler()[1],
                 cpu_signature(),
                 cffi.__version__, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 json.dumps(blas_info, sort_keys=True), __version__, compiler_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def settings_key(code_key: str, src: Sources) -> str:
    """The key of a build folder: its code's key and the settings the code does not depend on
    (learning rates, array initial values), so no compile changes another's folder."""
    import numpy as np
    h = hashlib.sha256(code_key.encode())
    h.update(json.dumps(src.meta.get("optimizer"), sort_keys=True).encode())
    for name in sorted(src.arrays):
        value = np.ascontiguousarray(src.arrays[name], dtype=np.float64)
        h.update(f"\0{name}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _meta_key(meta: dict) -> str:
    """The stored metadata, less the learning rate (a runtime value that needs no rebuild)."""
    return json.dumps(module_record(meta), sort_keys=True, default=str)


def module_record(meta: dict) -> dict:
    """What the module keeps of its metadata (`bp_layout()`, in the cache key too): all of it but
    the record of the built files, which holds the module's own hash, and the learning rate, a
    runtime value that needs no rebuild."""
    meta = {k: v for k, v in meta.items() if k != "files"}
    meta["optimizer"] = without_lr(meta.get("optimizer"))
    return meta


def build_defines(dtype: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The macros model.c and runtime.c of `dtype` compile with (besides `extra`): the libraries found
    and the product paths they select."""
    defines = dict(extra or {})
    if libmvec():
        defines["BP_USE_LIBMVEC"] = "1"
    blas_info = blas()
    if blas_info:
        defines["BP_USE_BLAS"] = "1"
        defines["BP_CBLAS_GEMM"] = blas_info["sgemm" if dtype == "float32" else "dgemm"]
    if not blas_info or blas_info["name"] != "mkl":
        defines["BP_TILED_PRODUCTS"] = "1"  # few-row products as register tiles (bp_runtime.h)
    return defines


def build(src: Sources, root: Path | str | None = None) -> Path:
    """The folder of the built module for `src`, compiling it only when no build that verifies
    is cached (a damaged one is rebuilt and replaced)."""
    root = Path(root) if root is not None else default_build_root()
    root.mkdir(parents=True, exist_ok=True)
    _wait_for_probes()
    defines = build_defines(src.meta["dtype"], dict(src.defines, BP_LAYOUT="1"))
    blas_info = blas()
    digest = cache_key(src, defines)  # the code: one module per key
    final = root / f"{safe_name(src.name)}-{settings_key(digest, src)[:16]}"  # the code and its settings
    module = f"_bp_{safe_name(src.name)}_{digest[:16]}"
    meta = dict(src.meta, module=module, module_file=module + sysconfig.get_config_var("EXT_SUFFIX"),
                key=digest, blas=blas_info, init_file=INIT_FILE if src.arrays else None, target=target())
    meta = json.loads(json.dumps(meta))  # as meta.json will hold it (lists, not tuples)
    if os.path.lexists(final) and _verifies(final, meta):
        return final
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{safe_name(src.name)}-", dir=root))
    try:
        _as_umask_allows(tmp)  # mkdtemp makes it private: a shared cache must serve other users too
        record = json.dumps(module_record(meta), sort_keys=True, separators=(",", ":")).encode()
        files = [meta["module_file"], *([INIT_FILE] if src.arrays else [])]

        def write_arrays() -> None:
            if src.arrays:
                _write_arrays(tmp / INIT_FILE, src.arrays)
        if _copy_built_module(root, src.name, meta, tmp):  # the same code under other settings
            write_arrays()
        else:
            _compile(src, tmp, module, defines, blas_info, record, root, meanwhile=write_arrays)
        meta["files"] = {name: file_record(tmp / name) for name in files}
        _write(tmp / "meta.json", json.dumps(meta, indent=1))
        _sync_folder(tmp)
        _install(tmp, final, meta)
    except CompileError as e:
        failed = _keep_failed(tmp, root / f"{final.name}.failed")
        source = str(failed / Path(e.source_path).name) if e.source_path else None
        raise CompileError(e.message, source, e.compiler_output) from e.__cause__
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _keep_failed(tmp: Path, failed: Path) -> Path:
    """Move a build that failed to `failed`, kept for inspection in place of an earlier failure.
    Processes failing the same build at once take turns under a lock on the name (each finds the
    same sources there); whatever goes wrong, `tmp` is removed."""
    try:
        with _lock(failed):
            _remove(failed)
            os.rename(tmp, failed)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return failed


def _copy_built_module(root: Path, name: str, meta: dict, out: Path) -> bool:
    """Copy this module, with its sources and logs, from another folder of the cache that holds
    it intact (a compile that differs only in settings): no C compiler run. False if none does."""
    module_file = meta["module_file"]
    for other in sorted(root.glob(f"{safe_name(name)}-*/{module_file}")):
        try:
            found = json.loads((other.parent / "meta.json").read_text(encoding="utf-8"))
            if found.get("module") != meta["module"] or file_record(other) != found["files"][module_file]:
                continue
            for part in (module_file, "model.c", "runtime.c", "model.h", "layout.h", "compile.log", "build.json"):
                if (other.parent / part).is_file():
                    shutil.copyfile(other.parent / part, out / part)
            if file_record(out / module_file) == found["files"][module_file]:
                return True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return False


def _write_arrays(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np
    with open(path, "wb") as f:
        np.savez(f, **{name: np.asarray(value, dtype=np.float64) for name, value in arrays.items()})


def _install(tmp: Path, final: Path, meta: dict) -> None:
    """Move a finished (fsynced) build into place. Usually nothing is there: one rename. When
    something is (another process finished the same build first, or the cached build is
    damaged), under a lock on the name: keep it if it verifies, else move it aside, rename ours
    in and delete it. A process that finds no folder between the two renames builds and renames
    its own, which verifies just as well."""
    if _rename(tmp, final):
        _sync_dir(final.parent)
        return
    with _lock(final):
        if _verifies(final, meta):
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same build first
            return
        aside = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
        _rename(final, aside)
        if not _rename(tmp, final):  # a process without the lock renamed its build in meanwhile
            if not _verifies(final, meta):
                raise OSError(errno.EEXIST, f"could not replace the damaged build {final}")
            shutil.rmtree(tmp, ignore_errors=True)
        _sync_dir(final.parent)
        _remove(aside)


def _rename(src: Path, dst: Path) -> bool:
    """Rename src to dst; False when dst is taken (or src is gone)."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
            return False
        raise
    return True


@contextlib.contextmanager
def _lock(final: Path):
    """An exclusive lock between processes on one build's name: a `.<name>.lock` file beside it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the renames alone keep readers safe
        yield
        return
    fd = os.open(final.with_name(f".{final.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _sync_folder(folder: Path) -> None:
    """fsync every file of a finished build, then the folder itself: after the rename, a crash
    or power loss cannot leave the build's name on partly written files."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _verifies(folder: Path, meta: dict) -> bool:
    """Whether `folder` holds this build intact: meta.json as this build writes it (the learning
    rate aside), and every file it records with the recorded size and sha256. (bp.load checks the
    same from the folder alone: runtime.buildfolder.check_files and check_record.)"""
    try:
        found = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(found, dict) or not isinstance(found.get("files"), dict):
            return False
        if _canonical(module_record(found)) != _canonical(module_record(meta)):
            return False
        return meta["module_file"] in found["files"] and all(
            Path(name).name == name and file_record(folder / name) == record for name, record in found["files"].items())
    except (OSError, ValueError):
        return False


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)  # types kept: 1, 1.0 and true all differ


def file_record(path: Path) -> dict:
    """What meta.json records of a built file: its size and sha256."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _compile(src: Sources, out: Path, module: str, defines: dict[str, str], blas_info: dict | None,
             record: bytes, root: Path, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Compile and link the module in `out`. gcc starts on model.c first (once per part, in
    parallel), the longest job; while it runs, cffi writes the wrapper (on this core), gcc compiles
    that and `meanwhile` writes the build's other files."""
    from . import runtime_object  # which builds on this module's compiler settings
    cc, _ = compiler()
    _write(out / "model.c", src.model_c)
    _write(out / "model.h", src.model_h)
    _write(out / "layout.h", _layout_header(record))
    include = [f"-I{out}"]
    flags = model_flags()
    defs = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    jobs = [[cc, *flags, *defs, f"-DBP_PART={k}", "-DBP_RUNTIME_APART=1", *include, "-c", "model.c", "-o",
             f"model{k}.o"] for k in range(src.parts)]  # runtime.o defines the runtime
    objects = [cmd[-1] for cmd in jobs] + ["wrapper.o", runtime_object.OBJECT]
    wrapper = [cc, *WRAPPER_FLAGS, *include, f"-I{sysconfig.get_paths()['include']}", "-c", "wrapper.c", "-o",
               "wrapper.o"]
    start = time.perf_counter()
    procs: list[subprocess.Popen] = []
    try:
        procs += [_start(cmd, out, src.name) for cmd in jobs]
        _write_wrapper(src, out, module)
        jobs.append(wrapper)
        procs.append(_start(wrapper, out, src.name))
        runtime_cmd, runtime_failed = _link_runtime(src, root, defines, out)
        meanwhile()
        results = [p.communicate() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
            p.communicate()
        raise
    for cmd, p, (_, err) in zip(jobs, procs, results):
        if p.returncode != 0:
            raise CompileError(f"the C compiler failed on the generated code of model {src.name!r}",
                               str(out / cmd[-3]), err)
    if runtime_failed is not None:  # reported after the model's own code, which a bad flag fails too
        raise runtime_failed
    _write(out / "compile.log", "".join(err for _, err in results[:-1]))
    link = _link(cc, flags, defines, blas_info, module, objects, out, src.name)
    _write(out / "build.json", json.dumps({"compile_seconds": time.perf_counter() - start,
                                           "commands": [runtime_cmd] + jobs + [link]}, indent=1))


def _link_runtime(src: Sources, root: Path, defines: dict[str, str], out: Path) -> tuple[list[str], CompileError | None]:
    """Put the compiled runtime (begun while the graph was lowered, by compiler.compile, or compiled
    now) and its source in `out`: the command that compiled it, or the error it failed with."""
    from . import runtime_object
    _write(out / runtime_object.SOURCE, src.runtime_c)
    runtime_defines = {k: v for k, v in defines.items() if k != "BP_LAYOUT"}
    try:
        obj, cmd = runtime_object.get(src.runtime_c, root, runtime_defines)
    except CompileError as e:
        return [], CompileError(e.message, str(out / runtime_object.SOURCE), e.compiler_output)
    shutil.copyfile(obj, out / runtime_object.OBJECT)
    return cmd, None


def _start(cmd: list[str], out: Path, name: str) -> subprocess.Popen:
    try:
        return subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise CompileError(f"the C compiler {cmd[0]!r} could not be started for model {name!r} ({e})",
                           str(out / "model.c")) from e


def _write_wrapper(src: Sources, out: Path, module: str) -> None:
    """wrapper.c: cffi's Python wrapper of the entry points the header declares."""
    import cffi
    try:
        ffi = cffi.FFI()
        ffi.cdef(src.cdef + "\n" + LAYOUT_PROTOTYPE)
        ffi.set_source(module, '#include "model.h"\n' + LAYOUT_PROTOTYPE)
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces the file it writes
            ffi.emit_c_code(str(out / "wrapper.c"))
    except (cffi.FFIError, cffi.CDefError, cffi.VerificationError, cffi.VerificationMissing) as e:
        raise CompileError(f"cffi could not write the Python wrapper of model {src.name!r} from its declarations "
                           f"({type(e).__name__}: {e})", str(out / "model.h")) from e


def _link(cc: str, flags: list[str], defines: dict[str, str], blas_info: dict | None, module: str,
          objects: list[str], out: Path, name: str) -> list[str]:
    """Link the compiled objects into the module; the command used."""
    command = [cc, "-shared", *(["-fsanitize=address,undefined"] if "-g" in flags else []),
               *objects, "-o", module + sysconfig.get_config_var("EXT_SUFFIX"),
               *(["-lmvec"] if defines.get("BP_USE_LIBMVEC") else []), "-lm", "-pthread"]
    if blas_info:
        command += [f"-L{blas_info['libdir']}", f"-l:{blas_info['file']}", f"-Wl,-rpath,{blas_info['libdir']}"]
    tries = [command[:2] + linker_flags() + command[2:]] + ([command] if linker_flags() else [])
    for link in tries:
        try:
            p = subprocess.run(link, cwd=out, capture_output=True, text=True)
        except OSError as e:
            raise CompileError(f"the C compiler {cc!r} could not be started to link model {name!r} ({e})",
                               str(out / "model.c")) from e
        if p.returncode == 0:
            break
    else:
        raise CompileError(f"linking the native module of model {name!r} failed", str(out / "model.c"), p.stderr)
    return link


def _layout_header(record: bytes) -> str:
    """layout.h: the bytes of the module's record of its metadata, which model.c compiles in
    (bp_layout in module.c.j2); numbers, so no text of the model's needs escaping."""
    rows = [",".join(map(str, record[i:i + 32])) for i in range(0, len(record), 32)]
    return ("/* bpcompile: the metadata model.c was generated for (meta.json less its file record), as JSON */\n"
            "#define BP_LAYOUT_JSON { \\\n" + ", \\\n".join(rows) + ", 0 }\n")


def _as_umask_allows(folder: Path) -> None:
    """Give a folder the mode a plain mkdir would (0777 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _remove_stale_temporaries(root: Path) -> None:
    """Drop temporary build folders left by killed processes (older than an hour), and damaged
    builds a killed process had moved aside to replace."""
    for p in root.glob(".old-*"):
        _remove(p)
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
