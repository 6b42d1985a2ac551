"""Shared fixtures: one build folder per test session, and generated C held to -Werror."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("BPCOMPILE_WERROR", "1")
# The suite builds against OpenBLAS, the BLAS of the core install, even where MKL (an optional
# extra) is installed; tests taking the `blas_backend` fixture run once per installed BLAS.
os.environ.setdefault("BPCOMPILE_BLAS", "openblas")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpbuild")
    os.environ["BPCOMPILE_BUILD_DIR"] = str(path)
    return path


def installed_blas() -> list[str]:
    """The BLAS libraries bpcompile can build against here (build.blas's choices)."""
    from bpcompile.build import cffi_build as build
    found = []
    for name in ("openblas", "mkl"):
        if (build._openblas() if name == "openblas" else build._mkl()) is not None:
            found.append(name)
    return found


@pytest.fixture(params=installed_blas() or [pytest.param("none", marks=pytest.mark.skip("no BLAS installed"))])
def blas_backend(request, monkeypatch) -> str:
    """Each installed BLAS in turn, chosen through BPCOMPILE_BLAS for the builds of one test."""
    from bpcompile.build import cffi_build as build
    monkeypatch.setenv("BPCOMPILE_BLAS", request.param)
    monkeypatch.delenv("BPCOMPILE_NO_BLAS", raising=False)
    build.blas.cache_clear()
    yield request.param
    build.blas.cache_clear()  # the next test reads the environment monkeypatch restores
