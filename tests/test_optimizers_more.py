"""The optimizers added after SGD/Adam/AdamW/RMSprop, and param_groups, over 20 steps in float64:
against the NumPy references of torch.optim (tests/optim_reference.py) always, and against
torch.optim itself where torch is installed (nanoGPT's configure_optimizers among them)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import bpcompile as bp
from bpcompile import optim

try:
    import optim_reference as ref
    from test_optimizers import batches, compile_model, linear_tanh_graph
except ImportError:  # tests/ imported as a package
    from tests import optim_reference as ref
    from tests.test_optimizers import batches, compile_model, linear_tanh_graph

STEPS = 20

# (name, bpcompile optimizer, NumPy reference, torch.optim class name, its settings)
CASES = [
    ("adagrad", optim.Adagrad(lr=0.1, lr_decay=0.01, weight_decay=0.01),
     ref.Adagrad(lr=0.1, lr_decay=0.01, weight_decay=0.01), "Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    ("adadelta", optim.Adadelta(lr=1.0, weight_decay=0.01), ref.Adadelta(lr=1.0, weight_decay=0.01),
     "Adadelta", dict(lr=1.0, weight_decay=0.01)),
    ("adamax", optim.Adamax(lr=0.01), ref.Adamax(lr=0.01), "Adamax", dict(lr=0.01)),
    ("nadam", optim.NAdam(lr=0.01, weight_decay=0.01), ref.NAdam(lr=0.01, weight_decay=0.01),
     "NAdam", dict(lr=0.01, weight_decay=0.01)),
    ("nadam-decoupled", optim.NAdam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     ref.NAdam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     "NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adam-amsgrad", optim.Adam(lr=0.01, amsgrad=True), ref.AdamAmsgrad(lr=0.01), "Adam", dict(lr=0.01, amsgrad=True)),
    ("adamw-amsgrad", optim.AdamW(lr=0.01, amsgrad=True), ref.AdamWAmsgrad(lr=0.01, weight_decay=0.01),
     "AdamW", dict(lr=0.01, amsgrad=True)),
    ("rmsprop-centered", optim.RMSprop(lr=0.01, centered=True, momentum=0.5),
     ref.RMSpropCentered(lr=0.01, momentum=0.5), "RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
    ("rmsprop-centered-wd", optim.RMSprop(lr=0.01, alpha=0.9, centered=True, weight_decay=0.1),
     ref.RMSpropCentered(lr=0.01, alpha=0.9, weight_decay=0.1), "RMSprop",
     dict(lr=0.01, alpha=0.9, centered=True, weight_decay=0.1)),
]
IDS = [c[0] for c in CASES]


def assert_close(model: bp.CompiledModel, expected: dict, what: str, rtol: float = 1e-12,
                 atol: float = 1e-15) -> None:
    for k, v in expected.items():
        np.testing.assert_allclose(model.params[k], v, rtol=rtol, atol=atol, err_msg=f"{k} {what}")


@pytest.mark.parametrize("ours, theirs", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_new_optimizers_match_reference(build_dir, monkeypatch, ours, theirs):
    model = compile_model(ours, monkeypatch)
    params = {k: v.copy() for k, v in model.params.items()}
    for X, T in batches(STEPS):
        _, grads = model.loss_and_grad(x=X, t=T)
        theirs.step(params, grads)
        model.train_step(x=X, t=T)
    assert_close(model, params, f"after {STEPS} steps")


# --- against torch.optim ----------------------------------------------------------------------

@pytest.fixture
def torch64():
    """torch with float64 as its default dtype: torch.optim keeps scalar state (the step count,
    NAdam's product of momentum factors) in the default dtype, float32 otherwise."""
    torch = pytest.importorskip("torch", reason="torch not installed: no torch.optim oracle")
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(saved)


def torch_twin(torch, model: bp.CompiledModel):
    """torch leaf tensors holding the model's parameters, and the loss of linear_tanh_graph on them."""
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}

    def loss(X, T):
        return torch.mean((torch.tanh(torch.tensor(X) @ tp["W"] + tp["b"]) - torch.tensor(T)) ** 2)
    return tp, loss


