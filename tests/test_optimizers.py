"""The fused optimizer updates against an independent NumPy reference of torch.optim
(tests/optim_reference.py), learning-rate overrides and schedules, and checkpoint resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bpcompile as bp
from bpcompile.train import optim, schedules

try:
    import optim_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import optim_reference as ref

STEPS = 5


def linear_tanh_graph() -> bp.Graph:
    g = bp.Graph("opt_lin")
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    W = g.param("W", (3, 2), init="normal")
    b = g.param("b", (2,), init="uniform")
    out = bp.tanh(x @ W + b)
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def batches(n_steps: int, seed: int = 0, n: int = 8):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, 3)), rng.uniform(-1, 1, size=(n, 2))) for _ in range(n_steps)]


def compile_model(opt: optim.Optimizer, monkeypatch, seed: int = 0) -> bp.CompiledModel:
    monkeypatch.setenv("BPCOMPILE_WERROR", "1")  # the generated update compiles warning-free
    return bp.compile(linear_tanh_graph(), dtype="float64", optimizer=opt, seed=seed)


# (name, bpcompile optimizer, reference optimizer): the same settings for both
def cases(clip: float | None):
    kw = {"clip_norm": clip}
    return [
        ("sgd", optim.SGD(lr=0.1, **kw), ref.SGD(lr=0.1, **kw)),
        ("sgd-momentum", optim.SGD(lr=0.1, momentum=0.9, **kw), ref.SGD(lr=0.1, momentum=0.9, **kw)),
        ("sgd-dampening", optim.SGD(lr=0.1, momentum=0.8, dampening=0.3, **kw),
         ref.SGD(lr=0.1, momentum=0.8, dampening=0.3, **kw)),
        ("sgd-nesterov", optim.SGD(lr=0.05, momentum=0.9, nesterov=True, **kw),
         ref.SGD(lr=0.05, momentum=0.9, nesterov=True, **kw)),
        ("sgd-wd", optim.SGD(lr=0.1, weight_decay=0.05, **kw), ref.SGD(lr=0.1, weight_decay=0.05, **kw)),
        ("sgd-momentum-wd", optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.02, **kw),
         ref.SGD(lr=0.1, momentum=0.9, weight_decay=0.02, **kw)),
        ("adam", optim.Adam(lr=0.01, **kw), ref.Adam(lr=0.01, **kw)),
        ("adam-wd", optim.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, **kw),
         ref.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, **kw)),
        ("adamw", optim.AdamW(lr=0.01, weight_decay=0.1, **kw), ref.AdamW(lr=0.01, weight_decay=0.1, **kw)),
        ("rmsprop", optim.RMSprop(lr=0.01, **kw), ref.RMSprop(lr=0.01, **kw)),
        ("rmsprop-momentum", optim.RMSprop(lr=0.01, alpha=0.9, momentum=0.7, **kw),
         ref.RMSprop(lr=0.01, alpha=0.9, momentum=0.7, **kw)),
        ("rmsprop-wd", optim.RMSprop(lr=0.01, weight_decay=0.1, eps=1e-4, **kw),
         ref.RMSprop(lr=0.01, weight_decay=0.1, eps=1e-4, **kw)),
    ]


CASES = [pytest.param(ours, theirs, clip, id=f"{name}-clip{clip}")
         for clip in (None, 0.05, 100.0) for name, ours, theirs in cases(clip)]


def assert_params_close(model: bp.CompiledModel, expected: dict[str, np.ndarray], what: str) -> None:
    for k, v in expected.items():
        np.testing.assert_allclose(model.params[k], v, rtol=1e-12, atol=1e-15, err_msg=f"{k} {what}")


@pytest.mark.parametrize("ours, theirs, clip", CASES)
def test_update_matches_reference(build_dir, monkeypatch, ours, theirs, clip):
    model = compile_model(ours, monkeypatch)
    params = {k: v.copy() for k, v in model.params.items()}
    initial = {k: v.copy() for k, v in params.items()}
    clipped = 0
    for step, (X, T) in enumerate(batches(STEPS), 1):
        loss, grads = model.loss_and_grad(x=X, t=T)
        norm = ref.global_grad_norm(grads)
        clipped += clip is not None and norm > clip
        theirs.step(params, grads)
        assert model.train_step(x=X, t=T) == loss
        assert model.step == step
        assert_params_close(model, params, f"after step {step}")
    if clip == 0.05:
        assert clipped == STEPS, "the clip threshold should have been active at every step"
    for k in initial:
        assert not np.allclose(model.params[k], initial[k], rtol=1e-6, atol=1e-8), f"{k} did not move"


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "rmsprop", "adam", "adamw"])
def test_learning_rate_override(build_dir, monkeypatch, kind):
    ours, theirs = {name: (o, t) for name, o, t in cases(None)}[kind]
    model = compile_model(ours, monkeypatch)
    params = {k: v.copy() for k, v in model.params.items()}
    rates = [0.3, None, 0.0, 0.02, None]
    for (X, T), lr in zip(batches(len(rates), seed=1), rates):
        _, grads = model.loss_and_grad(x=X, t=T)
        theirs.lr = ours.lr_at(model.step + 1) if lr is None else lr
        before = {k: v.copy() for k, v in model.params.items()}
        theirs.step(params, grads)
        model.train_step(x=X, t=T, lr=lr)
        assert_params_close(model, params, f"with lr={lr}")
        if lr == 0.0:
            for k in before:
                np.testing.assert_array_equal(model.params[k], before[k])
    assert model.step == len(rates)


def _step_decay(k):
    return 0.2 * 0.5 ** ((k - 1) // 2)


def _cosine(k):
    return 0.01 + 0.5 * (0.3 - 0.01) * (1 + math.cos(math.pi * min(k - 1, 4) / 4))


def _warmup(k):
    return 0.25 * min(1.0, k / 3)


def _warm_cosine(k):
    return (0.3 / 2 * (1 + math.cos(math.pi * min(k - 1, 5) / 5))) * min(1.0, k / 2)


SCHEDULES = [
    pytest.param(schedules.Constant(0.15), lambda k: 0.15, id="constant"),
    pytest.param(schedules.StepDecay(0.2, step_size=2, gamma=0.5), _step_decay, id="step-decay"),
    pytest.param(schedules.Cosine(0.3, total_steps=4, min_lr=0.01), _cosine, id="cosine"),
    pytest.param(schedules.LinearWarmup(0.25, warmup_steps=3), _warmup, id="warmup"),
    pytest.param(schedules.LinearWarmup(schedules.Cosine(0.3, total_steps=5), warmup_steps=2), _warm_cosine,
                 id="warmup-cosine"),
]


@pytest.mark.parametrize("schedule, formula", SCHEDULES)
def test_schedules_drive_the_step(build_dir, monkeypatch, schedule, formula):
    n = 7
    for k in range(1, n + 1):
        assert schedule(k) == pytest.approx(formula(k), rel=1e-15, abs=1e-300)
    model = compile_model(optim.SGD(lr=schedule), monkeypatch)
    for k, (X, T) in enumerate(batches(n, seed=2), 1):
        _, grads = model.loss_and_grad(x=X, t=T)
        before = {name: v.copy() for name, v in model.params.items()}
        model.train_step(x=X, t=T)
        for name in grads:
            np.testing.assert_allclose(model.params[name], before[name] - formula(k) * grads[name], rtol=1e-12,
                                       atol=1e-15, err_msg=f"{name} at step {k}")
    # with momentum the rate scales the buffer step by step, as in torch (lr changed per param_group)
    model = compile_model(optim.SGD(lr=schedule, momentum=0.9), monkeypatch)
    theirs = ref.SGD(lr=0.0, momentum=0.9)
    params = {k: v.copy() for k, v in model.params.items()}
    for k, (X, T) in enumerate(batches(n, seed=3), 1):
        _, grads = model.loss_and_grad(x=X, t=T)
        theirs.lr = formula(k)
        theirs.step(params, grads)
        model.train_step(x=X, t=T)
        assert_params_close(model, params, f"at step {k}")


def test_bp_load_restores_each_compiles_schedule(build_dir, monkeypatch):
    first = compile_model(optim.SGD(lr=0.1), monkeypatch)
    decay = schedules.StepDecay(0.4, step_size=3, gamma=0.25)
    model = compile_model(optim.SGD(lr=decay), monkeypatch)
    assert model.build_path != first.build_path and model.meta["module"] == first.meta["module"]  # no new C
    assert [model.optimizer.lr_at(k) for k in range(1, 8)] == [decay(k) for k in range(1, 8)]
    loaded = bp.load(model.build_path)
    assert [loaded.optimizer.lr_at(k) for k in range(1, 8)] == [0.4, 0.4, 0.4, 0.1, 0.1, 0.1, 0.025]
    assert bp.load(first.build_path).optimizer.lr_at(5) == 0.1  # the later compile changed nothing of it


def test_bp_load_restores_optimizer_settings(build_dir, monkeypatch):
    opt = optim.RMSprop(lr=0.01, alpha=0.9, momentum=0.7, weight_decay=0.1, clip_norm=0.05)
    model = compile_model(opt, monkeypatch)
    loaded = bp.load(model.build_path)
    assert isinstance(loaded.optimizer, optim.RMSprop)
    assert (loaded.optimizer.alpha, loaded.optimizer.momentum, loaded.optimizer.weight_decay,
            loaded.optimizer.clip_norm) == (0.9, 0.7, 0.1, 0.05)
    for m in (model, loaded):
        m.reset_parameters(0)
    for X, T in batches(3, seed=9):
        assert loaded.train_step(x=X, t=T, lr=0.01) == model.train_step(x=X, t=T, lr=0.01)
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])


RESUME = [
    pytest.param(optim.SGD(lr=schedules.StepDecay(0.1, 2, 0.7), momentum=0.9, nesterov=True, clip_norm=0.5),
                 id="sgd-nesterov"),
    pytest.param(optim.RMSprop(lr=0.01, momentum=0.5, weight_decay=0.01), id="rmsprop-momentum"),
    pytest.param(optim.Adam(lr=schedules.Cosine(0.02, 10), weight_decay=0.01), id="adam"),
    pytest.param(optim.AdamW(lr=0.01, clip_norm=0.1), id="adamw"),
    pytest.param(optim.Adagrad(lr=0.1, lr_decay=0.05), id="adagrad"),
    pytest.param(optim.Adadelta(lr=1.0, rho=0.8), id="adadelta"),
    pytest.param(optim.Adamax(lr=0.01), id="adamax"),
    pytest.param(optim.NAdam(lr=0.01, momentum_decay=0.01), id="nadam"),
    pytest.param(optim.Adam(lr=0.01, amsgrad=True), id="adam-amsgrad"),
    pytest.param(optim.RMSprop(lr=0.01, centered=True, momentum=0.5), id="rmsprop-centered"),
    pytest.param(optim.AdamW(lr=0.01, weight_decay=0.1, param_groups=[{"params": ["b"], "weight_decay": 0.0,
                                                                       "lr_scale": 0.3}]), id="adamw-groups"),
]


@pytest.mark.parametrize("opt", RESUME)
def test_bp_load_restores_every_setting_and_trains_the_same(build_dir, monkeypatch, opt):
    model = compile_model(opt, monkeypatch)
    loaded = bp.load(model.build_path)
    assert type(loaded.optimizer) is type(opt) and loaded.optimizer.config() == opt.config()
    for X, T in batches(3, seed=9):
        assert loaded.train_step(x=X, t=T) == model.train_step(x=X, t=T)
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])


@pytest.mark.parametrize("opt", RESUME)
def test_save_load_continue_is_bit_identical(build_dir, monkeypatch, tmp_path, opt):
    data = batches(8, seed=4)
    straight = compile_model(opt, monkeypatch, seed=0)
    for X, T in data[:4]:
        straight.train_step(x=X, t=T)
    straight.save(tmp_path / "ckpt.npz")
    losses = [straight.train_step(x=X, t=T) for X, T in data[4:]]

    resumed = compile_model(opt, monkeypatch, seed=123)  # a separate instance, other initial values
    resumed.load(tmp_path / "ckpt.npz")
    assert resumed.step == 4
    assert [resumed.train_step(x=X, t=T) for X, T in data[4:]] == losses
    assert resumed.step == straight.step == 8
    for k in straight.params:
        assert np.array_equal(resumed.params[k], straight.params[k]), k
        assert resumed.params[k].tobytes() == straight.params[k].tobytes(), k

    # without the optimizer state (only parameters copied) the run differs: the state matters
    fresh = compile_model(opt, monkeypatch, seed=0)
    with np.load(tmp_path / "ckpt.npz") as f:
        for k in fresh.params:
            fresh.params[k][...] = f[f"param/{k}"]
    for X, T in data[4:]:
        fresh.train_step(x=X, t=T)
    assert any(not np.array_equal(fresh.params[k], straight.params[k]) for k in straight.params)


@pytest.mark.parametrize("opt", [optim.Adam(lr=1e-3), optim.AdamW(lr=1e-3, clip_norm=1.0)], ids=["adam", "adamw"])
def test_adam_update_compiles_warning_free(build_dir, monkeypatch, opt):
    """Adam's update uses step_size, not lr: an unused hyperparameter must not become an unused
    C variable (an error under -Werror)."""
    monkeypatch.setenv("BPCOMPILE_WERROR", "1")
    model = bp.compile(linear_tanh_graph(), dtype="float32", optimizer=opt)
    X, T = batches(1)[0]
    assert np.isfinite(model.train_step(x=X, t=T))


def test_optimizer_settings_are_validated():
    with pytest.raises(ValueError):
        optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.Adam(betas=(1.0, 0.999))
    with pytest.raises(ValueError):
        optim.RMSprop(clip_norm=0)
    with pytest.raises(ValueError):
        optim.SGD(lr=-1.0)
    with pytest.raises(ValueError):
        optim.SGD(weight_decay=float("nan"))
