"""Where a bpcompile training step spends its time, by `perf` samples, and what that bounds.

    python bench/profile_step.py --workloads W2,W3 [--variant openblas] [--seconds 6]

For each workload: builds the model (cold, in a temporary build folder), warms it up, then
runs steps for ``--seconds`` while `perf record` samples the process (all its threads). The
samples are grouped by what ran: the BLAS's GEMM kernels, each kind of generated kernel
(`k12_layer_norm` counts as layer_norm), libm/libmvec's vector math, bpcompile's thread pool
(mostly a thread waiting for the other), Python with cffi's call, the OS kernel.

What it reports, per workload: the median step (timed before perf attaches), each group's
share of the samples (the pool's threads stay on their cores through a step, a thread with
nothing to do spinning in the pool, so a share is of threads x step time), and the rate the
step's matrix products reach (the step's GEMM FLOPs / the time the threads spend in the BLAS's
kernels, in bpcompile's register tiles and in its own product loops, over the threads). That
rate over the machine's GEMM peak (`gemm_peak.py`, NumPy's OpenBLAS with the CPU's best kernels,
the same run) is the highest "floor %" a step can reach with those products, however little
everything else costs.

Needs `perf` (linux-tools) and permission to sample one's own processes
(`kernel.perf_event_paranoid` <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PERF_HZ = 999  # samples a second per thread: perf's own work takes a share of the 2 cores, kept small
GROUPS = (  # (group, symbol pattern), first match wins
    ("BLAS GEMM", r"^(mkl_|sgemm|dgemm|cblas_|gemm_|.*sgemm_(kernel|beta|incopy|itcopy|oncopy|otcopy))"),
    ("BLAS threads", r"^(blas_thread_server|exec_blas|mkl_serv_|__kmp|_INTERNAL.*kmp)"),
    ("vector math", r"^(_ZGV|__(exp|log|erf|tanh|pow|sin|cos)f?_|(exp|log|erf|tanh|pow)f?(@plt)?$|__ieee754)"),
    ("thread pool", r"^bp_(worker|parallel|run_pieces)"),
    ("tiled products", r"^bp_gemm_tiles"),
    ("generated: {kind}", r"^k\d+_(?P<kind>[a-z0-9_]+?)(_part|_piece)?(\.[a-z]+\.\d+)*$"),
    ("bpcompile runtime", r"^bp_"),
    ("Python and cffi", r"^(_?Py|_cffi|PyEval|_PyEval|cfunction|method_|vectorcall|slot_|dict|list|tuple|"
                        r"unicode|long_|float_|frame_|gc_|visit_|object_|type_|builtin_|array_|npy|PyArray)"),
)

PRODUCT_GROUPS = ("BLAS GEMM", "tiled products", "generated: gemm")  # where a step's matrix products run


def _group(symbol: str, dso: str) -> str:
    if dso.startswith("[kernel"):
        return "OS kernel"
    for name, pattern in GROUPS:
        m = re.match(pattern, symbol)
        if m:
            kind = m.groupdict().get("kind")
            if kind:  # k3_elementwise -> elementwise; k7_gemm (the small products bpcompile loops itself)
                kind = re.sub(r"_(part|piece)$", "", kind)
            return name.format(kind=kind) if kind else name
    if dso.startswith(("libpython", "python", "_cffi_backend", "_multiarray")):
        return "Python and cffi"
    return "other"


def _perf_groups(data: Path) -> dict[str, float]:
    """Share of samples per group, from `perf report`."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol",
                          "-g", "none", "--stdio", "--percent-limit", "0"],
                         capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[([.k])\]\s+(\S+)", line)
        if not m:
            continue
        pct, dso, _, symbol = m.groups()
        group = _group(symbol, "[kernel" if m.group(3) == "k" else dso)
        shares[group] = shares.get(group, 0.0) + float(pct) / 100
    return shares


