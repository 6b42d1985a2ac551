"""AddressSanitizer + UndefinedBehaviorSanitizer runs of the generated C, and the helpers they use.

    python tests/sanitizers.py            # the CI step (.ci/sanitize): a representative subset
    python tests/sanitizers.py --full     # the whole test suite under the sanitizers (slow)

Every model is built with `BPCOMPILE_SANITIZE=1` (-fsanitize=address,undefined -g) and the tests
run in a Python whose LD_PRELOAD starts with gcc's libasan and libubsan:

- ASan: halt_on_error, detect_leaks=1 with leak_check_at_exit=0 (Python itself leaks at exit,
  and so do gcc's own processes, which inherit LD_PRELOAD); leaks of the generated code are
  checked with LeakSanitizer's recoverable check before and after 10,000 calls instead
  (tests/test_sanitizers.py), and the free bytes of each workspace arena (padding between
  buffers, the slack after the last one) are poisoned, so a kernel writing past its buffer is
  reported even though the arena is one allocation.
- UBSan: halt_on_error=1, print_stacktrace=1.

The shards run in parallel, each with its own fresh build folder; the run fails if any pytest
fails or any output carries a sanitizer report.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: UndefinedBehaviorSanitizer")

# (label, pytest arguments): the representative subset, sharded to run in parallel
SUBSET = [  # longest first
    ("every op", ["tests/test_op_gradients.py", "-k", "test_op_float32 or -7]"]),
    ("sanitizer checks, leaks", ["tests/test_sanitizers.py", "-k", "inprocess and not test_sanitized_inprocess"]),
    ("runtime, gemm paths", ["tests/test_runtime.py", "tests/test_gemm_paths.py"]),
    ("random graphs", ["tests/test_random_graphs.py", "-k", "matches_reference"]),
    # less the subprocess-heavy tests (killed processes); with the damaged build caches and meta.json
    # (each case in a sanitized subprocess: refused by bp.load, rebuilt by bp.compile)
    ("robustness", ["tests/test_robustness.py", "-k", "not killed"]),
    ("damaged caches", ["tests/test_build_cache.py", "-k", "damaged or reports_the_metadata or optimizer_file"]),
]
FULL = [("whole suite", ["tests"])]


def runtime_libraries(cc: str | None = None) -> list[str]:
    """gcc's libasan and libubsan (full paths), or [] when the compiler has none."""
    cc = cc or os.environ.get("CC", "gcc")
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        try:
            out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return []
        path = out.stdout.strip()
        if out.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            return []
        libs.append(os.path.realpath(path))
    return libs


