"""Memory safety of the generated C: AddressSanitizer and UndefinedBehaviorSanitizer.

In the default test run, the tests here start a sanitized Python (tests/sanitizers.py:
LD_PRELOAD of gcc's libasan and libubsan, BPCOMPILE_SANITIZE=1) and
- check that the harness catches what it must (canaries: an out-of-bounds read of a too-short
  input, a misaligned input pointer),
- run this file's `inprocess` tests there: 10,000 calls of every entry point with the free
  bytes of every workspace arena poisoned, LeakSanitizer's unreachable bytes unchanged across
  them, and random graphs with poisoned arenas.
The CI step `.ci/sanitize` (python tests/sanitizers.py) runs them, with a representative subset
of the rest of the suite, sanitized. A plain-process test checks that RSS and Python's traced
memory stay flat across 10,000 calls (ASan's quarantine makes RSS meaningless under it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import sanitizers
from testutil import subprocess_env

import bpcompile as bp

HERE = Path(__file__).resolve().parent
SANITIZED = sanitizers.asan_active()
CALLS = int(os.environ.get("BP_LEAK_CALLS", "10000"))
LSAN_CHECK = os.environ.get("BP_LSAN_CHECK") == "1"  # LeakSanitizer's scan takes ~15 s: CI step only
SAN_GRAPHS = int(os.environ.get("BP_SAN_GRAPHS", "0"))  # random graphs with poisoned arenas: CI step

needs_runtime = pytest.mark.skipif(not sanitizers.runtime_libraries(), reason="gcc has no libasan/libubsan")
inprocess = pytest.mark.skipif(not SANITIZED, reason="runs inside a sanitized Python (see test_sanitized_inprocess)")


def mlp_graph(name: str = "san_mlp") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 7))
    y = g.input("y", ("batch",), dtype="int32")
    W1 = g.param("W1", (7, 5), init="he_normal")
    b1 = g.param("b1", (5,), init="normal")
    W2 = g.param("W2", (5, 3), init="glorot_uniform")
    b2 = g.param("b2", (3,))
    h = bp.tanh(x @ W1 + b1)
    logits = h @ W2 + b2
    g.output("logits", logits)
    g.output("probs", bp.softmax(logits))
    g.loss(bp.softmax_cross_entropy(logits, y) + 0.01 * bp.mean(bp.square(W1)))
    return g


def _run_sanitized(code: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "sanitized.py"
    script.write_text(textwrap.dedent(code))
    env = subprocess_env(sanitizers.sanitizer_env(), BPCOMPILE_BUILD_DIR=str(tmp_path / "build"))
    return subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


CANARY = """
    import sys
    import numpy as np
    import bpcompile as bp
    from test_sanitizers import mlp_graph
    model = bp.compile(mlp_graph("san_canary"), dtype="float64")
    X = np.ones((4, 7)); Y = np.zeros(4, dtype=np.int32)
    model.forward(x=X)  # builds the call frame
    frame = model._tls.frames["forward"]
    ffi = model._ffi
    what = sys.argv[-1] if len(sys.argv) > 1 else "{what}"
    if what == "short":
        data = np.ones(4 * 7 - 1)  # one element short: the C reads past the end
        frame.in_ptrs[0] = ffi.from_buffer(data)
    elif what == "gap":  # poisoned arena gaps are live: a write just past the arena is caught
        import ctypes, sanitizers
        assert sanitizers.poison_arena_gaps(model) > 0
        arena = model._tls.arenas[(4,)]
        ctypes.memset(arena.ctypes.data + arena.nbytes, 0, 1)
        print("NOT CAUGHT")
        sys.exit(0)
    else:
        raw = np.ones(4 * 7 + 1)
        frame.in_ptrs[0] = ffi.cast("void *", raw.ctypes.data + 1)  # not a multiple of 8
    outs = [np.empty((4, 3)), np.empty((4, 3))]
    for i, o in enumerate(outs):
        frame.out_ptrs[i] = ffi.from_buffer(o)
    frame.fn(*frame.args)
    print("NOT CAUGHT")
"""


@needs_runtime
def test_canary_out_of_bounds_read_is_reported(tmp_path, build_dir):
    """The harness works: an entry point handed a too-short input (bypassing the runtime's
    checks) dies with ASan's heap-buffer-overflow report."""
    p = _run_sanitized(CANARY.format(what="short"), tmp_path)
    assert "NOT CAUGHT" not in p.stdout, p.stderr[-3000:]
    assert p.returncode != 0
    assert "heap-buffer-overflow" in p.stderr, p.stderr[-3000:]


@needs_runtime
def test_canary_write_into_a_poisoned_arena_gap_is_reported(tmp_path, build_dir):
    p = _run_sanitized(CANARY.format(what="gap"), tmp_path)
    assert "NOT CAUGHT" not in p.stdout, p.stderr[-3000:]
    assert "use-after-poison" in p.stderr, p.stderr[-3000:]


@needs_runtime
def test_canary_misaligned_input_is_reported(tmp_path, build_dir):
    """UBSan is live in the generated code: a float64 input at an odd address is reported."""
    p = _run_sanitized(CANARY.format(what="misaligned"), tmp_path)
    assert "NOT CAUGHT" not in p.stdout, p.stderr[-3000:]
    assert p.returncode != 0
    assert "misaligned address" in p.stderr, p.stderr[-3000:]


