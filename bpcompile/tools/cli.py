"""The `bpcompile` command: build, inspect, check, export and benchmark model specs.

    bpcompile build SPEC [-o DIR] [--dtype D]     compile the native module (cached), print a summary
    bpcompile show SPEC --grad [--latex] [--c] [--graph [FILE.dot|.svg|.png|.pdf|DIR/]]
                                                  derivatives, forward/backward equations, the C
    bpcompile check SPEC                          gradients vs float64 finite differences
    bpcompile export SPEC -o DIR [--force]        a standalone C99 library (model.c/h, Makefile, main.c)
    bpcompile bench SPEC                          compile times, step time, peak memory

SPEC is a Python file defining `graph` or `build()`, or a YAML layer stack (see bpcompile.tools.spec).
Errors are one line on stderr with a non-zero exit status (`--traceback` shows the Python one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BPError, CompileError, InputError
from . import gradcheck

DESCRIPTION = "bpcompile: a graph compiler for backpropagation. Compile, inspect, check and export model specs."
EPILOG = """\
SPEC is a Python file that defines a module-level `graph` (a bp.Graph) or a `build()` function
returning one (optionally `optimizer`, `dtype`, `seed`), or a YAML file describing a layer stack
(inputs, layers, loss, optimizer; see `python -m pydoc bpcompile.tools.spec`).

examples:
  bpcompile build examples/mlp_spec.py
  bpcompile show examples/mlp_spec.yaml --grad
  bpcompile check examples/mlp_spec.py
  bpcompile export examples/mlp_spec.py -o mlp_c && make -C mlp_c run
"""


# --- shared helpers ------------------------------------------------------------------------------

def _load(args: argparse.Namespace):
    from .spec import load_spec
    spec = load_spec(args.spec, loss=getattr(args, "loss", None))
    if getattr(args, "dtype", None):
        spec.dtype = args.dtype
    return spec


def _optimizer(spec):
    if spec.optimizer is not None or not spec.graph.losses:
        return spec.optimizer
    from ..train.optim import SGD
    return SGD(lr=0.01)  # bp.compile's default


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"


def _dims_arg(values: list[str] | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values or []:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise BPError(f"--dim {item!r}: expected NAME=SIZE with SIZE a positive integer")
        dims[name] = int(size)
    return dims


def _runtime_dims(names: list[str], batch: int, given: dict[str, int]) -> dict[str, int]:
    unknown = [d for d in given if d not in names]
    if unknown:
        raise BPError(f"--dim {unknown[0]}: the model has no runtime dimension {unknown[0]!r} "
                      f"(its dimensions: {names or 'none'})")
    return {d: given.get(d, batch) for d in names}


def random_inputs(inputs: list[dict], dims: dict[str, int], rng: np.random.Generator, dtype: Any,
                  positive: bool = False) -> dict[str, np.ndarray]:
    """Random data for a model's inputs (as in its meta.json): normal floats, labels in range."""
    kinds = {spec["name"]: ("labels", spec.get("classes") or 2) if spec["dtype"] == "int32"
             else ("positive",) if positive else ("normal",) for spec in inputs}
    return gradcheck.random_inputs({spec["name"]: spec["shape"] for spec in inputs}, kinds, dims, rng, dtype)


def _entry_lines(meta: dict) -> list[str]:
    losses = {e: spec for spec in meta["losses"] for e in spec["entries"].values()}
    from ..train.optim import OPTIMIZERS
    kind = (meta.get("optimizer") or {}).get("kind", "")
    kind = OPTIMIZERS[kind].__name__ if kind in OPTIMIZERS else kind
    lines = []
    for name, entry in meta["entries"].items():
        args = ", ".join(entry["inputs"])
        results = ", ".join(r["name"] for r in entry["results"])
        if name.startswith("grad_"):
            results += "; gradients of " + ", ".join(losses[name]["params"])
        elif name.startswith("train_"):
            results += f"; {kind} update of " + ", ".join(losses[name]["params"])
        call = {"forward": "model.forward", "loss": "model.loss", "eval": "model.loss(training=False)",
                "grad": "model.loss_and_grad", "train": "model.train_step", "backward": "model.backward",
                "update": "model.apply_gradients"}[name.split("_")[0]]
        lines.append((f"bp_{name}({args}) -> {results}", call))
    width = max((len(a) for a, _ in lines), default=0)
    return [f"{a.ljust(width)}   {b}" for a, b in lines]


