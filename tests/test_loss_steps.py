"""Each named loss owns its optimizer step count: a GAN's two losses under Adam update as two
torch.optim.Adam instances (one per network) do, and checkpoints keep every count."""

from __future__ import annotations

import numpy as np
import pytest

import bpcompile as bp


def gan_graph() -> bp.Graph:
    g = bp.Graph("loss_steps_gan")
    x = g.input("x", ("batch", 3))
    a, b = g.param("a", (3, 2), init="normal"), g.param("b", (2,), init="normal")
    out = x @ a + b
    g.loss(bp.mean(bp.square(out)), name="d", params=["a"])
    g.loss(bp.mean(bp.tanh(out)), name="g", params=["b"])
    return g


SCHEDULE = ("d", "d", "g", "d", "g", "g", "d")


def train(model, x):
    for loss in SCHEDULE:
        model.train_step(loss=loss, x=x)


def train_alongside_torch(model, x: np.ndarray, a, b, opt: dict) -> None:
    """SCHEDULE's steps on the model and on torch tensors a, b with one torch optimizer per loss:
    the same losses and parameters at every step."""
    import torch
    xt = torch.from_numpy(x)
    for loss in SCHEDULE:
        out = xt @ a + b
        value = (out ** 2).mean() if loss == "d" else torch.tanh(out).mean()
        opt[loss].zero_grad()
        value.backward()
        opt[loss].step()
        assert model.train_step(loss=loss, x=x) == pytest.approx(value.item(), rel=1e-12)
        np.testing.assert_allclose(model.params["a"], a.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(model.params["b"], b.detach().numpy(), rtol=1e-12)


def test_two_losses_match_two_torch_adams(build_dir):
    torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")
    model = bp.compile(gan_graph(), "float64", optimizer=bp.optim.Adam(lr=0.1, betas=(0.5, 0.999)), seed=1)
    x = np.random.default_rng(0).normal(size=(5, 3))
    a = torch.tensor(model.params["a"].copy(), requires_grad=True)
    b = torch.tensor(model.params["b"].copy(), requires_grad=True)
    opt = {name: torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.999)) for name, p in (("d", a), ("g", b))}
    train_alongside_torch(model, x, a, b, opt)
    assert model.loss_steps == {"d": 4, "g": 3} and model.step == 7


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoints_keep_each_losss_count(build_dir, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="needs the [safetensors] extra")
    make = lambda seed: bp.compile(gan_graph(), "float64", optimizer=bp.optim.Adam(lr=0.1), seed=seed)  # noqa: E731
    x = np.random.default_rng(1).normal(size=(4, 3))
    model, resumed = make(0), make(3)
    train(model, x)
    model.save(tmp_path / f"ck{suffix}")
    resumed.load(tmp_path / f"ck{suffix}")
    assert resumed.loss_steps == model.loss_steps == {"d": 4, "g": 3}
    train(model, x)
    train(resumed, x)
    for name in model.params:
        np.testing.assert_array_equal(resumed.params[name], model.params[name])


def test_reset_clears_every_count(build_dir):
    model = bp.compile(gan_graph(), "float64", optimizer=bp.optim.Adam(lr=0.1))
    train(model, np.ones((2, 3)))
    model.reset_parameters(0)
    assert model.step == 0 and model.loss_steps == {"d": 0, "g": 0}


def test_an_optimizer_per_loss_matches_two_torch_optimizers(build_dir, tmp_path):
    """DCGAN / TTUR: each network its own optimizer kind and hyperparameters, as two torch optimizers."""
    torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")
    optimizers = {"d": bp.optim.Adam(lr=4e-2, betas=(0.5, 0.999)), "g": bp.optim.SGD(lr=0.1, momentum=0.9)}
    model = bp.compile(gan_graph(), "float64", optimizer=optimizers, seed=1)
    assert isinstance(model.optimizer, bp.optim.PerLoss) and model.optimizer.for_loss("g").kind == "sgd"
    x = np.random.default_rng(0).normal(size=(5, 3))
    a = torch.tensor(model.params["a"].copy(), requires_grad=True)
    b = torch.tensor(model.params["b"].copy(), requires_grad=True)
    opt = {"d": torch.optim.Adam([a], lr=4e-2, betas=(0.5, 0.999)), "g": torch.optim.SGD([b], lr=0.1, momentum=0.9)}
    train_alongside_torch(model, x, a, b, opt)
    # the per-loss optimizers travel with the build and the checkpoint
    reloaded = bp.load(model.build_path)
    assert reloaded.optimizer.config() == model.optimizer.config()
    model.save(tmp_path / "ck.npz")
    resumed = bp.compile(gan_graph(), "float64", optimizer=optimizers, seed=5)
    resumed.load(tmp_path / "ck.npz")
    for loss in ("g", "d"):
        assert resumed.train_step(loss=loss, x=x) == pytest.approx(model.train_step(loss=loss, x=x), rel=1e-12)


def test_per_loss_optimizers_are_checked(build_dir):
    adam = bp.optim.Adam(lr=1e-3)
    with pytest.raises(ValueError, match=r"no optimizer for \['g'\]"):
        bp.compile(gan_graph(), optimizer={"d": adam})
    with pytest.raises(ValueError, match=r"no loss named \['gen'\]"):
        bp.compile(gan_graph(), optimizer={"d": adam, "g": adam, "gen": adam})
    g = bp.Graph("shared_param")
    x = g.input("x", ("batch", 2))
    w = g.param("w", (2,), init="normal")
    g.loss(bp.mean(x * w), name="a")
    g.loss(bp.mean(bp.square(x * w)), name="b")
    with pytest.raises(ValueError, match="'w' is trained by loss 'a' and loss 'b' with different optimizers"):
        bp.compile(g, optimizer={"a": adam, "b": bp.optim.Adam(lr=1e-3)})
    with pytest.raises(TypeError, match="dict of them per loss"):
        bp.compile(gan_graph(), optimizer="adam")
