"""Compile time and memory stay bounded (issue 12, item 10): graphs that made SymPy's rewrites,
simplification or CSE run for minutes and gigabytes compile in seconds, or, for an expression
too large to derive at all, stop at once with a CompileError naming the function.

Each case compiles cold in a fresh process (no SymPy cache, a new build folder) under a memory
cap and a timeout, so a regression fails the test instead of hanging or swapping the machine.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1

import bpcompile as bp
from bpcompile.codegen import printer as c_printer
from bpcompile.passes import pipeline
from bpcompile.symbolic import functions as symbolic

TIMEOUT = 60.0  # seconds for a whole case, the interpreter's start included
COMPILE_LIMIT = 30.0  # seconds of bp.compile on the clock, for a loaded machine
CPU_LIMIT = 15.0  # its CPU seconds, the C compiler's included (1-9 s here; the old code took minutes)
MEMORY_CAP = 4 << 30  # address space of the compiling process (the old code reached 15 GB)

CASE = textwrap.dedent('''
    import json, resource, sys, time
    import numpy as np
    import sympy as sp
    import bpcompile as bp

    case, build_dir = sys.argv[1], sys.argv[2]
    x = sp.Symbol("x")
    g = bp.Graph("limits_" + case)

    def chain(n, step):
        z = g.input("x", ("batch", 4)) * g.param("w", (4,), init=np.full(4, 0.01))
        for _ in range(n):
            z = step(z)
        g.loss(bp.mean(z))

    if case == "cubes":  # six chained cubes: sympy.factor in the expm1 rewrite took 79 s
        chain(6, lambda z: (1 + z) ** 3)
    elif case == "fiftieth_powers":  # five chained 50th powers: 15 GB (halved to stay finite)
        chain(5, lambda z: ((1 + z) / 2) ** 50)
    elif case == "mlp200":  # 200 layers of tanh(h @ W): over 300 s
        h = g.input("x", ("batch", 16))
        for i in range(200):
            h = bp.tanh(h @ g.param(f"W{i}", (16, 16)))
        g.loss(bp.mean(h * h))
    elif case == "sum1000":  # bp.sum(p0) + ... + bp.sum(p999): RecursionError printing one kernel
        params = [g.param(f"p{i}", (3,)) for i in range(1000)]
        loss = bp.sum(params[0])
        for p in params[1:]:
            loss = loss + bp.sum(p)
        g.loss(loss)
    elif case == "squares1000":  # sum(bp.sum(p * p) for p in params): 65 s for 100, 29 s for 1,000 in gcc
        g.loss(sum(bp.sum(p * p) for p in [g.param(f"p{i}", (3,)) for i in range(1000)]))
    elif case == "reused_chain":  # z + sin(z) 40 times: one fused formula of 2**40 terms
        step = bp.elementwise("z_plus_sin", x + sp.sin(x), x)
        chain(40, step)
    elif case == "nested_power":  # ((1 + x)**50 + 1)**50: sympy.simplify expands degree 2,500
        chain(1, bp.elementwise("nested_power", ((1 + x) ** 50 + 1) ** 50 / 10**20, x))
    elif case == "tower":  # simplify's trigsimp: 6 s; fitting y' at 30 digits: exp(exp(exp(exp(2.9)))) forever
        chain(1, bp.elementwise("tower", sp.exp(sp.exp(sp.exp(sp.exp(x)))) * sp.tanh(sp.tanh(sp.tanh(x))) ** 9, x))
    elif case == "sigmoid_chain":  # 300 sigmoids fused into one formula: RecursionError in SymPy
        chain(300, bp.sigmoid)
    elif case == "dag_bomb":  # e + sin(e) nested 40 times inside one function: 2**40 nodes
        e = x
        for _ in range(40):
            e = e + sp.sin(e)
        try:
            chain(1, bp.elementwise("dag_bomb", e, x))
        except bp.CompileError as err:
            print(json.dumps({"error": str(err)}))
            sys.exit(0)

    def cpu():
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    start, start_cpu = time.perf_counter(), cpu()
    try:
        model = bp.compile(g, dtype="float64", build_dir=build_dir)
    except bp.CompileError as err:
        print(json.dumps({"error": str(err)}))
        sys.exit(0)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - start_cpu
    rng = np.random.default_rng(0)
    inputs = {n: rng.normal(size=[2 if isinstance(d, str) else d for d in node.shape]) * 0.1
              for n, node in g.inputs.items()}
    loss, grads = model.loss_and_grad(**inputs)
    ref_loss, ref_grads = bp.reference.loss_and_grad(g, inputs, model.params)
    error = max([abs(loss - ref_loss) / (1 + abs(ref_loss))]
                + [float(np.max(np.abs(grads[k] - ref_grads[k]) / (1 + np.abs(ref_grads[k])))) for k in grads])
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "error": None, "mismatch": error}))
''')


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _run(case: str, build_dir) -> dict:
    """Compile one case in a fresh interpreter and a fresh build folder; what it reported."""
    folder = tempfile.mkdtemp(prefix=f"limits-{case}-", dir=build_dir)
    try:
        done = subprocess.run([sys.executable, "-c", CASE, case, folder], capture_output=True, text=True,
                              timeout=TIMEOUT, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling {case!r} took over {TIMEOUT:.0f} s")
    assert done.returncode == 0, f"compiling {case!r} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["cubes", "fiftieth_powers", "mlp200", "sum1000", "squares1000", "reused_chain",
                                  "nested_power", "tower", "sigmoid_chain"])
def test_large_graphs_compile_in_bounded_time(case, build_dir):
    report = _run(case, build_dir)
    assert report["error"] is None, report["error"]
    assert report["seconds"] < COMPILE_LIMIT and report["cpu"] < CPU_LIMIT, report
    assert report["mismatch"] < 1e-9, report  # split kernels and plain formulas compute the same


def test_expression_too_large_to_derive_is_refused_by_name(build_dir):
    report = _run("dag_bomb", build_dir)
    assert report["error"] is not None and "'dag_bomb'" in report["error"], report
    assert f"{symbolic.MAX_EXPR_NODES:,}" in report["error"], report


# --- the limits on their own, in this process -----------------------------------------------

a0 = symbolic.ARGS[0]


def test_expm1_kept_without_factoring():
    # small formulas: as before (the factored form is tried too)
    assert c_printer.c99_form(2 * sp.exp(a0) - 2).has(expm1)
    # a formula beyond FACTOR_MAX_OPS: exp(x) - 1 as written still becomes expm1
    big = sum(sp.sin(k * a0) for k in range(1, 30)) * (sp.exp(a0) - 1)
    assert sp.count_ops(big) > c_printer.FACTOR_MAX_OPS
    assert c_printer.c99_form(big).has(expm1)
    # a high power: no factoring, no expansion
    power = ((1 + a0) ** 50 + 1) ** 50 - 1
    assert symbolic.degree_bound(power) == 2500
    assert c_printer.c99_form(power) == power


def test_simplify_tried_only_within_its_limits():
    tower = sp.diff(sp.exp(sp.exp(sp.exp(sp.exp(a0)))) * sp.tanh(sp.tanh(sp.tanh(a0))) ** 9, a0)
    assert not symbolic._simplifiable(tower)  # too many calls: 6 s of trigsimp
    assert not symbolic._simplifiable(sp.diff(((1 + a0) ** 50 + 1) ** 50, a0))  # degree 2,499
    assert not symbolic._simplifiable(sp.diff(sum(1 / (a0 + k) for k in range(1, 17)), a0))  # degree 32
    sigmoid = symbolic.builtin("sigmoid")
    assert symbolic._simplifiable(sigmoid.partial(0).raw)
    assert sigmoid.partial(0).uses_output  # still y - y**2


def test_fusion_splits_long_chains_and_reused_values():
    x = sp.Symbol("x")
    reuse = bp.elementwise("limits_reuse", x + sp.sin(x), x)  # uses its argument twice
    g = bp.Graph("limits_fusion")
    z = g.param("p", (3,))
    for i in range(300):
        z = reuse(z) if i % 2 else z + 1.5
    order = bp.ir.topo_order([z])
    clusters = pipeline.fuse_elementwise(order, {z})
    assert sum(len(c) for c in clusters) == 300
    assert max(len(c) for c in clusters) <= pipeline.FUSE_MAX_NODES
    users = pipeline._consumers(order)
    for c in clusters:
        members = set(c)
        outputs = [m for m in c if m is z or any(u not in members for u in users[m])]
        size, depth = pipeline._fused_shape(c, outputs, members)
        assert size <= pipeline.FUSE_MAX_TREE and depth <= pipeline.FUSE_MAX_DEPTH


def test_numbers_stay_exact_after_the_limits(build_dir):
    # elu's exp(x) - 1 is still printed as expm1: exact near 0
    g = bp.Graph("limits_elu")
    p = g.param("p", (3,), init=np.array([-1e-10, -1e-5, -2.0]))
    y = bp.elu(p)
    g.output("y", y)
    g.loss(bp.sum(y))
    model = bp.compile(g, dtype="float64")
    np.testing.assert_allclose(model.forward()["y"], np.expm1([-1e-10, -1e-5, -2.0]), rtol=1e-14)


def test_kernels_equal_but_for_their_nodes_are_one_function(build_dir):
    """A loss over many same-shaped parameters repeats one kernel per parameter: the module holds
    each distinct kernel once, every call site still commented with its own nodes."""
    g = bp.Graph("limits_shared_kernels")
    params = [g.param(f"p{i}", (3,)) for i in range(50)]
    g.loss(sum(bp.sum(p * p) for p in params))
    model = bp.compile(g, dtype="float64", build_dir=build_dir)
    source = (Path(model.build_path) / "model.c").read_text()
    signature = r"^(?:BP_KERNEL|__attribute__\(\(noinline\)\) static) \w+ (k\d+_\w+?)(?:_part)?\("
    kernels = re.findall(signature, source, re.M)
    assert 0 < len(set(kernels)) < 20, sorted(set(kernels))
    for i in (0, 17, 49):  # each parameter's square is still named where it is computed
        assert re.search(rf"/\* t\d+ = .*\bp{i}\b", source), f"no call site comment names p{i}"
    loss, grads = model.loss_and_grad()
    ref_loss, ref_grads = bp.reference.loss_and_grad(g, {}, model.params)
    assert abs(loss - ref_loss) < 1e-12
    for name in grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-12)
