"""Tests of the NumPy optimizer reference (tests/optim_reference.py) itself.

* Hand-computed single/two-step cases that need no torch.
* When torch is importable: every optimizer and option combination over 5
  steps against ``torch.optim`` + ``torch.nn.utils.clip_grad_norm_`` in
  float64, to 1e-12.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

try:
    from optim_reference import SGD, Adam, AdamW, RMSprop, clip_grad_norm
except ImportError:  # tests/ imported as a package
    from tests.optim_reference import SGD, Adam, AdamW, RMSprop, clip_grad_norm

TOL = 1e-12


def scalar_params(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"p": np.array(value, dtype=np.float64)}


def run_scalar(opt, grads_seq, p0: float = 1.0) -> list[float]:
    """Run ``opt`` on one scalar parameter, return p after each step."""
    params = scalar_params(p0)
    out = []
    for g in grads_seq:
        opt.step(params, {"p": np.array(g, dtype=np.float64)})
        out.append(float(params["p"]))
    return out


# --------------------------------------------------------------- torch-free


def test_sgd_plain_and_l2_weight_decay():
    # p = 1, g = 2, lr = 0.1: p = 1 - 0.1*2 = 0.8
    assert run_scalar(SGD(lr=0.1), [2.0]) == pytest.approx([0.8], abs=TOL)
    # weight decay 0.1: g = 2 + 0.1*1 = 2.1, p = 1 - 0.21 = 0.79
    assert run_scalar(SGD(lr=0.1, weight_decay=0.1), [2.0]) == pytest.approx(
        [0.79], abs=TOL
    )


def test_sgd_momentum_two_steps():
    # step 1: buf = g1 = 2 (no dampening on the first step), p = 1 - 0.1*2 = 0.8
    # step 2: buf = 0.9*2 + 3 = 4.8, p = 0.8 - 0.1*4.8 = 0.32
    opt = SGD(lr=0.1, momentum=0.9)
    assert run_scalar(opt, [2.0, 3.0]) == pytest.approx([0.8, 0.32], abs=TOL)
    assert float(opt.state["p"]["momentum_buffer"]) == pytest.approx(4.8, abs=TOL)


def test_sgd_momentum_dampening_two_steps():
    # dampening 0.5: step 1 buf = 2 (undampened), p = 0.8
    # step 2: buf = 0.9*2 + 0.5*3 = 3.3, p = 0.8 - 0.33 = 0.47
    opt = SGD(lr=0.1, momentum=0.9, dampening=0.5)
    assert run_scalar(opt, [2.0, 3.0]) == pytest.approx([0.8, 0.47], abs=TOL)


def test_sgd_nesterov_two_steps():
    # step 1: buf = 2, g = 2 + 0.9*2 = 3.8, p = 1 - 0.38 = 0.62
    # step 2: buf = 0.9*2 + 3 = 4.8, g = 3 + 0.9*4.8 = 7.32, p = 0.62 - 0.732 = -0.112
    opt = SGD(lr=0.1, momentum=0.9, nesterov=True)
    assert run_scalar(opt, [2.0, 3.0]) == pytest.approx([0.62, -0.112], abs=TOL)


def test_sgd_nesterov_needs_momentum_and_no_dampening():
    with pytest.raises(ValueError):
        SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)


def test_adam_two_steps():
    # betas (0.5, 0.75), lr 0.1, eps 1e-8, p0 = 1, g = 2 then 4.
    # step 1: m = 0.5*2 = 1, v = 0.25*4 = 1, bc1 = 0.5, bc2 = 0.25
    #         denom = sqrt(1)/sqrt(0.25) + eps = 2 + eps
    #         p = 1 - (0.1/0.5) * 1/(2 + eps)
    p1 = 1 - (0.1 / 0.5) * 1 / (2 + 1e-8)
    # step 2: m = 0.5*1 + 0.5*4 = 2.5, v = 0.75*1 + 0.25*16 = 4.75
    #         bc1 = 1 - 0.25 = 0.75, bc2 = 1 - 0.5625 = 0.4375
    p2 = p1 - (0.1 / 0.75) * 2.5 / (math.sqrt(4.75) / math.sqrt(0.4375) + 1e-8)
    opt = Adam(lr=0.1, betas=(0.5, 0.75), eps=1e-8)
    assert run_scalar(opt, [2.0, 4.0]) == pytest.approx([p1, p2], abs=TOL)
    st = opt.state["p"]
    assert st["step"] == 2
    assert float(st["exp_avg"]) == pytest.approx(2.5, abs=TOL)
    assert float(st["exp_avg_sq"]) == pytest.approx(4.75, abs=TOL)


def test_adam_first_step_is_sign_step_and_l2_decay():
    # With default betas the first step is p - lr * g / (|g| + eps).
    assert run_scalar(Adam(lr=0.1), [2.0]) == pytest.approx(
        [1 - 0.1 * 2 / (2 + 1e-8)], abs=TOL
    )
    # L2 decay goes into the gradient, so into the moments: g = 2 + 0.5*1 = 2.5
    opt = Adam(lr=0.1, weight_decay=0.5)
    assert run_scalar(opt, [2.0]) == pytest.approx(
        [1 - 0.1 * 2.5 / (2.5 + 1e-8)], abs=TOL
    )
    assert float(opt.state["p"]["exp_avg"]) == pytest.approx(0.1 * 2.5, abs=TOL)


def test_adamw_decoupled_decay():
    # p = 1 * (1 - 0.1*0.1) = 0.99, then the Adam step with the raw g = 2.
    opt = AdamW(lr=0.1, weight_decay=0.1)
    assert run_scalar(opt, [2.0]) == pytest.approx(
        [0.99 - 0.1 * 2 / (2 + 1e-8)], abs=TOL
    )
    # the decay does not reach the moments
    assert float(opt.state["p"]["exp_avg"]) == pytest.approx(0.1 * 2.0, abs=TOL)
    assert AdamW().weight_decay == 1e-2


def test_rmsprop_plain_and_momentum():
    # alpha 0.5, lr 0.1, g = 2: v = 0.5*4 = 2, p = 1 - 0.1*2/(sqrt(2) + eps)
    p1 = 1 - 0.1 * 2 / (math.sqrt(2) + 1e-8)
    assert run_scalar(RMSprop(lr=0.1, alpha=0.5), [2.0]) == pytest.approx([p1], abs=TOL)
    # momentum 0.9, g = 2 then 4:
    # step 1: v = 2, b = 2/(sqrt2 + eps), p = 1 - 0.1*b
    b1 = 2 / (math.sqrt(2) + 1e-8)
    # step 2: v = 0.5*2 + 0.5*16 = 9, b = 0.9*b1 + 4/(3 + eps)
    b2 = 0.9 * b1 + 4 / (3 + 1e-8)
    opt = RMSprop(lr=0.1, alpha=0.5, momentum=0.9)
    assert run_scalar(opt, [2.0, 4.0]) == pytest.approx(
        [1 - 0.1 * b1, 1 - 0.1 * b1 - 0.1 * b2], abs=TOL
    )
    assert float(opt.state["p"]["square_avg"]) == pytest.approx(9.0, abs=TOL)


def test_clip_norm_global_and_only_when_needed():
    grads = {"a": np.array([3.0]), "b": np.array([4.0])}  # global norm 5
    clipped, norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0, abs=TOL)
    assert clipped["a"][0] == pytest.approx(3 / (5 + 1e-6), abs=TOL)
    assert clipped["b"][0] == pytest.approx(4 / (5 + 1e-6), abs=TOL)
    assert grads["a"][0] == 3.0  # input untouched
    # SGD lr 1 from 0: p = -clipped g
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    SGD(lr=1.0, clip_norm=1.0).step(params, grads)
    assert params["a"][0] == pytest.approx(-3 / (5 + 1e-6), abs=TOL)
    assert params["b"][0] == pytest.approx(-4 / (5 + 1e-6), abs=TOL)
    # max_norm 10 > 5: scale = 10/(5 + 1e-6) > 1, so no scaling at all
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    SGD(lr=1.0, clip_norm=10.0).step(params, grads)
    assert params["a"][0] == -3.0 and params["b"][0] == -4.0


def test_in_place_update_and_missing_grad_skipped():
    w = np.ones(3)
    params = {"w": w, "frozen": np.ones(2)}
    opt = Adam(lr=0.1)
    g = np.array([1.0, -2.0, 0.5])
    opt.step(params, {"w": g})
    assert params["w"] is w  # same array, updated in place
    np.testing.assert_allclose(w, 1 - 0.1 * np.sign(g), atol=1e-7)
    np.testing.assert_array_equal(params["frozen"], np.ones(2))
    assert "frozen" not in opt.state
    np.testing.assert_array_equal(g, [1.0, -2.0, 0.5])  # grads untouched
    with pytest.raises(KeyError):
        opt.step(params, {"nope": np.ones(1)})


# ------------------------------------------------------------ against torch

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
STEPS = 5

# (name, reference class, kwargs); clip_norm is added by the parametrisation.
CASES = [
    ("sgd", SGD, {"lr": 0.1}),
    ("sgd_wd", SGD, {"lr": 0.1, "weight_decay": 0.05}),
    ("sgd_mom", SGD, {"lr": 0.1, "momentum": 0.9}),
    ("sgd_mom_damp", SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    (
        "sgd_mom_damp_wd",
        SGD,
        {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    ),
    ("sgd_nesterov", SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (
        "sgd_nesterov_wd",
        SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    ),
    ("adam", Adam, {}),
    ("adam_lr", Adam, {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}),
    ("adam_wd", Adam, {"lr": 0.05, "weight_decay": 0.1}),
    ("adamw", AdamW, {}),
    ("adamw_wd", AdamW, {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.2}),
    ("adamw_no_wd", AdamW, {"lr": 0.05, "weight_decay": 0.0}),
    ("rmsprop", RMSprop, {}),
    ("rmsprop_wd", RMSprop, {"lr": 0.02, "alpha": 0.9, "weight_decay": 0.1}),
    ("rmsprop_mom", RMSprop, {"lr": 0.02, "momentum": 0.9}),
    (
        "rmsprop_mom_wd",
        RMSprop,
        {"lr": 0.02, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "weight_decay": 0.1},
    ),
]

# None: no clipping; 1.0: the global norm of the N(0,1) grads (~4) is clipped
# every step; 100.0: clipping on but never active.
CLIPS = [None, 1.0, 100.0]

TORCH_STATE_KEYS = ["momentum_buffer", "exp_avg", "exp_avg_sq", "square_avg"]


def _torch_optimizer(torch, cls, tparams, kwargs):
    # AdamW before Adam: AdamW subclasses Adam here.
    for ours, theirs in [
        (SGD, "SGD"),
        (AdamW, "AdamW"),
        (Adam, "Adam"),
        (RMSprop, "RMSprop"),
    ]:
        if cls is ours:
            return getattr(torch.optim, theirs)(tparams, **kwargs)
    raise AssertionError(cls)


@pytest.mark.parametrize("clip_norm", CLIPS, ids=lambda c: f"clip={c}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(case, clip_norm):
    torch = pytest.importorskip("torch", reason="torch not installed: no oracle check")
    name, cls, kwargs = case
    rng = np.random.default_rng(zlib.crc32(f"{name}/{clip_norm}".encode()))

    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    tparams = {
        k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True)
        for k, v in params.items()
    }
    ref = cls(**kwargs, clip_norm=clip_norm)
    topt = _torch_optimizer(torch, cls, list(tparams.values()), kwargs)

    for _ in range(STEPS):
        grads = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k].copy(), dtype=torch.float64)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip_norm)
        topt.step()
        ref.step(params, grads)

        for k, t in tparams.items():
            np.testing.assert_allclose(
                params[k], t.detach().numpy(), rtol=TOL, atol=TOL, err_msg=f"param {k}"
            )
            tstate = topt.state[t]
            for key in TORCH_STATE_KEYS:
                if tstate.get(key) is not None:
                    np.testing.assert_allclose(
                        ref.state[k][key],
                        tstate[key].numpy(),
                        rtol=TOL,
                        atol=TOL,
                        err_msg=f"state {key} of {k}",
                    )
            if "step" in tstate:
                assert ref.state[k]["step"] == int(tstate["step"])
