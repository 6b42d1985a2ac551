"""bpcompile's one gradient checker (bpcompile/tools/gradcheck.py), behind `bpcompile check`, the
tests and the random-graph fuzzer: its inputs are drawn as asked, and it catches a wrong gradient."""

from __future__ import annotations

import numpy as np
import pytest

import bpcompile as bp
from bpcompile.tools import cli, gradcheck


def _graph() -> bp.Graph:
    g = bp.Graph("gradcheck")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("batch",), dtype="int32")
    w = g.param("w", (3, 4), init="normal")
    g.loss(bp.softmax_cross_entropy(bp.tanh(x @ w), y))
    return g


def test_inputs_are_drawn_as_each_kind_says():
    rng = np.random.default_rng(0)
    shapes = {"a": ("n", 2), "b": (5,), "c": ("n",), "d": (3, "n")}
    kinds = {"a": ("labels", 3), "b": ("positive",), "c": ("unit",), "d": ("normal",)}
    out = gradcheck.random_inputs(shapes, kinds, {"n": 40}, rng, np.float32)
    assert {k: v.shape for k, v in out.items()} == {"a": (40, 2), "b": (5,), "c": (40,), "d": (3, 40)}
    assert out["a"].dtype == np.int32 and set(np.unique(out["a"])) == {0, 1, 2}
    assert out["b"].dtype == np.float32 and out["b"].min() >= 0.5 and out["b"].max() < 2.0
    assert out["c"].min() >= 0.0 and out["c"].max() < 1.0
    assert out["d"].dtype == np.float32 and out["d"].min() < 0 < out["d"].max()
    with pytest.raises(ValueError, match="unknown input kind .*expected normal, positive, unit or labels"):
        gradcheck.random_array((2,), ("uniform",), rng, np.float64)


def test_the_cli_and_the_tests_draw_the_same_inputs_from_a_seed():
    g = _graph()
    meta = [{"name": "x", "shape": ["batch", 3], "dtype": "float"},
            {"name": "y", "shape": ["batch"], "dtype": "int32", "classes": 4}]
    from_cli = cli.random_inputs(meta, {"batch": 6}, np.random.default_rng(3), np.float64)
    from_tests = gradcheck.graph_inputs(g, 6, np.random.default_rng(3), classes={"y": 4})
    assert from_cli.keys() == from_tests.keys()
    for k in from_cli:
        np.testing.assert_array_equal(from_cli[k], from_tests[k])


def test_a_wrong_gradient_is_caught_and_the_parameters_restored(build_dir):
    g = _graph()
    model = bp.compile(g, "float64", optimizer=None, seed=1, build_dir=build_dir)
    inputs = gradcheck.graph_inputs(g, 5, np.random.default_rng(0), classes={"y": 4})
    before = model.params["w"].copy()
    grads = gradcheck.check_model_gradients(model, g, inputs)
    np.testing.assert_array_equal(model.params["w"], before)
    err, checked = gradcheck.fd_errors(model, "loss", inputs, "w", grads["w"], np.random.default_rng(1), 4, 1e-6, 1e-12)
    assert err < 1e-6 and checked == "4 + 1 dir."
    wrong = grads["w"].copy()
    wrong[0, 0] += 0.1 * max(1.0, abs(wrong[0, 0]))
    err, _ = gradcheck.fd_errors(model, "loss", inputs, "w", wrong, np.random.default_rng(1), 12, 1e-6, 1e-12)
    assert err > 1e-3
    np.testing.assert_array_equal(model.params["w"], before)
    true_loss_and_grad = model.loss_and_grad

    def one_percent_off(**kwargs):
        value, gs = true_loss_and_grad(**kwargs)
        return value, {k: 1.01 * a for k, a in gs.items()}

    model.loss_and_grad = one_percent_off
    with pytest.raises(AssertionError, match="gradient of w"):
        gradcheck.check_model_gradients(model, g, inputs)
