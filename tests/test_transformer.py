"""Transformer ops and layers against PyTorch (loss and every gradient, float64 and float32),
plus their edge cases: T = 1, odd sizes, ties in max/min, fully masked rows, -inf masks.

Finite differences and the NumPy reference for the same ops are rows of test_op_gradients.py.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import bpcompile as bp

torch = pytest.importorskip("torch", reason="the PyTorch cross-checks need torch (pip install -e '.[torch]')")
F = torch.nn.functional

TOL = {"float64": dict(rtol=1e-9, atol=1e-11), "float32": dict(rtol=1e-4, atol=2e-5)}


def _compare(graph: bp.Graph, torch_loss, inputs: dict, dtype: str, seed: int = 0) -> bp.CompiledModel:
    """Compile `graph` (loss = sum(out * R) built by the caller) and compare the loss and every
    parameter gradient with `torch_loss(params as torch tensors, inputs as torch tensors)`."""
    model = bp.compile(graph, dtype=dtype, seed=seed)
    loss, grads = model.loss_and_grad(**inputs)
    tparams = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for k, v in model.params.items()}
    tinputs = {k: torch.tensor(v) for k, v in inputs.items()}
    tloss = torch_loss(tparams, tinputs)
    tloss.backward()
    tol = TOL[dtype]
    np.testing.assert_allclose(loss, tloss.item(), **tol)
    for name, g in grads.items():
        np.testing.assert_allclose(g, tparams[name].grad.numpy(), err_msg=name, **tol)
    return model


def _param(g: bp.Graph, name: str, shape: tuple, rng: np.random.Generator, scale: float = 1.0):
    return g.param(name, shape, init=rng.normal(size=shape) * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(2, 3, 8), (1, 1, 5), (3, 7)])
def test_layer_norm_matches_torch(dtype: str, shape: tuple, build_dir) -> None:
    rng = np.random.default_rng(len(shape))
    g = bp.Graph("ln")
    x = _param(g, "x", shape, rng, 3.0)
    w = _param(g, "w", shape[-1:], rng)
    b = _param(g, "b", shape[-1:], rng)
    r = g.input("R", shape)
    g.loss(bp.sum(bp.layer_norm(x, w, b, eps=1e-5) * r) + bp.sum(bp.layer_norm(x * x) * r))
    R = rng.normal(size=shape)

    def ref(p, i):
        y = F.layer_norm(p["x"], shape[-1:], p["w"], p["b"], eps=1e-5)
        return (y * i["R"]).sum() + (F.layer_norm(p["x"] * p["x"], shape[-1:]) * i["R"]).sum()
    _compare(g, ref, {"R": R}, dtype)


def test_layer_norm_is_stable_with_a_large_mean(build_dir) -> None:
    """Two passes: a row of 1e4 + small noise normalizes in float32 as in float64."""
    rng = np.random.default_rng(0)
    g = bp.Graph("ln_offset")
    x = g.input("x", ("batch", 64))
    g.output("y", bp.layer_norm(x))
    X = 1e4 + rng.normal(size=(4, 64))
    y = bp.compile(g, dtype="float32").forward(x=X)["y"]
    want = F.layer_norm(torch.tensor(X.astype(np.float32).astype(np.float64)), (64,)).numpy()
    np.testing.assert_allclose(y, want, atol=2e-3)


ATTENTION_CASES = {
    "plain": dict(t=5, s=6, causal=False, mask=None),
    "causal": dict(t=6, s=6, causal=True, mask=None),
    "causal-t1": dict(t=1, s=1, causal=True, mask=None),
    "causal-rect": dict(t=3, s=5, causal=True, mask=None),
    "mask": dict(t=5, s=7, causal=False, mask="random"),
    "mask-full-row": dict(t=4, s=3, causal=False, mask="row"),
    "mask-and-causal": dict(t=5, s=5, causal=True, mask="random"),
}


def _mask(kind: str | None, t: int, s: int, rng: np.random.Generator):
    if kind is None:
        return None
    m = rng.random((t, s)) > 0.35
    if kind == "row":
        m[1] = False
    return m


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=str)
def test_attention_matches_torch(case: str, dtype: str, build_dir) -> None:
    c = ATTENTION_CASES[case]
    rng = np.random.default_rng(len(case))
    d = 3  # odd head size
    g = bp.Graph(f"attn_{case}")
    q = _param(g, "q", (2, 3, c["t"], d), rng)
    k = _param(g, "k", (2, 3, c["s"], d), rng)
    v = _param(g, "v", (2, 3, c["s"], 4), rng)
    mask = _mask(c["mask"], c["t"], c["s"], rng)
    out = bp.attention(q, k, v, causal=c["causal"], mask=mask)
    assert out.shape == (2, 3, c["t"], 4)
    r = g.input("R", out.shape)
    g.loss(bp.sum(out * r))
    R = rng.normal(size=out.shape)

    def ref(p, i):
        m = None if mask is None else torch.tensor(mask)
        if c["causal"]:
            causal = torch.ones(c["t"], c["s"], dtype=torch.bool).tril()
            m = causal if m is None else m & causal
        o = F.scaled_dot_product_attention(p["q"], p["k"], p["v"], attn_mask=m)
        return (o * i["R"]).sum()
    model = _compare(g, ref, {"R": R}, dtype)
    _, grads = model.loss_and_grad(R=R)
    assert all(np.isfinite(gr).all() for gr in grads.values())


def test_attention_broadcasts_leading_dims_and_takes_scale(build_dir) -> None:
    rng = np.random.default_rng(3)
    g = bp.Graph("attn_bcast")
    q = _param(g, "q", (2, 1, 4, 5), rng)
    k = _param(g, "k", (3, 6, 5), rng)
    v = _param(g, "v", (3, 6, 2), rng)
    out = bp.attention(q, k, v, scale=0.7)
    r = g.input("R", out.shape)
    g.loss(bp.sum(out * r))
    R = rng.normal(size=out.shape)

    def ref(p, i):
        qq = p["q"].expand(2, 3, 4, 5)
        kk, vv = p["k"].expand(2, 3, 6, 5), p["v"].expand(2, 3, 6, 2)
        return (F.scaled_dot_product_attention(qq, kk, vv, scale=0.7) * i["R"]).sum()
    _compare(g, ref, {"R": R}, "float64")


def test_attention_mask_from_an_int_input(build_dir) -> None:
    rng = np.random.default_rng(4)
    g = bp.Graph("attn_mask_input")
    q, k, v = (_param(g, n, (2, 4, 3), rng) for n in "qkv")
    m = g.input("m", (2, 4, 4), dtype="int32")
    out = bp.attention(q, k, v, mask=m)
    r = g.input("R", (2, 4, 3))
    g.loss(bp.sum(out * r))
    M = (rng.random((2, 4, 4)) > 0.4).astype(np.int32)
    R = rng.normal(size=(2, 4, 3))

    def ref(p, i):
        return (F.scaled_dot_product_attention(p["q"], p["k"], p["v"], attn_mask=i["m"].bool()) * i["R"]).sum()
    _compare(g, ref, {"m": M, "R": R}, "float64")


@pytest.mark.parametrize("op", ["max", "min"])
def test_max_min_share_ties_as_torch(op: str, build_dir) -> None:
    g = bp.Graph(f"ties_{op}")
    init = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 2.0, -4.0, 2.0]])
    x = g.param("x", init.shape, init=init)
    f = getattr(bp, op)
    r1, r2 = g.input("R1", (3,)), g.input("R2", (1, 4))
    g.loss(bp.sum(f(x, axis=1) * r1) + bp.sum(f(x * x, axis=0, keepdims=True) * r2) + f(x))
    rng = np.random.default_rng(5)
    inputs = {"R1": rng.normal(size=3), "R2": rng.normal(size=(1, 4))}
    tf = torch.amax if op == "max" else torch.amin

    def ref(p, i):
        xx = p["x"]
        return (tf(xx, 1) * i["R1"]).sum() + (tf(xx * xx, 0, keepdim=True) * i["R2"]).sum() + tf(xx, (0, 1))
    _compare(g, ref, inputs, "float64")


def test_max_propagates_nan(build_dir) -> None:
    g = bp.Graph("max_nan")
    x = g.input("x", (2, 3))
    g.output("m", bp.max(x, axis=1))
    out = bp.compile(g, dtype="float64").forward(x=np.array([[1.0, np.nan, 2.0], [3.0, 1.0, 2.0]]))["m"]
    assert np.isnan(out[0]) and out[1] == 3.0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_where_and_masked_fill_match_torch(dtype: str, build_dir) -> None:
    rng = np.random.default_rng(6)
    g = bp.Graph("where")
    a = _param(g, "a", (3, 4), rng)
    b = _param(g, "b", (4,), rng)
    cond = rng.random((3, 4)) > 0.5
    cond[:, 0] = True  # no row of the softmax fully masked
    m = g.input("m", (3, 1), dtype="int32")
    r = g.input("R", (3, 4))
    y = bp.where(cond, a * a, b) + bp.masked_fill(a, m, 2.5) + bp.softmax(bp.masked_fill(a, ~cond, -math.inf))
    g.loss(bp.sum(y * r))
    M = np.array([[1], [0], [1]], dtype=np.int32)
    R = rng.normal(size=(3, 4))

    def ref(p, i):
        tc = torch.tensor(cond)
        yy = (torch.where(tc, p["a"] * p["a"], p["b"]) + p["a"].masked_fill(i["m"].bool(), 2.5)
              + torch.softmax(p["a"].masked_fill(~tc, -math.inf), -1))
        return (yy * i["R"]).sum()
    _compare(g, ref, {"m": M, "R": R}, dtype)


def test_constant_values_reach_the_kernel_exactly(build_dir) -> None:
    """Every pattern of a constant table survives the C compiler (see templates/constant.c.j2)."""
    rng = np.random.default_rng(7)
    g = bp.Graph("constants")
    x = g.input("x", (3, 37))
    tables = [rng.random((3, 37)) > 0.5, rng.normal(size=(3, 37)), np.arange(111.0).reshape(3, 37)]
    for i, t in enumerate(tables):
        g.output(f"c{i}", x * 0 + bp.constant(t))
    out = bp.compile(g, dtype="float64").forward(x=np.ones((3, 37)))
    for i, t in enumerate(tables):
        np.testing.assert_array_equal(out[f"c{i}"], t.astype(np.float64))


def test_bad_arguments_are_refused() -> None:
    g = bp.Graph("bad")
    x = g.input("x", (2, 3))
    with pytest.raises(bp.ShapeError, match="layer_norm: weight"):
        bp.layer_norm(x, g.param("w", (4,)))
    with pytest.raises(ValueError, match="eps"):
        bp.layer_norm(x, eps=0)
    with pytest.raises(bp.ShapeError, match="same last dim"):
        bp.attention(x, g.input("k", (2, 4)), g.input("v", (2, 4)))
    with pytest.raises(bp.ShapeError, match="mask"):
        bp.attention(x, x, x, mask=np.ones((5, 5), dtype=bool))
    with pytest.raises(ValueError, match="finite"):
        bp.constant([1.0, np.inf])
    with pytest.raises(ValueError, match="NaN"):
        bp.masked_fill(x, np.ones((2, 3), dtype=bool), math.nan)
    with pytest.raises(bp.ShapeError, match="out of range"):
        bp.max(x, axis=2)
    with pytest.raises(ValueError, match="not finite"):  # infinities only as where/masked_fill values
        x * math.inf


# --- layers against a torch twin ---------------------------------------------------------------

def _torch_block(p: dict, prefix: str, x, heads: int):
    """nanoGPT's Block, written with torch.nn.functional on the bp.nn parameter names."""
    c = x.shape[-1]
    h = F.layer_norm(x, (c,), p[f"{prefix}.ln_1.weight"], p[f"{prefix}.ln_1.bias"])
    qkv = F.linear(h, p[f"{prefix}.attn.in_proj_weight"], p[f"{prefix}.attn.in_proj_bias"])
    b, t, _ = x.shape
    q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in qkv.split(c, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
    x = x + F.linear(y, p[f"{prefix}.attn.out_proj.weight"], p[f"{prefix}.attn.out_proj.bias"])
    h = F.layer_norm(x, (c,), p[f"{prefix}.ln_2.weight"], p[f"{prefix}.ln_2.bias"])
    h = F.gelu(F.linear(h, p[f"{prefix}.mlp.c_fc.weight"], p[f"{prefix}.mlp.c_fc.bias"]))
    return x + F.linear(h, p[f"{prefix}.mlp.c_proj.weight"], p[f"{prefix}.mlp.c_proj.bias"])


def _gpt(vocab: int, t: int, c: int, heads: int, layers: int) -> tuple[bp.Graph, list[str]]:
    g = bp.Graph("gpt_twin")
    idx = g.input("idx", ("batch", t), dtype="int32")
    targets = g.input("targets", ("batch", t), dtype="int32")
    wte = bp.nn.Embedding(g, vocab, c, name="wte")
    wpe = g.param("wpe", (t, c), init="normal")
    x = wte(idx) + wpe
    blocks = [bp.nn.TransformerBlock(g, c, heads, name=f"h{i}") for i in range(layers)]
    for block in blocks:
        x = block(x)
    x = bp.nn.LayerNorm(g, c, name="ln_f")(x)
    logits = x @ bp.transpose(wte.weight)  # tied with the token embedding
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, targets))  # mean over every (batch, time) position
    return g, [b.name for b in blocks]


