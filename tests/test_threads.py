"""The thread pool of compiled modules: split work gives the same numbers as whole work and as
the NumPy reference, at every thread count; concurrent callers, forked children and models
too small to split all behave; bad thread counts are refused with a clear message."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from testutil import run_threads

import bpcompile as bp

COUNTS = [1, 2, 3]  # 3 splits unevenly, and oversubscribes a 2-core machine


@pytest.fixture
def restore_threads():
    before = bp.num_threads()
    yield
    bp.set_num_threads(before)


def mlp_graph() -> bp.Graph:
    """Products split by rows (batch-major) and by columns (weight gradients are wider than tall),
    fused Mish loops and a softmax loss."""
    g = bp.Graph("threads_mlp")
    x = g.input("x", ("batch", 24))
    y = g.input("y", ("batch",), dtype="int32")
    h = x @ g.param("W0", (24, 40), init="normal") + g.param("b0", (40,), init="zeros")
    h = h * bp.tanh(bp.softplus(h))
    h = bp.sigmoid(h @ g.param("W1", (40, 36), init="normal"))
    out = h @ g.param("W2", (36, 5), init="normal")
    g.output("out", out)
    g.loss(bp.softmax_cross_entropy(out, y))
    return g


def recurrent_graph() -> bp.Graph:
    """LSTM, GRU and tanh RNN cores, each split by batch rows."""
    g = bp.Graph("threads_rnn")
    x = g.input("x", ("batch", 5, 6))
    t = g.input("t", ("batch", 1))
    hidden = 7
    _, (h_lstm, _) = bp.lstm(x, *(g.param(f"l_{n}", s, init="normal") for n, s in
                                   (("W_ih", (4 * hidden, 6)), ("W_hh", (4 * hidden, hidden)),
                                    ("b_ih", (4 * hidden,)), ("b_hh", (4 * hidden,)))))
    _, h_gru = bp.gru(x, *(g.param(f"g_{n}", s, init="normal") for n, s in
                           (("W_ih", (3 * hidden, 6)), ("W_hh", (3 * hidden, hidden)),
                            ("b_ih", (3 * hidden,)), ("b_hh", (3 * hidden,)))))
    _, h_rnn = bp.rnn(x, g.param("r_W_ih", (hidden, 6), init="normal"),
                      g.param("r_W_hh", (hidden, hidden), init="normal"))
    out = (h_lstm + h_gru + h_rnn) @ g.param("W", (hidden, 1), init="normal")
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def cnn_graph() -> bp.Graph:
    """im2col and col2im split by images, max and average pooling (and their gradients) by planes."""
    g = bp.Graph("threads_cnn")
    x = g.input("x", ("batch", 2, 9, 9))
    y = g.input("y", ("batch",), dtype="int32")
    h = bp.conv2d(x, g.param("c0_w", (4, 2, 3, 3), init="normal"), g.param("c0_b", (4,), init="normal"), padding=1)
    h = bp.max_pool2d(bp.relu(h), 2)
    h = bp.conv2d(h, g.param("c1_w", (3, 4, 2, 2), init="normal"), stride=1)
    h = bp.avg_pool2d(bp.tanh(h), 3)
    out = bp.flatten(h) @ g.param("fc", (3, 5), init="normal")
    g.output("out", out)
    g.loss(bp.softmax_cross_entropy(out, y))
    return g


def _inputs(graph: bp.Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, node in graph.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in node.shape)
        out[name] = rng.integers(0, 5, size=shape).astype(np.int32) if node.dtype == "int32" \
            else rng.normal(size=shape)
    return out


def _compile(graph: bp.Graph, build_dir: Path) -> bp.CompiledModel:
    """float64, every product through BLAS, everything splittable split."""
    return bp.compile(graph, dtype="float64", optimizer=bp.optim.Adam(lr=0.01), build_dir=build_dir,
                      blas_min_flops=0, parallel_min_work=0)


@pytest.mark.parametrize("make_graph", [mlp_graph, recurrent_graph, cnn_graph], ids=["mlp", "recurrent", "cnn"])
def test_split_work_matches_reference_at_every_thread_count(build_dir, restore_threads, blas_backend, make_graph):
    graph = make_graph()
    model = _compile(graph, build_dir)
    inputs = _inputs(graph, batch=67, seed=1)  # 67 rows: uneven shares, and some of 16 rows
    params = {k: v.copy() for k, v in model.params.items()}
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, params)
    trained = {}
    for n in COUNTS:
        bp.set_num_threads(n)
        value, grads = model.loss_and_grad(**inputs)
        assert value == pytest.approx(ref_value, rel=1e-11), f"{n} threads"
        for k in grads:
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-9, atol=1e-12,
                                       err_msg=f"gradient of {k} with {n} threads")
        for _ in range(3):
            model.train_step(**inputs)
        trained[n] = {k: v.copy() for k, v in model.params.items()}
        model.reset_parameters(0)  # back to `params`, with fresh optimizer state
    for n in COUNTS[1:]:
        for k in trained[1]:
            np.testing.assert_allclose(trained[n][k], trained[1][k], rtol=1e-11, atol=1e-13,
                                       err_msg=f"{k} after 3 Adam steps, {n} threads vs 1")


def test_concurrent_callers_share_one_pool(build_dir, restore_threads):
    bp.set_num_threads(2)
    graph = mlp_graph()
    model = _compile(graph, build_dir)
    batches = [_inputs(graph, batch=50, seed=s) for s in range(4)]
    want = [model.loss_and_grad(**b) for b in batches]
    got = run_threads([lambda b=b: [model.loss_and_grad(**b) for _ in range(20)][-1] for b in batches], timeout=120)
    for (v, gr), (wv, wg) in zip(got, want):
        assert v == pytest.approx(wv, rel=1e-12)
        for k in wg:
            np.testing.assert_allclose(gr[k], wg[k], rtol=1e-12, atol=1e-14)


def _child_loss(model: bp.CompiledModel, inputs: dict, queue: multiprocessing.Queue) -> None:
    queue.put(model.loss(**inputs))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_runs_without_the_parents_workers(build_dir, restore_threads):
    bp.set_num_threads(2)
    graph = mlp_graph()
    model = _compile(graph, build_dir)
    inputs = _inputs(graph, batch=40, seed=3)
    want = model.loss(**inputs)  # the parent's workers have started
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_loss, args=(model, inputs, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    assert got == pytest.approx(want, rel=1e-12)


THREAD_COUNT_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import bpcompile as bp
    def tasks():
        return len(os.listdir("/proc/self/task"))
    sizes = {"tiny": (2, 16), "large": (256, 512)}
    n_in, n_hidden = sizes[sys.argv[1]]
    g = bp.Graph("threads_" + sys.argv[1])
    x = g.input("x", ("batch", n_in))
    t = g.input("t", ("batch", 1))
    h = bp.relu(x @ g.param("W0", (n_in, n_hidden)) + g.param("b0", (n_hidden,)))
    g.loss(bp.mse(h @ g.param("W1", (n_hidden, 1)), t))
    model = bp.compile(g, optimizer=bp.optim.SGD(lr=0.01))  # loads OpenBLAS, with its own idle threads
    batch = {"x": np.ones((128, n_in), np.float32), "t": np.ones((128, 1), np.float32)}
    before = tasks()
    for _ in range(5):
        model.train_step(**batch)
    print(tasks() - before)
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("size,started", [("tiny", 0), ("large", 1)])
def test_workers_start_only_for_large_work(build_dir, size, started):
    env = dict(os.environ, BPCOMPILE_NUM_THREADS="2", BPCOMPILE_BUILD_DIR=str(build_dir))
    done = subprocess.run([sys.executable, "-c", THREAD_COUNT_SCRIPT, size], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == started


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="number of threads must be an integer >= 1"):
        bp.set_num_threads(bad)


def test_bad_thread_count_in_environment_is_named():
    env = dict(os.environ, BPCOMPILE_NUM_THREADS="many")
    done = subprocess.run([sys.executable, "-c", "import bpcompile as bp; bp.num_threads()"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "BPCOMPILE_NUM_THREADS must be a whole number >= 1, got 'many'" in done.stderr


@pytest.mark.parametrize("bad", [-1, 2.5, None])
def test_bad_parallel_min_work_is_refused(build_dir, bad):
    with pytest.raises(ValueError, match="parallel_min_work must be a whole number >= 0"):
        bp.compile(mlp_graph(), build_dir=build_dir, parallel_min_work=bad)
