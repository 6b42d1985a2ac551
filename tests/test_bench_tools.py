"""The benchmark's compile-and-call tool still runs against the current runtime (it reaches into
a model's call frame to time the bare native call), and reports every measure it names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compile_and_call_reports_every_measure(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_and_call.py"), "--sizes", "8,4,3",
                           "--batch", "5", "--repeats", "1"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+ (?:ms|us)) \|$", done.stdout, re.MULTILINE))
    for measure in ("cold compile", "cached compile (new process)", "bp.load (new process, incl. import)",
                    "fresh `python -c` load + one step", "train_step, batch 5", "native train call alone",
                    "tiny model: native train call alone"):
        assert measure in rows, done.stdout
    assert "SymPy imported by bp.load: False" in done.stdout