# --- build -----------------------------------------------------------------------------------------

def cmd_build(args: argparse.Namespace) -> int:
    from .. import compiler
    from ..build import cffi_build as build
    from ..runtime.model import CompiledModel
    spec = _load(args)
    optimizer = _optimizer(spec)
    root = Path(args.output) if args.output else build.default_build_root()
    before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    start = time.perf_counter()
    lowered = compiler.lower(spec.graph, spec.dtype, optimizer)
    lowered_at = time.perf_counter()
    path = build.build(lowered.sources, root)
    built_at = time.perf_counter()
    model = CompiledModel(path, seed=spec.seed, optimizer=optimizer, init_arrays=lowered.init_arrays)
    cached = path.name in before
    meta = model.meta
    dims = {d: args.batch for d in meta["dims"]}
    ws = model.workspace_bytes(**dims)
    try:
        c_seconds = json.loads((path / "build.json").read_text())["compile_seconds"]
    except (OSError, ValueError, KeyError):
        c_seconds = None
    total = built_at - start
    print(f"Built model {spec.name!r} ({spec.dtype}) from {args.spec}" + (" - cached build reused" if cached else ""))
    print(f"  path          {path}{os.sep}")
    entries = _entry_lines(meta)
    print(f"  entry points  {entries[0]}")
    for line in entries[1:]:
        print(f"                {line}")
    detail = ", ".join(f"{p['name']} {_shape(p['shape'])}" for p in meta["params"])
    print(f"  parameters    {model.param_count:,}" + (f"  ({detail})" if detail else ""))
    at = ", ".join(f"{d}={n}" for d, n in dims.items())
    print(f"  workspace     {ws:,} bytes" + (f" at {at} (planned per runtime size)" if at else ""))
    if cached:
        how = f"; its C compile took {c_seconds:.2f} s when built" if c_seconds is not None else ""
        print(f"  compile time  {total:.2f} s (lowering {lowered_at - start:.2f} s, cache hit{how})")
    else:
        how = f", C compiler {c_seconds:.2f} s" if c_seconds is not None else ""
        print(f"  compile time  {total:.2f} s (lowering {lowered_at - start:.2f} s{how})")
    print(f"  load it       bp.load({str(path)!r})")
    return 0


# --- show ------------------------------------------------------------------------------------------

def _highlight(code: str, color: str) -> str:
    if color == "never" or (color == "auto" and not sys.stdout.isatty()):
        return code
    try:
        from pygments import highlight
        from pygments.formatters import TerminalFormatter
        from pygments.lexers import CLexer
    except ImportError:
        return code
    return highlight(code, CLexer(), TerminalFormatter())


def cmd_show(args: argparse.Namespace) -> int:
    from .. import compiler
    from ..codegen import module as codegen
    from . import explain
    spec = _load(args)
    lowered = compiler.lower(spec.graph, spec.dtype, _optimizer(spec))
    ex = explain.explain(spec.graph, lowered)
    grad = args.grad or (args.latex and not args.c)
    wrote_any = False
    if args.latex:
        sys.stdout.write(explain.explain_latex(ex, grad=grad))
        wrote_any = True
    elif grad or not (args.c or args.graph is not None):
        sys.stdout.write(explain.explain_text(ex, grad=grad))
        wrote_any = True
    if args.c:
        if wrote_any:
            print()
        sys.stdout.write(_highlight(lowered.sources.model_c, args.color))
    if args.graph is not None:
        message = _write_graph(args.graph, codegen.file_stem(spec.name), explain.to_dot(ex))
        print(message, file=sys.stderr if (args.c or wrote_any) else sys.stdout)
    return 0


