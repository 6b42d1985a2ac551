"""The build cache: content-hashed folders, no recompilation on a hit, atomic and concurrent
builds, verified builds (the module's size and hash, the module's own record of meta.json),
loading without SymPy or a compiler, and a non-editable (wheel) install. Damaged builds, case by
case: tests/test_robustness.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from testutil import run_started_together, subprocess_env

import bpcompile as bp
import bpcompile.build.cffi_build as bpbuild

REPO = Path(__file__).resolve().parent.parent


def mlp_graph(name: str = "cache_mlp", hidden: int = 5) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    W1 = g.param("W1", (3, hidden), init="normal")
    b1 = g.param("b1", (hidden,), init="normal")
    W2 = g.param("W2", (hidden, 2), init="normal")
    out = bp.tanh(x @ W1 + b1) @ W2
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def data(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 2))


def _no_compiler(*args, **kwargs):
    raise AssertionError("the C compiler was invoked for a cached build")


def test_second_compile_is_a_cache_hit(build_dir, monkeypatch):
    first = bp.compile(mlp_graph(), dtype="float64", seed=0)
    assert first.build_path.parent == build_dir
    assert first.build_path.name.startswith("cache_mlp-")
    monkeypatch.setattr(bpbuild, "_compile", _no_compiler)
    again = bp.compile(mlp_graph(), dtype="float64", seed=0)  # a fresh but identical graph
    assert again.build_path == first.build_path
    X, T = data()
    np.testing.assert_array_equal(again.forward(x=X)["out"], first.forward(x=X)["out"])


def test_different_graphs_and_dtypes_get_different_paths(build_dir):
    paths = {
        bp.compile(mlp_graph(), dtype="float64").build_path,
        bp.compile(mlp_graph(), dtype="float32").build_path,
        bp.compile(mlp_graph(hidden=6), dtype="float64").build_path,
        bp.compile(mlp_graph("cache_other"), dtype="float64").build_path,
        bp.compile(mlp_graph(), dtype="float64", optimizer=bp.optim.SGD(lr=0.1, momentum=0.5)).build_path,
    }
    assert len(paths) == 5
    assert all((p / "meta.json").is_file() for p in paths)


def test_learning_rate_change_does_not_rebuild(build_dir, monkeypatch):
    g = mlp_graph()
    slow = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.01), seed=1)
    monkeypatch.setattr(bpbuild, "_compile", _no_compiler)
    fast = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.5), seed=1)
    sched = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=bp.schedules.StepDecay(0.3, 1, 0.5)), seed=1)
    # one folder per learning rate (each holds its model's settings), one module compiled for all
    assert len({fast.build_path, slow.build_path, sched.build_path}) == 3
    assert fast.meta["module"] == slow.meta["module"] == sched.meta["module"]
    X, T = data()
    _, grads = fast.loss_and_grad(x=X, t=T)
    before = {k: v.copy() for k, v in fast.params.items()}
    fast.train_step(x=X, t=T)
    slow.train_step(x=X, t=T)
    sched.train_step(x=X, t=T)
    for k in before:  # each model steps with its own rate, not the cached build's
        np.testing.assert_allclose(fast.params[k], before[k] - 0.5 * grads[k], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(slow.params[k], before[k] - 0.01 * grads[k], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(sched.params[k], before[k] - 0.3 * grads[k], rtol=1e-12, atol=1e-15)


CONCURRENT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import bpcompile as bp
    from test_build_cache import mlp_graph, data
    from testutil import wait_for_start
    g = mlp_graph("concurrent")
    bp.lower(g, "float64")  # import and warm up everything before the start signal
    wait_for_start(Path(sys.argv[1]), sys.argv[2])
    model = bp.compile(g, dtype="float64", seed=0)
    X, _ = data()
    print(json.dumps({"path": str(model.build_path), "out": model.forward(x=X)["out"].tolist()}))
""")


