"""bp.from_onnx: models exported by torch.onnx.export import with torch's forward (float32, 1e-5),
train along torch's trajectory once the same loss is added, and round-trip through bp.to_onnx."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import bpcompile as bp

onnx = pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
TOL = dict(rtol=1e-5, atol=1e-5)


def _torch():
    return pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")


def export(torch, net, example, names=("x",)) -> onnx.ModelProto:
    """The TorchScript exporter's ONNX (opset 17), with a dynamic batch dim."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, f, dynamo=False, opset_version=17, input_names=list(names),
                          output_names=["out"], dynamic_axes={**{n: {0: "batch"} for n in names}, "out": {0: "batch"}})
    return onnx.load_from_string(f.getvalue())


def nets(torch):
    nn, F = torch.nn, torch.nn.functional

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 4)
            self.norm = nn.LayerNorm(12)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            h = self.norm(F.gelu(self.fc2(h)) + torch.tanh(h) * torch.sigmoid(h))
            return self.fc3(F.leaky_relu(h, 0.2) - 0.5 * F.elu(h))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.conv2, self.drop = nn.Conv2d(6, 8, 3, stride=2), nn.Dropout(0.3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
            h = F.adaptive_avg_pool2d(F.relu(self.conv2(self.drop(h))), 1)
            return F.log_softmax(self.fc(torch.flatten(h, 1)), dim=1)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(8, 2)

        def forward(self, ids, feats):
            h = torch.cat([self.emb(ids), feats], dim=2)[:, :, 1:9]
            return F.softmax(self.fc(h.reshape(h.shape[0], -1)[:, :8] * 2.0), dim=-1)

    return MLP, CNN, Tokens


def test_mlp_imports_and_trains_as_torch(build_dir):
    torch = _torch()
    torch.manual_seed(0)
    net = nets(torch)[0]().float()
    g = bp.from_onnx(export(torch, net, (torch.randn(2, 6),)))
    labels = g.input("labels", ("batch",), dtype="int32")
    g.loss(bp.softmax_cross_entropy(g.outputs["out"], labels))
    model = bp.compile(g, "float32", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x=x)["out"], net(torch.from_numpy(x)).numpy(), **TOL)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        np.testing.assert_allclose(model.train_step(x=x, labels=y), loss.item(), **TOL)
    torch_params = dict(net.named_parameters())
    for name in ("fc1.weight", "fc2.bias", "fc3.weight", "norm.weight"):
        np.testing.assert_allclose(model.params[name], torch_params[name].detach().numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_cnn_with_batch_norm_and_dropout_imports(build_dir):
    torch = _torch()
    torch.manual_seed(1)
    net = nets(torch)[1]()
    with torch.no_grad():  # running statistics away from their start
        net.train()
        for _ in range(3):
            net(torch.randn(8, 2, 12, 12))
    net.eval()
    g = bp.from_onnx(export(torch, net, (torch.randn(2, 2, 12, 12),)))
    model = bp.compile(g, "float32")
    x = np.random.default_rng(2).normal(size=(5, 2, 12, 12)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x=x)["out"], net(torch.from_numpy(x)).numpy(), **TOL)


def test_embedding_concat_slice_reshape_import(build_dir):
    torch = _torch()
    torch.manual_seed(2)
    net = nets(torch)[2]()
    ids = torch.randint(0, 10, (3, 5))
    feats = torch.randn(3, 5, 4)
    proto = export(torch, net, (ids.int(), feats), names=("ids", "feats"))
    model = bp.compile(bp.from_onnx(proto), "float32")  # x.shape[0] goes through Shape/Gather/Concat by name
    with torch.no_grad():
        expected = net(ids, feats).numpy()
    got = model.forward(ids=ids.numpy().astype(np.int32), feats=feats.numpy())["out"]
    np.testing.assert_allclose(got, expected, **TOL)


def test_unsupported_operators_and_attributes_are_named(build_dir):
    torch = _torch()

    class Cumulative(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    with pytest.raises(bp.CompileError, match=r"\(CumSum\): operator CumSum is not supported"):
        bp.from_onnx(export(torch, Cumulative(), (torch.randn(2, 3),)))
    dilated = torch.nn.Conv2d(1, 2, 3, dilation=2)
    with pytest.raises(bp.CompileError, match=r"\(Conv\): attribute dilations=\[2, 2\] is not supported"):
        bp.from_onnx(export(torch, dilated, (torch.randn(1, 1, 9, 9),)))


def test_round_trip_through_to_onnx(build_dir):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime)")
    import test_onnx_export as exported

    rng = np.random.default_rng(3)
    for name, make in exported.GRAPHS.items():
        model = bp.compile(make(), "float32", seed=4)
        again = bp.compile(bp.from_onnx(bp.to_onnx(model), name=f"{name}_again"), "float32")
        data = exported.inputs_for(name, rng, 4)
        for key, value in model.forward(**data).items():
            np.testing.assert_allclose(again.forward(**data)[key], value, **TOL, err_msg=f"{name} {key}")


def test_cli_builds_and_checks_an_onnx_file_with_a_loss(build_dir, tmp_path, capsys):
    torch = _torch()
    from bpcompile.tools.cli import main

    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    path = tmp_path / "net.onnx"
    path.write_bytes(export(torch, net, (torch.randn(2, 4),)).SerializeToString())
    assert main(["build", str(path), "--loss", "cross_entropy:labels"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["check", str(path), "--loss", "mse:target"]) == 0  # gradients vs finite differences
    capsys.readouterr()
    assert main(["build", str(path), "--loss", "hinge:labels"]) != 0
    assert "expected KIND:INPUT" in capsys.readouterr().err


def test_slices_with_steps_import(build_dir):
    """Slice with a step other than 1 (x[:, 1::2], torch.flip) over a fixed dim picks the entries
    (as a Gather of constant indices does); over a runtime one it is refused by name."""
    torch = _torch()

    class Strided(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.flip(x, [1]), x[:, 1::2], x[:, 1:6:3]], dim=1) * 2.0

    class FlipBatch(torch.nn.Module):
        def forward(self, x):
            return torch.flip(x, [0])

    x = np.random.default_rng(6).normal(size=(3, 7)).astype(np.float32)
    model = bp.compile(bp.from_onnx(export(torch, Strided(), (torch.randn(2, 7),))), "float32")
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x=x)["out"], Strided()(torch.from_numpy(x)).numpy(), **TOL)
    with pytest.raises(bp.CompileError, match=r"\(Slice\): steps other than 1 along the runtime size 'batch'"):
        bp.from_onnx(export(torch, FlipBatch(), (torch.randn(2, 7),)))
