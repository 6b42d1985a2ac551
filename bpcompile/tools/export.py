"""`bpcompile export`: a model as a standalone C99 library, and the binary parameter file.

`export_model(graph, out_dir, ...)` writes, with no Python needed to build or run them:

* `model.h`, `model.c`: the generated kernels and entry points (forward, loss, gradients and the
  fused optimizer step), followed by a small library around them (`bp_model_create`,
  `bp_model_train_*`, `bp_model_load` / `bp_model_save`, ...): it owns the flat parameter,
  gradient and optimizer-state buffers, plans the workspace for the runtime sizes it is given
  (with bp_plan_workspace of templates/bp_runtime.h, the plan the Python runtime calls through
  cffi, so any batch size works), and computes the optimizer's learning-rate schedule and the
  hyper array its update reads (`bp_model_loss_hyper`, `bp_model_loss_lr`; `bp_model_hyper`,
  `bp_model_lr` when one optimizer trains every loss; printed by `export_optim` from the
  formulas the runtime evaluates, in the order of `Optimizer.step_hyper`: the step, the rate and
  a running product such as NAdam's momentum product, carried from step to step in
  `m->mu_product` and rebuilt from the step count after a load; the update computes the
  hyperparameters from them, in the module's C). A model with
  several named losses keeps each loss's step count (`m->loss_steps`), and each loss's train
  step runs its own optimizer (`bp.optim.PerLoss`, a dict of optimizers by loss) or the shared one;
* `Makefile`: `make` builds `libmodel.a` and `./main`; GEMM is a portable loop unless
  `BLAS_LIBS` names a CBLAS;
* `main.c`: an example that trains for a few steps on synthetic data (the losses in turn) and
  prints the loss;
* `params.bin`: the initial parameters the Python model gets with the same seed.

The files are written into a temporary folder next to `out_dir`, fsynced, and moved in: a
failed export (a full disk, an error) leaves `out_dir` as it was. A folder that exists and holds
anything is refused unless `force=True`, which replaces only the files the export writes.

The parameter file (`params.bin`, also written by `CompiledModel.save(path, format="bin")`) is
read and written by `runtime.paramfile`, where its format is described.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import ExportError
from ..ir.graph import size_factors
from ..runtime.checkpoint import process_alive
from ..runtime.paramfile import (  # noqa: F401 - the parameter file's API, also read from here
    is_param_file,
    param_file_writer,
    read_param_file,
    read_param_file_full,
    save_model_params,
    write_param_file,
)

INIT_KINDS = {"zeros": 0, "ones": 1, "uniform": 2, "glorot_uniform": 2, "normal": 3, "he_normal": 3}


# --- synthetic data (main.c's, reproduced) ------------------------------------------------------

def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Outputs start+1 .. start+count of splitmix64 seeded with `seed`: bp_splitmix64 of
    templates/bp_runtime.h (the exported library's bp_model_splitmix64) in NumPy, the oracle that
    lets tests feed a Python model the data the exported main.c trains on."""
    from ..ops.core import GOLDEN, mix64  # the reference evaluator's mixer (and SymPy): not at import
    with np.errstate(over="ignore"):
        k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        return mix64(np.uint64(seed % 2**64) + k * np.uint64(GOLDEN))


def synthetic_inputs(inputs: list[dict], dims: Mapping[str, int], seed: int = 0,
                     dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The batch the exported main.c trains on: `inputs` as in a build's meta.json."""
    out, used = {}, 0
    for spec in inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec["shape"])
        n = int(np.prod(shape, dtype=np.int64))
        z = splitmix64(seed, used, n)
        used += n
        if spec["dtype"] == "int32":
            classes = np.uint64(spec.get("classes") or 2)
            out[spec["name"]] = (z % classes).astype(np.int32).reshape(shape)
        else:
            u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
            out[spec["name"]] = (2.0 * u - 1.0).astype(dtype).reshape(shape)
    return out


# --- the export ---------------------------------------------------------------------------------

@dataclass
class ExportResult:
    path: Path
    files: dict[str, int]  # file name -> bytes
    dims: dict[str, int]
    entries: list[str]
    default_train: str | None
    notes: list[str]