def _timed_steps(trainer, seconds: float) -> list[float]:
    """Runs steps for about `seconds`; the time of each."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t)
    return times


def profile(workload: str, variant: str, seconds: float) -> dict:
    """Runs the workload's step under perf; the step times, CPU time per step and group shares."""
    if variant == "openblas":
        os.environ["BPCOMPILE_BLAS"] = "openblas"
    import run_bpcompile
    from workloads import flops_per_step, get

    w = get(workload)
    trainer = run_bpcompile.build(w, variant)
    for _ in range(5):
        trainer.step()
    times = _timed_steps(trainer, seconds / 2)  # the step time, without perf's sampling cost
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-F", str(PERF_HZ), "-o", str(data), "-p", str(os.getpid())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf attaches
        profiled = _timed_steps(trainer, seconds)
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=120)
        if perf.returncode not in (0, -signal.SIGINT) or not data.exists():
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace').strip()}")
        shares = _perf_groups(data)
    # the pool's threads stay on their cores through a step (a thread with nothing to do waits
    # spinning), so a group's share of the samples is its share of threads x the step
    median, median_profiled = statistics.median(times), statistics.median(profiled)
    # every product, with the shares and the step both as perf saw them
    blas_s = sum(shares.get(name, 0.0) for name in PRODUCT_GROUPS) * median_profiled
    flops = flops_per_step(w)
    return {"workload": workload, "variant": variant, "steps": len(profiled), "median_step_s": median,
            "median_profiled_s": median_profiled,
            "threads": run_bpcompile.bp.num_threads(), "gemm_flops": flops,
            "blas_gflops": flops / blas_s / 1e9 if blas_s else None,
            "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1]))}


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def report(rows: list[dict], peak: float) -> str:
    lines = [f"float32 GEMM peak (gemm_peak.py, this run): {peak:.1f} GFLOP/s", "",
             "| workload | step (under perf) | products' rate | its % of peak (the floor % it allows) "
             "| step floor % | where the threads' time goes |", "|---|---|---|---|---|---|"]
    for r in rows:
        floor = r["gemm_flops"] / (peak * 1e9)
        rate = r["blas_gflops"]
        parts = ", ".join(f"{g} {s:.0%}" for g, s in r["shares"].items() if s >= 0.01)
        label = r["workload"] + (" (OpenBLAS)" if r["variant"] == "openblas" else "")
        lines.append(f"| {label} | {_fmt_time(r['median_step_s'])} ({_fmt_time(r['median_profiled_s'])}) | "
                     f"{f'{rate:.0f} GFLOP/s' if rate else '-'} | {f'{rate / peak:.0%}' if rate else '-'} | "
                     f"{floor / r['median_step_s']:.0%} | {parts} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6,W7")
    ap.add_argument("--variant", choices=("default", "openblas"), default="default")
    ap.add_argument("--seconds", type=float, default=6.0, help="how long perf samples each workload")
    ap.add_argument("--json", action="store_true", help="one JSON line per workload instead of the table")
    args = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("profile_step.py needs `perf` (linux-tools) on PATH")
    peak = json.loads(subprocess.run([sys.executable, str(HERE / "gemm_peak.py")], capture_output=True,
                                     text=True, check=True).stdout.splitlines()[-1])["gflops"]
    rows = []
    for wl in args.workloads.split(","):
        with tempfile.TemporaryDirectory() as build:  # a fresh process and cold build per workload
            out = subprocess.run([sys.executable, __file__, "--child", wl, args.variant, str(args.seconds)],
                                 capture_output=True, text=True, env={**os.environ, "BPCOMPILE_BUILD_DIR": build})
        if out.returncode != 0:
            sys.exit(f"{wl}: {out.stderr.strip()}")
        rows.append(json.loads(out.stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]) if args.json else f"{wl} done", file=sys.stdout if args.json else sys.stderr)
    if not args.json:
        print(report(rows, peak))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(profile(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
    else:
        main()
