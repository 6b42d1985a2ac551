"""Nothing a user does from Python crashes the process or silently returns wrong numbers.

- Bad input never reaches C unchecked: wrong shapes, dtypes, batch sizes, labels, zero-size
  batches raise bp.InputError and leave parameters, optimizer state and step untouched;
  non-contiguous, read-only, Fortran-order, big-endian, misaligned, subclassed and list inputs
  give the same results as clean arrays. NaN/Inf policy: propagate (the result is NaN/Inf,
  never a crash or an exception).
- Numerics: logits of +-1e4 (softmax CE, BCE with logits), activations far out and at their
  kinks, float32 reductions over 10^6 elements.
- Concurrency: threads training separate models and sharing one model; processes compiling
  the same graph at once, or killed mid-compile (SIGKILL), leave a usable cache.
- Damaged build caches: a truncated, altered or deleted module, and a damaged or edited
  meta.json (state_size 0, emptied buffers, bad JSON, missing or ill-typed fields), are refused
  by bp.load with a bp.CompileError naming the folder and the fault, and rebuilt in place by
  bp.compile (each case in a subprocess, so that a crash fails the test, not pytest).
- Checkpoints: SIGKILL during save keeps the previous checkpoint; another graph's, dtype's,
  truncated, damaged or crafted file raises bp.CheckpointError; nothing loads with pickle.
- Generated code: hostile names (C keywords, quotes, newlines, comment markers, collisions
  after sanitizing) compile with -Werror to distinct identifiers and a working model.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mpmath
import numpy as np
import pytest
from testutil import run_threads, subprocess_env

import bpcompile as bp

HERE = Path(__file__).resolve().parent
ENTRIES = ("forward", "loss", "loss_and_grad", "train_step")


def clf_graph(name: str = "rb_clf") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 6))
    y = g.input("y", ("batch",), dtype="int32")
    W1 = g.param("W1", (6, 5), init="he_normal")
    b1 = g.param("b1", (5,), init="normal")
    W2 = g.param("W2", (5, 3), init="glorot_uniform")
    b2 = g.param("b2", (3,), init="normal")
    logits = bp.tanh(x @ W1 + b1) @ W2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def data(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), rng.integers(0, 3, size=n).astype(np.int32)


@pytest.fixture(scope="module", params=["float64", "float32"])
def clf(request, build_dir):
    return bp.compile(clf_graph(), dtype=request.param, optimizer=bp.optim.Adam(lr=1e-2), seed=0)


def call(model, entry: str, **inputs):
    if entry == "forward":
        inputs.pop("y", None)
        return model.forward(**inputs)
    return getattr(model, entry)(**inputs)


def state(model) -> tuple:
    """Everything a failed call must leave alone: parameters, optimizer state, step."""
    return ({k: v.copy() for k, v in model.params.items()}, model._state_flat.copy(), model.step)


def assert_same_state(a: tuple, b: tuple) -> None:
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=f"parameter {k} changed")
    np.testing.assert_array_equal(a[1], b[1], err_msg="optimizer state changed")
    assert a[2] == b[2], "step changed"


# --- bad input --------------------------------------------------------------------------------

X5, Y5 = data()
BAD = {
    "x-rank3": dict(x=X5[:, :, None], y=Y5),
    "x-rank1": dict(x=X5[0], y=Y5),
    "x-scalar": dict(x=1.0, y=Y5),
    "x-fixed-dim": dict(x=X5[:, :5], y=Y5),
    "batch-mismatch": dict(x=X5, y=Y5[:4]),
    "zero-batch": dict(x=np.zeros((0, 6)), y=np.zeros(0, np.int32)),
    "x-complex": dict(x=X5 + 1j, y=Y5),
    "x-object": dict(x=X5.astype(object), y=Y5),
    "x-str": dict(x=np.full((5, 6), "1.0"), y=Y5),
    "x-none": dict(x=None, y=Y5),
    "x-ragged": dict(x=[[1.0, 2.0], [3.0]], y=Y5),
    "x-datetime": dict(x=np.zeros((5, 6), "datetime64[s]"), y=Y5),
    "y-float": dict(x=X5, y=Y5.astype(np.float64)),
    "y-too-big-for-int32": dict(x=X5, y=np.full(5, 2**40, np.int64)),
    "y-uint64-huge": dict(x=X5, y=np.full(5, 2**63, np.uint64)),
    "y-out-of-range": dict(x=X5, y=np.array([0, 1, 3, 0, 1], np.int32)),
    "y-negative": dict(x=X5, y=np.array([0, -1, 2, 0, 1], np.int32)),
    "y-int32-min": dict(x=X5, y=np.array([0, 1, -2**31, 0, 1], np.int32)),
    "missing-x": dict(y=Y5),
    "unknown-input": dict(x=X5, y=Y5, z=X5),
}
NEEDS_LABELS = {k for k in BAD if k.startswith("y-") or k == "batch-mismatch"}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_an_input_error_and_changes_nothing(clf, case, entry):
    inputs = dict(BAD[case])
    if entry == "forward" and case in NEEDS_LABELS:
        pytest.skip("forward is called without the labels")
    X, Y = data(7, seed=3)
    before_values = call(clf, "loss_and_grad", x=X, y=Y)
    before = state(clf)
    with pytest.raises(bp.InputError):
        call(clf, entry, **inputs)
    assert_same_state(before, state(clf))
    after_values = call(clf, "loss_and_grad", x=X, y=Y)  # the model still works, unchanged
    assert after_values[0] == before_values[0]
    for k in before_values[1]:
        np.testing.assert_array_equal(after_values[1][k], before_values[1][k])


def test_bad_input_after_a_good_call_with_the_same_signature(clf):
    """The per-thread fast path re-validates: the same names, dtypes and shapes as the last
    call but bad label values, then a non-contiguous array, are still caught."""
    X, Y = data()
    clf.train_step(x=X.astype(clf.dtype), y=Y)
    before = state(clf)
    with pytest.raises(bp.InputError, match="labels"):
        clf.train_step(x=X.astype(clf.dtype), y=np.array([0, 1, 2, 3, 0], np.int32))
    assert_same_state(before, state(clf))
    Xf = np.asfortranarray(np.concatenate([X, X], axis=1)[:, ::2].astype(clf.dtype))
    assert not Xf.flags.c_contiguous
    np.testing.assert_array_equal(clf.forward(x=Xf)["logits"], clf.forward(x=np.ascontiguousarray(Xf))["logits"])


def _variants(X: np.ndarray) -> dict[str, object]:
    wide = np.zeros((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    ro = X.copy()
    ro.flags.writeable = False
    raw = np.zeros(X.size * 8 + 1, np.uint8)
    misaligned = raw[1:].view(np.float64).reshape(X.shape)
    misaligned[...] = X
    return {
        "strided": wide[:, ::2],
        "fortran": np.asfortranarray(X),
        "read-only": ro,
        "big-endian": X.astype(">f8"),
        "misaligned": misaligned,
        "matrix-subclass": np.asmatrix(X),
        "list": X.tolist(),
    }


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("variant", ["strided", "fortran", "read-only", "big-endian", "misaligned",
                                     "matrix-subclass", "list"])
def test_unusual_arrays_give_the_clean_result(clf, variant):
    X, Y = data()
    X = X.astype(clf.dtype).astype(np.float64)  # exactly representable in the model's dtype
    v = _variants(X)[variant]
    Yv = Y.copy()
    Yv.flags.writeable = False
    want = clf.forward(x=X)["logits"], clf.loss_and_grad(x=X, y=Y)
    for _ in range(2):  # the second call takes the cached call frame
        got = clf.forward(x=v)["logits"], clf.loss_and_grad(x=v, y=Yv)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1][0] == want[1][0]
        for k in want[1][1]:
            np.testing.assert_array_equal(got[1][1][k], want[1][1][k])


class _RecordingFFI:
    """Wraps a model's cffi FFI and records the address and item size of every array handed
    to C."""

    def __init__(self, ffi):
        self._ffi = ffi
        self.seen: list[tuple[int, int]] = []

    def from_buffer(self, *args, **kwargs):
        obj = args[-1]
        if isinstance(obj, np.ndarray):
            self.seen.append((obj.ctypes.data, obj.dtype.itemsize))
        return self._ffi.from_buffer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ffi, name)


def test_every_array_handed_to_c_is_aligned(build_dir):
    model = bp.compile(clf_graph("rb_align"), dtype="float64", optimizer=bp.optim.SGD(lr=0.1))
    model._tls = threading.local()
    rec = _RecordingFFI(model._ffi)
    model._ffi = rec
    X, Y = data()
    for _ in range(2):
        for v in _variants(X).values():
            model.forward(x=v)
            model.loss_and_grad(x=v, y=Y)
    bad = [(addr, size) for addr, size in rec.seen if addr % size]
    assert not bad, f"{len(bad)} of {len(rec.seen)} arrays handed to C are not aligned to their item size"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_inputs_propagate(clf, value):
    """Documented policy: non-finite inputs are not rejected; they propagate by IEEE arithmetic
    (a NaN poisons its row, the loss and the gradients; an inf may also saturate, e.g. through
    tanh), never a crash or an exception; rows without them are unaffected. (The reference
    interpreter is no oracle here: OpenBLAS turns inf * w into NaN inside its kernels.)"""
    X, Y = data(4)
    clean = clf.forward(x=X)["logits"]
    Xb = X.copy()
    Xb[1, 2] = value
    out = clf.forward(x=Xb)["logits"]
    np.testing.assert_allclose(np.delete(out, 1, axis=0), np.delete(clean, 1, axis=0), rtol=1e-6)
    loss, grads = clf.loss_and_grad(x=Xb, y=Y)
    assert isinstance(loss, float) and isinstance(clf.loss(x=Xb, y=Y), float)
    twin = bp.compile(clf_graph(), dtype=clf.dtype.name, optimizer=bp.optim.SGD(lr=0.1), seed=1)
    step_loss = twin.train_step(x=Xb, y=Y)
    assert twin.step == 1  # the step happens
    if np.isnan(value):
        assert np.all(np.isnan(out[1])) and np.isnan(loss) and np.isnan(step_loss)
        assert np.all(np.isnan(grads["W1"][2])) and np.all(np.isnan(twin.params["W1"][2]))


# --- numerics --------------------------------------------------------------------------------

def _loss_model(name: str, dtype: str, make, shape=("batch", 3), target_dtype=None, build=None):
    g = bp.Graph(name)
    z = g.input("z", shape)
    s = g.param("s", (), init=np.array(1.0))
    t = g.input("t", shape[:-1] if target_dtype == "int32" else shape, dtype=target_dtype)
    g.loss(make(z * s, t))
    return bp.compile(g, dtype=dtype)


CE_Z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 0.0], [1e4, 1e4, -1e4]])
CE_Y = np.array([0, 0, 2, 1], np.int32)
# exact: per row logsumexp - z[label]; d/ds = mean over rows of sum_j (softmax_j - onehot_j) z_j
CE_LOSS = np.mean([0.0, 2e4, np.log(3.0), np.log(2.0)])
CE_GRAD = (0.0 + 2e4 + 0.0 + 0.0) / 4


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_of_huge_logits(dtype, build_dir):
    """Logits of +-1e4: the loss exact to rounding, the gradient finite and within what float32
    logits of 1e4 (ulp 1e-3) can give."""
    model = _loss_model("rb_ce_huge", dtype, bp.softmax_cross_entropy, target_dtype="int32")
    loss, grads = model.loss_and_grad(z=CE_Z, t=CE_Y)
    assert np.isfinite(loss) and np.isfinite(grads["s"])
    np.testing.assert_allclose(loss, CE_LOSS, rtol=1e-12 if dtype == "float64" else 2e-6)
    np.testing.assert_allclose(grads["s"], CE_GRAD, rtol=1e-12 if dtype == "float64" else 1e-3)


def test_float32_softmax_cross_entropy_gradient_exact_at_huge_logits(build_dir):
    model = _loss_model("rb_ce_huge", "float32", bp.softmax_cross_entropy, target_dtype="int32")
    _, grads = model.loss_and_grad(z=CE_Z, t=CE_Y)
    np.testing.assert_allclose(grads["s"], CE_GRAD, rtol=2e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bce_with_logits_of_huge_logits(dtype, build_dir):
    model = _loss_model("rb_bce_huge", dtype, bp.binary_cross_entropy_with_logits, shape=("batch", 2))
    z = np.array([[1e4, -1e4], [1e4, -1e4], [30.0, -30.0]])
    t = np.array([[0.0, 1.0], [1.0, 0.0], [0.3, 0.3]])
    rows = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    sig = np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))
    want_grad = np.mean((sig - t) * z)
    loss, grads = model.loss_and_grad(z=z, t=t)
    assert np.isfinite(loss) and np.isfinite(grads["s"])
    rtol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(loss, rows.mean(), rtol=rtol)
    np.testing.assert_allclose(grads["s"], want_grad, rtol=rtol)


mpmath.mp.dps = 60


def _mp_sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


EXACT = {  # value, derivative in mpmath (60 digits)
    "sigmoid": (_mp_sigmoid, lambda x: _mp_sigmoid(x) * (1 - _mp_sigmoid(x))),
    "tanh": (mpmath.tanh, lambda x: 1 - mpmath.tanh(x) ** 2),
    "softplus": (lambda x: mpmath.log1p(mpmath.exp(x)), _mp_sigmoid),
    "gelu": (lambda x: x / 2 * (1 + mpmath.erf(x / mpmath.sqrt(2))),
             lambda x: (1 + mpmath.erf(x / mpmath.sqrt(2))) / 2
             + x * mpmath.exp(-x**2 / 2) / mpmath.sqrt(2 * mpmath.pi)),
    "silu": (lambda x: x * _mp_sigmoid(x), lambda x: _mp_sigmoid(x) * (1 + x * (1 - _mp_sigmoid(x)))),
    "elu": (lambda x: x if x > 0 else mpmath.exp(x) - 1, lambda x: 1 if x > 0 else mpmath.exp(x)),
    "relu": (lambda x: max(x, 0), lambda x: 1 if x > 0 else 0),
    "leaky_relu": (lambda x: x if x > 0 else x / 100, lambda x: 1 if x > 0 else mpmath.mpf(1) / 100),
    "abs": (abs, lambda x: 1 if x > 0 else -1),
}
FAR = [-1e4, -1e3, -100.0, -89.0, -30.0, -1.0, 0.5, 30.0, 89.0, 100.0, 1e3, 1e4]


def _activation_model(kind: str, points: np.ndarray, dtype: str):
    g = bp.Graph(f"rb_act_{kind}")
    p = g.param("p", points.shape, init=points)
    y = getattr(bp, kind)(p)
    g.output("y", y)
    g.loss(bp.sum(y))
    return bp.compile(g, dtype=dtype)


def _check_activation(kind: str, dtype: str, points: list[float]) -> None:
    x = np.asarray(points, dtype=np.float64)
    model = _activation_model(kind, x, dtype)
    xs = model.params["p"].astype(np.float64)  # the points as the model holds them
    f, df = EXACT[kind]
    want_y = np.array([float(f(mpmath.mpf(v))) for v in xs])
    want_d = np.array([float(df(mpmath.mpf(v))) for v in xs])
    y = model.forward()["y"]
    _, grads = model.loss_and_grad()
    assert np.all(np.isfinite(y)), f"{kind} values: {y}"
    assert np.all(np.isfinite(grads["p"])), f"{kind} derivatives at {xs}: {grads['p']}"
    # relative accuracy, except where a value is below rounding of the function's scale (1):
    # e.g. sigmoid'(30) = y - y^2 with y rounded to 1, as in every framework
    eps = float(np.finfo(model.dtype).eps)
    rtol = 1e-12 if dtype == "float64" else 3e-6
    np.testing.assert_allclose(y, want_y.astype(model.dtype), rtol=rtol, atol=4 * eps)
    np.testing.assert_allclose(grads["p"], want_d.astype(model.dtype), rtol=rtol, atol=4 * eps)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "softplus", "gelu", "elu", "relu", "leaky_relu", "abs"])
def test_activation_values_and_derivatives_far_out(kind, dtype, build_dir):
    """At |x| up to 1e4 (past exp's overflow in both dtypes): finite and exact to rounding."""
    _check_activation(kind, dtype, FAR)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_silu_derivative_far_out(dtype, build_dir):
    _check_activation("silu", dtype, FAR)


def _mp_mish(x):
    return x * mpmath.tanh(mpmath.log1p(mpmath.exp(x)))


def _mp_mish_derivative(x):
    t = mpmath.tanh(mpmath.log1p(mpmath.exp(x)))
    return t + x * (1 - t**2) * _mp_sigmoid(x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mish_from_primitives_far_out_and_near_zero(dtype, build_dir):
    """x tanh(softplus(x)) (Mish) is printed as one exp and a ratio (printer._tanh_of_softplus):
    its values and derivatives are exact to rounding from -1e4 to 1e4 and at tiny |x|, and the
    generated C calls no tanh or log1p for it."""
    x = np.array(FAR + [-1e-30, -1e-8, -0.0, 0.0, 1e-8, 1e-30, -3.0, -0.3, 0.3, 3.0])
    g = bp.Graph("rb_mish")
    p = g.param("p", x.shape, init=x)
    y = p * bp.tanh(bp.softplus(p))
    g.output("y", y)
    g.loss(bp.sum(y))
    model = bp.compile(g, dtype=dtype)
    xs = model.params["p"].astype(np.float64)
    want_y = np.array([float(_mp_mish(mpmath.mpf(v))) for v in xs])
    want_d = np.array([float(_mp_mish_derivative(mpmath.mpf(v))) for v in xs])
    got_y = model.forward()["y"]
    _, grads = model.loss_and_grad()
    eps = float(np.finfo(model.dtype).eps)
    tiny = float(np.finfo(model.dtype).tiny)
    rtol = 1e-12 if dtype == "float64" else 3e-6
    # mish(-1e4) = -1e4 e^-1e4 underflows to (-)0 in both dtypes, as in mpmath's rounding to float
    np.testing.assert_allclose(got_y, want_y.astype(model.dtype), rtol=rtol, atol=4 * tiny / eps)
    np.testing.assert_allclose(grads["p"], want_d.astype(model.dtype), rtol=rtol, atol=4 * eps)
    code = re.sub(r"/\*.*?\*/", "", model.c_source, flags=re.S)  # comments name the nodes: tanh(t5)
    formulas = [line for line in code.splitlines() if "=" in line]  # not the libm declarations
    assert any(re.search(r"\bexpf?\(", line) for line in formulas)
    assert not any(re.search(r"\b(tanh|log1p)f?\(", line) for line in formulas)


KINK = [-1e-3, -1e-8, -1e-300, -0.0, 0.0, 1e-300, 1e-8, 1e-3]
AT_ZERO = {"relu": 0.0, "abs": 0.0, "leaky_relu": 0.01, "elu": 1.0}  # PyTorch's conventions


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", sorted(AT_ZERO))
def test_activation_derivatives_at_and_near_kinks(kind, dtype, build_dir):
    x = np.array(KINK)
    model = _activation_model(kind, x, dtype)
    xs = model.params["p"].astype(np.float64)
    _, grads = model.loss_and_grad()
    d = grads["p"]
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(model.forward()["y"]))
    _, df = EXACT[kind]
    for v, got in zip(xs, d):
        want = AT_ZERO[kind] if v == 0 else float(df(mpmath.mpf(v)))
        assert got == pytest.approx(want, rel=1e-6, abs=0), f"{kind}'({v!r}) = {got!r}, expected {want!r}"
    g = bp.Graph(f"rb_act_{kind}")
    g.loss(bp.sum(getattr(bp, kind)(g.param("p", x.shape, init=x))))
    ref = bp.reference.loss_and_grad(g, {}, model.params)[1]["p"]
    np.testing.assert_allclose(d, ref, rtol=1e-6, atol=0)


def test_float32_mean_and_sum_over_a_million_elements(build_dir):
    """Reductions accumulate in double: the float32 mean of 10^6 values (and the gradient that
    is itself such a mean) are within 2 ulp of the exact mean of the float32 data."""
    g = bp.Graph("rb_mean_1e6")
    x = g.input("x", ("batch",))
    s = g.param("s", (), init=np.array(1.0))
    g.output("mean", bp.mean(x * s))
    g.output("sum", bp.sum(x * s))
    g.loss(bp.mean(x * s))
    model = bp.compile(g, dtype="float32")
    rng = np.random.default_rng(0)
    X = (0.1 + 0.01 * rng.random(10**6)).astype(np.float32)  # naive float32 summation drifts ~1e-3
    exact = X.astype(np.float64).mean()
    ulp = np.spacing(np.float32(exact))
    out = model.forward(x=X)
    loss, grads = model.loss_and_grad(x=X)
    assert abs(float(out["mean"]) - exact) <= 2 * ulp
    assert abs(loss - exact) <= 2 * ulp
    assert abs(float(grads["s"]) - exact) <= 2 * ulp
    total = X.astype(np.float64).sum()
    assert abs(float(out["sum"]) - total) <= 2 * np.spacing(np.float32(total))


def test_float32_row_and_column_reductions_over_a_million_elements(build_dir):
    """The two reduction kernels (leading axes summed column-blockwise; trailing axes) and a
    bias gradient summed over 1000 x 1000 rows stay within 2 ulp."""
    g = bp.Graph("rb_mean_2d")
    x = g.input("x", ("batch", 1000))
    b = g.param("b", (1000,), init=np.zeros(1000))
    g.output("rows", bp.mean(x + b, axis=1))
    g.output("cols", bp.mean(x + b, axis=0))
    g.loss(bp.mean(bp.mean(x + b, axis=1)))
    model = bp.compile(g, dtype="float32")
    X = (0.1 + 0.01 * np.random.default_rng(1).random((1000, 1000))).astype(np.float32)
    out = model.forward(x=X)
    X64 = X.astype(np.float64)
    for name, want in (("rows", X64.mean(axis=1)), ("cols", X64.mean(axis=0))):
        err = np.abs(out[name] - want) / np.spacing(want.astype(np.float32))
        assert err.max() <= 2, f"{name}: {err.max()} ulp"
    loss, grads = model.loss_and_grad(x=X)
    assert abs(loss - X64.mean()) <= 2 * np.spacing(np.float32(X64.mean()))
    np.testing.assert_allclose(grads["b"], 1e-3, rtol=1e-6)


@pytest.mark.xfail(strict=False, reason="bug: a float32 weight gradient over a large batch is a GEMM contracted over "
                                        "the batch, accumulated in float32 (generated loops, and OpenBLAS builds "
                                        "without blocked accumulation): ~400 ulp off at 10^6 rows, unlike the "
                                        "reductions, which use double; OpenBLAS 0.3.34 on AMD EPYC happens to pass")
def test_float32_weight_gradient_over_a_million_rows(build_dir):
    g = bp.Graph("rb_linreg_1e6")
    x = g.input("x", ("batch", 1))
    t = g.input("t", ("batch", 1))
    W = g.param("W", (1, 1), init=np.full((1, 1), 0.5))
    g.loss(bp.mse(x @ W, t))
    model = bp.compile(g, dtype="float32")
    rng = np.random.default_rng(0)
    X = (1.0 + 0.1 * rng.random((10**6, 1))).astype(np.float32)
    T = rng.random((10**6, 1)).astype(np.float32)
    _, grads = model.loss_and_grad(x=X, t=T)
    _, ref = bp.reference.loss_and_grad(g, {"x": X, "t": T}, model.params)
    rel = abs(float(grads["W"][0, 0]) - ref["W"][0, 0]) / abs(ref["W"][0, 0])
    assert rel <= 1e-6, f"relative error {rel:.2g}"


# --- concurrency --------------------------------------------------------------------------------


CONFIGS = [("float32", bp.optim.Adam(lr=1e-2)), ("float64", bp.optim.SGD(lr=0.05, momentum=0.9, nesterov=True)),
           ("float32", bp.optim.RMSprop(lr=1e-3, clip_norm=0.5)), ("float64", bp.optim.AdamW(lr=1e-2))]


def test_threads_training_separate_models_equal_sequential(build_dir):
    """Four threads, four models (two dtypes, four optimizers), batch sizes changing every step:
    losses and parameters bit-identical to the same training run sequentially."""
    def make(i):
        dtype, opt = CONFIGS[i]
        return bp.compile(clf_graph(), dtype=dtype, optimizer=opt, seed=i)

    def train(model, i):
        losses = []
        for step in range(40):
            X, Y = data(1 + (step * 7 + i) % 13, seed=100 * i + step)
            losses.append(model.train_step(x=X, y=Y))
        return losses, {k: v.copy() for k, v in model.params.items()}

    models = [make(i) for i in range(4)]
    twins = [make(i) for i in range(4)]
    sequential = [train(twins[i], i) for i in range(4)]
    parallel = run_threads([lambda i=i: train(models[i], i) for i in range(4)], timeout=300)
    for (l_seq, p_seq), (l_par, p_par) in zip(sequential, parallel):
        assert l_seq == l_par
        for k in p_seq:
            np.testing.assert_array_equal(p_seq[k], p_par[k])


def test_threads_sharing_one_model_for_inference(build_dir):
    """Eight threads on one model at once, each switching batch sizes and entry points (so call
    frames and arenas are rebuilt under contention): every result bit-identical to sequential."""
    model = bp.compile(clf_graph(), dtype="float32", optimizer=bp.optim.SGD(lr=0.1), seed=3)
    batches = [data(n, seed=n) for n in (1, 2, 5, 8, 13, 64)]
    expected = [(model.forward(x=X)["logits"], model.loss(x=X, y=Y), model.loss_and_grad(x=X, y=Y))
                for X, Y in batches]

    def work(t):
        bad = 0
        for r in range(60):
            k = (t + r) % len(batches)
            X, Y = batches[k]
            logits, loss, (gl, grads) = expected[k]
            which = (t * 3 + r) % 3
            if which == 0:
                bad += not np.array_equal(model.forward(x=X)["logits"], logits)
            elif which == 1:
                bad += model.loss(x=X, y=Y) != loss
            else:
                got_l, got_g = model.loss_and_grad(x=X, y=Y)
                bad += got_l != gl or any(not np.array_equal(got_g[n], grads[n]) for n in grads)
        return bad

    assert sum(run_threads([lambda t=t: work(t) for t in range(8)], timeout=300)) == 0


SLOW_CC = """#!/bin/sh
# a C compiler that stops (for SIGKILL) at the step named by $BP_STALL: compile (-c model.c) or link
case "$*" in
  *"-c model.c"*) step=compile ;;
  *-shared*) step=link ;;
  *) step=other ;;
esac
if [ "$step" = "$BP_STALL" ]; then
  touch "$BP_STALL_MARK"
  sleep 120
fi
exec gcc "$@"
"""


@pytest.mark.parametrize("stall", ["compile", "link"])
def test_killed_mid_build_leaves_a_usable_cache(tmp_path, stall):
    """SIGKILL of a process (and its compiler) in the middle of compiling or linking: no build
    folder appears, and the next process (same cache key) rebuilds and gets a working model."""
    root = tmp_path / "build"
    cc = tmp_path / "slowcc"
    cc.write_text(SLOW_CC)
    cc.chmod(0o755)
    mark = tmp_path / "stalled"
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent("""
        import bpcompile as bp
        from test_robustness import clf_graph, data
        model = bp.compile(clf_graph("rb_killed"), dtype="float64", seed=0)
        X, Y = data()
        print(repr(model.loss(x=X, y=Y)))
    """))
    p = subprocess.Popen([sys.executable, str(script)], env=subprocess_env(BPCOMPILE_BUILD_DIR=str(root), CC=str(cc),
                                                                  BP_STALL=stall, BP_STALL_MARK=str(mark)),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not mark.exists():
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline, "the build never reached the stall"
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
    assert not [q for q in root.iterdir() if not q.name.startswith(".")], "a build folder appeared"
    assert list(root.glob(".tmp-*")), "expected the killed build's temporary folder"
    # the same cache key (CC prints gcc's version): the next run must rebuild, not load a half module
    again = subprocess.run([sys.executable, str(script)], env=subprocess_env(BPCOMPILE_BUILD_DIR=str(root), CC=str(cc),
                                                                   BP_STALL="none", BP_STALL_MARK=str(mark)),
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    X, Y = data()
    want = bp.compile(clf_graph("rb_killed"), dtype="float64", seed=0, build_dir=tmp_path / "clean").loss(x=X, y=Y)
    assert float(again.stdout.strip().splitlines()[-1]) == want
    built = [q for q in root.iterdir() if not q.name.startswith(".")]
    assert len(built) == 1 and (built[0] / "meta.json").is_file()
    assert bp.load(built[0]).loss(x=X, y=Y) == pytest.approx(want, rel=0, abs=1.0)  # loads; fresh init params


# --- checkpoints -------------------------------------------------------------------------------

SAVE_SCRIPT = """
    import io, sys, time
    from pathlib import Path
    import numpy as np
    import bpcompile as bp
    from test_robustness import clf_graph
    ckpt, mark = Path(sys.argv[1]), Path(sys.argv[2])
    model = bp.compile(clf_graph("rb_ckpt"), dtype="float64", optimizer=bp.optim.Adam(lr=1e-2), seed=0)
    for k, v in model.params.items():
        v[...] = 1.0
    model.step = 11
    model.save(ckpt)
    for k, v in model.params.items():
        v[...] = 2.0
    real = np.savez

    def stalled(f, **arrays):  # write half of the new checkpoint, then stop for the kill
        buf = io.BytesIO()
        real(buf, **arrays)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        mark.touch()
        time.sleep(120)

    np.savez = stalled
    model.save(ckpt)
"""


def test_killed_during_save_keeps_the_previous_checkpoint(tmp_path, build_dir):
    ckpt, mark = tmp_path / "model.npz", tmp_path / "saving"
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(SAVE_SCRIPT))
    p = subprocess.Popen([sys.executable, str(script), str(ckpt), str(mark)], env=subprocess_env(), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not mark.exists():
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline
            time.sleep(0.01)
    finally:
        p.kill()
        p.communicate()
    model = bp.compile(clf_graph("rb_ckpt"), dtype="float64", optimizer=bp.optim.Adam(lr=1e-2), seed=5)
    model.load(ckpt)
    assert model.step == 11
    for v in model.params.values():
        assert np.all(v == 1.0)
    model.save(ckpt)  # the leftover temporary file does not get in the way
    model.load(ckpt)


@pytest.fixture(scope="module")
def saved(build_dir, tmp_path_factory):
    model = bp.compile(clf_graph(), dtype="float64", optimizer=bp.optim.Adam(lr=1e-2), seed=0)
    X, Y = data()
    model.train_step(x=X, y=Y)
    path = tmp_path_factory.mktemp("ckpt") / "model.npz"
    model.save(path)
    return model, path


def _expect_checkpoint_error(model, path, *words: str) -> None:
    before = state(model)
    with pytest.raises(bp.CheckpointError) as e:
        model.load(path)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
    assert_same_state(before, state(model))


@pytest.mark.parametrize("other", ["graph", "dtype", "optimizer", "shape"])
def test_checkpoint_of_another_model_is_refused_by_name(saved, other, build_dir, tmp_path):
    _, path = saved
    if other == "graph":
        g = clf_graph("rb_other_graph")
    elif other == "shape":
        g = bp.Graph("rb_clf")
        x = g.input("x", ("batch", 6))
        y = g.input("y", ("batch",), dtype="int32")
        W1 = g.param("W1", (6, 4))
        b1 = g.param("b1", (4,))
        W2 = g.param("W2", (4, 3))
        b2 = g.param("b2", (3,))
        g.loss(bp.softmax_cross_entropy(bp.tanh(x @ W1 + b1) @ W2 + b2, y))
    else:
        g = clf_graph()
    model = bp.compile(g, dtype="float32" if other == "dtype" else "float64",
                       optimizer=bp.optim.SGD(lr=0.1) if other == "optimizer" else bp.optim.Adam(lr=1e-2))
    word = {"graph": "graph", "dtype": "dtype", "optimizer": "state_size", "shape": "params"}[other]
    _expect_checkpoint_error(model, path, word)


def test_truncated_checkpoints_are_refused(saved, tmp_path):
    """Every prefix of a checkpoint (step 97 bytes) is a CheckpointError, never another error."""
    model, path = saved
    blob = path.read_bytes()
    bad = tmp_path / "cut.npz"
    for n in list(range(0, len(blob), 97)) + [len(blob) - 1]:
        bad.write_bytes(blob[:n])
        _expect_checkpoint_error(model, bad)


def test_damaged_checkpoints_are_refused_or_exact(saved, tmp_path):
    """Single bytes flipped anywhere: a CheckpointError, or (a flip in zip padding or metadata
    that does not matter) exactly the saved values."""
    model, path = saved
    blob = bytearray(path.read_bytes())
    want = state(model)
    rng = np.random.default_rng(0)
    bad = tmp_path / "flipped.npz"
    for pos in rng.choice(len(blob), size=60, replace=False):
        damaged = bytearray(blob)
        damaged[pos] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        try:
            model.load(bad)
        except bp.CheckpointError:
            continue
        assert_same_state(want, state(model))
        model.load(path)


@pytest.mark.parametrize("signature", ["not json", "[1, 2]", "5", "null"])
def test_crafted_signature_is_a_checkpoint_error(saved, signature, tmp_path):
    model, path = saved
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["signature"] = np.asarray(signature)
    bad = tmp_path / "crafted.npz"
    np.savez(bad, **arrays)
    _expect_checkpoint_error(model, bad)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('BP_PWNED', '/tmp/bp-pwned')}",))


def test_checkpoints_never_unpickle(saved, tmp_path, monkeypatch):
    model, path = saved
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("BP_PWNED", str(pwned))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["param/W1"] = np.array([_Payload()], dtype=object)
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **arrays)  # numpy pickles object arrays
    _expect_checkpoint_error(model, bad)
    assert not pwned.exists()

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model.load(path)


