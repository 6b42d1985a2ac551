"""State dicts under PyTorch's names and layouts, and .safetensors checkpoints.

The torch cross-checks load a torch module's own state_dict() into the bpcompile model built from
bp.nn layers of the same names, then compare outputs and gradients (float64); the other way, a
bpcompile state_dict loads into the torch module with strict=True.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpcompile as bp

TOL = dict(rtol=1e-10, atol=1e-12)


def _torch():
    return pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")


def _safetensors():
    return pytest.importorskip("safetensors.numpy", reason="needs the [safetensors] extra")


# --- the bpcompile side of each model ------------------------------------------------------

def mlp_graph() -> bp.Graph:
    """fc1 16->16 (square: a transposed weight would pass a shape check), fc2 16->3."""
    g = bp.Graph("sd_mlp")
    x, y = g.input("x", ("batch", 16)), g.input("y", ("batch",), dtype="int32")
    h = bp.nn.Dense(g, 16, 16, activation="tanh", name="fc1")(x)
    logits = bp.nn.Linear(g, 16, 3, name="fc2")(h)
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def mnist_graph(dropout: bool) -> bp.Graph:
    """pytorch/examples' MNIST network: conv 1->32, conv 32->64, pool, dropout, fc 9216->128, fc 128->10."""
    g = bp.Graph(f"sd_mnist_{int(dropout)}")
    x, y = g.input("x", ("batch", 1, 28, 28)), g.input("y", ("batch",), dtype="int32")
    h = bp.nn.Conv2d(g, 1, 32, 3, activation="relu", name="conv1")(x)
    h = bp.max_pool2d(bp.nn.Conv2d(g, 32, 64, 3, activation="relu", name="conv2")(h), 2)
    if dropout:
        h = bp.nn.Dropout(0.25)(h)
    h = bp.nn.Linear(g, 9216, 128, activation="relu", name="fc1")(bp.flatten(h))
    if dropout:
        h = bp.nn.Dropout(0.5, salt=1)(h)
    out = bp.log_softmax(bp.nn.Linear(g, 128, 10, name="fc2")(h))
    g.output("out", out)
    g.loss(bp.softmax_cross_entropy(out, y))  # log_softmax is idempotent: this is nll_loss(out, y)
    return g


def lstm_graph() -> bp.Graph:
    g = bp.Graph("sd_lstm")
    x, t = g.input("x", ("batch", 6, 5)), g.input("t", ("batch", 2))
    _, (h, _) = bp.nn.LSTM(g, 5, 8, name="lstm")(x)
    out = bp.nn.Linear(g, 8, 2, name="fc")(h)
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def bn_cnn_graph() -> bp.Graph:
    g = bp.Graph("sd_bn_cnn")
    x, y = g.input("x", ("batch", 2, 8, 8)), g.input("y", ("batch",), dtype="int32")
    h = bp.nn.Conv2d(g, 2, 4, 3, padding=1, name="conv")(x)
    h = bp.max_pool2d(bp.relu(bp.nn.BatchNorm(g, 4, name="bn")(h)), 2)
    logits = bp.nn.Linear(g, 64, 3, name="fc")(bp.flatten(h))
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


# --- the torch side -----------------------------------------------------------------------

def torch_models(torch):
    nn, F = torch.nn, torch.nn.functional

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    class MNIST(nn.Module):  # pytorch/examples mnist/main.py's Net
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
            return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)

    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(5, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.fc(h[0])

    class BNCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2), 1))

    return {"mlp": MLP, "mnist": MNIST, "lstm": LSTMNet, "bn_cnn": BNCNN}


def batch(kind: str, rng: np.random.Generator, n: int = 4) -> dict[str, np.ndarray]:
    shapes = {"mlp": (16,), "mnist": (1, 28, 28), "lstm": (6, 5), "bn_cnn": (2, 8, 8)}
    out = {"x": rng.normal(size=(n, *shapes[kind]))}
    if kind == "lstm":
        out["t"] = rng.normal(size=(n, 2))
    else:
        out["y"] = rng.integers(0, 3, n).astype(np.int32)
    return out