GRAPH_FORMATS = {".dot": "Graphviz DOT", ".svg": "SVG", ".png": "PNG", ".pdf": "PDF"}  # suffix -> what it holds


def _write_graph(where: str, stem: str, dot_text: str) -> str:
    """`show --graph WHERE`: a file whose suffix names the format (.dot is the text itself; the
    others are drawn by Graphviz), or a folder (WHERE ends with a separator, is an existing folder,
    or is empty for the current one) that gets STEM.dot, and STEM.svg when Graphviz is installed.
    STEM is already a bare file name (codegen.file_stem), so nothing lands outside the folder.
    Every file is written atomically; returns the message to print."""
    what = "of the forward and backward graphs"
    if not where or where.endswith(("/", os.sep)) or Path(where).is_dir():
        folder = Path(where or ".")
        folder.mkdir(parents=True, exist_ok=True)
        target, svg = folder / f"{stem}.dot", folder / f"{stem}.svg"
        drawn = _graphviz(dot_text, "svg", svg) if shutil.which("dot") else None  # before writing anything
        _write_file_atomic(target, dot_text.encode("utf-8"))
        message = f"wrote {target} (Graphviz DOT {what})"
        if drawn is None:
            return message + "; install Graphviz (`dot`) to get an SVG as well"
        _write_file_atomic(svg, drawn)
        return message + f" and {svg}"
    target = Path(where)
    suffix = target.suffix.lower()
    if suffix not in GRAPH_FORMATS:
        supported = ", ".join(GRAPH_FORMATS)
        raise BPError(f"--graph {where}: unknown format {suffix or '(no suffix)'!r}; name a file ending in "
                      f"{supported}, or a folder (ending in {os.sep}) for {stem}.dot")
    data = dot_text.encode("utf-8") if suffix == ".dot" else _graphviz(dot_text, suffix[1:], target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_file_atomic(target, data)
    return f"wrote {target} ({GRAPH_FORMATS[suffix]} {what})"


def _graphviz(dot_text: str, fmt: str, target: Path) -> bytes:
    """The graph drawn by Graphviz's `dot -T<fmt>`; BPError when it is missing or fails."""
    dot = shutil.which("dot")
    if dot is None:
        raise BPError(f"--graph {target}: writing {fmt.upper()} needs Graphviz (the `dot` program), which is not "
                      f"on PATH; install it, or give a .dot path (e.g. {target.with_suffix('.dot')}), which needs "
                      "no Graphviz")
    done = subprocess.run([dot, f"-T{fmt}"], input=dot_text.encode("utf-8"), capture_output=True)
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip() or "no message"
        raise BPError(f"--graph {target}: Graphviz `{dot} -T{fmt}` failed with exit status {done.returncode}: "
                      f"{detail}")
    return done.stdout


def _write_file_atomic(path: Path, data: bytes) -> None:
    from ..runtime.model import write_atomic
    write_atomic(path, lambda f: f.write(data))


# --- check -----------------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    import bpcompile as bp
    spec = _load(args)
    graph = spec.graph
    if not graph.losses:
        raise BPError(f"{args.spec}: model {graph.name!r} declares no loss: there is no gradient to check")
    model = bp.compile(graph, "float64", optimizer=_optimizer(spec), seed=args.seed, build_dir=args.output)
    rng = np.random.default_rng(args.seed)
    dims = _runtime_dims(model.meta["dims"], args.batch, _dims_arg(args.dim))
    inputs = random_inputs(model.meta["inputs"], dims, rng, np.float64, positive=args.positive)
    at = ", ".join(f"{d} {n}" for d, n in dims.items())
    print(f"Gradient check of model {graph.name!r}: float64{', ' + at if at else ''}, seed {args.seed}, "
          f"central differences (step {args.eps:g}) at {args.samples} sampled elements per parameter "
          "and along one random direction")
    worst, failures = 0.0, []
    for lname in graph.losses:
        value, grads = model.loss_and_grad(loss=lname, **inputs)
        _, ref = bp.reference.loss_and_grad(graph, inputs, model.params, loss=lname)
        scale = max([float(np.max(np.abs(g))) for g in grads.values() if g.size] + [1e-12])
        floor = 1e-3 * scale
        rows = []
        for pname, g in grads.items():
            g = np.array(g)
            ref_err = float(np.max(np.abs(g - ref[pname]))) / max(float(np.max(np.abs(ref[pname]), initial=0)),
                                                                   floor)
            fd_err, checked = gradcheck.fd_errors(model, lname, inputs, pname, g, rng, args.samples, args.eps, floor)
            status = "ok" if max(fd_err, ref_err) <= args.tol else "MISMATCH"
            if status != "ok":
                failures.append(f"{lname}/{pname}")
            worst = max(worst, fd_err, ref_err)
            rows.append((pname, str(tuple(g.shape)), checked, f"{ref_err:.1e}",
                         f"{fd_err:.1e}", status))
        print(f"\nloss {lname!r} = {value:.10g}")
        header = ("parameter", "shape", "checked", "vs reference", "vs finite diff.", "status")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    print("max relative error: |analytic - numeric| / max(|analytic|, |numeric|, 1e-3 max|gradient|); "
          "'vs reference' compares with bpcompile's NumPy interpreter of the same graph")
    if failures:
        print(f"bpcompile: error: gradient mismatch in {', '.join(failures)} (largest relative error {worst:.1e} > "
              f"tolerance {args.tol:g})", file=sys.stderr)
        return 1
    print(f"all gradients match (largest relative error {worst:.1e} <= tolerance {args.tol:g})")
    return 0


# --- export ----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model
    if args.onnx is None and args.output is None:
        raise InputError("export needs -o DIR (a C99 library) or --onnx FILE (an ONNX model)")
    spec = _load(args)
    if args.onnx is not None:
        return _export_onnx(spec, args.onnx)
    result = export_model(spec.graph, args.output, spec.dtype, _optimizer(spec), seed=spec.seed,
                          dims=_dims_arg(args.dim), batch=args.batch, steps=args.steps, force=args.force)
    print(f"Exported model {spec.name!r} ({spec.dtype}) as a standalone C99 library to {result.path}{os.sep}")
    width = max(len(n) for n in result.files)
    what = {"model.h": "the API: entry points, bp_model_* library functions, the parameter file format",
            "model.c": "forward, backward and optimizer kernels; workspace plan; parameter files",
            "main.c": "example: trains on synthetic data and prints the loss",
            "Makefile": "make -> libmodel.a and ./main (GEMM: portable loops; make BLAS_LIBS=-lopenblas for CBLAS)",
            "params.bin": f"the initial parameters (seed {spec.seed}), as bp.compile draws them"}
    for name, size in result.files.items():
        print(f"  {name.ljust(width)}  {size:>9,} bytes  {what.get(name, '')}")
    dims = " ".join(f"{d}={n}" for d, n in result.dims.items())
    print(f"  entry points  {', '.join('bp_model_' + e for e in result.entries)}")
    print(f"  main.c        {args.steps} steps" + (f", {dims}" if dims else "") + " (-steps N -batch N to change)")
    for note in result.notes:
        print(f"  note: {note}")
    if args.make:
        make = shutil.which("make")
        if make is None:
            raise BPError("--make: the `make` program is not installed")
        done = subprocess.run([make, "-s"], cwd=result.path, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"make failed in {result.path}", str(result.path / "model.c"), done.stderr)
        lib = result.path / "libmodel.a"
        print(f"  built         {lib} ({lib.stat().st_size:,} bytes) and {result.path / 'main'}")
    else:
        print(f"  next          make -C {result.path} run")
    return 0


def _export_onnx(spec, path: str) -> int:
    from ..compiler import compile
    from .onnx_export import to_onnx
    model = compile(spec.graph, spec.dtype, seed=spec.seed)
    proto = to_onnx(model, path)
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"Exported model {spec.name!r} ({spec.dtype}, evaluation-mode forward, parameters drawn with seed "
          f"{spec.seed}) as ONNX opset {proto.opset_import[0].version} to {path}: {len(proto.graph.node)} nodes "
          f"({', '.join(ops)}), outputs {[o.name for o in proto.graph.output]}")
    return 0