def _torch_gpt(p: dict, names: list[str], idx, targets, heads: int):
    x = p["wte.weight"][idx] + p["wpe"]
    for name in names:
        x = _torch_block(p, name, x, heads)
    x = F.layer_norm(x, (x.shape[-1],), p["ln_f.weight"], p["ln_f.bias"])
    logits = x @ p["wte.weight"].T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpt_with_tied_embeddings_matches_torch_over_adamw_steps(dtype: str, build_dir) -> None:
    vocab, t, c, heads = 11, 7, 12, 3
    g, names = _gpt(vocab, t, c, heads, layers=2)
    rng = np.random.default_rng(8)
    idx = rng.integers(0, vocab, size=(3, t)).astype(np.int32)
    targets = rng.integers(0, vocab, size=(3, t)).astype(np.int32)
    opt = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model = bp.compile(g, dtype=dtype, optimizer=bp.optim.AdamW(**opt), seed=1)
    for name in model.params:  # biases start non-zero, so their gradients are exercised
        if name.endswith("bias"):
            model.params[name][...] = rng.normal(size=model.params[name].shape) * 0.1
    tp = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for k, v in model.params.items()}
    tidx, ttargets = torch.tensor(idx).long(), torch.tensor(targets)
    loss, grads = model.loss_and_grad(idx=idx, targets=targets)
    tloss = _torch_gpt(tp, names, tidx, ttargets, heads)
    tloss.backward()
    tol = TOL[dtype]
    np.testing.assert_allclose(loss, tloss.item(), **tol)
    for name, gr in grads.items():
        np.testing.assert_allclose(gr, tp[name].grad.numpy(), err_msg=name, **tol)
    torch_opt = torch.optim.AdamW(list(tp.values()), **opt)
    for _ in range(10):
        torch_opt.zero_grad()
        step_loss = _torch_gpt(tp, names, tidx, ttargets, heads)
        step_loss.backward()
        torch_opt.step()
        np.testing.assert_allclose(model.train_step(idx=idx, targets=targets), step_loss.item(),
                                   **({"rtol": 1e-9} if dtype == "float64" else {"rtol": 1e-3}))
    for name, value in model.params.items():
        want = tp[name].detach().numpy()
        if dtype == "float32" and name.endswith("in_proj_bias"):
            # the key bias shifts every score of a query alike, so its true gradient is 0: Adam turns
            # float32 rounding noise there into steps of full size, different in each library
            value, want = np.delete(value, np.s_[c:2 * c]), np.delete(want, np.s_[c:2 * c])
        np.testing.assert_allclose(value, want, err_msg=name,
                                   **({"rtol": 1e-8, "atol": 1e-10} if dtype == "float64" else
                                      {"rtol": 1e-2, "atol": 1e-4}))


