"""The native module of a build and its calls: loading it once per process (after the folder
verifies), the entry points, their call frames, the workspace plan and 64-byte-aligned buffers."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CompileError, InputError
from ..ir.dims import dim_size
from . import threads
from .buildfolder import check_files, check_record, check_target

if TYPE_CHECKING:
    from .model import CompiledModel

ALIGN = 64
_MODULES: dict[str, Any] = {}
_RECORDS: dict[str, dict] = {}  # each loaded module's record of its metadata (bp_layout)
_MODULES_LOCK = threading.Lock()


def aligned_empty(count: int, dtype: Any) -> np.ndarray:
    """A zeroed 1-D array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(count * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + count * dtype.itemsize].view(dtype)


def _load_module(path: Path, meta: dict) -> Any:
    """The native module of a build folder, loaded once per process, after its file has been
    verified and its target checked against this machine; then meta.json is checked against the
    module's own record of it."""
    check_target(path, meta)  # before any byte of the folder runs
    check_files(path, meta)
    name = meta["module"]
    with _MODULES_LOCK:
        module = _MODULES.get(name)
        if module is None:
            if meta.get("blas"):
                from . import blas
                blas.load(meta["blas"])
            file = path / meta["module_file"]
            try:
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                record = json.loads(module.ffi.string(module.lib.bp_layout()))
            except (ImportError, OSError, AttributeError, ValueError) as e:
                raise CompileError(f"{path}: the built module {file.name} does not load ({type(e).__name__}: {e}); "
                                   "recompile the model") from None
            sys.modules.setdefault(name, module)
            threads.attach(module.lib)
            _MODULES[name] = module
            _RECORDS[name] = record
    check_record(path, meta, _RECORDS[name])
    return module


PLAN_COLUMNS = 4  # a workspace table row: coef, first kernel, last kernel, number of dims; then the dims


def plan_table(buffers: list[list], dim_names: list[str]) -> np.ndarray:
    """An entry point's workspace buffers (meta.json's [coef, dims, start, end]) as the table of
    rows bp_plan_workspace reads (templates/bp_runtime.h): coef, start, end, ndims, dim indices."""
    index = {d: i for i, d in enumerate(dim_names)}
    width = PLAN_COLUMNS + max((len(names) for _, names, _, _ in buffers), default=0)
    table = np.zeros((len(buffers), width), dtype=np.int64)
    for row, (coef, names, start, end) in zip(table, buffers):
        unknown = [d for d in names if d not in index]
        if unknown:
            raise CompileError(f"a workspace buffer is sized by {unknown[0]!r}, not one of the model's "
                               f"dimensions {dim_names}; recompile the model")
        row[:PLAN_COLUMNS + len(names)] = [coef, start, end, len(names), *(index[d] for d in names)]
    return table


def plan_workspace(module: Any, table: np.ndarray, dims: np.ndarray, itemsize: int) -> tuple[np.ndarray, int]:
    """Byte offsets of one entry point's workspace buffers for the runtime sizes `dims` (int64,
    the model's order), and the arena's bytes: the module's own bp_plan_workspace computes them
    (largest buffer first, each at the lowest 64-byte-aligned offset free among the buffers live
    with it), the plan the exported C library makes too."""
    ffi, lib = module.ffi, module.lib
    n, stride = table.shape
    offsets = np.zeros(max(n, 1), dtype=np.int64)
    work = np.zeros(3 * max(n, 1), dtype=np.int64)
    sizes = np.ascontiguousarray(dims, dtype=np.int64)
    total = lib.bp_plan_workspace(n, ffi.from_buffer("int64_t[]", np.ascontiguousarray(table)), stride,
                                  ffi.from_buffer("int64_t[]", sizes if sizes.size else np.zeros(1, np.int64)),
                                  sizes.size, itemsize, ffi.from_buffer("int64_t[]", offsets),
                                  ffi.from_buffer("int64_t[]", work))
    if total == -2:
        raise InputError(f"runtime sizes {sizes.tolist()} make a workspace buffer larger than 2**63 bytes")
    if total < 0:
        raise CompileError(f"the workspace table of {n} buffers is malformed (a dimension index outside the "
                           f"model's {sizes.size}, or a negative size or interval); recompile the model")
    return offsets[:n], int(total)


def plan(module: Any, entries: Mapping[str, Entry], dims: tuple[int, ...], itemsize: int
         ) -> tuple[dict[str, np.ndarray], int]:
    """The workspace plan of every entry point for these runtime sizes (0 counts as 1): each
    entry's buffer offsets, and the bytes of an arena that serves them all."""
    sizes = np.asarray([max(d, 1) for d in dims], dtype=np.int64)
    offsets, size = {}, 0
    for name, entry in entries.items():
        offsets[name], n = plan_workspace(module, entry.table, sizes, itemsize)
        size = max(size, n)
    return offsets, size


class Entry:
    """One native entry point: its function, the inputs it reads and its workspace buffers."""

    def __init__(self, lib: Any, name: str, spec: dict, dim_names: list[str]):
        self.name = name
        self.fn = getattr(lib, "bp_" + name)
        self.inputs: list[str] = spec["inputs"]
        self.buffers: list[list] = spec["buffers"]
        self.table = plan_table(self.buffers, dim_names)  # the buffers as bp_plan_workspace reads them
        self.results: list[dict] = spec["results"]


