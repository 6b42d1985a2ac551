"""The runtime: parameter views into one flat buffer, values against the NumPy reference,
thread safety, checkpoints, seeds and initial values, and the fit/evaluate/predict loop."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from testutil import run_threads

import bpcompile as bp


def mlp_graph(name: str = "rt_mlp", n_in: int = 6, hidden: int = 8, classes: int = 3) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", n_in))
    y = g.input("y", ("batch",), dtype="int32")
    W1 = g.param("W1", (n_in, hidden), init="he_normal")
    b1 = g.param("b1", (hidden,), init="normal")
    W2 = g.param("W2", (hidden, classes), init="glorot_uniform")
    b2 = g.param("b2", (classes,), init="normal")
    logits = bp.tanh(x @ W1 + b1) @ W2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def regression_graph(name: str = "rt_reg") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 4))
    t = g.input("t", ("batch", 1))
    W = g.param("W", (4, 6), init="he_normal")
    b = g.param("b", (6,))
    V = g.param("V", (6, 1), init="glorot_uniform")
    out = bp.sigmoid(x @ W + b) @ V
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def cls_data(n: int, seed: int, n_in: int = 6, classes: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)), rng.integers(0, classes, size=n).astype(np.int32)


TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=2e-5)}


@pytest.fixture(scope="module")
def mlp(build_dir):
    g = mlp_graph()
    return g, bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1), seed=0)


# --- parameters: views into one flat buffer -------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_params_are_views_into_one_flat_buffer(build_dir, dtype):
    model = bp.compile(mlp_graph(), dtype=dtype, seed=0)
    views = list(model.params.values())
    assert [tuple(v.shape) for v in views] == [(6, 8), (8,), (8, 3), (3,)]
    assert all(v.dtype == np.dtype(dtype) for v in views)
    for a in views:
        assert a.base is not None and not a.flags.owndata
        for b in views:
            assert np.shares_memory(a, b.base), "parameters do not live in one buffer"
            if a is not b:
                assert not np.shares_memory(a, b), "two parameters overlap"
    starts = sorted(v.ctypes.data for v in views)
    ends = sorted(v.ctypes.data + v.nbytes for v in views)
    assert ends[-1] - starts[0] < 4 * sum(v.nbytes for v in views)  # one compact block, in order
    assert all(v.ctypes.data % 64 == 0 for v in views), "parameters should start on 64-byte boundaries"


def test_writing_a_param_view_changes_the_model(mlp):
    _, model = mlp
    X, _ = cls_data(4, 1)
    saved = model.params["W2"].copy()
    try:
        model.params["W2"][...] = 0.0
        model.params["b2"][...] = [1.0, 2.0, 3.0]
        np.testing.assert_array_equal(model.forward(x=X)["logits"], np.tile([1.0, 2.0, 3.0], (4, 1)))
        model.params["W2"][0, 1] = 1.5
        h = np.tanh(X @ model.params["W1"] + model.params["b1"])
        np.testing.assert_allclose(model.forward(x=X)["logits"][:, 1], 2.0 + 1.5 * h[:, 0], rtol=1e-12)
    finally:
        model.params["W2"][...] = saved
        model.params["b2"][...] = 0.0
        model.reset_parameters(0)


# --- values against the NumPy reference -----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calls_match_reference(build_dir, dtype):
    g = mlp_graph()
    model = bp.compile(g, dtype=dtype, optimizer=bp.optim.SGD(lr=0.3), seed=2)
    X, Y = cls_data(7, 3)
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    tol = TOL[dtype]
    (ref_logits,) = bp.reference.evaluate([g.outputs["logits"]], {"x": X}, params)
    ref_loss, ref_grads = bp.reference.loss_and_grad(g, {"x": X, "y": Y}, params)
    # an independent NumPy forward for the reference itself
    h = np.tanh(X @ params["W1"] + params["b1"])
    logits = h @ params["W2"] + params["b2"]
    np.testing.assert_allclose(ref_logits, logits, rtol=1e-12)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert ref_loss == pytest.approx(-logp[np.arange(7), Y].mean(), rel=1e-12)

    out = model.forward(x=X)["logits"]
    assert out.dtype == np.dtype(dtype) and out.shape == (7, 3)
    np.testing.assert_allclose(out, ref_logits, **tol)
    assert model.loss(x=X, y=Y) == pytest.approx(ref_loss, rel=tol["rtol"])
    value, grads = model.loss_and_grad(x=X, y=Y)
    assert value == pytest.approx(ref_loss, rel=tol["rtol"])
    assert set(grads) == {"W1", "b1", "W2", "b2"}
    for k in grads:
        assert grads[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(grads[k], ref_grads[k], err_msg=k, **tol)
    step_loss = model.train_step(x=X, y=Y)
    assert step_loss == pytest.approx(ref_loss, rel=tol["rtol"])
    for k in params:
        np.testing.assert_allclose(model.params[k], params[k] - 0.3 * ref_grads[k], err_msg=k, **tol)
    assert model.step == 1


def test_loss_and_grad_returns_fresh_arrays(mlp):
    _, model = mlp
    X1, Y1 = cls_data(5, 10)
    X2, Y2 = cls_data(9, 11)
    _, g1 = model.loss_and_grad(x=X1, y=Y1)
    kept = {k: v.copy() for k, v in g1.items()}
    _, g2 = model.loss_and_grad(x=X2, y=Y2)
    model.train_step(x=X2, y=Y2)
    model.reset_parameters(0)
    for k in kept:
        np.testing.assert_array_equal(g1[k], kept[k], err_msg=f"{k} was overwritten by a later call")
        assert not np.shares_memory(g1[k], g2[k])
        assert not np.shares_memory(g1[k], model.params[k])
        assert not np.array_equal(g1[k], g2[k])
    out1 = model.forward(x=X1)["logits"]
    saved = out1.copy()
    model.forward(x=X1 * 2)
    np.testing.assert_array_equal(out1, saved)


# --- the workspace plan (bp_plan_workspace in templates/bp_runtime.h, called through cffi) --------


def _check_first_fit(table: np.ndarray, dims: np.ndarray, itemsize: int, offsets: np.ndarray, total: int) -> None:
    """Offsets are a plan of largest-first first fit: 64-byte aligned, no two buffers live at the
    same time overlap, and no buffer could sit lower among those placed before it."""
    sizes = []
    for coef, _, _, ndims, *idx in table.tolist():
        n = coef * int(np.prod([dims[d] for d in idx[:ndims]], dtype=np.int64))
        sizes.append(-(-n * itemsize // 64) * 64)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    live = [(int(table[i, 1]), int(table[i, 2])) for i in range(len(sizes))]
    for k, b in enumerate(order):
        assert offsets[b] % 64 == 0
        before = [c for c in order[:k] if live[c][0] <= live[b][1] and live[b][0] <= live[c][1]]
        ranges = [(int(offsets[c]), int(offsets[c]) + sizes[c]) for c in before]
        fits = [o for o in [0] + [e for _, e in ranges]
                if all(o + sizes[b] <= s or e <= o for s, e in ranges)]
        assert offsets[b] == min(fits), (b, offsets[b], fits)
    assert total == max((int(offsets[i]) + sizes[i] for i in range(len(sizes))), default=0)


def test_workspace_plan_is_largest_first_first_fit(mlp):
    from bpcompile.runtime.native import plan_table, plan_workspace
    _, model = mlp
    rng = np.random.default_rng(3)
    for _ in range(200):
        names = ["batch", "T"]
        buffers = []
        for _ in range(int(rng.integers(0, 25))):
            start = int(rng.integers(0, 20))
            buffers.append([int(rng.choice([0, 1, 5, 16, 100])), list(rng.choice(names, int(rng.integers(0, 3)))),
                            start, start + int(rng.integers(0, 8))])
        table = plan_table(buffers, names)
        dims = rng.integers(1, 40, size=2)
        itemsize = int(rng.choice([4, 8]))
        offsets, total = plan_workspace(model._module, table, dims, itemsize)
        _check_first_fit(table, dims, itemsize, offsets, total)


def test_model_workspace_follows_its_plan(mlp):
    """Each entry's buffers are planned first-fit, and the arena serves the largest entry."""
    from bpcompile.runtime.native import plan_workspace
    _, model = mlp
    for batch in (1, 7, 64, 1000):
        offsets, size = model._plan((batch,))
        totals = []
        for entry in model._entries.values():
            mine, total = plan_workspace(model._module, entry.table, np.array([batch]), model.dtype.itemsize)
            np.testing.assert_array_equal(mine, offsets[entry.name])
            _check_first_fit(entry.table, np.array([batch]), model.dtype.itemsize, mine, total)
            totals.append(total)
        assert model.workspace_bytes(batch=batch) == size == max(totals) > 0
    assert model.workspace_bytes(batch=1000) > model.workspace_bytes(batch=7)


