"""Forward values and gradients of the model-family ops equal PyTorch's (float64):
conv2d, max_pool2d, avg_pool2d, LSTM, GRU, RNN, BatchNorm1d/2d (train and eval, running
statistics) and embedding. Skipped, with the reason, when PyTorch is not installed."""

from __future__ import annotations

import numpy as np
import pytest

import bpcompile as bp

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the PyTorch comparisons are skipped")
F = torch.nn.functional


def _t(a: np.ndarray, grad: bool = True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _compile_weighted(g: bp.Graph, outs: dict[str, bp.Tensor], batch: int = 2,
                      **kw) -> tuple[bp.CompiledModel, dict[str, np.ndarray]]:
    """Loss = sum over outputs of sum(out * R_out), R_out random inputs; returns the model and
    the R's (named dims of the outputs take the size `batch`)."""
    rng = np.random.default_rng(7)
    loss, weights = None, {}
    for name, out in outs.items():
        g.output(name, out)
        weights[name] = rng.normal(size=tuple(batch if isinstance(d, str) else d for d in out.shape))
        term = bp.sum(out * g.input(f"R_{name}", out.shape))
        loss = term if loss is None else loss + term
    g.loss(loss)
    return bp.compile(g, dtype="float64", **kw), weights


def _torch_loss(outs: dict, weights: dict[str, np.ndarray]):
    return sum((outs[k] * torch.tensor(weights[k])).sum() for k in outs)


@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (2, 1, True), ((1, 2), (0, 1), False)])
def test_conv2d_matches_torch(stride, padding, bias, build_dir) -> None:
    rng = np.random.default_rng(0)
    xv, wv, bv = rng.normal(size=(2, 3, 7, 6)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4,))
    g = bp.Graph("torch_conv")
    x, w = g.param("x", xv.shape, init=xv), g.param("w", wv.shape, init=wv)
    b = g.param("b", bv.shape, init=bv) if bias else None
    model, weights = _compile_weighted(g, {"y": bp.conv2d(x, w, b, stride=stride, padding=padding)})
    tx, tw, tb = _t(xv), _t(wv), _t(bv) if bias else None
    ty = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    np.testing.assert_allclose(model.forward()["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    _torch_loss({"y": ty}, weights).backward()
    _, grads = model.loss_and_grad(**{f"R_{k}": v for k, v in weights.items()})
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["w"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    if bias:
        np.testing.assert_allclose(grads["b"], tb.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,kernel,stride",
                         [("max", 2, None), ("max", 3, 1), ("avg", 2, None), ("avg", (3, 2), (2, 1))])
def test_pooling_matches_torch(kind, kernel, stride, build_dir) -> None:
    xv = np.random.default_rng(1).normal(size=(2, 3, 7, 6))
    g = bp.Graph(f"torch_{kind}pool")
    x = g.param("x", xv.shape, init=xv)
    op = bp.max_pool2d if kind == "max" else bp.avg_pool2d
    model, weights = _compile_weighted(g, {"y": op(x, kernel, stride)})
    tx = _t(xv)
    ty = (F.max_pool2d if kind == "max" else F.avg_pool2d)(tx, kernel, stride)
    np.testing.assert_allclose(model.forward()["y"], ty.detach().numpy(), rtol=1e-12)
    _torch_loss({"y": ty}, weights).backward()
    _, grads = model.loss_and_grad(**{f"R_{k}": v for k, v in weights.items()})
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch,time,initial", [(3, 5, False), (1, 1, True), (2, 4, True)])
def test_recurrent_matches_torch(kind, batch, time, initial, build_dir) -> None:
    rng = np.random.default_rng(2)
    n_in, hid = 4, 6
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    torch.manual_seed(0)
    ref = cls(n_in, hid, batch_first=True).double()
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    wv = {n: getattr(ref, n).detach().numpy().copy() for n in names}
    xv = rng.normal(size=(batch, time, n_in))
    h0v, c0v = rng.normal(size=(batch, hid)), rng.normal(size=(batch, hid))
    g = bp.Graph(f"torch_{kind}")
    x = g.param("x", xv.shape, init=xv)
    w = [g.param(n, v.shape, init=v) for n, v in wv.items()]
    h0 = g.param("h0", h0v.shape, init=h0v) if initial else None
    c0 = g.param("c0", c0v.shape, init=c0v) if initial else None
    if kind == "lstm":
        out, (h, c) = bp.lstm(x, *w, h0=h0, c0=c0)
        outs = {"out": out, "h": h, "c": c}
    else:
        out, h = getattr(bp, kind)(x, *w, h0=h0)
        outs = {"out": out, "h": h}
    model, weights = _compile_weighted(g, outs)
    tx = _t(xv)
    th0, tc0 = _t(h0v[None]), _t(c0v[None])
    if kind == "lstm":
        tout, (th, tc) = ref(tx, (th0, tc0)) if initial else ref(tx)
        touts = {"out": tout, "h": th[0], "c": tc[0]}
    else:
        tout, th = ref(tx, th0) if initial else ref(tx)
        touts = {"out": tout, "h": th[0]}
    got = model.forward()
    for k in outs:
        np.testing.assert_allclose(got[k], touts[k].detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=k)
    _torch_loss(touts, weights).backward()
    _, grads = model.loss_and_grad(**{f"R_{k}": v for k, v in weights.items()})
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    for n in names:
        np.testing.assert_allclose(grads[n], getattr(ref, n).grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=n)
    if initial:
        np.testing.assert_allclose(grads["h0"], th0.grad.numpy()[0], rtol=1e-9, atol=1e-11)
        if kind == "lstm":
            np.testing.assert_allclose(grads["c0"], tc0.grad.numpy()[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)])
def test_batch_norm_matches_torch(shape, build_dir) -> None:
    rng = np.random.default_rng(3)
    xv = rng.normal(1.0, 2.0, size=shape)
    gv, bv = rng.normal(size=3), rng.normal(size=3)
    g = bp.Graph(f"torch_bn{len(shape)}")
    x = g.param("x", shape, init=xv)
    gamma, beta = g.param("gamma", (3,), init=gv), g.param("beta", (3,), init=bv)
    model, weights = _compile_weighted(g, {"y": bp.batch_norm(x, gamma, beta, momentum=0.1, eps=1e-5)},
                                       optimizer=bp.optim.SGD(lr=0.0))
    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(3, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gv))
        bn.bias.copy_(torch.tensor(bv))
    tx = _t(xv)
    bn.train()
    ty = bn(tx)
    r = {f"R_{k}": v for k, v in weights.items()}
    _torch_loss({"y": ty}, weights).backward()
    loss, grads = model.loss_and_grad(**r)
    np.testing.assert_allclose(loss, _torch_loss({"y": ty}, weights).item(), rtol=1e-10)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(grads["gamma"], bn.weight.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(grads["beta"], bn.bias.grad.numpy(), rtol=1e-9, atol=1e-11)
    model.train_step(**r)  # lr 0: only the running statistics change
    np.testing.assert_allclose(model.params["gamma.running_mean"], bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(model.params["gamma.running_var"], bn.running_var.numpy(), rtol=1e-12)
    bn.eval()
    np.testing.assert_allclose(model.forward()["y"], bn(tx).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_embedding_matches_torch(build_dir) -> None:
    rng = np.random.default_rng(4)
    tv = rng.normal(size=(6, 3))
    ids = np.array([[0, 5, 5], [2, 0, 1]], dtype=np.int32)
    g = bp.Graph("torch_embedding")
    i = g.input("ids", ("batch", 3), dtype="int32")
    table = g.param("table", tv.shape, init=tv)
    model, weights = _compile_weighted(g, {"e": bp.embedding(i, table)})
    tt = _t(tv)
    te = F.embedding(torch.tensor(ids, dtype=torch.long), tt)
    np.testing.assert_allclose(model.forward(ids=ids)["e"], te.detach().numpy())
    r = {"R_e": weights["e"]}
    (te * torch.tensor(r["R_e"])).sum().backward()
    _, grads = model.loss_and_grad(ids=ids, **r)
    np.testing.assert_allclose(grads["table"], tt.grad.numpy(), rtol=1e-12)
