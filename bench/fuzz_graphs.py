"""The long random-graph run: thousands of graphs from tests/randgraph.py, each compiled and
checked against the NumPy reference interpreter and float64 finite differences.

    python bench/fuzz_graphs.py --count 2000            # 2000 graphs, 2 worker processes
    python bench/fuzz_graphs.py --count 200 --seed 7 --float32 always --jobs 4
    python bench/fuzz_graphs.py --count 100 --sanitize  # generated C built with ASan + UBSan

Graphs are drawn in chunks (one worker process per chunk, so loaded modules do not pile up);
chunk i uses hypothesis seed (seed, i), so a run is reproducible. Every failure is printed with
the program that rebuilds its graph. Exit status 0 only when no graph failed (graphs that hit a
known, still unfixed bug - randgraph.KNOWN_BUGS - are counted separately).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def worker(seed: int, chunk: int, count: int, float32: str, build_dir: str) -> None:
    """Check `count` graphs; print one JSON line per graph."""
    sys.path.insert(0, str(TESTS))
    import randgraph as rg
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    @hseed(seed * 1_000_003 + chunk)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=rg.graph_cases(float32=float32))
    def run(case):
        start = time.perf_counter()
        record = {"chunk": chunk}
        try:
            report, bug = rg.run_case(case, build_dir)
            record.update(report.__dict__, known_bug=bug)
        except Exception:
            record.update(failure=traceback.format_exc(limit=8), source=repr(case))
        record["seconds"] = time.perf_counter() - start
        print(json.dumps(record), flush=True)

    run()


def sanitizer_env(env: dict) -> dict:
    sys.path.insert(0, str(TESTS))
    from sanitizers import sanitizer_env as make
    return make(env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="graphs to check (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="worker processes")
    ap.add_argument("--chunk", type=int, default=100, help="graphs per worker process (default 100)")
    ap.add_argument("--float32", choices=("drawn", "always", "never"), default="drawn",
                    help="also compile float32: for about half the graphs (default), always, never")
    ap.add_argument("--sanitize", action="store_true", help="build the generated C with ASan + UBSan")
    ap.add_argument("--build-dir", help="build cache (default: a temporary folder, removed afterwards)")
    ap.add_argument("--show", type=int, default=10, help="failures printed in full (default 10)")
    ap.add_argument("--worker", nargs=5, metavar=("SEED", "CHUNK", "COUNT", "FLOAT32", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        s, c, n, f, d = args.worker
        worker(int(s), int(c), int(n), f, d)
        return 0

    build_dir = Path(args.build_dir) if args.build_dir else Path(tempfile.mkdtemp(prefix="bp-fuzz-"))
    env = dict(os.environ, BPCOMPILE_WERROR="1", OPENBLAS_NUM_THREADS="1")
    if args.sanitize:
        env = sanitizer_env(env)
    chunks = [(i, min(args.chunk, args.count - i * args.chunk)) for i in range(-(-args.count // args.chunk))]
    records: list[dict] = []
    errors: list[str] = []
    start = time.perf_counter()

    def run_chunk(item: tuple[int, int]) -> None:
        chunk, count = item
        cmd = [sys.executable, __file__, "--worker", str(args.seed), str(chunk), str(count), args.float32,
               str(build_dir)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        got = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        records.extend(got)
        if p.returncode != 0 or len(got) != count:
            errors.append(f"chunk {chunk}: worker exited {p.returncode} after {len(got)}/{count} graphs\n"
                          + p.stderr[-4000:])
        done = len(records)
        failed = sum("failure" in r for r in records)
        print(f"[{time.perf_counter() - start:7.1f}s] {done}/{args.count} graphs, {failed} failed", file=sys.stderr,
              flush=True)

    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run_chunk, chunks))
    finally:
        if not args.build_dir:
            shutil.rmtree(build_dir, ignore_errors=True)

    failures = [r for r in records if "failure" in r]
    known: dict[str, int] = {}
    for r in records:
        if r.get("known_bug"):
            known[r["known_bug"]] = known.get(r["known_bug"], 0) + 1
    total = {k: sum(r.get(k, 0) for r in records) for k in ("models", "calls", "arrays", "fd_checks", "fd_skipped")}
    for r in failures[:args.show]:
        print("=" * 100)
        print(r["source"])
        print(r["failure"])
    for e in errors:
        print("=" * 100)
        print(e)
    checked = len(records) - len(failures) - sum(known.values())
    print("=" * 100)
    print(f"random graphs: {len(records)} drawn (seed {args.seed}{', sanitized' if args.sanitize else ''}), "
          f"{checked} checked clean, {len(failures)} failed, {sum(known.values())} hit known bugs {known or ''}")
    print(f"  {total['models']} models compiled, {total['calls']} native calls, {total['arrays']} arrays compared "
          f"with the reference, {total['fd_checks']} finite-difference checks ({total['fd_skipped']} skipped: "
          f"every step crossed a kink); {time.perf_counter() - start:.0f} s")
    return 0 if not failures and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
