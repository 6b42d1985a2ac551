"""Python specs: a file defining `graph` or `build()`, run as a module; its errors at its lines."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
from pathlib import Path

import bpcompile as bp

from .common import DTYPES, Spec, SpecError

_counter = itertools.count()


def _user_error(path: Path, exc: BaseException) -> SpecError:
    """A one-line error for an exception raised by the spec's own code, at its line in the spec."""
    line = None
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path.resolve():
        line = exc.lineno
    else:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename and Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
    text = str(exc.msg if isinstance(exc, SyntaxError) else exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return SpecError(path, "", message, line)


def _load_python(path: Path) -> Spec:
    module_name = f"_bpcompile_spec_{next(_counter)}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(path, "", "cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        graph = getattr(module, "graph", None)
        if graph is None:
            build = getattr(module, "build", None)
            if not callable(build):
                raise SpecError(path, "", "defines neither a module-level 'graph' (a bp.Graph) nor a 'build()' "
                                "function returning one")
            graph = build()
            where = "build()"
        else:
            where = "graph"
    except SpecError:
        raise
    except (Exception, SystemExit) as e:  # the spec's own code failed: report it at its line
        raise _user_error(path, e) from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
        sys.modules.pop(module_name, None)
    if not isinstance(graph, bp.Graph):
        raise SpecError(path, where, f"expected a bp.Graph, got {type(graph).__name__}")
    dtype = getattr(module, "dtype", "float32")
    if dtype not in DTYPES:
        raise SpecError(path, "dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    optimizer = getattr(module, "optimizer", None)
    if optimizer is not None and not isinstance(optimizer, bp.optim.Optimizer):
        raise SpecError(path, "optimizer", f"expected a bp.optim optimizer, got {type(optimizer).__name__}")
    seed = getattr(module, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(path, "seed", f"expected a non-negative integer, got {seed!r}")
    return Spec(path, "python", graph, dtype, optimizer, seed)
