"""The machine: its CPU model, and how much of its CPU other processes are using.

On a shared 2-core machine, another process's work slows multi-threaded runs several-fold,
so run.py measures that share around each run (from /proc/stat, minus our own CPU time
and our children's) and can wait for a quiet moment.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

BUSY_WARNING = 0.05  # share of CPU time used by other processes that makes a run suspect


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ForeignCPU:
    """Share of the machine's CPU time used by processes other than ours, between two reads."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())

    def share(self) -> float | None:
        wall0, busy0, own0 = self.start
        busy1 = _machine_busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        return max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / max(wall, 1e-9)


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat), steal included."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _own_cpu_s() -> float:
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def wait_for_quiet(max_wait_s: float) -> None:
    """Wait, up to ``max_wait_s``, for a 1-second window in which other processes idle."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        meter = ForeignCPU()
        time.sleep(1.0)
        share = meter.share()
        if share is None or share < BUSY_WARNING:
            return


def busy_note(share: float | None) -> str:
    if share is None or share < BUSY_WARNING:
        return ""
    return f"machine busy: other processes used {share:.0%} of the CPU"
