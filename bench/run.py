"""Run every (workload, framework) pair in a fresh process and print a markdown report.

    python bench/run.py                                   # everything
    python bench/run.py --workloads W1,W2 --frameworks numpy,bpcompile --repeats 20

Progress goes to stderr, the report to stdout. A framework that is not installed, or a
workload a framework does not support, is a "skipped" row; a crash or a timeout is a
"failed" row. Each run gets fresh, empty build caches (bpcompile's build dir and
TorchInductor's cache), so "compile" is a cold compile. bpcompile's bytecode (.pyc) is written
first, as `pip install` writes it: with PYTHONDONTWRITEBYTECODE set (this project's machines set
it) an editable install would have every fresh process compile bpcompile's sources (0.1-0.2 s of
its cold compile), which the peers' installed packages never do.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import BUSY_WARNING, ForeignCPU, busy_note, cpu_model, wait_for_quiet
from workloads import WORKLOADS, flops_per_step

HERE = Path(__file__).resolve().parent
REFERENCE = "bpcompile"  # the "ratio to" column divides by this framework's time
LOSS_REFERENCE = "numpy"  # first-step losses are compared with this framework's
LOSS_RTOL = 1e-3


@dataclass(frozen=True)
class Runner:
    script: str
    variant: str | None = None

    def command(self, workload: str, args: argparse.Namespace) -> list[str]:
        cmd = [sys.executable, str(HERE / self.script), "--workload", workload, "--json",
               "--budget", str(args.budget)]
        if self.variant:
            cmd += ["--variant", self.variant]
        if args.repeats:
            cmd += ["--repeats", str(args.repeats)]
        return cmd


FRAMEWORKS: dict[str, Runner] = {
    "bpcompile": Runner("run_bpcompile.py"),
    "bpcompile.openblas": Runner("run_bpcompile.py", "openblas"),
    "numpy": Runner("run_numpy.py"),
    "torch": Runner("run_torch.py"),
    "torch.compile": Runner("run_torch.py", "compile"),
    "jax": Runner("run_jax.py"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, e.g. W1,W2")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"comma-separated, from {','.join(FRAMEWORKS)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples per run (default: fit --budget)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per run")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to idle")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="rerun a run disturbed by other processes up to N times, keep the"
                        " least disturbed")
    p.add_argument("--save", type=Path, help="also write all results as JSON to this file")
    args = p.parse_args()
    args.workloads = _choices(args.workloads, WORKLOADS, str.upper)
    args.frameworks = _choices(args.frameworks, FRAMEWORKS, str.lower)
    return args


def _choices(text: str, known: dict[str, Any], norm: Any) -> list[str]:
    names = [norm(s.strip()) for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _failure(workload: str, framework: str, note: str) -> dict[str, Any]:
    return {"workload": workload, "framework": framework, "status": "failed", "note": note}


def run_one(workload: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process with empty build caches; never raises."""
    meter = ForeignCPU()
    with tempfile.TemporaryDirectory(prefix="bpbench-") as tmp:
        env = dict(os.environ, BPCOMPILE_BUILD_DIR=f"{tmp}/bpcompile",
                   TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor")
        try:
            proc = subprocess.run(FRAMEWORKS[framework].command(workload, args), env=env,
                                  capture_output=True, text=True, timeout=args.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return _failure(workload, framework, f"timed out after {args.timeout:.0f} s")
    result = _last_json_line(proc.stdout)
    if result is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return _failure(workload, framework, f"exit code {proc.returncode}: {tail}")
    result["foreign_cpu_share"] = share = meter.share()
    if result.get("status") == "ok" and busy_note(share):
        result["note"] = "; ".join(filter(None, [result.get("note"), busy_note(share)]))
    return result


def _disturbance(r: dict[str, Any]) -> float:
    share = r.get("foreign_cpu_share")
    return 0.0 if r.get("status") != "ok" or share is None else share


def run_least_disturbed(workload: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """run_one, repeated up to --retry-busy times while other processes disturbed it."""
    wait_for_quiet(args.wait_quiet)
    best = run_one(workload, framework, args)
    for _ in range(args.retry_busy):
        if _disturbance(best) < BUSY_WARNING:
            break
        print("(machine busy, again)", end=" ", file=sys.stderr, flush=True)
        wait_for_quiet(args.wait_quiet)
        best = min(best, run_one(workload, framework, args), key=_disturbance)
    return best


def gemm_peak_once() -> dict[str, Any]:
    meter = ForeignCPU()
    proc = subprocess.run([sys.executable, str(HERE / "gemm_peak.py")], capture_output=True,
                          text=True, timeout=300, check=False)
    peak = _last_json_line(proc.stdout) or {"gflops": math.nan, "openblas_core": "?"}
    peak["foreign_cpu_share"] = meter.share()
    return peak


def gemm_peak(args: argparse.Namespace) -> dict[str, Any]:
    """The highest of the GEMM peaks measured, retried like the runs while disturbed."""
    wait_for_quiet(args.wait_quiet)
    best = gemm_peak_once()
    for _ in range(args.retry_busy):
        if (best.get("foreign_cpu_share") or 0.0) < BUSY_WARNING:
            break
        wait_for_quiet(args.wait_quiet)
        best = max(best, gemm_peak_once(), key=lambda p: p.get("gflops") or 0.0)
    return best


def fmt_time(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_flops(flops: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP"
    return f"{flops:.3g} FLOP"


def fmt_ratio(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    if r.get("status") != "ok" or not ref or ref.get("status") != "ok":
        return "n/a"
    return f"{r['median_step_s'] / ref['median_step_s']:.2f}×"


def loss_check(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """Largest relative difference of the first-step losses from the reference run."""
    mine, theirs = r.get("losses") or [], (ref or {}).get("losses") or []
    if r.get("status") != "ok" or not mine or len(mine) != len(theirs):
        return "–"
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, theirs, strict=True))
    return f"{'ok' if diff <= LOSS_RTOL else 'MISMATCH'} ({diff:.0e})"


def fmt_floor_share(r: dict[str, Any], gflops: float) -> str:
    """The GEMM floor (FLOPs / peak) as a share of this row's median step: 100% is the peak."""
    if r.get("status") != "ok" or not r.get("median_step_s") or not gflops or math.isnan(gflops):
        return "–"
    pct = 100 * flops_per_step(WORKLOADS[r["workload"]]) / (gflops * 1e9) / r["median_step_s"]
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def result_table(results: list[dict[str, Any]], gflops: float = math.nan) -> list[str]:
    by_key = {(r["workload"], r["framework"]): r for r in results}
    header = ("| workload | framework | median step | ratio to bpcompile | floor % | compile time |"
              " peak RSS | loss vs numpy | note |")
    lines = [header, "|" + "---|" * 9]
    for r in results:
        w = r["workload"]
        ref, loss_ref = by_key.get((w, REFERENCE)), by_key.get((w, LOSS_REFERENCE))
        rss = f"{r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "–"
        note = r.get("note") or ""
        if r.get("status") != "ok":
            note = f"{r.get('status')}: {note}"
        lines.append(f"| {w} | {r['framework']} | {fmt_time(r.get('median_step_s'))} | "
                     f"{fmt_ratio(r, ref)} | {fmt_floor_share(r, gflops)} | "
                     f"{fmt_time(r.get('compile_s'))} | {rss} | "
                     f"{loss_check(r, loss_ref)} | {note.replace('|', '/')} |")
    return lines


def flops_table(workloads: list[str], results: list[dict[str, Any]], gflops: float) -> list[str]:
    lines = ["| workload | model | FLOPs/step | floor at peak | fastest measured |",
             "|---|---|---|---|---|"]
    for name in workloads:
        flops = flops_per_step(WORKLOADS[name])
        ok = [r for r in results if r["workload"] == name and r.get("status") == "ok"]
        best = min(ok, key=lambda r: r["median_step_s"], default=None)
        fastest = f"{fmt_time(best['median_step_s'])} ({best['framework']})" if best else "–"
        lines.append(f"| {name} | {WORKLOADS[name].title} | {fmt_flops(flops)} | "
                     f"{fmt_time(flops / (gflops * 1e9))} | {fastest} |")
    return lines


def busy_summary(share: float | None) -> str:
    if share is None:
        return "(CPU use of other processes unknown: no /proc/stat)"
    line = f"Other processes used {share:.0%} of the machine's CPU time during the runs."
    if share >= BUSY_WARNING:
        line += " Rows noted 'machine busy' are suspect: rerun them on a quiet machine."
    return line


def versions_line(results: list[dict[str, Any]]) -> str:
    """Each framework's version and BLAS, as its runner reported them (first run of each)."""
    seen: dict[str, str] = {}
    for r in results:
        if r.get("version") and r["framework"] not in seen:
            seen[r["framework"]] = r["version"]
    return "Versions and BLAS: " + ("; ".join(f"{k} {v}" for k, v in seen.items()) or "–") + "."


def machine_lines(peak: dict[str, Any]) -> list[str]:
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    preset = (f"OPENBLAS_CORETYPE={coretype} (the NumPy runner's OpenBLAS keeps it)" if coretype
              else "OPENBLAS_CORETYPE not set")
    machine = f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. {preset}."
    busy = busy_note(peak.get("foreign_cpu_share"))
    gemm = (f"float32 GEMM peak (NumPy 2048×2048 matmul, best of 10, OpenBLAS's "
            f"{peak.get('openblas_core', '?')} kernels): "
            f"{peak.get('gflops', math.nan):.1f} GFLOP/s{f' ({busy})' if busy else ''}.")
    return [machine, gemm]


def write_bytecode() -> None:
    """The .pyc files of the bpcompile the runner imports (installed, else this repository's)."""
    spec = importlib.util.find_spec("bpcompile")
    folders = list(spec.submodule_search_locations or []) if spec else [str(HERE.parent / "bpcompile")]
    for folder in folders:
        compileall.compile_dir(folder, quiet=1)


def main() -> None:
    args = parse_args()
    write_bytecode()
    meter = ForeignCPU()
    print("measuring GEMM peak ...", file=sys.stderr, flush=True)
    peak = gemm_peak(args)
    results = []
    for w in args.workloads:
        for fw in args.frameworks:
            print(f"{w} {fw} ...", end=" ", file=sys.stderr, flush=True)
            r = run_least_disturbed(w, fw, args)
            print(r.get("status"), fmt_time(r.get("median_step_s")), r.get("note") or "",
                  file=sys.stderr, flush=True)
            results.append(r)
    if args.save:
        args.save.write_text(json.dumps({"gemm_peak": peak, "results": results}, indent=1))
    flops_note = ("FLOPs count GEMM/conv work only (forward, weight and input gradients); "
                  "floor = FLOPs / GEMM peak; floor % = floor / median step.")
    gflops = peak.get("gflops", math.nan)
    report = [*machine_lines(peak), versions_line(results), busy_summary(meter.share()), "",
              *result_table(results, gflops), "", flops_note, "",
              *flops_table(args.workloads, results, gflops)]
    print("\n".join(report))


if __name__ == "__main__":
    main()
