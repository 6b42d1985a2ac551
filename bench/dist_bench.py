"""Data-parallel throughput: one process with 2 threads against 2 MPI ranks with 1 thread each.

    python bench/dist_bench.py                        # W2 and W3, prints a Markdown table
    python bench/dist_bench.py --workloads W3 --repeats 15

Each configuration runs in its own processes on the workload's batch (bench/workloads.py,
float32): `1 rank x 2 threads` calls `model.train_step` on the whole batch; `2 ranks x 1 thread`
gives each rank half of it through `bp.distributed.DataParallel.train_step` (backward, one
in-place Allreduce of the gradient buffer, fused update). A sample is the median of `--repeats`
timed runs of `--steps` steps each. The allreduce share is the time rank 0 spends in the gradient
Allreduce over its whole step time. The floor is the workload's FLOPs at the GEMM peak of the
same run. Needs the [mpi] and [bench] extras.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = (("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1), ("1 rank x 1 thread", 1, 1))


def worker(args: argparse.Namespace) -> None:
    """One rank: build the workload, time its steps, rank 0 prints one JSON line."""
    import common
    import numpy as np
    from run_bpcompile import GraphBuilder, make_optimizer
    from workloads import get, make_batch

    import bpcompile as bp

    w = get(args.worker)
    comm = bp.distributed.init()
    rank, size = comm.Get_rank(), comm.Get_size()
    model = bp.compile(GraphBuilder(w).build(), dtype="float32", optimizer=make_optimizer(w), seed=0)
    x, y = make_batch(w)
    part = slice(rank * len(x) // size, (rank + 1) * len(x) // size)
    x, y = np.ascontiguousarray(x[part]), np.ascontiguousarray(y[part])
    dp = bp.distributed.DataParallel(model, comm=comm) if size > 1 else None
    step = (lambda: dp.train_step(x=x, y=y)) if dp else (lambda: model.train_step(x=x, y=y))
    for _ in range(3):
        step()
    times, shares = [], []
    for _ in range(args.repeats):
        if dp:
            comm.Barrier()
            dp.allreduce_seconds = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        elapsed = time.perf_counter() - start
        times.append(elapsed / args.steps)
        shares.append(dp.allreduce_seconds / elapsed if dp else 0.0)
    if rank == 0:
        blas = bp.build.blas()
        print(json.dumps({"median_step_s": statistics.median(times), "allreduce_share": statistics.median(shares),
                          "peak_rss_mib": common.peak_rss_mib(), "batch": w.batch, "params": model.param_count,
                          "blas": f"{blas['name']} {blas['version']}" if blas else "none"}), flush=True)


def run_config(workload: str, ranks: int, threads: int, args: argparse.Namespace, build_dir: str) -> dict:
    env = {**os.environ, "BPCOMPILE_NUM_THREADS": str(threads), "BPCOMPILE_BUILD_DIR": build_dir,
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", workload, "--steps", str(args.steps),
               "--repeats", str(args.repeats)]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("mpiexec")
        command = [str(launcher) if launcher.is_file() else (shutil.which("mpiexec") or "mpiexec"),
                   "-n", str(ranks), *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{workload} with {ranks} ranks x {threads} threads failed:\n{done.stdout}{done.stderr}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="W2,W3")
    p.add_argument("--steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=9, help="timed runs; the median is reported")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from gemm_peak import gemm_gflops
    from machine import cpu_model
    from workloads import flops_per_step, get

    peak = gemm_gflops()[0]
    rows, blas = [], "?"
    with tempfile.TemporaryDirectory() as build_dir:
        for name in args.workloads.split(","):
            w = get(name)
            results = {label: run_config(w.name, r, t, args, build_dir) for label, r, t in CONFIGS}
            base = results[CONFIGS[0][0]]
            floor = flops_per_step(w) / (peak * 1e9)
            for label, result in results.items():
                blas = result["blas"]
                rate = result["batch"] / result["median_step_s"]
                rows.append(f"| {w.name} | {label} | {result['median_step_s'] * 1e3:.2f} ms | {rate:,.0f} | "
                            f"{base['median_step_s'] / result['median_step_s']:.2f} | "
                            f"{result['allreduce_share']:.1%} | {floor * 1e3:.2f} ms | "
                            f"{result['peak_rss_mib']:.0f} MiB |")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} CPUs; float32 GEMM peak {peak:.0f} GFLOP/s; "
          f"bpcompile's BLAS: {blas}. Median of {args.repeats} runs of {args.steps} steps.\n")
    print("| workload | configuration | step | samples/s | throughput vs 1x2 | allreduce share | floor "
          "| peak RSS (rank 0) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
