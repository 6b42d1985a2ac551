"""bp.distributed: data-parallel training under `mpiexec -n 2`, exact against one process.

The scenarios live in distributed_worker.py, one per job; each rank checks itself against a
one-process reference and prints `rank <r> ok <scenario>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bpcompile as bp
from bpcompile import distributed as dist

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent


def _mpiexec() -> str | None:
    beside = Path(sys.executable).with_name("mpiexec")  # the mpich wheel's launcher in this environment
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


needs_mpi = pytest.mark.skipif(not (_have_mpi4py() and _mpiexec()),
                               reason="needs the [mpi] extra (mpi4py and an MPI launcher): "
                                      "pip install 'bpcompile[mpi]'")


@pytest.fixture(scope="module")
def mpi_env(tmp_path_factory) -> dict[str, str]:
    """A build folder with every scenario's models compiled (so the ranks only load them)."""
    build = tmp_path_factory.mktemp("dp_build")
    env = {**os.environ, "BPCOMPILE_BUILD_DIR": str(build), "BPCOMPILE_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", "import distributed_worker as w; w.build_all()"], cwd=WORKER.parent,
                   env=env, check=True, timeout=600)
    return env


def launch(scenario: str, folder: Path, env: dict[str, str], timeout: float = 300) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(WORKER), scenario, str(folder)],
                          cwd=WORKER.parent, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


@needs_mpi
@pytest.mark.parametrize("scenario", ["exact", "gan", "bn_dropout", "bad_input"])
def test_two_ranks(scenario, mpi_env, tmp_path):
    code, out, _ = launch(scenario, tmp_path, mpi_env)
    assert code == 0, out
    for r in (0, 1):
        assert f"rank {r} ok {scenario}" in out, out


@needs_mpi
def test_fit_on_two_ranks_then_resume_on_one(mpi_env, tmp_path):
    import distributed_worker as w

    code, out, _ = launch("fit", tmp_path, mpi_env)
    assert code == 0, out
    train = w.data(25, seed=1)
    os.environ["BPCOMPILE_BUILD_DIR"] = mpi_env["BPCOMPILE_BUILD_DIR"]
    ref = bp.compile(w.mlp(), "float64", optimizer=w.OPTIMIZERS["adam"](), seed=3)
    ref.fit(train, epochs=3, batch_size=8, seed=5, verbose=False)
    ref.fit(train, epochs=1, batch_size=8, seed=6, verbose=False)
    resumed = dist.DataParallel(bp.compile(w.mlp(), "float64", optimizer=w.OPTIMIZERS["adam"](), seed=99),
                                comm=dist._SingleProcess())
    resumed.load(tmp_path / "fit.npz")
    assert resumed.model.step == 12
    resumed.fit(train, epochs=1, batch_size=8, seed=6, verbose=False)
    w.same_params(resumed.model, ref, w.TOLERANCE["float64"], "resumed")


@needs_mpi
def test_a_killed_rank_ends_the_job(mpi_env, tmp_path):
    code, out, seconds = launch("kill", tmp_path, mpi_env, timeout=120)
    assert code != 0 and seconds < 60, out
    assert "signal 9" in out or "Killed" in out, out


@needs_mpi
def test_an_uncaught_exception_aborts_the_job(mpi_env, tmp_path):
    code, out, seconds = launch("uncaught", tmp_path, mpi_env, timeout=120)
    assert code != 0 and seconds < 60, out
    assert "rank 1 gives up" in out and "rank 1 of 2 ended with RuntimeError; aborting the job" in out, out


def test_world_of_one_equals_the_model(build_dir):
    import distributed_worker as w

    ref = bp.compile(w.mlp(), "float64", optimizer=w.OPTIMIZERS["sgd"](), seed=1)
    dp = dist.DataParallel(bp.compile(w.mlp(), "float64", optimizer=w.OPTIMIZERS["sgd"](), seed=1),
                           comm=dist._SingleProcess())
    for step in range(3):
        batch = w.data(5, seed=step)
        assert dp.train_step(**batch) == ref.train_step(**batch)
    for name in ref.params:
        np.testing.assert_array_equal(dp.model.params[name], ref.params[name])
    with pytest.raises(bp.InputError, match="every rank's batch is empty"):
        dp.train_step(**w.data(0))


def test_without_an_optimizer_is_refused(build_dir):
    g = bp.Graph("dp_no_opt")
    g.output("y", g.input("x", ("batch", 2)) * 2.0)
    with pytest.raises(bp.InputError, match="without an optimizer"):
        dist.DataParallel(bp.compile(g), comm=dist._SingleProcess())


def _init_in_subprocess(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['mpi4py'] = None\n"  # as if the [mpi] extra were not installed
            "from bpcompile import distributed as d\n"
            "d.init(); d.init(); print('world', d.rank(), d.world_size())\n")
    env = {k: v for k, v in os.environ.items() if k not in dist._LAUNCHER_VARIABLES}
    return subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                          timeout=120)


def test_init_without_mpi4py_is_a_world_of_one():
    done = _init_in_subprocess({})
    assert done.returncode == 0 and "world 0 1" in done.stdout, done.stderr


def test_init_under_a_launcher_without_mpi4py_names_the_extra():
    done = _init_in_subprocess({"PMI_RANK": "0"})
    assert done.returncode != 0 and "bpcompile[mpi]" in done.stderr, done.stderr
