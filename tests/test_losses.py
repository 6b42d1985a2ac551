"""Losses as torch.nn.functional defines them: nll_loss, reduction="mean" | "sum" on every loss,
label_smoothing on softmax_cross_entropy. Values and gradients against torch (float64, rtol
1e-9), against the NumPy reference and central finite differences; second derivatives through
nll_loss and the summed losses against torch's double backward."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_model_gradients

import bpcompile as bp

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
F = torch.nn.functional

REDUCTIONS = ["mean", "sum"]
SMOOTHING = [0.0, 0.1, 0.35]
CLASSES = 3


def _batch_losses() -> dict[str, tuple]:
    """name -> (bp loss of (z, inputs), torch loss of (z, inputs)) for logits z (batch, 3)."""
    long = lambda a: a.long()  # noqa: E731
    losses = {}
    for red in REDUCTIONS:
        losses[f"mse_{red}"] = (lambda z, i, r=red: bp.mse(z, i["t"], reduction=r),
                                lambda z, i, r=red: F.mse_loss(z, i["t"], reduction=r))
        losses[f"bce_{red}"] = (lambda z, i, r=red: bp.binary_cross_entropy_with_logits(z, i["p"], reduction=r),
                                lambda z, i, r=red: F.binary_cross_entropy_with_logits(z, i["p"], reduction=r))
        losses[f"nll_{red}"] = (lambda z, i, r=red: bp.nll_loss(bp.log_softmax(z), i["y"], reduction=r),
                                lambda z, i, r=red: F.nll_loss(F.log_softmax(z, -1), long(i["y"]), reduction=r))
        losses[f"nll_raw_{red}"] = (lambda z, i, r=red: bp.nll_loss(z, i["y"], reduction=r),
                                    lambda z, i, r=red: F.nll_loss(z, long(i["y"]), reduction=r))
        for eps in SMOOTHING:
            losses[f"ce_{red}_{eps}"] = (
                lambda z, i, r=red, e=eps: bp.softmax_cross_entropy(z, i["y"], reduction=r, label_smoothing=e),
                lambda z, i, r=red, e=eps: F.cross_entropy(z, long(i["y"]), reduction=r, label_smoothing=e))
    return losses


BATCH_LOSSES = _batch_losses()


def _batch_graph() -> bp.Graph:
    g = bp.Graph("loss_batch")
    x = g.input("x", ("batch", 4))
    inputs = {"y": g.input("y", ("batch",), dtype="int32"), "t": g.input("t", ("batch", CLASSES)),
              "p": g.input("p", ("batch", CLASSES))}
    W = g.param("W", (4, CLASSES), init="normal")
    b = g.param("b", (CLASSES,), init="normal")
    z = 2.0 * (x @ W + b)
    for name, (make, _) in BATCH_LOSSES.items():
        g.loss(make(z, inputs), name=name)
    return g


def _batch_inputs(n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4)), "y": rng.integers(0, CLASSES, n).astype(np.int32),
            "t": rng.normal(size=(n, CLASSES)), "p": rng.uniform(size=(n, CLASSES))}


@pytest.fixture(scope="module")
def batch_model(build_dir):
    graph = _batch_graph()
    return graph, bp.compile(graph, dtype="float64", optimizer=None, seed=1)


def _torch_loss_and_grads(model, torch_loss, inputs):
    W = torch.tensor(model.params["W"], requires_grad=True)
    b = torch.tensor(model.params["b"], requires_grad=True)
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    value = torch_loss(2.0 * (tensors["x"] @ W + b), tensors)
    value.backward()
    return value.item(), {"W": W.grad.numpy(), "b": b.grad.numpy()}


@pytest.mark.parametrize("name", list(BATCH_LOSSES))
def test_loss_and_gradients_equal_torch(batch_model, name):
    _, model = batch_model
    inputs = _batch_inputs()
    value, grads = model.loss_and_grad(loss=name, **inputs)
    want, want_grads = _torch_loss_and_grads(model, BATCH_LOSSES[name][1], inputs)
    np.testing.assert_allclose(value, want, rtol=1e-9)
    for k in ("W", "b"):
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-9, err_msg=k)
    # the evaluation-mode entry computes the same loss
    np.testing.assert_allclose(model.loss(loss=name, training=False, **inputs), want, rtol=1e-9)


@pytest.mark.parametrize("name", list(BATCH_LOSSES))
def test_gradients_match_reference_and_finite_differences(batch_model, name):
    graph, model = batch_model
    check_model_gradients(model, graph, _batch_inputs(n=5, seed=3), loss=name)


def test_sum_is_the_mean_times_the_rows_for_any_batch(batch_model):
    _, model = batch_model
    for n in (1, 4, 9):
        inputs = _batch_inputs(n=n, seed=n)
        for kind in ("mse", "bce", "nll", "ce_{}_0.1"):
            mean_name = kind.format("mean") if "{" in kind else f"{kind}_mean"
            sum_name = kind.format("sum") if "{" in kind else f"{kind}_sum"
            elements = n * CLASSES if kind in ("mse", "bce") else n
            np.testing.assert_allclose(model.loss(loss=sum_name, **inputs),
                                       elements * model.loss(loss=mean_name, **inputs), rtol=1e-12)


# --- labels along several axes: (batch, time, classes) --------------------------------------------

def _sequence_graph() -> bp.Graph:
    g = bp.Graph("loss_seq")
    x = g.input("x", ("batch", 2, 5))
    y = g.input("y", ("batch", 2), dtype="int32")
    W = g.param("W", (2, 5), init="normal")
    z = x * W
    for red in REDUCTIONS:
        g.loss(bp.nll_loss(bp.log_softmax(z), y, reduction=red), name=f"nll_{red}")
        g.loss(bp.softmax_cross_entropy(z, y, reduction=red, label_smoothing=0.2), name=f"ce_{red}")
    return g


@pytest.mark.parametrize("red", REDUCTIONS)
def test_labels_over_batch_and_time_equal_torch(build_dir, red):
    graph = _sequence_graph()
    model = bp.compile(graph, dtype="float64", optimizer=None, seed=2)
    rng = np.random.default_rng(4)
    inputs = {"x": rng.normal(size=(3, 2, 5)), "y": rng.integers(0, 5, (3, 2)).astype(np.int32)}
    torch_losses = {
        "nll": lambda z, y: F.nll_loss(F.log_softmax(z, -1).permute(0, 2, 1), y, reduction=red),
        "ce": lambda z, y: F.cross_entropy(z.permute(0, 2, 1), y, reduction=red, label_smoothing=0.2),
    }
    for kind, torch_loss in torch_losses.items():
        value, grads = model.loss_and_grad(loss=f"{kind}_{red}", **inputs)
        W = torch.tensor(model.params["W"], requires_grad=True)
        want = torch_loss(torch.tensor(inputs["x"]) * W, torch.tensor(inputs["y"]).long())
        want.backward()
        np.testing.assert_allclose(value, want.item(), rtol=1e-9, err_msg=kind)
        np.testing.assert_allclose(grads["W"], W.grad.numpy(), rtol=1e-9, err_msg=kind)
        check_model_gradients(model, graph, inputs, loss=f"{kind}_{red}")


# --- nll_loss -------------------------------------------------------------------------------------

def test_nll_loss_gradient_is_exactly_the_one_hot(build_dir):
    """d nll / d log_probs is -one_hot(label) (/ rows for the mean), exactly: no rounding residue
    where the gradient is zero."""
    g = bp.Graph("nll_exact")
    rng = np.random.default_rng(5)
    P = g.param("P", (4, 6), init=rng.normal(size=(4, 6)) * 30)
    y = g.input("y", (4,), dtype="int32")
    g.loss(bp.nll_loss(P, y), name="mean")
    g.loss(bp.nll_loss(P, y, reduction="sum"), name="sum")
    model = bp.compile(g, dtype="float64", optimizer=None)
    labels = np.array([5, 0, 0, 3], dtype=np.int32)
    one_hot = np.eye(6)[labels]
    value, grads = model.loss_and_grad(loss="sum", y=labels)
    assert value == -np.sum(model.params["P"][np.arange(4), labels])
    np.testing.assert_array_equal(grads["P"], -one_hot)
    value, grads = model.loss_and_grad(loss="mean", y=labels)
    np.testing.assert_allclose(value, -np.mean(model.params["P"][np.arange(4), labels]), rtol=1e-15)
    np.testing.assert_array_equal(grads["P"], -one_hot / 4)


def test_nll_loss_refuses_labels_out_of_range(build_dir):
    g = bp.Graph("nll_range")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("batch",), dtype="int32")
    g.loss(bp.nll_loss(bp.log_softmax(x), y))
    model = bp.compile(g, dtype="float64", optimizer=None)
    X = np.zeros((2, 3))
    assert model.loss(x=X, y=np.array([0, 2], dtype=np.int32)) == pytest.approx(np.log(3))
    for bad in ([0, 3], [-1, 0], [0, -100]):
        with pytest.raises(bp.InputError, match=r"labels must be class indices in \[0, 3\)"):
            model.loss(x=X, y=np.array(bad, dtype=np.int32))


def test_nll_loss_shape_errors():
    g = bp.Graph("nll_shapes")
    lp = g.input("lp", ("batch", 4))
    with pytest.raises(bp.ShapeError, match=r"need labels of shape \(batch,\), got labels \(batch, 4\)"):
        bp.nll_loss(lp, g.input("y2", ("batch", 4), dtype="int32"))
    with pytest.raises(bp.ShapeError, match="int32"):
        bp.nll_loss(lp, g.input("yf", ("batch",)))
    with pytest.raises(bp.ShapeError, match="fixed size"):
        bp.nll_loss(g.input("lp2", ("batch", "classes")), g.input("y3", ("batch",), dtype="int32"))
    with pytest.raises(TypeError, match="graph tensor"):
        bp.nll_loss(np.zeros((2, 4)), g.input("y4", ("batch",), dtype="int32"))


# --- reduction and label_smoothing arguments --------------------------------------------------------

def _loss_calls(g: bp.Graph) -> dict:
    z = g.input("z", ("batch", 3))
    t = g.input("t", ("batch", 3))
    y = g.input("y", ("batch",), dtype="int32")
    return {"mse": lambda **kw: bp.mse(z, t, **kw),
            "binary_cross_entropy_with_logits": lambda **kw: bp.binary_cross_entropy_with_logits(z, t, **kw),
            "softmax_cross_entropy": lambda **kw: bp.softmax_cross_entropy(z, y, **kw),
            "nll_loss": lambda **kw: bp.nll_loss(z, y, **kw)}


@pytest.mark.parametrize("bad", ["none", "Mean", "avg", None, 1])
def test_bad_reduction_names_the_allowed_ones(bad):
    for name, call in _loss_calls(bp.Graph("reductions")).items():
        with pytest.raises(ValueError, match=rf"{name}: reduction must be one of 'mean', 'sum', got"):
            call(reduction=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan")])
def test_bad_label_smoothing_is_refused(bad):
    call = _loss_calls(bp.Graph("smoothing"))["softmax_cross_entropy"]
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        call(label_smoothing=bad)


def test_defaults_build_the_same_nodes_as_before():
    """reduction="mean" and label_smoothing=0 are the fused losses of old, node for node."""
    g = bp.Graph("defaults")
    calls = _loss_calls(g)
    for call in calls.values():
        assert call() is call(reduction="mean")
    assert calls["softmax_cross_entropy"]().op == "softmax_ce"
    assert calls["softmax_cross_entropy"](label_smoothing=0.0) is calls["softmax_cross_entropy"]()


# --- second derivatives ------------------------------------------------------------------------------

def _penalty_graph() -> tuple[bp.Graph, dict]:
    """loss = mean((d L / d x)^2) for L = nll(log_softmax(tanh(x W))) + bce + mse, summed."""
    rng = np.random.default_rng(6)
    g = bp.Graph("loss_penalty")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("batch",), dtype="int32")
    p = g.input("p", ("batch", 4))
    W = g.param("W", (3, 4), init=rng.normal(size=(3, 4)))
    z = bp.tanh(x @ W)
    inner = (bp.nll_loss(bp.log_softmax(z), y, reduction="sum")
             + bp.binary_cross_entropy_with_logits(z, p, reduction="sum") + bp.mse(z, p, reduction="sum"))
    (dx,) = bp.grad(inner, [x])
    g.loss(bp.mean(bp.square(dx)))
    inputs = {"x": rng.normal(size=(5, 3)), "y": rng.integers(0, 4, 5).astype(np.int32), "p": rng.uniform(size=(5, 4))}
    return g, inputs


def test_second_derivatives_match_torch_double_backward(build_dir):
    graph, inputs = _penalty_graph()
    model = bp.compile(graph, dtype="float64", optimizer=None)
    check_model_gradients(model, graph, inputs)
    value, grads = model.loss_and_grad(**inputs)
    W = torch.tensor(model.params["W"], requires_grad=True)
    x = torch.tensor(inputs["x"], requires_grad=True)
    p = torch.tensor(inputs["p"])
    z = torch.tanh(x @ W)
    inner = (F.nll_loss(F.log_softmax(z, -1), torch.tensor(inputs["y"]).long(), reduction="sum")
             + F.binary_cross_entropy_with_logits(z, p, reduction="sum") + F.mse_loss(z, p, reduction="sum"))
    (dx,) = torch.autograd.grad(inner, x, create_graph=True)
    loss = (dx ** 2).mean()
    loss.backward()
    np.testing.assert_allclose(value, loss.item(), rtol=1e-9)
    np.testing.assert_allclose(grads["W"], W.grad.numpy(), rtol=1e-9)
