"""backward + apply_gradients (the train step in two native calls) == train_step, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import bpcompile as bp


def _graph(name: str) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 5))
    y = g.input("y", ("batch",), dtype="int32")
    w1 = g.param("W1", (5, 6), init="he_normal")
    gamma, beta = g.param("gamma", (6,), init="ones"), g.param("beta", (6,))
    w2 = g.param("W2", (6, 3), init="glorot_uniform")
    h = bp.dropout(bp.relu(bp.batch_norm(x @ w1, gamma, beta)), 0.3)
    logits = h @ w2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


@pytest.mark.parametrize("optimizer", [
    bp.optim.SGD(lr=bp.schedules.StepDecay(0.1, 2, 0.5), momentum=0.9, weight_decay=1e-3),
    bp.optim.Adam(lr=bp.schedules.Cosine(0.01, 6), clip_norm=0.05),
], ids=["sgd-momentum", "adam-clip"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_then_apply_gradients_equals_train_step(tmp_path, optimizer, dtype):
    g = _graph("split_step")
    one = bp.compile(g, dtype, optimizer=optimizer, seed=3, build_dir=tmp_path)
    two = bp.compile(g, dtype, optimizer=optimizer, seed=3, build_dir=tmp_path)
    rng = np.random.default_rng(0)
    for _ in range(6):
        x, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
        expected = one.train_step(x=x, y=y)
        assert two.backward(x=x, y=y) == expected
        assert two.step == one.step - 1
        two.apply_gradients()
        assert two.step == one.step
    for name in one.params:  # weights, batch-norm running statistics: all bit-equal
        np.testing.assert_array_equal(two.params[name], one.params[name], err_msg=name)


def test_backward_writes_the_gradient_buffer(tmp_path):
    model = bp.compile(_graph("split_grads"), "float64", optimizer=bp.optim.SGD(lr=0.5), build_dir=tmp_path)
    x, y = np.random.default_rng(1).normal(size=(4, 5)), np.array([0, 1, 2, 0])
    model.backward(x=x, y=y)
    before = {k: v.copy() for k, v in model.params.items()}
    grads = {k: model.grads[k].copy() for k in ("W1", "W2")}
    model.grads["W2"][...] *= 2  # changed in place between the two calls: the update sees it
    model.apply_gradients(lr=0.25)
    np.testing.assert_allclose(model.params["W1"], before["W1"] - 0.25 * grads["W1"], rtol=1e-14)
    np.testing.assert_allclose(model.params["W2"], before["W2"] - 0.5 * grads["W2"], rtol=1e-14)


def test_named_losses_update_only_their_params(tmp_path):
    g = bp.Graph("split_gan")
    x = g.input("x", ("batch", 3))
    a, b = g.param("a", (3, 2), init="normal"), g.param("b", (2,), init="normal")
    out = x @ a + b
    g.loss(bp.mean(bp.square(out)), name="d", params=["a"])
    g.loss(bp.mean(out), name="g", params=["b"])
    one = bp.compile(g, "float64", optimizer=bp.optim.Adam(lr=0.1), build_dir=tmp_path)
    two = bp.compile(g, "float64", optimizer=bp.optim.Adam(lr=0.1), build_dir=tmp_path)
    x = np.random.default_rng(2).normal(size=(4, 3))
    for loss in ("d", "g", "d"):
        one.train_step(loss=loss, x=x)
        two.backward(loss=loss, x=x)
        two.apply_gradients(loss=loss)
    for name in one.params:
        np.testing.assert_array_equal(two.params[name], one.params[name], err_msg=name)


def test_without_optimizer_is_a_clear_error(tmp_path):
    g = bp.Graph("split_none")
    x = g.input("x", ("batch", 2))
    g.output("y", x * 2.0)
    model = bp.compile(g, build_dir=tmp_path)
    with pytest.raises(bp.InputError, match="declares no loss"):
        model.apply_gradients()