def test_workspace_plan_refuses_sizes_beyond_int64_and_malformed_tables(mlp):
    from bpcompile.runtime.native import plan_workspace
    _, model = mlp
    with pytest.raises(bp.InputError, match="larger than 2\\*\\*63 bytes"):
        model.workspace_bytes(batch=2**62)
    table = np.array([[4, 0, 1, 1, 5]], dtype=np.int64)  # dimension 5 of a model with one
    with pytest.raises(bp.CompileError, match="workspace table of 1 buffers is malformed"):
        plan_workspace(model._module, table, np.array([3]), 8)


def test_the_plan_prototype_is_the_one_model_h_declares(mlp):
    from bpcompile.codegen.module import PLAN_PROTOTYPE
    _, model = mlp
    header = " ".join((model.build_path / "model.h").read_text().split())
    assert " ".join(PLAN_PROTOTYPE.split()) in header


# --- threads ---------------------------------------------------------------------------------


def test_one_model_called_from_four_threads(build_dir):
    g = mlp_graph("rt_threads", n_in=32, hidden=64, classes=10)
    model = bp.compile(g, dtype="float64", seed=0)
    # two threads share a batch size (so they share the arena pool), two have their own
    datasets = [cls_data(n, 100 + i, n_in=32, classes=10) for i, n in enumerate((64, 64, 48, 80))]
    repeats = 25

    def work(X, Y):
        outs = []
        for _ in range(repeats):
            outs.append(model.forward(x=X)["logits"])
            loss, grads = model.loss_and_grad(x=X, y=Y)
            outs.append((loss, grads))
        return outs

    expected = [(model.forward(x=X)["logits"], model.loss_and_grad(x=X, y=Y)) for X, Y in datasets]
    results = run_threads([lambda d=d: work(*d) for d in datasets], timeout=120)
    for (logits, (loss, grads)), outs in zip(expected, results):
        for r in range(repeats):
            np.testing.assert_array_equal(outs[2 * r], logits)
            got_loss, got_grads = outs[2 * r + 1]
            assert got_loss == loss
            for k in grads:
                np.testing.assert_array_equal(got_grads[k], grads[k])


