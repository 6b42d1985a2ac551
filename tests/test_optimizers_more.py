"""The optimizers added after SGD/Adam/AdamW/RMSprop, and param_groups, against the NumPy
references of torch.optim (tests/optim_reference.py) over 20 steps in float64."""

from __future__ import annotations

import numpy as np
import pytest

from bpcompile import optim

try:
    import optim_reference as ref
    from test_optimizers import batches, compile_model
except ImportError:  # tests/ imported as a package
    from tests import optim_reference as ref
    from tests.test_optimizers import batches, compile_model

CASES = [
    ("adagrad", optim.Adagrad(lr=0.1, lr_decay=0.01, weight_decay=0.01), ref.Adagrad(lr=0.1, lr_decay=0.01,
                                                                                     weight_decay=0.01)),
    ("adadelta", optim.Adadelta(lr=1.0, weight_decay=0.01), ref.Adadelta(lr=1.0, weight_decay=0.01)),
    ("adamax", optim.Adamax(lr=0.01), ref.Adamax(lr=0.01)),
    ("nadam", optim.NAdam(lr=0.01, weight_decay=0.01), ref.NAdam(lr=0.01, weight_decay=0.01)),
    ("adam-amsgrad", optim.Adam(lr=0.01, amsgrad=True), ref.AdamAmsgrad(lr=0.01)),
    ("adamw-amsgrad", optim.AdamW(lr=0.01, amsgrad=True), ref.AdamWAmsgrad(lr=0.01, weight_decay=0.01)),
    ("rmsprop-centered", optim.RMSprop(lr=0.01, centered=True, momentum=0.5),
     ref.RMSpropCentered(lr=0.01, momentum=0.5)),
]


@pytest.mark.parametrize("ours, theirs", [pytest.param(o, t, id=n) for n, o, t in CASES])
def test_new_optimizers_match_reference(build_dir, monkeypatch, ours, theirs):
    model = compile_model(ours, monkeypatch)
    params = {k: v.copy() for k, v in model.params.items()}
    for X, T in batches(20):
        _, grads = model.loss_and_grad(x=X, t=T)
        theirs.step(params, grads)
        model.train_step(x=X, t=T)
    for k, v in params.items():
        np.testing.assert_allclose(model.params[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


def test_param_groups_are_validated():
    with pytest.raises(ValueError, match="unknown settings"):
        optim.AdamW(param_groups=[{"params": ["W"], "momentum": 1}])
    opt = optim.AdamW(param_groups=[{"params": ["W"]}, {"params": ["W"]}])
    with pytest.raises(ValueError, match="is in param_groups"):
        opt.group_of(["W", "b"])
    with pytest.raises(ValueError, match="not a parameter"):
        optim.AdamW(param_groups=[{"params": ["nope"]}]).group_of(["W", "b"])