def test_multi_head_attention_state_dict_has_torch_names(build_dir) -> None:
    g = bp.Graph("mha_names")
    x = g.input("x", ("batch", 4, 8))
    attn = bp.nn.MultiHeadAttention(g, 8, 2, name="attn")
    g.output("y", attn(x))
    sd = bp.compile(g, dtype="float64").state_dict()
    tm = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    assert {f"attn.{k}" for k in tm.state_dict()} == set(sd)
    assert all(sd[f"attn.{k}"].shape == tuple(v.shape) for k, v in tm.state_dict().items())


# --- specs, explanations and the standalone C of a GPT -----------------------------------------

GPT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "gpt_spec.yaml"


def test_yaml_gpt_spec_builds_the_bp_nn_model(build_dir) -> None:
    from bpcompile.tools.spec import load_spec
    spec = load_spec(GPT_SPEC)
    g = spec.graph
    assert g.params["wte.weight"].shape == (65, 64) and "transformer_block2.attn.in_proj_weight" in g.params
    model = bp.compile(g, dtype="float64", optimizer=spec.optimizer, seed=0)
    rng = np.random.default_rng(0)
    data = {name: rng.integers(0, 65, (3, 16)).astype(np.int32) for name in ("idx", "targets")}
    loss = model.loss(**data)
    assert abs(loss - math.log(65)) < 0.5  # small random init: close to uniform predictions
    assert model.train_step(**data) == pytest.approx(loss, rel=1e-12)