def test_models_trained_in_parallel_threads_equal_sequential(build_dir):
    g = mlp_graph("rt_threads", n_in=32, hidden=64, classes=10)
    datasets = [cls_data(64, 200 + i, n_in=32, classes=10) for i in range(4)]
    steps = 15

    def train(i):
        model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.05, momentum=0.9), seed=i)
        X, Y = datasets[i]
        losses = [model.train_step(x=X, y=Y) for _ in range(steps)]
        return losses, {k: v.copy() for k, v in model.params.items()}

    sequential = [train(i) for i in range(4)]
    parallel = run_threads([lambda i=i: train(i) for i in range(4)], timeout=120)
    for (l_seq, p_seq), (l_par, p_par) in zip(sequential, parallel):
        assert l_seq == l_par
        assert l_seq[-1] < l_seq[0]
        for k in p_seq:
            np.testing.assert_array_equal(p_seq[k], p_par[k])


def test_train_steps_from_several_threads_are_serialized(build_dir):
    """train_step on one model from many threads: every step counted, the result equals some
    sequential order (here all threads use the same batch, so every order gives the same result)."""
    g = mlp_graph("rt_threads", n_in=32, hidden=64, classes=10)
    X, Y = cls_data(64, 7, n_in=32, classes=10)
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.05, momentum=0.9), seed=1)
    twin = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.05, momentum=0.9), seed=1)
    run_threads([lambda: [model.train_step(x=X, y=Y) for _ in range(10)] for _ in range(4)], timeout=120)
    for _ in range(40):
        twin.train_step(x=X, y=Y)
    assert model.step == twin.step == 40
    for k in model.params:
        np.testing.assert_array_equal(model.params[k], twin.params[k])


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(build_dir, tmp_path, dtype):
    g = mlp_graph()
    opt = bp.optim.RMSprop(lr=0.01, momentum=0.5)
    model = bp.compile(g, dtype=dtype, optimizer=opt, seed=0)
    X, Y = cls_data(8, 5)
    for _ in range(3):
        model.train_step(x=X, y=Y)
    ckpt = tmp_path / "model.npz"
    model.save(ckpt)
    at_ckpt = model.forward(x=X)["logits"]
    other = bp.compile(g, dtype=dtype, optimizer=opt, seed=99)
    assert not np.array_equal(other.params["W1"], model.params["W1"])
    other.load(ckpt)
    assert other.step == 3
    for k in model.params:
        np.testing.assert_array_equal(other.params[k], model.params[k])
    # the optimizer state came along: the next steps agree exactly
    for _ in range(2):
        assert other.train_step(x=X, y=Y) == model.train_step(x=X, y=Y)
    for k in model.params:
        np.testing.assert_array_equal(other.params[k], model.params[k])
    # a build folder loaded with bp.load takes the checkpoint too
    loaded = bp.load(model.build_path, seed=5)
    loaded.load(ckpt)
    assert loaded.step == 3
    np.testing.assert_array_equal(loaded.forward(x=X)["logits"], at_ckpt)