def test_truncated_parameter_files_are_refused(saved, tmp_path):
    """The exported binary parameter format: every prefix is a CheckpointError."""
    from bpcompile.tools import export
    model, _ = saved
    pf = tmp_path / "params.bin"
    export.write_param_file(pf, dict(model.params))
    blob = pf.read_bytes()
    bad = tmp_path / "cut.bin"
    for n in range(0, len(blob), 3):
        bad.write_bytes(blob[:n])
        if n < 4:
            continue  # too short to carry the magic bytes: read as an npz, refused too
        _expect_checkpoint_error(model, bad)


# --- hostile names -----------------------------------------------------------------------------

HOSTILE = [
    "int", "return", "float", "main", "NULL", "bp_real", "dims", "ws", "ws_off", "params", "grads", "inputs",
    "outputs", "hyper", "state", "i0", "in0", "out0", "t1", "x0",
    'quote"d', "apo'strophe", "back\\slash", "trailing\\", "two words", "new\nline #error injected",
    "close */ int injected_a = 1; /*", "open /* comment", "line // comment", "trigraph ??/", "percent %s %n",
    "a-b", "a b", "a_b", "a.b", "a_b_2", "1starts_with_digit", "__reserved", "π", "emoji 🙂", "x" * 200,
]


def test_hostile_names_compile_to_distinct_identifiers_and_work(build_dir, tmp_path):
    """Parameters, inputs, outputs, losses, runtime dims, a custom function and the graph named
    with everything above: compiled with -Werror, no injected code, every name round-trips, and
    loss and gradients equal the reference interpreter."""
    import sympy as sp
    g = bp.Graph('graph */ #error injected "name"\n')
    x = g.input(HOSTILE[0], ("batch // size\n#error", 3))  # '*' is refused in dim names (products)
    inputs = {HOSTILE[0]: np.random.default_rng(0).normal(size=(4, 3))}
    z = sp.Symbol("z */ #error")
    weird = bp.elementwise("fn */ #error injected\n", z * sp.tanh(z), z)
    h = x
    rng = np.random.default_rng(1)
    for i, name in enumerate(HOSTILE[1:]):
        p = g.param(name, (3,), init=rng.normal(size=3))
        h = weird(h * p) if i % 7 == 0 else h + p * 0.1
    g.output("out */ #error", h)
    g.output("out\n2", bp.sum(h, axis=1))
    other = g.input("batch", ("batch-size", 2))  # a second runtime dim whose C name collides
    inputs["batch"] = rng.normal(size=(5, 2))
    g.loss(bp.mean(bp.square(h)), name="loss */ #error")
    g.loss(bp.mean(bp.square(h)) + bp.mean(other), name="loss-a")
    g.loss(bp.mean(h), name="loss a")
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1))
    from bpcompile.codegen.module import runtime_c
    generated = model.c_source.replace(runtime_c(), "")  # the runtime's own #error lines are not the model's
    code = re.sub(r"/\*.*?\*/", " ", generated, flags=re.S)
    assert "#error" not in code and not re.search(r"\binjected_a\s*=", code)  # only inside identifiers
    assert set(model.params) == set(HOSTILE[1:])
    out = model.forward(**inputs)
    assert set(out) == {"out */ #error", "out\n2"}
    for lname in ("loss */ #error", "loss-a", "loss a"):
        value, grads = model.loss_and_grad(loss=lname, **inputs)
        ref_value, ref_grads = bp.reference.loss_and_grad(g, inputs, model.params, loss=lname)
        assert value == pytest.approx(ref_value, rel=1e-12)
        for k in ref_grads:
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)
        model.train_step(loss=lname, **inputs)
    ckpt = tmp_path / "hostile.npz"
    model.save(ckpt)
    again = bp.load(model.build_path)
    again.load(ckpt)
    for k in model.params:
        np.testing.assert_array_equal(again.params[k], model.params[k])