# --- bench -----------------------------------------------------------------------------------------

def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cmd_bench(args: argparse.Namespace) -> int:
    import bpcompile as bp

    from .. import compiler
    from ..build import cffi_build as build
    spec = _load(args)
    optimizer = _optimizer(spec)
    with tempfile.TemporaryDirectory(prefix="bpcompile-bench-") as root:
        start = time.perf_counter()
        lowered = compiler.lower(spec.graph, spec.dtype, optimizer)
        lowering = time.perf_counter() - start
        path = build.build(lowered.sources, root)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        model = bp.compile(spec.graph, spec.dtype, optimizer=optimizer, seed=spec.seed, build_dir=root)
        cached = time.perf_counter() - start
        start = time.perf_counter()
        bp.load(path)
        load_s = time.perf_counter() - start
        dims = _runtime_dims(model.meta["dims"], args.batch, _dims_arg(args.dim))
        inputs = random_inputs(model.meta["inputs"], dims, np.random.default_rng(spec.seed), model.dtype)
        at = ", ".join(f"{d} {n}" for d, n in dims.items())
        print(f"Benchmark of model {spec.name!r} ({spec.dtype}{', ' + at if at else ''})")
        print(f"  cold compile    {_seconds(cold)}  (empty build cache: lowering and codegen {_seconds(lowering)}, "
              f"C compiler and link {_seconds(cold - lowering)})")
        print(f"  cached compile  {_seconds(cached)}  (bp.compile with the build cached; bp.load of the build "
              f"{_seconds(load_s)})")
        timings = {}
        if spec.graph.losses:
            for _ in range(3):  # warm up: first-call set-up, caches
                model.train_step(**inputs)
            timings["train step"] = _time(lambda: model.train_step(**inputs), args.steps)
        if spec.graph.outputs:
            model.forward(**inputs)
            timings["forward"] = _time(lambda: model.forward(**inputs), args.steps)
        for label, samples in timings.items():
            print(f"  {label:<14}  median {_seconds(statistics.median(samples))} over {len(samples)} calls "
                  f"(min {_seconds(min(samples))}, max {_seconds(max(samples))})")
        meta = model.meta
        item = model.dtype.itemsize
        buffers = {"parameters": meta["param_size"] * item, "gradients": meta["param_size"] * item,
                   "optimizer state": meta["state_size"] * item, "workspace": model.workspace_bytes(**dims)}
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in buffers.items())
        peak = _peak_rss()
        print(f"  peak memory     {_bytes(peak) if peak else 'n/a'} (process peak RSS); model buffers "
              f"{_bytes(sum(buffers.values()))}: {parts}")
    return 0


