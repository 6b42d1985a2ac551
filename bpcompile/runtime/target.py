"""What a build folder records about where it runs and what it depends on, read by both the
builder (build.cffi_build, which writes meta.json) and the loader (runtime.model, which checks it):
the Python ABI and machine, this CPU's feature flags, and the optimizer config less its learning
rates (a runtime setting, not part of the compiled code). Import-free of the rest of bpcompile,
so that build and runtime, which may not import each other, share one copy."""

from __future__ import annotations

import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any


def this_target() -> dict[str, str]:
    """The Python ABI and machine of this process, as meta.json's "target" records them."""
    return {"system": platform.system(), "machine": platform.machine(), "python": sys.implementation.cache_tag,
            "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX") or ""}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); None if unreadable."""
    value = _cpuinfo_field(("flags", "Features"))
    return None if value is None else set(value.split())


def cpu_vendor() -> str | None:
    """This CPU's vendor as /proc/cpuinfo names it (x86 `vendor_id`: GenuineIntel, AuthenticAMD);
    None where it is not there (Arm, no /proc)."""
    return _cpuinfo_field(("vendor_id",))


def _cpuinfo_field(keys: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of `keys` (the first CPU's)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def without_lr(config: Any) -> Any:
    """An optimizer config with every learning rate left out (per-loss configs nest them)."""
    return {k: without_lr(v) for k, v in config.items() if k != "lr"} if isinstance(config, dict) else config