@pytest.mark.parametrize("name", ["lr", "loss", "data", "batch_size"])
def test_input_named_like_a_call_parameter(name, build_dir):
    g = bp.Graph("rb_reserved")
    x = g.input("x", ("batch", 2))
    try:
        t = g.input(name, ("batch", 2))
    except ValueError as e:  # a clear refusal at graph build time is a fix too
        assert name in str(e)
        return
    p = g.param("p", (2,), init=np.ones(2))
    g.output("y", x * p)
    g.loss(bp.mean(bp.square(x * p - t)))
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1))
    X = np.ones((3, 2))
    feed = {"x": X, name: 2 * X}
    assert model.loss(**feed) == pytest.approx(1.0)
    assert model.train_step(**feed) == pytest.approx(1.0)
    np.testing.assert_array_equal(model.predict(**feed)["y"], model.forward(**feed)["y"])


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reference_of_a_loss_that_folds_to_a_constant(build_dir, reduce):
    """x*w - x*w folds to a constant of shape (batch, 2): the NumPy reference reads the batch size
    off the given input, as the compiled model does."""
    g = bp.Graph(f"folded_{reduce}")
    x = g.input("x", ("batch", 2))
    w = g.param("w", (2,), init="ones")
    g.loss(getattr(bp, reduce)(x * w - x * w + 1.5))
    model = bp.compile(g, "float64")
    data = np.ones((3, 2))
    (reference,) = bp.evaluate([g.losses["loss"].node], {"x": data}, {"w": model.params["w"]})
    assert float(reference) == model.loss(x=data) == (1.5 if reduce == "mean" else 9.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_integer_constants_beyond_64_bits_are_printed_as_floats(build_dir, dtype):
    """10**20 as a C integer literal is truncated by gcc (to 7.77e18); printed as a float it is exact."""
    import sympy as sp

    a = sp.Symbol("a")
    g = bp.Graph(f"big_constant_{dtype}")
    x = g.input("x", ("batch", 2))
    g.output("y", bp.elementwise("big", a * 10**20 - 3 * 2**40 + 7, a)(x))
    model = bp.compile(g, dtype)
    data = np.array([[1.0, -2.0]])
    expected = data * 1e20 - 3 * 2**40 + 7
    np.testing.assert_allclose(model.forward(x=data)["y"], expected, rtol=1e-6 if dtype == "float32" else 1e-15)


@pytest.mark.parametrize("step", [np.nan, np.inf, -1.0, 2.5, 2.0**60])
def test_a_checkpoint_with_a_bad_step_changes_nothing(build_dir, tmp_path, step):
    model = bp.compile(_small_adam_graph(), "float64", optimizer=bp.optim.Adam(lr=0.01), seed=1)
    model.train_step(x=np.ones((2, 3)))
    model.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as data:
        files = {k: data[k] for k in data.files}
    files["step"] = np.asarray(step)
    np.savez(tmp_path / "bad.npz", **files)
    other = bp.compile(_small_adam_graph(), "float64", optimizer=bp.optim.Adam(lr=0.01), seed=2)
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(bp.CheckpointError, match="'step' holds"):
        other.load(tmp_path / "bad.npz")
    assert other.step == 0
    for k, v in other.params.items():
        np.testing.assert_array_equal(v, before[k])


def _small_adam_graph() -> bp.Graph:
    g = bp.Graph("small_adam")
    x = g.input("x", ("batch", 3))
    w = g.param("w", (3, 2), init="normal")
    g.loss(bp.mean(bp.square(x @ w)))
    return g


def test_many_batch_sizes_keep_a_few_arenas(build_dir):
    """400 batch sizes once held 400 arenas; a thread now keeps those of its last few shapes."""
    import gc

    from bpcompile.runtime.model import ARENAS_KEPT
    model = bp.compile(_small_adam_graph(), "float64", optimizer=bp.optim.SGD(lr=0.01))
    for n in range(1, 41):
        model.loss(x=np.ones((n, 3)))
        model.train_step(x=np.ones((n, 3)))
    assert list(model._tls.arenas) == [(n,) for n in range(41 - ARENAS_KEPT, 41)]
    gc.collect()
    alive = {id(a) for a in model._tls.arenas.values()} | {id(f.arena) for f in model._tls.frames.values()}
    assert len(alive) <= ARENAS_KEPT + len(model._tls.frames)
    model.train_step(x=np.ones((40, 3)))  # a kept shape reuses its arena
    assert model._tls.frames["train_loss"].arena is model._tls.arenas[(40,)]


def test_save_while_another_thread_trains_is_one_step(build_dir, tmp_path):
    """Every saved file holds the parameters of exactly the step it records."""
    import threading

    model = bp.compile(_small_adam_graph(), "float64", optimizer=bp.optim.SGD(lr=0.01), seed=3)
    x = np.random.default_rng(0).normal(size=(4, 3))
    replay = bp.compile(_small_adam_graph(), "float64", optimizer=bp.optim.SGD(lr=0.01), seed=3)
    history = {0: replay.params["w"].copy()}
    for step in range(1, 301):
        replay.train_step(x=x)
        history[step] = replay.params["w"].copy()
    done = threading.Event()

    def train():
        for _ in range(300):
            model.train_step(x=x)
        done.set()

    worker = threading.Thread(target=train)
    worker.start()
    checked = 0
    while not done.is_set() or checked == 0:
        model.save(tmp_path / "live.npz")
        with np.load(tmp_path / "live.npz") as data:
            np.testing.assert_array_equal(data["param/w"], history[int(data["step"])])
        checked += 1
    worker.join()


# --- damaged build caches and meta.json ---------------------------------------------------------

def _module_file(folder: Path) -> Path:
    (module,) = folder.glob("*.so")
    return module


def _edit_meta(change):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        change(meta)
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return damage


def _flip_middle_byte(folder: Path) -> None:
    data = bytearray(_module_file(folder).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _module_file(folder).write_bytes(data)


def _empty_buffers(meta: dict) -> None:
    for spec in meta["entries"].values():
        spec["buffers"] = []


# case -> (what it does to a build folder of an Adam model, words the refusal must hold)
DAMAGE = {
    "truncated module": (lambda f: _module_file(f).write_bytes(_module_file(f).read_bytes()[:20000]),
                         ["size mismatch", ".so"]),
    "flipped byte in module": (_flip_middle_byte, ["hash mismatch", ".so"]),
    "deleted module": (lambda f: _module_file(f).unlink(), [".so is missing"]),
    "state_size 0": (_edit_meta(lambda m: m.update(state_size=0)), ["field 'state_size' is 0", "built with"]),
    "emptied buffers": (_edit_meta(_empty_buffers), [".buffers' is []", "built with"]),
    "invalid JSON": (lambda f: (f / "meta.json").write_bytes((f / "meta.json").read_bytes()[:100]), ["not valid JSON"]),
    "missing key": (_edit_meta(lambda m: m.pop("param_size")), ["no field 'param_size'"]),
    "ill-typed key": (_edit_meta(lambda m: m.update(state_size=str(m["state_size"]))),
                      ["field 'state_size' is", "not an integer"]),
    "meta.json deleted": (lambda f: (f / "meta.json").unlink(), ["no meta.json"]),
    # a build copied from elsewhere: meta.json and the module's record agree, the machine does not
    # (load refuses from meta.json alone, before the module runs, so the edit stands for both)
    "built for a CPU feature this one lacks": (_edit_meta(lambda m: m["target"]["cpu_features"].append("bp_avx9")),
                                              ["-march=native", "bp_avx9", "lacks it", "illegal instruction"]),
    "built for another Python": (_edit_meta(lambda m: m["target"].update(python="cpython-27")),
                                 ["Python implementation 'cpython-27'", f"'{sys.implementation.cache_tag}'"]),
    "built for another architecture": (_edit_meta(lambda m: m["target"].update(machine="riscv64")),
                                       ["machine architecture 'riscv64'", f"'{platform.machine()}'"]),
    "ill-typed target": (_edit_meta(lambda m: m["target"].update(cpu_features="avx2")),
                         ["'target.cpu_features' is \"avx2\"", "not a list"]),
}

DAMAGED_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import bpcompile as bp
    from bpcompile.build import cffi_build as build
    from test_robustness import DAMAGE, clf_graph, data
    case, root = sys.argv[1], Path(sys.argv[2])
    g, adam = clf_graph("rb_cache"), bp.optim.Adam(lr=0.01)
    folder = build.build(bp.lower(g, "float64", adam).sources, root)  # the cached build (not loaded)
    DAMAGE[case][0](folder)
    X, Y = data()
    try:
        model = bp.load(folder)
        model.train_step(x=X, y=Y)  # a build that is not refused may crash or corrupt the heap here
        model.train_step(x=X, y=Y)
        refused = None
    except bp.CompileError as e:
        refused = str(e)
    model = bp.compile(g, "float64", optimizer=adam, seed=0, build_dir=root)  # must rebuild it in place
    losses = [model.train_step(x=X, y=Y) for _ in range(2)]
    again = bp.load(folder)
    print(json.dumps({"folder": str(folder), "refused": refused, "path": str(model.build_path), "losses": losses,
                      "again": again.loss(x=X, y=Y), "left": sorted(p.name for p in root.iterdir())}))
""")


@pytest.fixture(scope="module")
def cached_adam(tmp_path_factory):
    """A build folder of an Adam model to copy (the damaged cases then need no first compile),
    and the losses of its first two steps from seed 0."""
    root = tmp_path_factory.mktemp("rb_cache")
    model = bp.compile(clf_graph("rb_cache"), "float64", optimizer=bp.optim.Adam(lr=0.01), seed=0, build_dir=root)
    X, Y = data()
    return model.build_path, [model.train_step(x=X, y=Y) for _ in range(2)]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_build_is_refused_by_load_and_rebuilt_by_compile(case, cached_adam, tmp_path):
    pristine, losses = cached_adam
    root = tmp_path / "cache"
    root.mkdir()
    shutil.copytree(pristine, root / pristine.name)
    script = tmp_path / "damaged.py"
    script.write_text(DAMAGED_SCRIPT)
    p = subprocess.run([sys.executable, str(script), case, str(root)], env=subprocess_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode} (< 0: killed by that signal)\n{p.stderr[-3000:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["refused"] is not None, "bp.load accepted the damaged build"
    for words in [res["folder"], "recompile", *DAMAGE[case][1]]:
        assert words in res["refused"], (words, res["refused"])
    assert res["path"] == res["folder"], "bp.compile did not rebuild the damaged folder in place"
    assert res["losses"] == losses
    assert np.isfinite(res["again"])
    assert Path(res["folder"]).name in res["left"]
    assert not [n for n in res["left"] if n.startswith((".tmp-", ".old-"))], res["left"]  # nothing left over


def test_a_dim_name_that_could_close_a_c_comment_is_refused():
    g = bp.Graph("rb_star_dim")
    with pytest.raises(bp.ShapeError, match=r"dimension 'batch \*/ size' .* must be a plain name"):
        g.input("x", ("batch */ size", 3))