def torch_loss(torch, kind, out, data):
    F = torch.nn.functional
    if kind == "lstm":
        return F.mse_loss(out, torch.from_numpy(data["t"]))
    y = torch.from_numpy(data["y"]).long()
    return F.nll_loss(out, y) if kind == "mnist" else F.cross_entropy(out, y)


GRAPHS = {"mlp": mlp_graph, "mnist": lambda: mnist_graph(dropout=False), "lstm": lstm_graph,
          "bn_cnn": bn_cnn_graph}
OUTPUT = {"mlp": "logits", "mnist": "out", "lstm": "out", "bn_cnn": "logits"}


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_a_torch_state_dict_gives_torch_outputs_and_gradients(kind, build_dir):
    torch = _torch()
    torch.manual_seed(0)
    net = torch_models(torch)[kind]().double()
    rng = np.random.default_rng(1)
    if kind == "bn_cnn":  # running statistics worth loading
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.from_numpy(batch(kind, rng, 8)["x"]))
    model = bp.compile(GRAPHS[kind](), "float64")
    model.load_state_dict(net.state_dict())  # one call, strict
    data = batch(kind, rng)
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(data["x"])).numpy()
    inputs = {"x": data["x"]}
    np.testing.assert_allclose(model.forward(**inputs)[OUTPUT[kind]], expected, **TOL)
    # gradients in training mode (batch statistics), against torch's train mode (the bpcompile MNIST
    # graph here has no dropout: the torch one is kept in eval mode)
    net.train(kind != "mnist")
    net.zero_grad()
    loss = torch_loss(torch, kind, net(torch.from_numpy(data["x"])), data)
    loss.backward()
    value, grads = model.loss_and_grad(**data)
    np.testing.assert_allclose(value, loss.item(), **TOL)
    layout = {p["name"]: p for p in model.meta["params"]}
    torch_grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    for name, grad in grads.items():
        key = layout[name]["state_key"]
        mine = grad.T if layout[name]["state_transposed"] else grad
        np.testing.assert_allclose(mine, torch_grads[key], err_msg=key, **TOL)
    assert len(grads) == len(torch_grads)


@pytest.mark.parametrize("kind", ["mlp", "lstm", "bn_cnn"])
def test_a_bpcompile_state_dict_loads_into_torch_strictly(kind, build_dir):
    torch = _torch()
    model = bp.compile(GRAPHS[kind](), "float64", optimizer=bp.optim.SGD(lr=0.1), seed=4)
    rng = np.random.default_rng(2)
    for _ in range(2):  # moves the running statistics away from their start
        model.train_step(**batch(kind, rng, 8))
    net = torch_models(torch)[kind]().double()
    state = {k: torch.from_numpy(v) for k, v in model.state_dict().items()}
    net.load_state_dict(state, strict=True)
    net.eval()
    data = batch(kind, rng)
    with torch.no_grad():
        expected = net(torch.from_numpy(data["x"])).numpy()
    np.testing.assert_allclose(model.forward(x=data["x"])[OUTPUT[kind]], expected, **TOL)


def test_mnist_with_dropout_loads_and_matches_in_evaluation(build_dir):
    torch = _torch()
    torch.manual_seed(3)
    net = torch_models(torch)["mnist"]().double().eval()
    model = bp.compile(mnist_graph(dropout=True), "float64")
    model.load_state_dict(net.state_dict())
    x = np.random.default_rng(3).normal(size=(2, 1, 28, 28))
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x=x)["out"], net(torch.from_numpy(x)).numpy(), **TOL)


def test_state_dict_names_and_layouts(build_dir):
    model = bp.compile(bn_cnn_graph(), "float64", seed=1)
    sd = model.state_dict()
    assert list(sd) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                        "bn.num_batches_tracked", "fc.weight", "fc.bias"]  # torch's order
    assert sd["fc.weight"].shape == (3, 64) and sd["bn.num_batches_tracked"].dtype == np.int64
    dense = bp.compile(mlp_graph(), "float64", seed=1)
    np.testing.assert_array_equal(dense.state_dict()["fc1.weight"], dense.params["fc1.weight"].T)
    sd["fc.weight"][...] = 7  # fresh arrays: the model is untouched
    assert not np.any(model.params["fc.weight"] == 7)