def _c_string(text: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\?' else f"\\{ord(c) & 0xFF:03o}" for c in text)


def _init_scale(init: Any, shape: tuple[int, ...]) -> tuple[int, float, str]:
    from ..train.init import fans as _fans
    if not isinstance(init, str):
        return 0, 0.0, "an array given at compile time (its values are in params.bin)"
    fan_in, fan_out = _fans(shape)
    scale = {"zeros": 0.0, "ones": 0.0, "uniform": 0.05, "normal": 0.05,
             "glorot_uniform": float(np.sqrt(6.0 / (fan_in + fan_out))),
             "he_normal": float(np.sqrt(2.0 / fan_in))}[init]
    return INIT_KINDS[init], scale, init


def export_model(graph: Any, out_dir: str | os.PathLike, dtype: str = "float32", optimizer: Any = None,
                 seed: int = 0, dims: Mapping[str, int] | None = None, batch: int = 32, steps: int = 10,
                 blas_min_flops: int | None = None, force: bool = False) -> ExportResult:
    """Write the standalone C library of `graph` into `out_dir` (see the module docstring).

    `dims` gives main.c's default runtime sizes (`batch` is the default of a dim named "batch",
    or of the only named dim); `seed` draws params.bin as `bp.compile(..., seed=seed)` does.
    `out_dir` must be new or empty; with `force=True` an existing folder keeps everything but
    the files the export writes, which are replaced (each atomically)."""
    target = Path(os.path.abspath(out_dir))
    _remove_orphaned_exports(target)
    _check_target(target, EXPORT_FILES, force)  # before the slow part: refuse early

    from .. import compiler
    from ..codegen import module as codegen
    from ..train.init import initial_value
    from ..train.optim import SGD, as_optimizer
    from .export_optim import optimizer_contexts

    if optimizer is None and graph.losses:
        optimizer = SGD(lr=0.01)
    optimizer = as_optimizer(optimizer)
    kwargs = {} if blas_min_flops is None else {"blas_min_flops": int(blas_min_flops)}
    lowered = compiler.lower(graph, dtype, optimizer, **kwargs)
    meta = lowered.sources.meta
    notes: list[str] = []

    env = codegen.environment()
    env.filters["c_double"] = lambda x: repr(float(x))
    env.globals["c_string"] = _c_string
    env.globals["c_comment"] = codegen.comment_text

    # runtime sizes main.c starts with
    names = list(meta["dims"])
    sizes = {k: int(v) for k, v in (dims or {}).items()}
    unknown = [k for k in sizes if k not in names]
    if unknown:
        raise ExportError(f"model {graph.name!r} has no runtime dimension {unknown[0]!r} (its dimensions: "
                          f"{names or 'none'})")
    batch_dim = "batch" if "batch" in names else (names[0] if len(names) == 1 else None)
    if batch_dim is not None:
        sizes.setdefault(batch_dim, int(batch))
    missing = [d for d in names if d not in sizes]
    if missing:
        raise ExportError(f"model {graph.name!r}: runtime dimension {missing[0]!r} needs a default size "
                          f"(--dim {missing[0]}=N)")
    if any(v < 1 for v in sizes.values()):
        raise ExportError(f"runtime sizes must be at least 1, got {sizes}")

    taken: set[str] = set()
    dim_ctx = [{"name": d, "c": codegen.c_identifier(d, taken), "default": sizes[d]} for d in names]
    taken = set()
    inputs_ctx = []
    for spec in meta["inputs"]:
        shape = [d if isinstance(d, int) else -1 - names.index(d) for d in spec["shape"]]
        inputs_ctx.append({"name": spec["name"], "c": codegen.c_identifier(spec["name"], taken),
                           "is_int": spec["dtype"] == "int32", "classes": int(spec.get("classes") or 0),
                           "shape": shape, "shape_text": "[" + ", ".join(map(str, spec["shape"])) + "]"})
    params_ctx = []
    for p in meta["params"]:
        shape = tuple(p["shape"])
        kind, scale, init_doc = _init_scale(graph.param_init[p["name"]], shape)
        if not isinstance(graph.param_init[p["name"]], str):
            notes.append(f"parameter {p['name']!r} has an array initializer: bp_model_init_params sets it to zero; "
                         "params.bin holds its values")
        params_ctx.append({"name": p["name"], "offset": p["offset"], "size": int(np.prod(shape, dtype=np.int64)),
                           "shape": list(shape), "init_kind": kind, "init_scale": scale, "init": init_doc})
    max_ndim = max([len(s["shape"]) for s in meta["inputs"]] + [len(p["shape"]) for p in meta["params"]] + [1])

    input_index = {spec["name"]: i for i, spec in enumerate(meta["inputs"])}
    # entries that update the parameters (train_*, update_*) -> the index of their loss; they and
    # backward_* (a train step's first half) draw random streams (dropout) of the coming step
    stepping = {spec["entries"][kind]: k for k, spec in enumerate(meta["losses"])
                for kind in ("train", "update") if kind in spec["entries"]}
    upcoming = set(stepping) | {spec["entries"]["backward"] for spec in meta["losses"] if "backward" in spec["entries"]}
    buffers, entries_ctx = [], []
    docs = {e.name: e.doc for e in lowered.entries}
    for name, spec in meta["entries"].items():
        first = len(buffers)
        for k, (coef, bdims, start, end) in enumerate(spec["buffers"]):
            buffers.append({"coef": coef, "dims": [names.index(d) for d in bdims], "start": start, "end": end,
                            "entry": name, "index": k})
        entries_ctx.append({"name": name, "doc": docs.get(name, name),
                            "inputs": [input_index[i] for i in spec["inputs"]], "first": first,
                            "count": len(spec["buffers"]), "train": name in stepping, "loss": stepping.get(name),
                            "next_step": name in upcoming})
    default_train = default_loss = None
    if meta["losses"] and meta["losses"][0]["entries"].get("train"):
        default_train = meta["losses"][0]["entries"]["train"]
        default_loss = meta["losses"][0]["entries"]["loss"]
        if len(meta["losses"]) > 1:
            notes.append("main.c trains the losses in turn, " + ", ".join(repr(s["name"]) for s in meta["losses"])
                         + " (-loss NAME for one); each has its own bp_model_train_* function and step count")
    optimizers_ctx, losses_ctx = optimizer_contexts(optimizer, meta["losses"], notes)

    forward_results = []
    if "forward" in meta["entries"]:
        for r in meta["entries"]["forward"]["results"]:
            coef, named = size_factors(r["shape"])  # product dims ("8*batch") by their factors
            factors = ([str(coef)] if coef != 1 or not named else []) + [f"m.dims[{names.index(d)}]" for d in named]
            forward_results.append({"name": r["name"], "size": "*".join(factors)})

    context = {
        "model_name": codegen.comment_text(graph.name), "model_label": graph.name, "dtype": dtype, "seed": int(seed),
        "real": "float" if dtype == "float32" else "double",
        "dims": dim_ctx, "inputs": inputs_ctx, "params": params_ctx, "max_ndim": max_ndim,
        "param_size": meta["param_size"], "state_size": meta["state_size"],
        "param_count": sum(p["size"] for p in params_ctx),
        "slots": list(optimizer.slots) if optimizer is not None else [],
        "optimizers": optimizers_ctx, "losses": losses_ctx, "several_losses": len(losses_ctx) > 1,
        "running_product": any(o["product"] for o in optimizers_ctx),
        "num_hyper": max(len(o["hyper"]) for o in optimizers_ctx),
        "optimizer_kind": optimizers_ctx[0]["kind"] if len(optimizers_ctx) == 1 else "its own optimizer's",
        "entries": entries_ctx, "buffers": buffers, "total_buffers": len(buffers),
        "max_buffer_dims": max([len(b["dims"]) for b in buffers] + [1]),
        "default_train": default_train, "default_loss": default_loss,
        "steps": int(steps), "batch_dim": batch_dim or "", "batch_default": sizes.get(batch_dim, 1) if batch_dim else 1,
        "batch_index": names.index(batch_dim) if batch_dim is not None else None,
        "digits": 9 if dtype == "float32" else 17, "forward_results": forward_results,
        "blas_min_flops": int(blas_min_flops if blas_min_flops is not None else compiler.DEFAULT_BLAS_MIN_FLOPS),
    }
    texts = {
        "model.h": lowered.sources.model_h + env.get_template("export_api.h.j2").render(**context),
        "model.c": lowered.sources.model_c + env.get_template("export_api.c.j2").render(**context),
        "main.c": env.get_template("export_main.c.j2").render(**context),
        "Makefile": env.get_template("export_Makefile.j2").render(**context),
    }
    files = {name: _text_writer(text) for name, text in texts.items()}

    # params.bin: the parameters bp.compile(graph, dtype, optimizer, seed=seed) starts from
    rng = np.random.default_rng(seed)
    initial = {}
    for p in meta["params"]:
        init = p["init"]
        if init == "array":
            init = np.asarray(lowered.init_arrays[p["name"]], dtype=np.float64)
        initial[p["name"]] = initial_value(init, tuple(p["shape"]), rng).astype(dtype)
    files["params.bin"] = param_file_writer(initial, dtype=dtype)
    assert tuple(files) == EXPORT_FILES
    _write_export_folder(target, files, force=force)
    sizes_out = {name: (target / name).stat().st_size for name in files}
    return ExportResult(Path(out_dir), sizes_out, {d: sizes[d] for d in names}, list(meta["entries"]),
                        default_train, notes)


# --- moving the export in -------------------------------------------------------------------------

EXPORT_FILES = ("model.h", "model.c", "main.c", "Makefile", "params.bin")
TEMP_SUFFIX = ".export-tmp"


def _write_export_folder(out: Path, files: Mapping[str, Callable[[BinaryIO], object]], force: bool = False) -> None:
    """Write `files` (name -> function writing its bytes) as the folder `out`, all or nothing.

    They go to a temporary folder next to `out` (same filesystem), are fsynced, and move in: by
    one rename when `out` is new or an empty folder; file by file (each os.replace atomic) into a
    non-empty folder, which needs `force`. On any failure `out` is left as it was and the
    temporary folder is removed."""
    out = Path(os.path.abspath(out))
    _remove_orphaned_exports(out)
    _check_target(out, tuple(files), force)
    created = _make_folders(out.parent)
    tmp: Path | None = None
    try:
        tmp, inside = _temp_folder(out)
        for name, write in files.items():
            _write_file(tmp / name, write)
        _fsync_folder(tmp)
        if inside or not _move_folder(tmp, out, tuple(files), force):
            _move_files(tmp, out, tuple(files))
        tmp = None
        _fsync_folder(out.parent)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _check_target(out: Path, names: tuple[str, ...], force: bool) -> None:
    """Refuse a target that is not a folder, one where an export file would replace a folder, and
    a non-empty folder unless `force`."""
    if not out.is_dir():
        if out.exists() or out.is_symlink():
            raise ExportError(f"export target {out} exists and is not a folder")
        return
    present = sorted(p.name for p in out.iterdir() if not _is_export_temp(p))
    if not present:
        return
    clash = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    folders = [n for n in clash if (out / n).is_dir()]
    if folders:
        raise ExportError(f"export target {out}: {folders[0]!r} is a folder, where the export writes a file")
    if force:
        return
    if clash:
        what = "the export would overwrite " + ", ".join(clash)
    else:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        what = f"it holds {len(present)} other entr{'y' if len(present) == 1 else 'ies'} ({shown})"
    raise ExportError(f"export target {out} is not empty: {what}. Choose a new or empty folder, or pass --force "
                      f"(force=True) to replace only the files the export writes ({', '.join(names)})")


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, outermost first (to undo on failure)."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing[::-1]


def _temp_folder(out: Path) -> tuple[Path, bool]:
    """A new private folder next to `out`, or inside an existing `out` whose parent we cannot
    write (e.g. a mount point); the bool says which. Its name carries our process id."""
    prefix = f".{out.name or 'export'}.{os.getpid()}."
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=out.parent)), False
    except PermissionError:
        if not out.is_dir():
            raise
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=out)), True