def test_processes_building_the_same_model_at_once(tmp_path):
    root = tmp_path / "fresh-build"
    script = tmp_path / "concurrent.py"
    script.write_text(CONCURRENT)
    env = subprocess_env(BPCOMPILE_BUILD_DIR=str(root))
    runs = run_started_together([[sys.executable, str(script)]] * 3, tmp_path / "sync", env, tmp_path)
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in runs]
    assert len({r["path"] for r in results}) == 1
    assert all(r["out"] == results[0]["out"] for r in results)
    path = Path(results[0]["path"])
    assert path.parent == root
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [path.name]
    assert not list(root.glob(".tmp-*")), "a temporary build folder was left behind"
    model = bp.load(path)
    X, _ = data()
    np.testing.assert_array_equal(model.forward(x=X)["out"], np.asarray(results[0]["out"]))


def test_leftover_temporary_folders_do_not_break_a_build(tmp_path):
    root = tmp_path / "with-leftovers"
    root.mkdir()
    fresh = root / ".tmp-leftover-abc123"  # a build killed a moment ago
    stale = root / ".tmp-leftover-old999"  # a build killed long ago
    for d in (fresh, stale):
        d.mkdir()
        (d / "model.c").write_text("this is not C {")
        (d / "meta.json").write_text("{")
        (d / "half.so").write_bytes(b"\0" * 10)
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    model = bp.compile(mlp_graph("leftover"), dtype="float64", build_dir=root)
    assert model.build_path.parent == root
    assert (model.build_path / "meta.json").is_file()
    X, _ = data()
    assert model.forward(x=X)["out"].shape == (6, 2)
    assert not stale.exists(), "a stale temporary folder (older than an hour) was not cleaned up"
    assert bp.compile(mlp_graph("leftover"), dtype="float64", build_dir=root).build_path == model.build_path


LOAD_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np
    import bpcompile as bp
    path, data_file = sys.argv[1], sys.argv[2]
    d = np.load(data_file)
    model = bp.load(path, seed=4)
    out = model.forward(x=d["x"])["out"]
    loss = model.train_step(x=d["x"], t=d["t"])
    heavy = sorted(m for m in ("sympy", "jinja2", "cffi.recompiler", "bpcompile.compiler", "bpcompile.codegen.module",
                               "bpcompile.symbolic.functions", "bpcompile.ops.core") if m in sys.modules)
    print(json.dumps({"out": out.tolist(), "loss": loss, "W1": model.params["W1"].tolist(), "heavy": heavy}))
""")


def test_load_in_fresh_process_needs_no_sympy_or_compiler(build_dir, tmp_path):
    model = bp.compile(mlp_graph("loadonly"), dtype="float64", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9), seed=4)
    X, T = data()
    np.savez(tmp_path / "data.npz", x=X, t=T)
    script = tmp_path / "load_only.py"
    script.write_text(LOAD_ONLY)
    env = subprocess_env(CC="/bin/false", PATH="/nonexistent")  # no compiler can run
    p = subprocess.run([sys.executable, str(script), str(model.build_path), str(tmp_path / "data.npz")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    np.testing.assert_array_equal(np.asarray(res["out"]), model.forward(x=X)["out"])
    assert res["loss"] == model.train_step(x=X, t=T)
    np.testing.assert_array_equal(np.asarray(res["W1"]), model.params["W1"])


WHEEL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import bpcompile as bp
    site = Path(sys.argv[1]).resolve()
    assert Path(bp.__file__).resolve().is_relative_to(site), bp.__file__
    g = bp.Graph("wheel_mlp")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("batch",), dtype="int32")
    W = g.param("W", (3, 4), init="he_normal")
    b = g.param("b", (4,))
    logits = bp.relu(x @ W + b)
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1), seed=0)
    assert Path(model.build_path).resolve().is_relative_to(Path.cwd().resolve()), model.build_path
    X = np.random.default_rng(0).normal(size=(8, 3)); Y = np.arange(8) % 4
    W0 = model.params["W"].copy()
    loss = model.train_step(x=X, y=Y)
    assert np.isfinite(loss) and not np.array_equal(W0, model.params["W"])
    print("wheel ok", bp.__file__, loss)
""")