def _time(fn, steps: int) -> list[float]:
    samples = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


# --- the parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpcompile", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"bpcompile {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("spec", metavar="SPEC", help="model spec: a .py file (graph or build()), a .yaml layer stack "
                                                     "or an .onnx model")
        p.add_argument("--loss", metavar="KIND:INPUT", help="for an .onnx SPEC, the loss to add on its first output: "
                                                          "cross_entropy:LABELS, nll:LABELS or mse:TARGET")
        return p

    dtype = {"choices": ["float32", "float64"], "help": "the model's float type (default: the spec's, else float32)"}

    p = command("build", "compile a model spec to a native module (cached)",
                "Compile SPEC to a native module in the build cache and print where it is, its entry points,\n"
                "parameter count, workspace size and compile time. A cached build is reused.")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="build cache folder (default: $BPCOMPILE_BUILD_DIR or ./build)")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--batch", type=int, default=32, metavar="N", help="runtime size for the workspace figure (32)")
    p.set_defaults(func=cmd_build)

    p = command("show", "print derivatives, forward/backward equations, the C, or the graph",
                "Explain SPEC: with --grad, each elementwise op's derivative as SymPy derived and simplified it,\n"
                "and the backward pass as tensor equations in topological order (dZ1 = dH1 ⊙ 𝟙[Z1 > 0]), each\n"
                "annotated with the node (tN) that computes it in the generated C.")
    p.add_argument("--grad", action="store_true", help="derivatives and the backward pass")
    p.add_argument("--latex", action="store_true", help="the same in LaTeX")
    p.add_argument("--c", action="store_true", help="the generated C (syntax-highlighted on a terminal)")
    p.add_argument("--graph", nargs="?", const="", metavar="FILE",
                   help="write the forward and backward graphs to FILE in the format its suffix names: .dot "
                        "(Graphviz DOT text), .svg, .png or .pdf (drawn by Graphviz's `dot`); a folder (or no "
                        "FILE: the current one) gets NAME.dot, and NAME.svg too if `dot` is installed")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="highlight --c (auto)")
    p.add_argument("--dtype", **dtype)
    p.set_defaults(func=cmd_show)

    p = command("check", "verify every gradient against float64 finite differences",
                "Compile SPEC in float64 and compare every parameter's gradient with central finite\n"
                "differences and with the NumPy reference interpreter, on random data. Prints a table of the\n"
                "largest relative errors; the exit status is 1 when one exceeds --tol.")
    p.add_argument("--batch", type=int, default=4, metavar="N", help="runtime size of every named dim (4)")
    p.add_argument("--dim", action="append", metavar="NAME=N", help="runtime size of one named dim")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and parameters (0)")
    p.add_argument("--samples", type=int, default=12, metavar="N", help="elements checked per parameter (12)")
    p.add_argument("--eps", type=float, default=1e-6, help="finite-difference step, relative (1e-6)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest accepted relative error (1e-5)")
    p.add_argument("--positive", action="store_true", help="positive float inputs (for log, sqrt, ...)")
    p.add_argument("-o", "--output", metavar="DIR", help="build cache folder")
    p.set_defaults(func=cmd_check)

    p = command("export", "write a standalone C99 library: model.h/.c, Makefile, main.c",
                "Write SPEC as a standalone C99 library to DIR: model.h and model.c (forward, backward and the\n"
                "optimizer step, with the buffers, the workspace plan and parameter files), a Makefile, an example\n"
                "main.c that trains a few steps on synthetic data and prints the loss, and params.bin (the initial\n"
                "parameters). No Python is needed to build or run it.")
    p.add_argument("-o", "--output", metavar="DIR", help="the folder to write: new or empty (else see --force)")
    p.add_argument("--force", action="store_true", help="export into a non-empty DIR, replacing only the files "
                                                         "the export writes (the others are kept)")
    p.add_argument("--onnx", metavar="FILE", help="write the evaluation-mode forward graph as ONNX instead "
                                                   "(needs the [onnx] extra)")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--batch", type=int, default=32, metavar="N", help="main.c's default batch size (32)")
    p.add_argument("--dim", action="append", metavar="NAME=N", help="main.c's default size of another named dim")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="main.c's default training steps (10)")
    p.add_argument("--make", action="store_true", help="run make in DIR afterwards")
    p.set_defaults(func=cmd_export)

    p = command("bench", "time cold and cached compiles, the training step, and memory",
                "Compile SPEC into an empty cache, then again with the build cached; time the training step and\n"
                "the forward pass on random data; report the peak memory.")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--batch", type=int, default=128, metavar="N", help="batch size (128)")
    p.add_argument("--dim", action="append", metavar="NAME=N", help="runtime size of another named dim")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="timed calls (50)")
    p.set_defaults(func=cmd_bench)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse printed them)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    for name in ("batch", "steps", "samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"bpcompile {args.command}: error: --{name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("bpcompile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except CompileError as e:
        if args.traceback:
            raise
        print(f"bpcompile {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (BPError, ValueError, TypeError, OSError) as e:
        if args.traceback:
            raise
        print(f"bpcompile {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with the way to see more
        if args.traceback:
            raise
        print(f"bpcompile {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(rerun with --traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
