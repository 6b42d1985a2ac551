"""Shared runner machinery: the command line, timing, peak RSS and the JSON result line.

A runner module defines ``build(workload, variant) -> Trainer`` and calls
``run_cli(framework, build, ...)``. The framework is imported with ``optional_import`` so
that a missing package yields a "skipped" result line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import workloads
from workloads import Workload

N_CHECK_LOSSES = 3  # losses of the first steps, reported so run.py can compare frameworks
MIN_SAMPLE_S = 0.005  # a timed sample runs enough steps to last at least this long
MIN_SAMPLES, MAX_SAMPLES = 5, 50

_import_errors: dict[str, str] = {}


class Skip(Exception):
    """Raised by a runner for a workload or variant it does not support."""


@dataclass
class Trainer:
    """One training step on the fixed batch; ``to_float`` turns its result into the loss."""

    step: Callable[[], Any]
    to_float: Callable[[Any], float] = float


@dataclass
class Result:
    workload: str
    framework: str
    status: str = "ok"  # ok | skipped | failed
    median_step_s: float | None = None
    min_step_s: float | None = None
    compile_s: float | None = None  # model build/compile + first step, wall clock
    peak_rss_mib: float | None = None
    samples: int = 0
    steps_per_sample: int = 0
    losses: list[float] = field(default_factory=list)
    note: str = ""
    version: str = ""
    openblas_coretype: str = field(default_factory=lambda: os.environ.get("OPENBLAS_CORETYPE", ""))
    python: str = field(default_factory=platform.python_version)


def optional_import(name: str) -> ModuleType | None:
    """Import a module, or record why it failed and return None."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _time_steps(trainer: Trainer, n: int) -> float:
    start = time.perf_counter()
    out = None
    for _ in range(n):
        out = trainer.step()
    trainer.to_float(out)  # waits for asynchronous frameworks
    return time.perf_counter() - start


def _plan(step_s: float, budget_s: float, repeats: int | None) -> tuple[int, int]:
    """Steps per timed sample and number of samples for a step of about ``step_s``."""
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(step_s, 1e-9)))
    if repeats is not None:
        return inner, max(1, repeats)
    samples = int(budget_s / (inner * max(step_s, 1e-9)))
    return inner, min(MAX_SAMPLES, max(MIN_SAMPLES, samples))


def measure(build: Callable[[], Trainer], result: Result, repeats: int | None,
            budget_s: float) -> None:
    """Build, run the first steps (compile time, check losses), warm up, then time."""
    start = time.perf_counter()
    trainer = build()
    result.losses.append(trainer.to_float(trainer.step()))
    result.compile_s = time.perf_counter() - start
    result.losses += [trainer.to_float(trainer.step()) for _ in range(N_CHECK_LOSSES - 1)]
    if not all(math.isfinite(v) for v in result.losses):
        result.note = "non-finite loss"
    warm_s = _time_steps(trainer, 2) / 2  # warm-up, and a first estimate of the step time
    inner, samples = _plan(warm_s, budget_s, repeats)
    times = [_time_steps(trainer, inner) / inner for _ in range(samples)]
    result.median_step_s, result.min_step_s = statistics.median(times), min(times)
    result.samples, result.steps_per_sample = samples, inner


def parse_args(variants: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time one training workload in this process.")
    p.add_argument("--workload", required=True, help="W1 .. W7")
    p.add_argument("--variant", choices=variants, default=variants[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples (default: as many as fit in --budget, 5..50)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timed samples to aim for (default 2)")
    return p.parse_args()


def emit(result: Result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(result)), flush=True)
        return
    if result.status != "ok":
        print(f"{result.workload} {result.framework}: {result.status} ({result.note})")
        return
    print(f"{result.workload} {result.framework}: median step {result.median_step_s * 1e3:.3f} ms"
          f" ({result.samples} x {result.steps_per_sample} steps), compile+first step"
          f" {result.compile_s:.2f} s, peak RSS {result.peak_rss_mib:.0f} MiB,"
          f" losses {[f'{v:.6g}' for v in result.losses]} {result.note}")


def framework_label(framework: str, variant: str, default_variant: str) -> str:
    return framework if variant == default_variant else f"{framework}.{variant}"


def run_cli(framework: str, build: Callable[[Workload, str], Trainer],
            variants: tuple[str, ...] = ("default",), requires: tuple[str, ...] = (),
            version: Callable[[], str] = lambda: "") -> None:
    """Entry point of every runner: parse arguments, time, print, exit 0 unless failed."""
    args = parse_args(variants)
    w = workloads.get(args.workload)
    result = Result(w.name, framework_label(framework, args.variant, variants[0]))
    missing = [f"{name} ({_import_errors[name]})" for name in requires if name in _import_errors]
    if missing:
        result.status, result.note = "skipped", "not importable: " + "; ".join(missing)
    else:
        result.version = version()
        try:
            measure(lambda: build(w, args.variant), result, args.repeats, args.budget)
        except Skip as exc:
            result.status, result.note = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a "failed" result line
            result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
    result.peak_rss_mib = peak_rss_mib()
    emit(result, args.json)
    sys.exit(1 if result.status == "failed" else 0)
