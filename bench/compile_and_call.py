"""Compile times and call costs of bpcompile on one MLP (784-256-10 by default).

Measures, each in fresh processes where it matters:
  cold compile      bp.compile into an empty build folder (SymPy + codegen + C compiler)
  cached compile    bp.compile again in a new process (SymPy + codegen, no compiler)
  bp.load           loading the built folder in a new process (no SymPy, no compiler)
  fresh step        `python -c` that imports bpcompile, loads the cached model, runs one step
  loss_and_grad     median per call at the given batch
  train_step        median per call
  native call       the entry point called directly with prepared arguments (no Python checks)
  call overhead     train_step minus the native call: the Python side of a step, measured on
                    this model and on a tiny one (2-16-1, batch 32), where the native call is
                    short enough for the difference to be well above the noise

Run: python bench/compile_and_call.py [--sizes 784,256,10] [--batch 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from run import write_bytecode

ROOT = Path(__file__).resolve().parent.parent

MODEL = textwrap.dedent("""
    import numpy as np, bpcompile as bp
    def build(sizes):
        g = bp.Graph("mlp_" + "_".join(map(str, sizes)))
        h = x = g.input("x", ("batch", sizes[0]))
        y = g.input("y", ("batch",), dtype="int32")
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            h = h @ g.param(f"W{i}", (a, b), init="he_normal") + g.param(f"b{i}", (b,))
            if i < len(sizes) - 2:
                h = bp.relu(h)
        g.output("logits", h)
        g.loss(bp.softmax_cross_entropy(h, y))
        return g
""")


def run(code: str, env: dict) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def step_and_native_seconds(model, inputs: dict, repeats: int, inner: int) -> tuple[float, float]:
    """Median seconds of train_step and of its entry point called directly with the arguments a
    train_step prepared, timed in alternation so that drifts of the machine hit both alike."""
    model.train_step(**inputs)
    frame = model._ready(model._loss_spec(None)["entries"]["train"], inputs)  # the frame train_step calls
    step, native = [], []
    for _ in range(repeats):
        step.append(median_seconds(lambda: model.train_step(**inputs), 1, inner))
        native.append(median_seconds(lambda: frame.fn(*frame.args), 1, inner))
    return statistics.median(step), statistics.median(native)


def tiny_model_seconds(bp, repeats: int) -> tuple[float, float]:
    """(train_step, native call) per step of a 2-16-1 ReLU MLP with MSE and SGD, batch 32."""
    import numpy as np
    g = bp.Graph("tiny_2_16_1")
    x_in, t_in = g.input("x", ("batch", 2)), g.input("t", ("batch", 1))
    h = bp.relu(x_in @ g.param("W0", (2, 16)) + g.param("b0", (16,)))
    g.loss(bp.mse(h @ g.param("W1", (16, 1)) + g.param("b1", (1,)), t_in))
    model = bp.compile(g, dtype="float32", optimizer=bp.optim.SGD(lr=0.01))
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(32, 2)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32)
    return step_and_native_seconds(model, {"x": x, "t": t}, repeats, 20000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,256,10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    write_bytecode()  # as an install writes it (run.py)
    build_dir = tempfile.mkdtemp(prefix="bpbench-")
    env = dict(os.environ, BPCOMPILE_BUILD_DIR=build_dir, PYTHONPATH=str(ROOT))
    compile_code = MODEL + textwrap.dedent(f"""
        import time, json
        t = time.perf_counter()
        m = bp.compile(build({sizes}), dtype="float32", optimizer=bp.optim.Adam(lr=1e-3))
        print(json.dumps({{"seconds": time.perf_counter() - t, "path": str(m.build_path)}}))
    """)
    cold = run(compile_code, env)
    cached = run(compile_code, env)
    load = run(textwrap.dedent(f"""
        import time, json, sys
        t = time.perf_counter()
        import bpcompile as bp
        m = bp.load({cold['path']!r})
        print(json.dumps({{"seconds": time.perf_counter() - t, "sympy": "sympy" in sys.modules}}))
    """), env)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np, bpcompile as bp
        m = bp.load({cold['path']!r})
        m.train_step(x=np.zeros(({args.batch}, {sizes[0]}), np.float32), y=np.zeros({args.batch}, np.int32))
    """)], check=True, env=env, cwd=ROOT)
    fresh_step = time.perf_counter() - start

    sys.path.insert(0, str(ROOT))
    import numpy as np

    import bpcompile as bp
    model = bp.load(cold["path"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], args.batch).astype(np.int32)
    inner = max(1, int(20e-3 / max(1e-6, median_seconds(lambda: model.train_step(x=x, y=y), 3, 3))))
    median_seconds(lambda: model.loss_and_grad(x=x, y=y), 1, inner)  # its first calls set up its frame
    grad_s = median_seconds(lambda: model.loss_and_grad(x=x, y=y), args.repeats, inner)
    step_s, native_s = step_and_native_seconds(model, {"x": x, "y": y}, args.repeats, inner)
    tiny_step_s, tiny_native_s = tiny_model_seconds(bp, args.repeats)
    rows = [
        ("cold compile", cold["seconds"]), ("cached compile (new process)", cached["seconds"]),
        ("bp.load (new process, incl. import)", load["seconds"]), ("fresh `python -c` load + one step", fresh_step),
        (f"loss_and_grad, batch {args.batch}", grad_s), (f"train_step, batch {args.batch}", step_s),
        ("native train call alone", native_s), ("Python side of train_step", step_s - native_s),
        ("tiny 2-16-1 model, batch 32: train_step", tiny_step_s),
        ("tiny model: native train call alone", tiny_native_s),
        ("tiny model: Python side of train_step", tiny_step_s - tiny_native_s),
    ]
    print(f"model {'-'.join(map(str, sizes))}, float32, Adam; BLAS {bp.blas.info()}")
    print(f"SymPy imported by bp.load: {load['sympy']}")
    print("| measure | time |\n|---|---|")
    for name, seconds in rows:
        text = f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.2f} us"
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main()
