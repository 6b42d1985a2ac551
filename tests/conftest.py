"""Shared fixtures: one build folder per test session, and generated C held to -Werror."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("BPCOMPILE_WERROR", "1")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpbuild")
    os.environ["BPCOMPILE_BUILD_DIR"] = str(path)
    return path
