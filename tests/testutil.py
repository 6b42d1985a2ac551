"""Helpers shared by several test files: loading example scripts, and running calls in threads."""

from __future__ import annotations

import ast
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
