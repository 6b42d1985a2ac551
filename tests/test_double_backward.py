"""Gradients of gradients through every op of the gradient tables (tests/test_op_gradients.py,
tests/test_nn_ops.py): the loss is a gradient penalty, 0.5 * sum of every squared gradient of
the table's loss, so its gradient is the table loss's Hessian times its gradient and goes through
each op's VJP rule differentiated again. Checked against the NumPy reference and central finite
differences of the penalty (itself computed from the first derivatives). Ops that have no
second-derivative rule must refuse with a CompileError naming the op, never crash."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import test_nn_ops
import test_op_gradients
from gradcheck import check_model_gradients

import bpcompile as bp

# The VJPs of these ops are fused kernels with no rule of their own: differentiating them again is
# refused with a CompileError that says so (row name prefix -> the op named).
NO_SECOND_DERIVATIVE = {"lstm": "lstm_grad", "gru": "gru_grad", "rnn": "rnn_grad", "layer_norm": "layer_norm_grad",
                        "max_pool": "max_pool2d_grad"}


def _with_penalty(graph: bp.Graph) -> bp.Graph:
    loss = graph.losses["loss"].node
    params = [graph.params[n] for n in graph.trained_params("loss")]
    grads = [g for g in bp.grad(loss, params) if g is not None]
    graph.loss(0.5 * sum(bp.sum(g * g) for g in grads), name="penalty")
    return graph


def _check(graph: bp.Graph, inputs: dict, row_name: str) -> None:
    refused = next((op for prefix, op in NO_SECOND_DERIVATIVE.items() if row_name.startswith(prefix)), None)
    if refused is not None:
        with pytest.raises(bp.CompileError, match=rf"{refused}\w* \(from .*has no second-derivative rule"):
            _with_penalty(graph)
            bp.compile(graph, dtype="float64", seed=0)
        return
    model = bp.compile(_with_penalty(graph), dtype="float64", seed=0)
    check_model_gradients(model, graph, inputs, loss="penalty", fd_tol=2e-6)


@pytest.mark.parametrize("row", test_op_gradients.ROWS, ids=lambda r: r.name)
def test_gradient_of_gradient_of_op(row, build_dir) -> None:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()))
    graph, inputs = test_op_gradients.build(row, 3, rng)
    _check(graph, inputs, row.name)


@pytest.mark.parametrize("row", test_nn_ops.ROWS, ids=lambda r: r.name)
def test_gradient_of_gradient_of_layer_op(row, build_dir) -> None:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()))
    graph, inputs = test_nn_ops.build(row, rng)
    _check(graph, inputs, row.name)


def test_cross_entropy_and_embedding_double_backward_match_torch(build_dir) -> None:
    """An input-gradient penalty on an embedding -> tanh -> linear -> cross-entropy classifier,
    against torch's double backward (autograd.grad with create_graph=True)."""
    torch = pytest.importorskip("torch", reason="the torch cross-check needs the [torch] extra")
    rng = np.random.default_rng(5)
    table0, W0 = rng.normal(size=(6, 4)), rng.normal(size=(4, 3))
    ids, labels = rng.integers(0, 6, size=(5,)).astype(np.int32), rng.integers(0, 3, size=(5,)).astype(np.int32)
    g = bp.Graph("ce_double_backward")
    ids_in, y = g.input("ids", ("batch",), dtype="int32"), g.input("y", ("batch",), dtype="int32")
    table, W = g.param("table", (6, 4), init=table0), g.param("W", (4, 3), init=W0)
    loss = bp.softmax_cross_entropy(bp.tanh(bp.embedding(ids_in, table)) @ W, y)
    d_table, d_W = bp.grad(loss, [table, W])
    g.loss(loss + bp.sum(d_table * d_table) + 0.5 * bp.sum(d_W * d_W))
    model = bp.compile(g, dtype="float64")
    value, grads = model.loss_and_grad(ids=ids, y=labels)

    t_table = torch.tensor(table0, requires_grad=True)
    t_W = torch.tensor(W0, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(torch.tanh(t_table[torch.tensor(ids).long()]) @ t_W,
                                               torch.tensor(labels).long())
    gt, gw = torch.autograd.grad(t_loss, [t_table, t_W], create_graph=True)
    total = t_loss + (gt * gt).sum() + 0.5 * (gw * gw).sum()
    want = torch.autograd.grad(total, [t_table, t_W])
    total = total.detach()
    assert value == pytest.approx(total.item(), rel=1e-12)
    np.testing.assert_allclose(grads["table"], want[0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["W"], want[1].numpy(), rtol=1e-10, atol=1e-12)