def train_both(model: bp.CompiledModel, torch_opt, tp: dict, loss, steps: int = STEPS) -> None:
    """`steps` train steps of the model and of torch_opt on the same batches, compared at each."""
    for step, (X, T) in enumerate(batches(steps), 1):
        torch_opt.zero_grad()
        value = loss(X, T)
        value.backward()
        torch_opt.step()
        assert model.train_step(x=X, t=T) == pytest.approx(value.item(), rel=1e-12)
        assert_close(model, {k: v.detach().numpy() for k, v in tp.items()}, f"after step {step}")


@pytest.mark.parametrize("ours, cls, kwargs", [pytest.param(c[1], c[3], c[4], id=c[0]) for c in CASES])
def test_new_optimizers_match_torch(build_dir, monkeypatch, torch64, ours, cls, kwargs):
    model = compile_model(ours, monkeypatch)
    tp, loss = torch_twin(torch64, model)
    train_both(model, getattr(torch64.optim, cls)(list(tp.values()), foreach=False, **kwargs), tp, loss)


GROUPED = [  # (name, bpcompile optimizer, torch.optim class, settings, torch's groups of W and b)
    ("adamw-decay-matrices-only", optim.AdamW(lr=0.02, weight_decay=0.1, param_groups=[{"params": ["b"],
                                                                                       "weight_decay": 0.0}]),
     "AdamW", dict(lr=0.02, weight_decay=0.1), [{"params": ["W"]}, {"params": ["b"], "weight_decay": 0.0}]),
    ("sgd-lr-scale", optim.SGD(lr=0.1, momentum=0.9, param_groups=[{"params": ["W"], "lr_scale": 0.5,
                                                                    "weight_decay": 0.05}]),
     "SGD", dict(lr=0.1, momentum=0.9), [{"params": ["W"], "lr": 0.05, "weight_decay": 0.05}, {"params": ["b"]}]),
    ("nadam-both", optim.NAdam(lr=0.01, param_groups=[{"params": ["W"], "weight_decay": 0.2},
                                                      {"params": ["b"], "lr_scale": 2.0}]),
     "NAdam", dict(lr=0.01), [{"params": ["W"], "weight_decay": 0.2}, {"params": ["b"], "lr": 0.02}]),
    ("adagrad-lr-scale", optim.Adagrad(lr=0.1, lr_decay=0.05, param_groups=[{"params": ["b"], "lr_scale": 0.1}]),
     "Adagrad", dict(lr=0.1, lr_decay=0.05), [{"params": ["W"]}, {"params": ["b"], "lr": 0.01}]),
]


@pytest.mark.parametrize("ours, cls, kwargs, groups", [pytest.param(*c[1:], id=c[0]) for c in GROUPED])
def test_param_groups_match_torch_param_groups(build_dir, monkeypatch, torch64, ours, cls, kwargs, groups):
    model = compile_model(ours, monkeypatch)
    tp, loss = torch_twin(torch64, model)
    torch_groups = [dict(g, params=[tp[n] for n in g["params"]]) for g in groups]
    train_both(model, getattr(torch64.optim, cls)(torch_groups, foreach=False, **kwargs), tp, loss)


def test_param_groups_match_one_reference_per_group(build_dir, monkeypatch):
    """A group is its own optimizer on its parameters, with the same step count."""
    model = compile_model(optim.Adam(lr=0.01, param_groups=[{"params": ["W"], "weight_decay": 0.1,
                                                              "lr_scale": 0.5}]), monkeypatch)
    params = {k: v.copy() for k, v in model.params.items()}
    per_group = {"W": ref.Adam(lr=0.005, weight_decay=0.1), "b": ref.Adam(lr=0.01)}
    for X, T in batches(STEPS):
        _, grads = model.loss_and_grad(x=X, t=T)
        for name, opt in per_group.items():
            opt.step({name: params[name]}, {name: grads[name]})
        model.train_step(x=X, t=T)
    assert_close(model, params, f"after {STEPS} steps")