@needs_runtime
def test_sanitized_inprocess(tmp_path, build_dir):
    """This file's in-process tests, in a sanitized Python: clean exit and no report."""
    env = sanitizers.sanitizer_env()
    env["BPCOMPILE_BUILD_DIR"] = str(tmp_path / "build")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
                        str(Path(__file__)), "-k", "inprocess and not test_sanitized_inprocess"],
                       env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert not sanitizers.REPORT.search(out), out[-6000:]
    assert "passed" in p.stdout.splitlines()[-1], out[-2000:]  # the summary line


# --- in the sanitized process ------------------------------------------------------------------

def _all_calls(model, X, Y):
    model.forward(x=X)
    model.loss(x=X, y=Y)
    model.loss_and_grad(x=X, y=Y)
    model.train_step(x=X, y=Y)


@inprocess
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inprocess_10000_calls_poisoned_gaps_no_leak(dtype, build_dir):
    """10,000 rounds of every entry point (forward, loss, loss_and_grad, train_step with Adam
    and clip_norm) at batch sizes 1, 3 and 64, every arena's free bytes poisoned: no ASan/UBSan
    report. With BP_LSAN_CHECK=1 (the CI step; float32), LeakSanitizer's recoverable check
    before and after: the unreachable memory (Python's own, ~20 MB, from before the calls) does
    not grow - a leak of one allocation per call would add 10,000 allocations."""
    model = bp.compile(mlp_graph(), dtype=dtype, optimizer=bp.optim.Adam(lr=1e-3, clip_norm=1.0))
    rng = np.random.default_rng(0)
    batches = {n: (rng.normal(size=(n, 7)), rng.integers(0, 3, size=n).astype(np.int32)) for n in (1, 3, 64)}
    for X, Y in batches.values():
        _all_calls(model, X, Y)
    assert sanitizers.poison_arena_gaps(model) > 0
    check = LSAN_CHECK and dtype == "float32"
    before = sanitizers.leak_check() if check else (0, 0)
    for i in range(CALLS):
        X, Y = batches[(1, 3, 64)[i % 3]]
        _all_calls(model, X, Y)
    after = sanitizers.leak_check() if check else (0, 0)
    sanitizers.poison_arena_gaps(model, False)
    assert model.step == 3 + CALLS
    assert all(np.all(np.isfinite(v)) for v in model.params.values())
    grown = (after[0] - before[0], after[1] - before[1])
    assert grown[1] < 100 and grown[0] < 64 * 2**10, (
        f"unreachable memory grew by {grown[0]} bytes in {grown[1]} allocations over {CALLS} x 4 calls")


@inprocess
@pytest.mark.skipif(SAN_GRAPHS < 1, reason="BP_SAN_GRAPHS=0 (the CI step sets it)")
def test_inprocess_random_graphs_with_poisoned_gaps(build_dir):
    """Random graphs (both dtypes, two batch sizes) with every arena's free bytes poisoned."""
    import randgraph as rg
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=SAN_GRAPHS, derandomize=True, deadline=None,
              database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=rg.graph_cases(float32="always"))
    def run(case):
        graph = case.build()
        try:
            models = [bp.compile(graph, dtype=dt) for dt in case.dtypes]
        except Exception as e:
            if rg.known_bug(e):
                return
            raise
        for model in models:
            for batch in case.batches:
                inputs = case.inputs(graph, batch)
                for _ in range(2):  # the second time with the gaps poisoned
                    if graph.outputs:
                        model.forward(**inputs)
                    model.loss_and_grad(**inputs)
                    model.train_step(**inputs)
                    sanitizers.poison_arena_gaps(model)
            sanitizers.poison_arena_gaps(model, False)

    run()


# --- in a plain process ------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(SANITIZED or not Path("/proc/self/statm").exists(), reason="needs /proc and no ASan quarantine")
def test_rss_and_python_memory_flat_across_10000_calls(build_dir):
    """No leak from the runtime or the generated code: after a warm-up, 10,000 rounds of all four
    calls grow neither the resident set (> 2 MiB) nor Python's traced allocations (> 256 KiB)."""
    model = bp.compile(mlp_graph(), dtype="float32", optimizer=bp.optim.Adam(lr=1e-3))
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(n, 7)), rng.integers(0, 3, size=n).astype(np.int32)) for n in (1, 5, 32)]
    for _ in range(300):
        for X, Y in batches:
            _all_calls(model, X, Y)
    tracemalloc.start()
    try:
        rss0, (traced0, _) = _rss_bytes(), tracemalloc.get_traced_memory()
        for i in range(CALLS):
            _all_calls(model, *batches[i % 3])
        rss1, (traced1, _) = _rss_bytes(), tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rss1 - rss0 < 2 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over {CALLS} x 4 calls"
    assert traced1 - traced0 < 256 * 2**10, f"Python allocations grew by {(traced1 - traced0) / 2**10:.0f} KiB"


def test_generated_code_allocates_nothing(build_dir):
    """The generated C never allocates: no malloc/calloc/realloc/free/alloca in any kernel or entry
    point (so it cannot leak; the arena is Python's, allocated once per runtime shape)."""
    import re
    model = bp.compile(mlp_graph(), dtype="float64", optimizer=bp.optim.Adam(lr=1e-3))
    code = re.sub(r"/\*.*?\*/", "", model.c_source, flags=re.S)
    assert not re.search(r"\b(malloc|calloc|realloc|free|alloca|aligned_alloc|posix_memalign)\s*\(", code)