def _text_writer(text: str) -> Callable[[BinaryIO], object]:
    data = text.encode("utf-8")
    return lambda f: f.write(data)


def _write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a folder's entries (renames into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _move_folder(tmp: Path, out: Path, names: tuple[str, ...], force: bool) -> bool:
    """Rename `tmp` to `out` when `out` is new or an empty folder that can be replaced (not a
    symlink, a mount point or the current folder). False when the files must move one by one."""
    if out.is_dir():
        if out.is_symlink() or os.path.ismount(out) or os.path.samefile(out, os.getcwd()):
            return False
        os.chmod(tmp, out.stat().st_mode & 0o7777)  # the folder keeps its permissions
    else:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private; this is an ordinary folder
    try:
        os.rename(tmp, out)  # replaces an empty folder atomically; fails on a non-empty one
    except OSError as e:
        if not out.is_dir() or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _check_target(out, names, force)  # someone wrote into it meanwhile
        return False
    return True


def _move_files(tmp: Path, out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        os.replace(tmp / name, out / name)
    _fsync_folder(out)
    tmp.rmdir()


def _is_export_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def _remove_orphaned_exports(out: Path) -> None:
    """Delete the temporary folders of earlier exports to `out` whose process is gone (killed)."""
    places = [out.parent, out] if out.is_dir() and not out.is_symlink() else [out.parent]
    for place in places:
        try:
            candidates = list(place.glob(f".{glob.escape(out.name or 'export')}.*{TEMP_SUFFIX}"))
        except OSError:
            continue
        for tmp in candidates:
            pid = tmp.name[len(out.name or "export") + 2:].split(".", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)) and tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