def test_non_editable_wheel_install_works(tmp_path):
    src = tmp_path / "src"
    # the repository as a clean source tree (pip would build in place and write into the repo)
    ignore = shutil.ignore_patterns(".git", "bench", "examples", "tests", "__pycache__", "*.egg-info", ".venv*", "dist")
    shutil.copytree(REPO, src, ignore=lambda folder, names: ignore(folder, names) | (
        {"build"} if Path(folder) == REPO else set()))  # the build cache, not the bpcompile.build package
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = wheels.glob("bpcompile-*.whl")
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert list((site / "bpcompile" / "templates").glob("*.j2")), "templates/ did not ship in the wheel"
    run = tmp_path / "run"
    run.mkdir()
    script = run / "use_wheel.py"
    script.write_text(WHEEL_SCRIPT)
    env = subprocess_env(PYTHONPATH=str(site), BPCOMPILE_BUILD_DIR=str(run / "build"))
    p = subprocess.run([sys.executable, str(script), str(site)], cwd=run, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "wheel ok" in p.stdout


def test_build_folders_follow_the_umask(tmp_path):
    """mkdtemp's private 0700 would keep a shared build cache from other users."""
    import stat

    g = bp.Graph("umask_build")
    g.output("y", g.input("x", ("batch", 2)) * 3.0)
    mask = os.umask(0o022)
    try:
        model = bp.compile(g, build_dir=tmp_path)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(model.build_path.stat().st_mode) == 0o755


def test_save_removes_temporaries_of_killed_writers(tmp_path):
    g = bp.Graph("orphan_save")
    x = g.input("x", ("batch", 2))
    g.loss(bp.mean(bp.square(x @ g.param("w", (2, 1), init="normal"))))
    model = bp.compile(g, build_dir=tmp_path / "build")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited
    orphan = tmp_path / f".ck.npz.{dead_pid}.abc123.tmp"
    live = tmp_path / f".ck.npz.{os.getpid()}.def456.tmp"  # a write of a running process: kept
    orphan.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    model.save(tmp_path / "ck.npz")
    assert not orphan.exists() and live.exists() and (tmp_path / "ck.npz").is_file()


def test_a_build_records_its_module_and_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_rename(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    model = bp.compile(mlp_graph("fsynced"), dtype="float64", build_dir=tmp_path)
    monkeypatch.undo()
    meta = json.loads((model.build_path / "meta.json").read_text())
    module = model.build_path / meta["module_file"]
    assert meta["files"] == {module.name: {"size": module.stat().st_size,
                                           "sha256": hashlib.sha256(module.read_bytes()).hexdigest()}}
    final = os.path.realpath(model.build_path)
    (i,) = [k for k, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    tmp = events[i][1]
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    assert {os.path.join(tmp, module.name), os.path.join(tmp, "meta.json"), tmp} <= synced
    assert ("fsync", os.path.realpath(tmp_path)) in events[i:], "the rename itself was not made durable"


def test_the_module_reports_the_metadata_it_was_built_for(build_dir):
    model = bp.compile(mlp_graph("reports"), dtype="float64", optimizer=bp.optim.Adam(lr=0.01))
    record = json.loads(model._module.ffi.string(model._lib.bp_layout()))
    meta = json.loads((model.build_path / "meta.json").read_text())
    assert record["state_size"] == 2 * record["param_size"] > 0  # Adam's two slots
    assert record["entries"] == meta["entries"] and record["module_file"] == meta["module_file"]
    optimizer = {k: v for k, v in meta["optimizer"].items() if k != "lr"}  # a runtime value, not part of the build
    assert record == {**{k: v for k, v in meta.items() if k != "files"}, "optimizer": optimizer}


def test_load_gives_back_the_compiled_settings(build_dir):
    """bp.load(build_path) restores array initial values and the learning rate, whatever was
    compiled after it: each compile's settings have their own folder."""
    g = bp.Graph("settings")
    x, t = g.input("x", ("batch", 3)), g.input("t", ("batch", 2))
    bias = np.arange(5.0) + 0.5  # an array init, as an LSTM's forget-gate bias of ones
    w1, b1 = g.param("W1", (3, 5), init="normal"), g.param("b1", (5,), init=bias)
    g.loss(bp.mse(bp.tanh(x @ w1 + b1) @ g.param("W2", (5, 2), init="normal"), t))
    first = bp.compile(g, dtype="float64", optimizer=bp.optim.Adam(lr=0.01), seed=2)
    second = bp.compile(g, dtype="float64", optimizer=bp.optim.Adam(lr=0.25), seed=2)
    assert first.build_path != second.build_path
    for model in (first, second):
        loaded = bp.load(model.build_path, seed=2)
        assert loaded.optimizer.config() == model.optimizer.config()
        np.testing.assert_array_equal(loaded.params["b1"], bias)
        for name, value in model.params.items():
            np.testing.assert_array_equal(loaded.params[name], value)
    assert "optimizer.json" not in {p.name for p in first.build_path.iterdir()}
    (first.build_path / "init.npz").write_bytes(b"damaged")
    with pytest.raises(bp.CompileError, match="init.npz"):
        bp.load(first.build_path)


def test_a_build_records_the_python_abi_and_cpu_features_it_needs(build_dir):
    """bp.load compares them with the machine it runs on (a copied -march=native build may die
    of SIGILL elsewhere): the cases are in tests/test_robustness.py's DAMAGE table."""
    import platform
    import sysconfig
    model = bp.compile(mlp_graph("targeted"), dtype="float64")
    target = json.loads((model.build_path / "meta.json").read_text())["target"]
    assert target["python"] == sys.implementation.cache_tag
    assert target["ext_suffix"] == sysconfig.get_config_var("EXT_SUFFIX") and model.meta["module_file"].endswith(
        target["ext_suffix"])
    assert (target["system"], target["machine"]) == (platform.system(), platform.machine())
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].strip(": \t").split())
    assert set(target["cpu_features"]) <= flags
    if platform.machine() == "x86_64":  # what -march=native turns on for any x86-64 CPU, and more
        assert {"sse2", "fxsr"} <= set(target["cpu_features"])
        plain = bpbuild.targeted_cpu_features(bpbuild.compiler()[0], ("-march=x86-64",))  # the baseline ISA
        assert "sse2" in plain and "avx" not in plain and set(plain) <= set(target["cpu_features"])


REPAIR = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import bpcompile as bp
    from bpcompile.build import cffi_build as build
    from test_build_cache import mlp_graph, data
    from testutil import wait_for_start
    sync, tag = Path(sys.argv[1]), sys.argv[2]
    g = mlp_graph("repaired")
    folder = build.build(bp.lower(g, "float64", bp.optim.SGD(lr=0.01)).sources)  # as bp.compile builds it
    if tag == "0":  # damaged before any process starts to compile
        module = next(folder.glob("*.so"))
        module.write_bytes(module.read_bytes()[:5000])
    wait_for_start(sync, tag)
    model = bp.compile(g, dtype="float64", seed=0)
    X, _ = data()
    print(json.dumps({"folder": str(folder), "path": str(model.build_path), "out": model.forward(x=X)["out"].tolist()}))
""")


def test_processes_rebuilding_one_damaged_build_at_once(tmp_path):
    root = tmp_path / "cache"
    script = tmp_path / "repair.py"
    script.write_text(REPAIR)
    env = subprocess_env(BPCOMPILE_BUILD_DIR=str(root))
    (tmp_path / "sync0").mkdir()
    (tmp_path / "sync0" / "go").touch()
    first = subprocess.run([sys.executable, str(script), str(tmp_path / "sync0"), "1"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)  # builds it, so that the racers find it
    assert first.returncode == 0, first.stderr[-3000:]
    runs = run_started_together([[sys.executable, str(script)]] * 3, tmp_path / "sync", env, tmp_path)
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in runs]
    folder = Path(results[0]["folder"])
    assert {r["path"] for r in results} == {r["folder"] for r in results} == {str(folder)}
    assert all(r["out"] == results[0]["out"] for r in results)
    left = sorted(p.name for p in root.iterdir())
    assert folder.name in left and not [n for n in left if n.startswith((".tmp-", ".old-"))], left
    model = bp.load(folder)
    X, _ = data()
    np.testing.assert_array_equal(model.forward(x=X)["out"], np.asarray(results[0]["out"]))


FAILING = textwrap.dedent("""
    import json, shutil, sys, time
    from pathlib import Path
    import bpcompile as bp
    from bpcompile.build import cffi_build as build
    from test_build_cache import mlp_graph
    from testutil import wait_for_start
    flags = build.model_flags
    build.model_flags = lambda: [*flags(), "-fbpcompile-no-such-flag"]  # the model's C cannot compile
    rmtree = shutil.rmtree

    def slow_rmtree(*args, **kwargs):  # a slow file system: removing a folder leaves time for a race
        rmtree(*args, **kwargs)
        time.sleep(0.3)
    shutil.rmtree = slow_rmtree
    g = mlp_graph("failing")
    bp.lower(g, "float64")
    wait_for_start(Path(sys.argv[1]), sys.argv[2])
    try:
        bp.compile(g, dtype="float64", seed=0)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e), "source": getattr(e, "source_path", None)}))