def test_nanogpt_configure_optimizers_trajectory(build_dir, torch64):
    """nanoGPT's configure_optimizers (AdamW; weight decay on the parameters of 2 or more
    dimensions only) on a GPT twin: the same trajectory as torch's over 20 steps."""
    torch = torch64
    try:
        from test_transformer import _gpt, _torch_gpt
    except ImportError:
        from tests.test_transformer import _gpt, _torch_gpt
    vocab, t, c, heads = 11, 6, 8, 2
    g, names = _gpt(vocab, t, c, heads, layers=1)
    settings = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    no_decay = [p for p, node in g.params.items() if len(node.shape) < 2]
    model = bp.compile(g, "float64", seed=2, optimizer=optim.AdamW(
        **settings, param_groups=[{"params": no_decay, "weight_decay": 0.0}]))
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    # configure_optimizers, as nanoGPT's model.py writes it
    decay_params = [p for n, p in tp.items() if p.dim() >= 2]
    nodecay_params = [p for n, p in tp.items() if p.dim() < 2]
    optim_groups = [{"params": decay_params, "weight_decay": settings["weight_decay"]},
                    {"params": nodecay_params, "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(optim_groups, lr=settings["lr"], betas=settings["betas"], foreach=False)
    rng = np.random.default_rng(4)
    for _ in range(STEPS):
        idx, targets = (rng.integers(0, vocab, size=(3, t)).astype(np.int32) for _ in range(2))
        torch_opt.zero_grad()
        loss = _torch_gpt(tp, names, torch.tensor(idx).long(), torch.tensor(targets), heads)
        loss.backward()
        torch_opt.step()
        assert model.train_step(idx=idx, targets=targets) == pytest.approx(loss.item(), rel=1e-9)
    assert no_decay and len(no_decay) < len(tp)
    # atol: the key bias has a true gradient of 0 (it shifts all of a query's scores alike): both
    # libraries leave it at rounding noise (1e-12), each its own
    assert_close(model, {k: v.detach().numpy() for k, v in tp.items()}, "after 20 steps", rtol=1e-8, atol=1e-10)
    decayed = optim.AdamW(**settings)  # without the groups every parameter decays: another trajectory
    other = bp.compile(g, "float64", seed=2, optimizer=decayed)
    rng = np.random.default_rng(4)
    for _ in range(STEPS):
        other.train_step(idx=rng.integers(0, vocab, size=(3, t)).astype(np.int32),
                         targets=rng.integers(0, vocab, size=(3, t)).astype(np.int32))
    assert not np.allclose(other.params[no_decay[0]], model.params[no_decay[0]], rtol=1e-6, atol=0)


def test_param_groups_are_validated():
    with pytest.raises(ValueError, match="unknown settings"):
        optim.AdamW(param_groups=[{"params": ["W"], "momentum": 1}])
    opt = optim.AdamW(param_groups=[{"params": ["W"]}, {"params": ["W"]}])
    with pytest.raises(ValueError, match="is in param_groups"):
        opt.group_of(["W", "b"])
    with pytest.raises(ValueError, match="not a parameter"):
        optim.AdamW(param_groups=[{"params": ["nope"]}]).group_of(["W", "b"])


def test_param_group_errors_at_compile_name_the_parameter(build_dir):
    g = linear_tanh_graph()
    with pytest.raises(ValueError, match=r"param_groups\[1\] names 'nope', which is not a parameter"):
        bp.compile(g, optimizer=optim.SGD(param_groups=[{"params": ["W"]}, {"params": ["nope"]}]))
    with pytest.raises(ValueError, match=r"parameter 'W' is in param_groups\[0\] and param_groups\[1\]"):
        bp.compile(g, optimizer=optim.Adam(param_groups=[{"params": [g.params["W"]]}, {"params": ["b", "W"]}]))
    with pytest.raises(ValueError, match="neither a parameter name nor a parameter node"):
        optim.Adam(param_groups=[{"params": [g.inputs["x"]]}])


def test_param_groups_share_the_one_fused_update_kernel(build_dir, monkeypatch):
    """Groups change the update's constants per parameter range, not the number of passes: one
    update kernel, called once per train step, each parameter's range written once."""
    plain = compile_model(optim.AdamW(lr=0.01), monkeypatch).c_source
    grouped = compile_model(optim.AdamW(lr=0.01, param_groups=[{"params": ["b"], "weight_decay": 0.0,
                                                                 "lr_scale": 0.5}]), monkeypatch).c_source
    writes = []
    for source in (plain, grouped):
        assert len(re.findall(r"static void k\d+_update_part\(", source)) == 1
        train = source[source.index('Entry point "train_loss"'):source.index('Entry point "backward_loss"')]
        assert len(re.findall(r"k\d+_update\(dims", train)) == 1
        kernel = source[re.search(r"static void k\d+_update_part\(", source).start():]
        writes.append(re.findall(r"params\[i\] = (\w+)\*p", kernel[:kernel.index("\n}\n")]))
    assert writes == [["decay"], ["decay", "decay_g1"]]  # W and b (one range) / W, then b with group 1's
