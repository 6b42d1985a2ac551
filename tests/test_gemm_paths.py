"""Both matrix-product paths: every product through OpenBLAS (blas_min_flops=0) and every
product as generated loops (blas_min_flops=10**12), against the NumPy reference in float64,
over all the transpose combinations that forward and backward passes produce."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import bpcompile as bp

ALL_BLAS, NO_BLAS = 0, 10**12
PATHS = [pytest.param(ALL_BLAS, id="blas"), pytest.param(NO_BLAS, id="loops")]


def mlp_graph() -> bp.Graph:
    """x@W (NN), h@V.T with V in PyTorch's (out, in) layout (NT), a Gram term h.T@h contracting the
    batch (TN); the backward pass adds g@W.T (NT), x.T@g (TN) and g.T@h (TN)."""
    g = bp.Graph("gemm_mlp")
    x = g.input("x", ("batch", 5))
    t = g.input("t", ("batch", 3))
    W1 = g.param("W1", (5, 7), init="normal")
    b1 = g.param("b1", (7,), init="normal")
    V = g.param("V", (6, 7), init="normal")  # (out, in)
    W3 = g.param("W3", (6, 3), init="normal")
    R = g.param("R", (7, 7), init="normal")
    h = bp.tanh(x @ W1 + b1)
    h2 = bp.sigmoid(h @ V.T)
    out = h2 @ W3
    g.output("out", out)
    g.output("gram", h.T @ h)
    g.loss(bp.mse(out, t) + 0.1 * bp.mean((h.T @ h) * R))
    return g


def rank3_graph() -> bp.Graph:
    """A rank-3 input: (batch, 4, 5) @ (5, 6) merges the leading dims into rows; its weight
    gradient is x.T @ g over the merged rows."""
    g = bp.Graph("gemm_rank3")
    x = g.input("x", ("batch", 4, 5))
    t = g.input("t", ("batch", 2))
    W = g.param("W", (5, 6), init="normal")
    b = g.param("b", (6,), init="normal")
    U = g.param("U", (6, 2), init="normal")
    h = bp.tanh(x @ W + b)  # (batch, 4, 6)
    pooled = bp.mean(h, axis=1)  # (batch, 6)
    out = pooled @ U
    g.output("h", h)
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def recurrent_graph() -> bp.Graph:
    """An LSTM and a GRU over 6 steps: each step's product with W_hh (forward: h W_hhᵀ, backward:
    the pre-activation gradients times W_hh) inside the recurrent kernels."""
    g = bp.Graph("gemm_recurrent")
    x = g.input("x", ("batch", 6, 5))
    t = g.input("t", ("batch", 2))
    out, (h, _) = bp.nn.LSTM(g, 5, 8)(x)
    seq, h2 = bp.nn.GRU(g, 8, 3)(out)
    U = g.param("U", (11, 2), init="normal")
    y = bp.concat([h, h2], axis=1) @ U
    g.output("y", y)
    g.output("seq", seq)
    g.loss(bp.mse(y, t))
    return g


def tiled_graph() -> bp.Graph:
    """Products that run as register tiles (bp_gemm_tiles: 8-128 rows, a tile is 32 float32 or 16
    float64 columns): x@W and h@V.T (A Bᵀ, through a transposed panel) forward, g@V backward; 37
    and 40 columns end short of a tile."""
    g = bp.Graph("gemm_tiled")
    x = g.input("x", ("batch", 19))
    t = g.input("t", ("batch", 40))
    W = g.param("W", (19, 37), init="normal")
    V = g.param("V", (40, 37), init="normal")  # (out, in): h @ V.T forward, g @ V backward
    h = bp.tanh(x @ W)
    out = h @ V.T
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def _inputs(graph: bp.Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=tuple(batch if isinstance(d, str) else d for d in node.shape))
            for name, node in graph.inputs.items()}


def _check_against_reference(graph: bp.Graph, model: bp.CompiledModel, batch: int, seed: int) -> None:
    inputs = _inputs(graph, batch, seed)
    params = {k: v.copy() for k, v in model.params.items()}
    forward_inputs = {k: v for k, v in inputs.items() if k != "t"}
    outs = model.forward(**forward_inputs)
    refs = bp.reference.evaluate(list(graph.outputs.values()), forward_inputs, params)
    for (name, got), want in zip(outs.items(), refs):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"output {name}")
    value, grads = model.loss_and_grad(**inputs)
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, params)
    assert value == pytest.approx(ref_value, rel=1e-10, abs=1e-12)
    assert set(grads) == set(ref_grads) == set(params)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, err_msg=f"gradient of {k}")


@pytest.mark.parametrize("min_flops", PATHS)
@pytest.mark.parametrize("make_graph", [mlp_graph, rank3_graph], ids=["mlp", "rank3"])
def test_products_match_reference(build_dir, make_graph, min_flops):
    graph = make_graph()
    model = bp.compile(graph, dtype="float64", seed=1, blas_min_flops=min_flops)
    for batch, seed in ((1, 0), (9, 1), (33, 2)):
        _check_against_reference(graph, model, batch, seed)


@pytest.mark.parametrize("make_graph", [mlp_graph, rank3_graph], ids=["mlp", "rank3"])
def test_every_installed_blas_matches_reference(build_dir, blas_backend, make_graph):
    graph = make_graph()
    model = bp.compile(graph, dtype="float64", seed=1, blas_min_flops=ALL_BLAS)
    assert blas_backend in json.loads((model.build_path / "meta.json").read_text())["blas"]["name"]
    for batch, seed in ((1, 0), (33, 2)):
        _check_against_reference(graph, model, batch, seed)


@pytest.mark.parametrize("min_flops", PATHS)
def test_tiled_products_match_reference(build_dir, min_flops):
    """Rows 8 (one tile), 13 (8 + 4 + 1), 100 and 128, and 7 and 129 around the tiles' range, in
    float64 against the reference; float32 at rtol 1e-4."""
    graph = tiled_graph()
    model = bp.compile(graph, dtype="float64", seed=1, blas_min_flops=min_flops)
    for batch, seed in ((7, 0), (8, 1), (13, 2), (100, 3), (128, 4), (129, 5)):
        _check_against_reference(graph, model, batch, seed)
    f32 = bp.compile(graph, dtype="float32", seed=1, blas_min_flops=min_flops)
    inputs = _inputs(graph, 13, 6)
    value, grads = f32.loss_and_grad(**inputs)
    ref_value, ref_grads = bp.reference.loss_and_grad(graph, inputs, {k: v.astype(np.float64)
                                                                      for k, v in f32.params.items()})
    assert value == pytest.approx(ref_value, rel=1e-4)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_recurrent_products_with_every_installed_blas_match_reference(build_dir, blas_backend):
    """Every product through each BLAS, the batch split across the pool (rows 1, 2 and 33)."""
    graph = recurrent_graph()
    model = bp.compile(graph, dtype="float64", seed=1, blas_min_flops=ALL_BLAS, parallel_min_work=1)
    assert blas_backend in json.loads((model.build_path / "meta.json").read_text())["blas"]["name"]
    for batch, seed in ((1, 0), (2, 1), (33, 2)):
        _check_against_reference(graph, model, batch, seed)


def _gemm_calls(source: str) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in re.findall(r"bp_gemm\((\d), (\d),", source)}


@pytest.mark.parametrize("make_graph", [mlp_graph, rank3_graph], ids=["mlp", "rank3"])
def test_both_paths_agree_and_cover_all_transposes(build_dir, make_graph):
    graph = make_graph()
    blas = bp.compile(graph, dtype="float64", seed=3, blas_min_flops=ALL_BLAS)
    loops = bp.compile(graph, dtype="float64", seed=3, blas_min_flops=NO_BLAS)
    assert blas.build_path != loops.build_path
    assert re.search(r"#define BP_BLAS_MIN_FLOPS 0LL", blas.c_source)
    assert re.search(r"#define BP_BLAS_MIN_FLOPS 1000000000000LL", loops.c_source)
    for model in (blas, loops):
        calls = _gemm_calls(model.c_source)
        assert (0, 0) in calls and (1, 0) in calls, calls
        if make_graph is mlp_graph:
            assert (0, 1) in calls, calls  # h @ V.T and g @ W.T
    inputs = _inputs(graph, 17, 5)
    lb, gb = blas.loss_and_grad(**inputs)
    ll, gl = loops.loss_and_grad(**inputs)
    assert lb == pytest.approx(ll, rel=1e-12)
    for k in gb:
        np.testing.assert_allclose(gb[k], gl[k], rtol=1e-11, atol=1e-13, err_msg=k)
    # one training step each: the same update through either path
    for model in (blas, loops):
        model.train_step(**inputs)
    for k in blas.params:
        np.testing.assert_allclose(blas.params[k], loops.params[k], rtol=1e-12, atol=1e-14, err_msg=k)


LINKED = {"openblas": ("libscipy_openblas", "scipy_cblas_"), "mkl": ("libmkl_rt", "CBLAS_")}


def test_blas_is_linked(build_dir, blas_backend):
    library, symbol = LINKED[blas_backend]
    model = bp.compile(mlp_graph(), dtype="float64", blas_min_flops=ALL_BLAS)
    info = json.loads((model.build_path / "build.json").read_text())
    commands = [" ".join(cmd) for cmd in info["commands"]]
    assert any(library in c and "-shared" in c for c in commands), commands  # the link line
    assert any("-DBP_USE_BLAS=1" in c for c in commands), commands
    assert any(f"-DBP_CBLAS_GEMM={symbol}dgemm" in c.replace("DGEMM", "dgemm") for c in commands), commands
    f32 = bp.compile(mlp_graph(), dtype="float32", blas_min_flops=ALL_BLAS)
    f32_commands = " ".join(" ".join(c) for c in json.loads((f32.build_path / "build.json").read_text())["commands"])
    assert f"-DBP_CBLAS_GEMM={symbol}sgemm" in f32_commands.replace("SGEMM", "sgemm")
    assert ("-DBP_TILED_PRODUCTS=1" in f32_commands) == (blas_backend != "mkl")  # MKL keeps its own
    assert blas_backend in bp.blas.info()
    maps = Path("/proc/self/maps")
    if maps.exists():  # the library is loaded into this process
        assert library in maps.read_text()


def test_float32_paths_agree(build_dir):
    graph = mlp_graph()
    inputs = _inputs(graph, 21, 8)
    results = []
    for min_flops in (ALL_BLAS, NO_BLAS):
        model = bp.compile(graph, dtype="float32", seed=3, blas_min_flops=min_flops)
        results.append(model.loss_and_grad(**inputs))
    (lb, gb), (ll, gl) = results
    assert lb == pytest.approx(ll, rel=1e-5)
    for k in gb:
        np.testing.assert_allclose(gb[k], gl[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_unknown_blas_choice_is_named(build_dir, monkeypatch):
    from bpcompile.build import cffi_build as build
    monkeypatch.setenv("BPCOMPILE_BLAS", "fastest")
    build.blas.cache_clear()
    try:
        with pytest.raises(bp.CompileError, match="BPCOMPILE_BLAS must be one of auto, mkl, openblas, none, "
                                                  "got 'fastest'"):
            bp.compile(mlp_graph())
    finally:
        build.blas.cache_clear()


@pytest.mark.parametrize("choice,package", [("mkl", "mkl"), ("openblas", "scipy-openblas32")])
def test_missing_blas_that_was_asked_for_is_named(build_dir, monkeypatch, choice, package):
    from bpcompile.build import cffi_build as build
    monkeypatch.setenv("BPCOMPILE_BLAS", choice)
    monkeypatch.setattr(build, "_mkl", lambda: None)
    monkeypatch.setattr(build, "_openblas", lambda: None)
    build.blas.cache_clear()
    try:
        with pytest.raises(bp.CompileError, match=f"BPCOMPILE_BLAS={choice} but that library is not installed "
                                                  rf"\(pip install {package}\)"):
            bp.compile(mlp_graph())
    finally:
        build.blas.cache_clear()


@pytest.mark.parametrize("vendor,both,only_mkl", [
    ("GenuineIntel", "mkl", "mkl"),   # MKL's fast paths are Intel's
    ("AuthenticAMD", "openblas", "mkl"),  # MKL at 1.6-2x OpenBLAS's step time on an EPYC
    (None, "openblas", "mkl"),  # no vendor to read (Arm, no /proc)
])
def test_auto_blas_prefers_mkl_on_intel_only(monkeypatch, vendor, both, only_mkl):
    from bpcompile.build import cffi_build as build
    monkeypatch.delenv("BPCOMPILE_BLAS", raising=False)
    monkeypatch.delenv("BPCOMPILE_NO_BLAS", raising=False)
    monkeypatch.setattr(build, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(build, "_mkl", lambda: {"name": "mkl"})
    monkeypatch.setattr(build, "_openblas", lambda: {"name": "openblas"})
    try:
        build.blas.cache_clear()
        assert build.blas()["name"] == both
        monkeypatch.setattr(build, "_openblas", lambda: None)
        build.blas.cache_clear()
        assert build.blas()["name"] == only_mkl
        monkeypatch.setenv("BPCOMPILE_BLAS", "mkl")
        monkeypatch.setattr(build, "_openblas", lambda: {"name": "openblas"})
        build.blas.cache_clear()
        assert build.blas()["name"] == "mkl"  # asked for by name: whatever the CPU
    finally:
        build.blas.cache_clear()


def test_missing_blas_library_of_a_build_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(bp.blas, "_LIBS", {})  # as in a fresh process
    with pytest.raises(FileNotFoundError, match=r"built against .*libmkl_rt\.so\.9, which is missing: reinstall mkl"):
        bp.blas.load({"name": "mkl", "libdir": str(tmp_path), "file": "libmkl_rt.so.9"})


def test_products_larger_than_blas_int_run_in_blocks(build_dir, monkeypatch):
    """CBLAS takes int sizes: a product with a dimension past that range runs as blocks that fit,
    and one whose leading dimension does not fit runs as loops. The module is built with the int
    range shrunk to 4 so that batches of 23 rows (and a layer of 6) cross it."""
    from bpcompile.build import cffi_build as build
    flags = build.model_flags
    monkeypatch.setattr(build, "model_flags", lambda: [*flags(), "-DBP_BLAS_INT_MAX=4"])
    g = bp.Graph("gemm_int_blocks")
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    W = g.param("W", (3, 4), init="normal")
    V = g.param("V", (2, 4), init="normal")  # (out, in): h @ V.T reads it transposed
    U = g.param("U", (2, 6), init="normal")  # leading dimension 6: past the range, loops
    Z = g.param("Z", (6, 2), init="normal")
    h = bp.tanh(x @ W)
    out = bp.sigmoid(h @ V.T) @ U @ Z
    g.output("out", out)
    g.loss(bp.mse(out, t))
    model = bp.compile(g, dtype="float64", seed=2, blas_min_flops=ALL_BLAS)
    commands = " ".join(" ".join(c) for c in json.loads((model.build_path / "build.json").read_text())["commands"])
    assert "-DBP_BLAS_INT_MAX=4" in commands and "#ifndef BP_BLAS_INT_MAX" in model.c_source
    for batch, seed in ((23, 0), (4, 1), (1, 2)):
        _check_against_reference(g, model, batch, seed)