""")


def test_processes_failing_to_compile_the_same_model_at_once(tmp_path):
    """Each gets the CompileError (not an OSError of a lost rename), and no temporary folder is left."""
    root = tmp_path / "cache"
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    runs = run_started_together([[sys.executable, str(script)]] * 4, tmp_path / "sync",
                                subprocess_env(BPCOMPILE_BUILD_DIR=str(root)), tmp_path)
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in runs]
    assert [r["error"] for r in results] == ["CompileError"] * 4, [r.get("message") for r in results]
    assert all("-fbpcompile-no-such-flag" in r["message"] for r in results)
    assert {Path(r["source"]).name for r in results} == {"model.c"}
    assert all(Path(r["source"]).is_file() for r in results)  # the failed build kept for inspection
    left = sorted(p.name for p in root.iterdir())
    assert not [n for n in left if n.startswith((".tmp-", ".old-"))], left
    assert [n for n in left if not n.startswith(".")] == [Path(results[0]["source"]).parent.name], left


def test_a_link_the_preferred_linker_fails_is_retried_with_the_compilers_own(tmp_path, monkeypatch):
    monkeypatch.setattr(bpbuild, "linker_flags", lambda: ["-Wl,--bpcompile-no-such-option"])
    model = bp.compile(mlp_graph("relinked"), dtype="float64", build_dir=tmp_path)
    link = json.loads((model.build_path / "build.json").read_text())["commands"][-1]
    assert "-shared" in link and "-Wl,--bpcompile-no-such-option" not in link
    X, _ = data()
    assert model.forward(x=X)["out"].shape == (6, 2)


def test_the_linker_is_part_of_the_cache_key(tmp_path, monkeypatch):
    first = bp.compile(mlp_graph("keyed_linker"), dtype="float64", build_dir=tmp_path).build_path
    monkeypatch.setattr(bpbuild, "linker_flags", lambda: ["-Wl,-O1"])
    second = bp.compile(mlp_graph("keyed_linker"), dtype="float64", build_dir=tmp_path).build_path
    assert first != second
    assert "-Wl,-O1" in json.loads((second / "build.json").read_text())["commands"][-1]


def test_a_failure_while_the_compiler_runs_leaves_no_build(tmp_path, monkeypatch):
    """init.npz is written while gcc compiles model.c: if that fails, the compile stops with it."""
    def fail(path, arrays):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bpbuild, "_write_arrays", fail)
    g = bp.Graph("arrays_fail")
    x = g.input("x", ("batch", 3))
    g.output("o", x @ g.param("W", (3, 2), init=np.ones((3, 2))))
    with pytest.raises(OSError, match="No space left"):
        bp.compile(g, dtype="float64", build_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    assert not list(tmp_path.glob(".tmp-*"))
