"""Helpers shared by several test files: loading example scripts, and running calls in threads."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    module_name = f"bpcompile_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def check_script_shape(name: str) -> None:
    """An example has a module docstring, main(argv=None), and ends with the __main__ guard."""
    tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
    assert ast.get_docstring(tree), f"{name}.py has no module docstring"
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and [a.arg for a in mains[0].args.args] == ["argv"], f"{name}.py needs main(argv=None)"
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test), f"{name}.py ends without the guard"


def run_threads(fns: list[Callable[[], Any]], timeout: float) -> list[Any]:
    """Start every fn in its own thread at the same moment; their results, in order."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(fns))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return results


def subprocess_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: `base` (default this process's) with tests/ on
    PYTHONPATH (so scripts import the test modules and this one), then `extra`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def wait_for_start(sync: Path, tag: str, timeout: float = 120) -> None:
    """In a subprocess of run_started_together: say this one is ready, then wait for the start."""
    (sync / f"ready-{tag}").touch()
    deadline = time.time() + timeout
    while not (sync / "go").exists():
        if time.time() > deadline:
            sys.exit("no start signal")
        time.sleep(0.001)


def run_started_together(commands: list[list[str]], sync: Path, env: dict[str, str], cwd: Path,
                         timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start every command (each calls wait_for_start with its index as tag), give the start signal
    once all are ready, and return each one's (exit code, stdout, stderr)."""
    sync.mkdir(exist_ok=True)
    procs = [subprocess.Popen(cmd + [str(sync), str(i)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, cmd in enumerate(commands)]
    try:
        deadline = time.time() + timeout
        while len(list(sync.glob("ready-*"))) < len(procs):
            assert time.time() < deadline, "subprocesses did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.005)
        (sync / "go").touch()
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