class Frame:
    """What one native call of an entry point needs, for one input signature and one thread:
    pointer arrays, the runtime dims, the arena and the optimizer's hyperparameter slots.
    Built (after full validation) when the runtime sizes change; reused while they do not, its
    input pointers moved to each call's arrays (accepts, or bind after validation)."""

    def __init__(self, model: CompiledModel, entry: Entry, arrays: list[np.ndarray], dims: tuple[int, ...]):
        ffi = model._ffi
        self.entry = entry
        # (slot, name, dtype, shape) of each input: what accepts() compares a call's arrays with
        self.slots = tuple((i, name, a.dtype, a.shape) for i, (name, a) in enumerate(zip(entry.inputs, arrays)))
        self.bound: list[np.ndarray | None] = [None] * len(arrays)  # the arrays in_ptrs points at
        self.bound_strides: list[tuple[int, ...] | None] = [None] * len(arrays)  # their strides when bound
        self.from_buffer = ffi.from_buffer
        offsets, size = model._plan(dims)
        self.dims = dims
        # after the runtime sizes: the seed and step counter of random streams (dropout)
        self.dims_arr = np.asarray(dims + (model.seed, 0), dtype=np.int64)
        self.offsets = offsets[entry.name]
        self.arena = model._arena(dims, size)
        self.hyper = np.zeros(max(len(model.optimizer.hyper_names()) if model.optimizer else 0, 1))
        self.scalar = np.zeros(1, dtype=model.dtype)
        self.scalar_c = ffi.from_buffer(model._ctype, self.scalar)
        self.hyper_key: Any = None  # what the hyperparameters in `hyper` were computed for
        self.fn = entry.fn
        named = dict(zip(model._dims, dims))
        self.result_names = [r["name"] for r in entry.results]
        self.result_shapes = [tuple(dim_size(d, named) for d in r["shape"]) for r in entry.results]
        self.in_ptrs = ffi.new("void *[]", max(len(arrays), 1))
        self.out_ptrs = ffi.new("void *[]", max(len(entry.results), 1))
        self.out_ptrs[0] = ffi.from_buffer(self.scalar)
        real = model._ctype
        self.dims_c = ffi.from_buffer("int64_t[]", self.dims_arr)
        self.counter_index = len(dims) + 1
        self.hyper_c = ffi.from_buffer("double[]", self.hyper)
        # the buffers the arguments point into, kept alive here; the arguments themselves are cast
        # to the parameters' pointer types, which cffi passes faster than arrays (~40 ns a call)
        self.owners = (self.dims_c, ffi.from_buffer("char[]", self.arena),
                       ffi.from_buffer("int64_t[]", self.offsets), ffi.from_buffer(real, model._params_flat),
                       ffi.from_buffer(real, model._grads_flat), ffi.from_buffer(real, model._state_flat),
                       self.in_ptrs, self.out_ptrs, self.hyper_c)
        self.args = tuple(ffi.cast(t, a) for t, a in zip(ffi.typeof(entry.fn).args, self.owners))

    def accepts(self, given: Mapping[str, Any]) -> bool:
        """Whether these inputs match this frame exactly (the same names, no others, and NumPy
        arrays of its dtypes and shapes, C-contiguous and aligned); if so the native call's input
        pointers now point at them. An array of the last call is re-checked by its shape, dtype
        and strides (the ways it can change in place); another one fully. When False the caller
        validates everything (runtime.model's _prepare), extra names included."""
        if len(given) != len(self.slots):  # with every name below found: no extra names
            return False
        bound, strides = self.bound, self.bound_strides
        for i, name, dtype, shape in self.slots:
            a = given.get(name)
            if a is bound[i] and a.dtype is dtype and a.shape == shape and a.strides == strides[i]:
                continue
            if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape:
                return False
            flags = a.flags
            if not (flags.c_contiguous and flags.aligned):
                return False
            self.point(i, a)
        return True

    def set_hyper(self, optimizer: Any, step: int, rate: float) -> None:
        """The optimizer's hyperparameters of this step at learning rate `rate`, into the
        native call's `hyper` array; recomputed only when they can differ from the last call's."""
        key = (step, rate) if optimizer.step_dependent else rate
        if key != self.hyper_key:
            hyper_c = self.hyper_c
            for i, value in enumerate(optimizer.step_hyper(step, rate).values()):
                hyper_c[i] = value
            self.hyper_key = key

    def run(self, counter: int, args: tuple | None = None) -> int:
        """The native call with the random streams' step counter `counter` (and other
        arguments than the frame's own); its status: 0, or nonzero for refused input data."""
        self.dims_c[self.counter_index] = counter
        return self.fn(*(self.args if args is None else args))

    def point(self, i: int, a: np.ndarray) -> None:
        """Point input `i` of the native call at the (validated) array `a`."""
        self.in_ptrs[i] = self.from_buffer(a)
        self.bound[i] = a
        self.bound_strides[i] = a.strides

    def bind(self, arrays: list[np.ndarray]) -> None:
        """Point the native call at these (validated) input arrays."""
        for i, a in enumerate(arrays):
            self.point(i, a)