def test_yaml_gpt_spec_errors_name_the_layer(tmp_path) -> None:
    from bpcompile.tools.spec import SpecError, load_spec
    bad = tmp_path / "bad.yaml"
    bad.write_text(GPT_SPEC.read_text().replace("  - {type: embedding, vocab: 65, dim: 64, positions: 16}\n", ""))
    with pytest.raises(SpecError, match=r"layers\[0\]: shape mismatch: transformer_block needs a float tensor"):
        load_spec(bad)
    bad.write_text(GPT_SPEC.read_text().replace("heads: 4}", "heads: 5}", 1))
    with pytest.raises(SpecError, match=r"layers\[1\].*not divisible by heads 5"):
        load_spec(bad)


def test_show_grad_explains_layer_norm_and_attention(capsys) -> None:
    from bpcompile.tools import cli
    assert cli.main(["show", str(GPT_SPEC), "--grad"]) == 0
    out = capsys.readouterr().out
    backward = out.split("Backward pass")[1]
    # layer norm's backward as written by hand
    assert re.search(r"\(1/std\(T\d+\)\) ⊙ \(dT\d+ - mean\(dT\d+\) - T\d+ ⊙ mean\(dT\d+ ⊙ T\d+\)\)", backward)
    # attention is one fused node reading q, k and v as slices of the qkv projection (Z) in place,
    # scale 1/sqrt(16); its backward writes dZ side by side: dS k, dSᵀ q, Pᵀ dO, with dS the softmax
    # Jacobian-vector product of the probabilities P the forward kept
    forward = out.split("Backward pass")[0]
    assert re.search(r"T(\d+) +\= softmax_causal\(0\.25·Z(\d+)\[…, 0:64\] · Z\2\[…, 64:128\]ᵀ\) · Z\2\[…, 128:192\]",
                     forward)
    assert re.search(r"dZ(\d+) +\= \[dS · Z\1\[…, 64:128\], dSᵀ · Z\1\[…, 0:64\], P\(T(\d+)\)ᵀ · dT\2\] with "
                     r"dS = 0\.25·P\(T\2\) ⊙ \(dT\2 · Z\1\[…, 128:192\]ᵀ - rowsum\(dT\2 ⊙ T\2\)\)", backward)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="needs a C compiler and make")
def test_exported_gpt_trains_like_the_python_module(tmp_path) -> None:
    from bpcompile.tools import export
    from bpcompile.tools.spec import load_spec
    spec = load_spec(GPT_SPEC)
    export.export_model(spec.graph, tmp_path / "c", "float64", spec.optimizer, seed=0, batch=3, steps=4)
    flags = "CFLAGS=-std=c99 -O2 -Wall -Wextra -Werror -pedantic"
    done = subprocess.run(["make", "-s", flags], cwd=tmp_path / "c", capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run(["./main"], cwd=tmp_path / "c", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    c_losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    model = bp.compile(spec.graph, "float64", optimizer=spec.optimizer, seed=0)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 3}, seed=0, dtype=np.float64)
    np.testing.assert_allclose(c_losses, [model.train_step(**data) for _ in range(4)], rtol=1e-12)
