"""The per-thread call frame (runtime.native.Frame): what its cheap re-check of the last call's
arrays must still catch, and when a frame is reused rather than rebuilt.

A frame points the native call at the arrays of the last call; the next call with the same
array objects checks only their dtype, shape and strides. These tests change an array in place
between calls (each a way its memory can be seen differently under the same object) and
expect the result a fresh array would give; inputs that need converting reuse the frame while
the runtime sizes stay the same; a step refused by the native call leaves the step count and
the training lock as they were.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_robustness import clf_graph, data

import bpcompile as bp


@pytest.fixture(scope="module")
def clf(build_dir):
    return bp.compile(clf_graph("cf_clf"), dtype="float32", optimizer=bp.optim.SGD(lr=0.1), seed=0)


def logits(model, x) -> np.ndarray:
    return model.forward(x=x)["logits"]


def test_an_array_reshaped_in_place_is_checked_again(clf):
    X = data(6)[0].astype(np.float32)  # (6, 6)
    want = logits(clf, X.copy())
    a = X.copy()
    np.testing.assert_array_equal(logits(clf, a), want)
    a.shape = (4, 9)  # the same object, now the wrong shape
    with pytest.raises(bp.InputError, match="axis 1 is 9"):
        logits(clf, a)
    a.shape = (6, 6)
    np.testing.assert_array_equal(logits(clf, a), want)
    a[0, 0] += 1  # new values in the same memory: read again, nothing cached
    assert not np.array_equal(logits(clf, a)[0], want[0])
    np.testing.assert_array_equal(logits(clf, a)[1:], want[1:])


def test_an_array_given_another_dtype_in_place_is_converted(clf):
    ints = np.arange(-18, 18, dtype=np.int32).reshape(6, 6)
    a = ints.view(np.float32).copy()  # float32 bytes that are the int32 values
    logits(clf, a)  # binds the frame to `a` as float32
    a.dtype = np.int32  # the same object and buffer, now read as int32
    np.testing.assert_array_equal(logits(clf, a), logits(clf, ints.astype(np.float32)))


def test_an_array_given_other_strides_in_place_is_converted(clf):
    X = data(5)[0].astype(np.float32)
    buf = np.zeros(5 * 12, np.float32)
    buf.reshape(5, 12)[:, ::2] = X  # every other element of buf holds X
    a = buf[:30].reshape(5, 6)  # contiguous: another matrix until its strides change
    assert not np.array_equal(a, X)
    logits(clf, a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy >= 2.4 deprecates setting strides
        a.strides = (48, 8)
    assert not a.flags.c_contiguous
    np.testing.assert_array_equal(a, X)
    np.testing.assert_array_equal(logits(clf, a), logits(clf, X))


def test_converted_inputs_reuse_the_frame_while_the_sizes_stay(clf):
    X, Y = data(7)
    want = logits(clf, X.astype(np.float32))
    np.testing.assert_array_equal(logits(clf, X), want)  # float64 converted to float32
    frame = clf._tls.frames["forward"]
    for v in (X, np.asfortranarray(X), X.tolist()):
        np.testing.assert_array_equal(logits(clf, v), want)
        assert clf._tls.frames["forward"] is frame
    logits(clf, X[:3])  # another batch size: another frame
    assert clf._tls.frames["forward"] is not frame
    assert clf._tls.frames["forward"].dims != frame.dims


def test_converted_inputs_train_as_clean_ones(build_dir):
    X, Y = data(8)
    a = bp.compile(clf_graph("cf_clf"), dtype="float32", optimizer=bp.optim.SGD(lr=0.1), seed=0)
    b = bp.compile(clf_graph("cf_clf"), dtype="float32", optimizer=bp.optim.SGD(lr=0.1), seed=0)
    X32, Y64 = X.astype(np.float32), Y.astype(np.int64)
    for _ in range(3):
        assert a.train_step(x=X, y=Y64) == b.train_step(x=X32, y=Y)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_a_refused_step_leaves_the_count_and_the_lock(clf):
    X, Y = data(5)
    X = X.astype(np.float32)
    clf.train_step(x=X, y=Y)
    step, params = clf.step, {k: v.copy() for k, v in clf.params.items()}
    bad = np.array([0, 1, 7, 1, 0], np.int32)  # the same signature as the last call: the fast path
    with pytest.raises(bp.InputError, match="labels must be class indices"):
        clf.train_step(x=X, y=bad)
    assert clf.step == step and clf.loss_steps["loss"] == step
    assert not clf._train_lock.locked()
    for k, v in params.items():
        np.testing.assert_array_equal(clf.params[k], v)
    clf.train_step(x=X, y=Y)
    assert clf.step == step + 1


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.uint64])
def test_labels_beyond_int32_are_refused(clf, dtype):
    X, Y = data(5)
    big = Y.astype(dtype)
    big[2] = 2**31  # one past int32's range, only in a type wider than int32
    with pytest.raises(bp.InputError, match="do not fit in int32"):
        clf.loss(x=X, y=big)
    if np.dtype(dtype).kind == "i":
        big[2] = -2**31 - 1
        with pytest.raises(bp.InputError, match="do not fit in int32"):
            clf.loss(x=X, y=big)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, bool])
def test_labels_of_any_integer_type_that_fit_give_the_int32_result(clf, dtype):
    X, Y = data(5)
    Y = Y.clip(0, 1)  # 0 and 1: valid in every listed type, bool included
    assert clf.loss(x=X, y=Y.astype(dtype)) == clf.loss(x=X, y=Y)
