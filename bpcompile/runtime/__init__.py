"""Running a built model: loading the native module (`load`), the `CompiledModel` with its
arrays, entries, checkpoints and atomic file writes, the thread pool and the BLAS library.
Needs neither SymPy, Jinja2 nor a C compiler."""

from .model import ALIGN, CompiledModel, Entry, Frame, aligned_empty, load, write_atomic
from .native import plan

__all__ = ["ALIGN", "CompiledModel", "Entry", "Frame", "aligned_empty", "load", "plan", "write_atomic"]