def test_load_state_dict_lists_every_problem_and_changes_nothing(build_dir):
    model = bp.compile(mlp_graph(), "float64", seed=2)
    before = {k: v.copy() for k, v in model.params.items()}
    sd = model.state_dict()
    del sd["fc2.bias"]
    sd["fc1.weight"] = np.zeros((16, 15))
    sd["fc3.weight"] = np.zeros(3)
    sd["fc2.weight"] = sd["fc2.weight"] + 1.0  # a good entry is not applied either
    with pytest.raises(bp.InputError) as e:
        model.load_state_dict(sd)
    text = str(e.value)
    assert "'fc1.weight' has shape (16, 15)" in text and "missing ['fc2.bias']" in text
    assert "unexpected ['fc3.weight']" in text and "nothing was changed" in text
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(bp.InputError, match="expects a mapping"):
        model.load_state_dict([1, 2])
    del sd["fc3.weight"]
    sd["fc1.weight"] = np.ones((16, 16))
    model.load_state_dict(sd, strict=False)  # missing fc2.bias allowed; the rest applied
    np.testing.assert_array_equal(model.params["fc1.weight"], np.ones((16, 16)))
    np.testing.assert_array_equal(model.params["fc2.bias"], before["fc2.bias"])


def test_state_names_must_be_unique(build_dir):
    g = bp.Graph("sd_clash")
    g.param("a", (2, 2))
    g.param("b", (2, 3))
    g.param("c", (4,))
    with pytest.raises(ValueError, match="already the key of 'a'"):
        g.name_in_state_dict("b", "a")
    g.name_in_state_dict("b", "layer.weight", transpose=True)
    with pytest.raises(ValueError, match="already the key of 'b'"):
        g.name_in_state_dict("c", "layer.weight")
    with pytest.raises(bp.ShapeError, match="2-D"):
        g.name_in_state_dict("c", "c2", transpose=True)


def test_safetensors_checkpoint_round_trip(build_dir, tmp_path):
    st = _safetensors()
    make = lambda seed: bp.compile(bn_cnn_graph(), "float64", optimizer=bp.optim.Adam(lr=0.01), seed=seed)  # noqa: E731
    model, other = make(0), make(5)
    rng = np.random.default_rng(4)
    for _ in range(3):
        model.train_step(**batch("bn_cnn", rng, 8))
    path = tmp_path / "ckpt.safetensors"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    plain = st.load_file(str(path))  # any safetensors reader sees the state dict
    np.testing.assert_array_equal(plain["fc.weight"], model.params["fc.weight"])  # Linear: (out, in) both
    assert plain["bpcompile.optimizer_state"].shape == (model.meta["state_size"],)
    other.load(path)
    assert other.step == 3
    for k in model.params:
        np.testing.assert_array_equal(other.params[k], model.params[k])
    data = batch("bn_cnn", rng, 8)
    assert other.train_step(**data) == model.train_step(**data)  # optimizer state came back
    for k in model.params:
        np.testing.assert_array_equal(other.params[k], model.params[k])


def test_safetensors_checkpoint_refusals(build_dir, tmp_path):
    st = _safetensors()
    model = bp.compile(mlp_graph(), "float64", optimizer=bp.optim.Adam(lr=0.01))
    path = tmp_path / "m.safetensors"
    model.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(bp.CheckpointError, match="not a readable safetensors file"):
        model.load(tmp_path / "cut.safetensors")
    st.save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(bp.CheckpointError, match="load_state_dict"):
        model.load(tmp_path / "plain.safetensors")
    sgd = bp.compile(mlp_graph(), "float64", optimizer=bp.optim.SGD(lr=0.1))
    with pytest.raises(bp.CheckpointError, match="does not match this model's"):
        sgd.load(path)