def test_save_is_atomic(mlp, tmp_path, monkeypatch):
    _, model = mlp
    ckpt = tmp_path / "ckpt.npz"
    model.save(ckpt)
    good = ckpt.read_bytes()
    original = {k: v.copy() for k, v in model.params.items()}
    real_savez = np.savez

    def crash_midway(file, *args, **kwds):
        file.write(b"PK\x03\x04 partial garbage")  # some bytes reach the file, then the process "dies"
        raise KeyboardInterrupt("simulated crash while saving")

    try:
        model.params["W1"][...] += 1.0
        monkeypatch.setattr(np, "savez", crash_midway)
        with pytest.raises(KeyboardInterrupt):
            model.save(ckpt)
        monkeypatch.setattr(np, "savez", real_savez)
        assert ckpt.read_bytes() == good, "the previous checkpoint was damaged"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"], "temporary files were left behind"
        model.load(ckpt)
        for k in original:
            np.testing.assert_array_equal(model.params[k], original[k])
    finally:
        model.reset_parameters(0)


def test_load_rejects_other_graph_dtype_optimizer_and_damage(build_dir, tmp_path):
    g = mlp_graph()
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1), seed=0)
    ckpt = tmp_path / "mlp.npz"
    model.save(ckpt)

    def check(target, *words):
        before = {k: v.copy() for k, v in target.params.items()}
        with pytest.raises(bp.CheckpointError) as e:
            target.load(ckpt)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
        for k in before:
            np.testing.assert_array_equal(target.params[k], before[k])

    check(bp.compile(mlp_graph(hidden=9), dtype="float64", optimizer=bp.optim.SGD(lr=0.1)), "params")
    check(bp.compile(mlp_graph("rt_other"), dtype="float64", optimizer=bp.optim.SGD(lr=0.1)), "graph", "rt_other")
    check(bp.compile(g, dtype="float32", optimizer=bp.optim.SGD(lr=0.1)), "dtype", "float32", "float64")
    check(bp.compile(g, dtype="float64", optimizer=bp.optim.RMSprop(lr=0.1)), "state_size")  # more state
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9), seed=0)
    model.save(ckpt)
    check(bp.compile(g, dtype="float64", optimizer=bp.optim.RMSprop(lr=0.1)), "optimizer", "sgd", "rmsprop")

    data = ckpt.read_bytes()
    for cut in (len(data) // 2, 40, 0):
        ckpt.write_bytes(data[:cut])
        check(model)
    ckpt.write_text("not a checkpoint")
    check(model)
    np.savez(ckpt, something=np.zeros(3))
    check(model, "signature")


def _rewrite(ckpt: Path, change) -> None:
    with np.load(ckpt, allow_pickle=False) as f:
        files = {k: f[k] for k in f.files}
    change(files)
    with open(ckpt, "wb") as f:
        np.savez(f, **files)


DAMAGE = {
    "param-shape": lambda f: f.__setitem__("param/b1", np.ones(1)),
    "param-missing": lambda f: f.pop("param/W2"),
    "state-size": lambda f: f.__setitem__("state", np.ones(3)),
    "step-missing": lambda f: f.pop("step"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_rejects_damaged_arrays(build_dir, tmp_path, damage):
    """A checkpoint whose signature matches but whose arrays do not: a CheckpointError, and the
    model is left as it was (no silent broadcast, no half-loaded parameters)."""
    model = bp.compile(mlp_graph(), dtype="float64", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9), seed=0)
    ckpt = tmp_path / "ckpt.npz"
    model.save(ckpt)
    _rewrite(ckpt, DAMAGE[damage])
    model.reset_parameters(1)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(bp.CheckpointError):
        model.load(ckpt)
    for k in before:
        np.testing.assert_array_equal(model.params[k], before[k], err_msg=k)
    assert model.step == 0


def test_checkpoints_are_loaded_without_pickle(build_dir, tmp_path, monkeypatch):
    model = bp.compile(mlp_graph(), dtype="float64", seed=0)
    ckpt = tmp_path / "ckpt.npz"
    model.save(ckpt)
    with zipfile.ZipFile(ckpt) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    with np.load(ckpt, allow_pickle=False) as f:  # a checkpoint holds no pickled objects
        assert all(f[k].dtype != object for k in f.files)
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: (calls.append(k), real_load(*a, **k))[1])
    model.load(ckpt)
    assert calls and all(k.get("allow_pickle") is False for k in calls)
    monkeypatch.setattr(np, "load", real_load)
    # a checkpoint carrying a pickled object (a would-be exploit) is refused
    _rewrite(ckpt, lambda f: f.__setitem__("signature", np.array([json.loads(str(f["signature"]))], dtype=object)))
    with pytest.raises(bp.CheckpointError):
        model.load(ckpt)


# --- seeds and initial values ------------------------------------------------------------------


def test_seed_determinism(build_dir):
    g = mlp_graph()
    a, b = (bp.compile(g, dtype="float64", seed=11) for _ in range(2))
    c = bp.compile(g, dtype="float64", seed=12)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    for k in ("W1", "b1", "W2", "b2"):
        assert not np.array_equal(a.params[k], c.params[k]), k
    loaded = bp.load(a.build_path, seed=11)
    for k in a.params:
        np.testing.assert_array_equal(loaded.params[k], a.params[k])
    c.reset_parameters(11)
    for k in a.params:
        np.testing.assert_array_equal(c.params[k], a.params[k])
    # he_normal and glorot_uniform follow their formulas (checked on a bigger layer)
    big = bp.Graph("rt_init")
    x = big.input("x", ("batch", 200))
    Wh = big.param("Wh", (200, 300), init="he_normal")
    Wg = big.param("Wg", (200, 300), init="glorot_uniform")
    big.output("o", x @ Wh + x @ Wg)
    m = bp.compile(big, dtype="float64", seed=0)
    assert m.params["Wh"].std() == pytest.approx(np.sqrt(2 / 200), rel=0.02)
    limit = np.sqrt(6 / 500)
    assert np.abs(m.params["Wg"]).max() <= limit and np.abs(m.params["Wg"]).max() > 0.99 * limit


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ndarray_init_is_used_exactly(build_dir, dtype):
    rng = np.random.default_rng(5)
    W0 = rng.normal(size=(3, 4))
    b0 = np.array([0.1, -0.2, 1 / 3, 7.0])
    g = bp.Graph("rt_arrinit")
    x = g.input("x", ("batch", 3))
    W = g.param("W", (3, 4), init=W0)
    b = g.param("b", (4,), init=b0)
    g.output("o", x @ W + b)
    W0_copy = W0.copy()
    model = bp.compile(g, dtype=dtype, seed=123)
    np.testing.assert_array_equal(model.params["W"], W0.astype(dtype))
    np.testing.assert_array_equal(model.params["b"], b0.astype(dtype))
    np.testing.assert_array_equal(W0, W0_copy)
    assert not np.shares_memory(model.params["W"], W0)
    model.params["W"][...] = 0
    model.reset_parameters(7)
    np.testing.assert_array_equal(model.params["W"], W0.astype(dtype))
    X = rng.normal(size=(2, 3))
    np.testing.assert_allclose(model.forward(x=X)["o"], X @ W0 + b0, **TOL[dtype])


# --- fit / evaluate / predict ---------------------------------------------------------------------


def test_fit_evaluate_predict(build_dir):
    rng = np.random.default_rng(0)
    n = 240
    centers = np.array([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    Y = rng.integers(0, 3, size=n).astype(np.int32)
    X = centers[Y] + 0.5 * rng.normal(size=(n, 6))
    train = {"x": X[:200], "y": Y[:200]}
    val = {"x": X[200:], "y": Y[200:]}
    model = bp.compile(mlp_graph(), dtype="float32", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9), seed=0)
    history = model.fit(train, epochs=6, batch_size=32, validation=val, verbose=False)
    losses = history["loss"]
    assert len(losses) == 6
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]
    assert model.step == 6 * 7  # ceil(200 / 32) steps per epoch
    assert len(history["val_loss"]) == 6 and len(history["val_accuracy"]) == 6
    metrics = model.evaluate(val, batch_size=16)
    assert metrics["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-6)
    logits = model.forward(x=val["x"])["logits"]
    expected_loss = float(np.mean(-(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(40), val["y"]]))
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert metrics["accuracy"] == pytest.approx(np.mean(np.argmax(logits, 1) == val["y"]))
    assert metrics["accuracy"] > 0.9
    # batches equal the whole-data forward (up to the last-ulp differences of vectorized math: a
    # row may fall in a loop's SIMD body in one call and in its scalar tail in another)
    full = model.forward(x=X)["logits"]
    pred = model.predict({"x": X}, batch_size=50)["logits"]
    assert pred.shape == full.shape == (n, 3)
    np.testing.assert_allclose(pred, full, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(model.predict(x=X, batch_size=7)["logits"], full, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(model.predict(x=X, batch_size=n)["logits"], full)


def test_fit_regression_history(build_dir):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(128, 4))
    T = np.sin(X[:, :1]) + 0.5 * X[:, 1:2]
    model = bp.compile(regression_graph(), dtype="float64", optimizer=bp.optim.SGD(lr=0.2, momentum=0.9), seed=0)
    first = model.evaluate({"x": X, "t": T})["loss"]
    history = model.fit({"x": X, "t": T}, epochs=5, batch_size=16, shuffle=True, seed=3, verbose=False)
    assert history["loss"][-1] < history["loss"][0] < first * 1.5
    assert model.evaluate({"x": X, "t": T})["loss"] < 0.5 * first
    assert "accuracy" not in model.evaluate({"x": X, "t": T})
    # fit with shuffle=False over one full batch is exactly train_step
    a = bp.compile(regression_graph(), dtype="float64", optimizer=bp.optim.SGD(lr=0.1), seed=4)
    b = bp.compile(regression_graph(), dtype="float64", optimizer=bp.optim.SGD(lr=0.1), seed=4)
    a.fit({"x": X, "t": T}, epochs=3, batch_size=128, shuffle=False, verbose=False)
    for _ in range(3):
        b.train_step(x=X, t=T)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_fit_writes_a_checkpoint_after_each_epoch(build_dir, tmp_path):
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(size=(40, 4)), "t": rng.normal(size=(40, 1))}
    model = bp.compile(regression_graph(), dtype="float64", optimizer=bp.optim.Adam(lr=0.01), seed=0)
    model.fit(data, epochs=2, batch_size=16, seed=1, verbose=False, checkpoint=tmp_path / "ck.npz")
    resumed = bp.compile(regression_graph(), dtype="float64", optimizer=bp.optim.Adam(lr=0.01), seed=9)
    resumed.load(tmp_path / "ck.npz")
    assert resumed.step == model.step == 6
    for k in model.params:
        np.testing.assert_array_equal(resumed.params[k], model.params[k])
    model.fit(data, epochs=1, batch_size=16, seed=2, verbose=False)
    resumed.fit(data, epochs=1, batch_size=16, seed=2, verbose=False)  # optimizer state came back too
    for k in model.params:
        np.testing.assert_array_equal(resumed.params[k], model.params[k])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary file left behind