def sanitizer_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) set up for a sanitized Python and sanitized model builds."""
    env = dict(os.environ if env is None else env)
    libs = runtime_libraries()
    if not libs:
        raise RuntimeError("the C compiler has no libasan/libubsan (gcc -print-file-name=libasan.so)")
    env["LD_PRELOAD"] = " ".join(libs + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = ("detect_leaks=1:leak_check_at_exit=0:halt_on_error=1:abort_on_error=0:exitcode=86:"
                           "detect_odr_violation=0:allocator_may_return_null=1")
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    env["BPCOMPILE_SANITIZE"] = "1"
    env["BPCOMPILE_WERROR"] = "1"
    env["BP_SANITIZED"] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


# --- in a sanitized process ----------------------------------------------------------------------

def _symbol(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except AttributeError:
        return None


def asan_active() -> bool:
    """Whether this process runs with the AddressSanitizer runtime (LD_PRELOAD)."""
    return _symbol("__asan_poison_memory_region") is not None


def leak_check() -> tuple[int, int]:
    """LeakSanitizer's recoverable check now: (bytes, allocations) unreachable; its report goes
    to a temporary file, not the terminal."""
    fn = _symbol("__lsan_do_recoverable_leak_check")
    if fn is None:
        raise RuntimeError("LeakSanitizer is not active in this process")
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    m = re.search(r"SUMMARY: AddressSanitizer: (\d+) byte\(s\) leaked in (\d+) allocation", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def poison_arena_gaps(model, poison_them: bool = True) -> int:
    """Poison (for ASan) every byte of each of this thread's workspace arenas of the model that
    no workspace buffer of any entry point uses at that arena's runtime sizes, and the
    allocation's slack around it; returns the poisoned byte count. Unpoison (poison_them=False)
    before the model goes: NumPy caches small freed buffers and hands them out again without
    malloc, which would otherwise clear the poison."""
    import numpy as np
    poison = _symbol("__asan_poison_memory_region" if poison_them else "__asan_unpoison_memory_region")
    if poison is None:
        raise RuntimeError("AddressSanitizer is not active in this process")
    poison.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    total = 0
    for dims, arena in model._tls.__dict__.get("arenas", {}).items():
        offsets, _ = model._plan(dims)
        named = dict(zip(model._dims, (max(d, 1) for d in dims)))
        used = []
        for name, entry in model._entries.items():
            for (coef, names, _, _), off in zip(entry.buffers, offsets[name]):
                n = coef
                for d in names:
                    n *= named[d]
                used.append((int(off), int(off) + n * model.dtype.itemsize))
        gaps, pos = [], 0
        for start, end in sorted(used):
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, end)
        gaps.append((pos, arena.nbytes))
        base = arena.ctypes.data
        if isinstance(arena.base, np.ndarray):  # the allocation's bytes before and after the aligned arena
            raw = arena.base
            gaps += [(raw.ctypes.data - base, 0), (arena.nbytes, raw.ctypes.data + raw.nbytes - base)]
        for start, end in gaps:
            if end > start:
                poison(base + start, end - start)
                total += end - start
    return total


# --- the CI step ---------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole test suite instead of the subset")
    ap.add_argument("--jobs", type=int, default=max(1, min(len(SUBSET), os.cpu_count() or 1)))
    ap.add_argument("--graphs", type=int, default=20, help="random graphs drawn (BP_RANDOM_GRAPHS, default 20)")
    args = ap.parse_args(argv)
    try:
        env = sanitizer_env()
    except RuntimeError as e:
        print(f"sanitize: {e}", file=sys.stderr)
        return 2
    env["BP_RANDOM_GRAPHS"] = str(args.graphs)
    env["BP_LSAN_CHECK"] = "1"
    env["BP_SAN_GRAPHS"] = "6"
    shards = FULL if args.full else SUBSET
    start = time.perf_counter()
    running: list[tuple[str, subprocess.Popen, Path, float]] = []
    results: list[tuple[str, int, str, float]] = []
    pending = list(shards)
    with tempfile.TemporaryDirectory(prefix="bp-sanitize-") as tmp:
        while pending or running:
            while pending and len(running) < args.jobs:
                label, targs = pending.pop(0)
                log = Path(tmp) / f"shard{len(results) + len(running)}.log"
                shard_env = dict(env, BPCOMPILE_BUILD_DIR=str(Path(tmp) / f"build-{log.stem}"))
                # --capture=sys: a sanitizer's report (written to fd 2 just before it ends the
                # process) must reach the log, not pytest's capture file
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *targs]
                f = open(log, "w")
                p = subprocess.Popen(cmd, cwd=ROOT, env=shard_env, stdout=f, stderr=subprocess.STDOUT)
                f.close()
                running.append((label, p, log, time.perf_counter()))
            time.sleep(0.2)
            for item in list(running):
                label, p, log, t0 = item
                if p.poll() is not None:
                    running.remove(item)
                    results.append((label, p.returncode, log.read_text(errors="replace"), time.perf_counter() - t0))
    failed = False
    for label, code, text, seconds in results:
        reports = REPORT.findall(text)
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        status = "ok" if code == 0 and not reports else "FAILED"
        failed |= status != "ok"
        print(f"sanitize: {label}: {status} in {seconds:.0f} s ({tail[-1].strip() if tail else f'exit {code}'})")
        if status != "ok":
            print(text[-12000:])
    print(f"sanitize: {'FAILED' if failed else 'clean'} ({time.perf_counter() - start:.0f} s, ASan + UBSan, "
          f"{'whole suite' if args.full else 'subset'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
