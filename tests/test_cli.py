"""The `bpcompile` command: every subcommand through its entry point on a Python and a YAML spec,
the standalone C export built with make and checked against the Python module, parameter files,
and bad specs (one line on stderr, non-zero exit, no traceback)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bpcompile as bp
from bpcompile.errors import CheckpointError
from bpcompile.tools import export
from bpcompile.tools.cli import main

HAVE_CC = shutil.which(os.environ.get("CC", "gcc")) is not None
HAVE_MAKE = shutil.which("make") is not None

PY_SPEC = '''
"""An 8-16-3 MLP: ReLU, softmax cross-entropy, Adam."""
import bpcompile as bp

optimizer = bp.optim.Adam(lr=1e-2)
seed = 3


def build():
    g = bp.Graph("tiny")
    x = g.input("x", ("batch", 8))
    y = g.input("y", ("batch",), dtype="int32")
    W1 = g.param("W1", (8, 16), init="he_normal")
    b1 = g.param("b1", (16,))
    W2 = g.param("W2", (16, 3), init="glorot_uniform")
    b2 = g.param("b2", (3,))
    logits = bp.relu(x @ W1 + b1) @ W2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g
'''

YAML_SPEC = """
# the same model as PY_SPEC
name: tiny
seed: 3
inputs:
  x: {shape: [batch, 8]}
  y: {shape: [batch], dtype: int32}
layers:
  - {type: dense, units: 16, activation: relu, init: he_normal}
  - {type: dense, units: 3, init: glorot_uniform}
output: logits
loss: {type: softmax_cross_entropy, target: y}
optimizer: {type: adam, lr: 1e-2}
"""

YAML_FANCY = """
name: fancy
dtype: float64
inputs:
  x: {shape: [batch, 5]}
  t: {shape: [batch, 2]}
functions:
  mish: {expr: "z * tanh(log(1 + exp(z)))", symbols: [z]}
  shifted: {expr: "z + w^2", symbols: [z, w]}
layers:
  - {type: dense, units: 6, activation: sigmoid}
  - mish
  - {type: shifted, args: {w: 0.5}}
  - {type: dense, units: 4, activation: {type: leaky_relu, negative_slope: 0.2}}
  - {type: dense, units: 2, activation: tanh}
loss: {type: mse, target: t}
optimizer: {type: sgd, lr: 0.05, momentum: 0.9}
"""

YAML_BN = """
name: bn
dtype: float64
seed: 4
inputs:
  x: {shape: [batch, 6]}
  y: {shape: [batch], dtype: int32}
layers:
  - {type: dense, units: 10, bias: false}
  - batch_norm
  - relu
  - {type: dropout, p: 0.3}
  - {type: dense, units: 3}
loss: softmax_cross_entropy
optimizer: {type: adam, lr: 0.01}
"""


@pytest.fixture(scope="module")
def specs(tmp_path_factory, build_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("specs")
    files = {"py": folder / "tiny.py", "yaml": folder / "tiny.yaml", "fancy": folder / "fancy.yaml",
             "bn": folder / "bn.yaml"}
    files["py"].write_text(PY_SPEC)
    files["yaml"].write_text(YAML_SPEC)
    files["fancy"].write_text(YAML_FANCY)
    files["bn"].write_text(YAML_BN)
    return files


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_graph() -> bp.Graph:
    namespace: dict = {}
    exec(compile(PY_SPEC, "tiny.py", "exec"), namespace)
    return namespace["build"]()


# --- help and entry points -------------------------------------------------------------------

def test_help_lists_every_command_through_python_m():
    done = subprocess.run([sys.executable, "-m", "bpcompile.tools.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for command in ("build", "show", "check", "export", "bench"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), command


@pytest.mark.parametrize("command", ["build", "show", "check", "export", "bench"])
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: bpcompile {command}" in out and "SPEC" in out


def test_console_script_and_usage_errors(capsys):
    exe = shutil.which("bpcompile")
    if exe:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and "bpcompile" in done.stdout
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err
    code, _, err = run(capsys, "build")
    assert code == 2 and "SPEC" in err
    code, _, err = run(capsys, "frobnicate", "x.py")
    assert code == 2 and "invalid choice" in err


# --- build -------------------------------------------------------------------------------------

def test_build_python_then_yaml_reuses_the_cache(capsys, specs):
    code, out, err = run(capsys, "build", specs["py"])
    assert code == 0, err
    path = Path(re.search(r"path\s+(\S+)", out).group(1))
    assert (path / "meta.json").is_file()
    for text in ("bp_forward(x) -> logits", "bp_train_loss(x, y) -> loss; Adam update of W1, b1, W2, b2",
                 "parameters    195", "workspace", "bytes at batch=32", "compile time"):
        assert text in out, text
    code, out2, err = run(capsys, "build", specs["yaml"])
    assert code == 0, err
    assert "cached build reused" in out2 and "cache hit" in out2
    assert Path(re.search(r"path\s+(\S+)", out2).group(1)) == path  # the same graph, the same module
    model = bp.load(path)
    assert model.param_count == 195


def test_build_dtype_and_output_folder(capsys, specs, tmp_path):
    code, out, err = run(capsys, "build", specs["yaml"], "--dtype", "float64", "-o", tmp_path / "cache")
    assert code == 0, err
    path = Path(re.search(r"path\s+(\S+)", out).group(1))
    assert path.parent == tmp_path / "cache"
    assert bp.load(path).dtype == np.float64


# --- show --------------------------------------------------------------------------------------

def test_show_grad_python_spec(capsys, specs):
    code, out, err = run(capsys, "show", specs["py"], "--grad")
    assert code == 0, err
    assert "relu(x) = Max(0, x)" in out and "Heaviside(x)" in out
    eq = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(d?\w+)\s+= (.+)$", out, re.M)}
    assert eq["Z1"].startswith("x · W1 + b1")
    assert eq["dZ1"].startswith("dH1 ⊙ 𝟙[Z1 > 0]")
    assert eq["dW1"].startswith("xᵀ · dZ1")
    assert eq["db1"].startswith("Σ_batch dZ1")
    assert eq["dH1"].startswith("dlogits · W2ᵀ")
    assert eq["dlogits"].startswith("(softmax(logits) - onehot(y)) / batch")
    order = [name for name in eq if name.startswith("d")]
    assert order.index("dlogits") < order.index("dH1") < order.index("dZ1") < order.index("dW1")
    # the tN after each equation is the node computing it in the generated C
    c_name = eq["dZ1"].split()[-1]
    source = bp.lower(tiny_graph(), "float32", bp.optim.Adam(lr=1e-2)).sources.model_c
    assert re.search(rf"{c_name} = .*Heaviside", source)


def test_show_grad_yaml_spec_rewrites_in_output(capsys, specs):
    code, out, err = run(capsys, "show", specs["fancy"], "--grad")
    assert code == 0, err
    sigmoid = out[out.index("sigmoid(x) ="):]
    assert "derived     exp(-x)/(1 + exp(-x))**2" in sigmoid
    assert "rewritten in terms of the output y = sigmoid(x)" in sigmoid.splitlines()[2]
    assert "mish(z) = z*tanh(log(exp(z) + 1))" in out
    eq = {m.group(1): m.group(2).split("   ")[0] for m in re.finditer(r"^\s+(d?\w+)\s+= (.+)$", out, re.M)}
    assert eq["dZ3"] == "dT3 ⊙ (1 - output²)"  # tanh' = 1 - y², y the forward output
    assert eq["dZ2"] == "dH2 ⊙ where(Z2 > 0, 1, 0.2)"  # leaky_relu'
    assert eq["dH1"] == "dT2 ⊙ mish'(H1)"  # too long to inline: the table above has it
    assert eq["dZ1"] == "dH1 ⊙ (H1 - H1²)"  # sigmoid' = y - y²
    assert eq["dT4"] == "dloss / (2·batch)"  # mse's mean over (batch, 2)


def test_show_latex_c_and_graph(capsys, specs, tmp_path):
    code, out, err = run(capsys, "show", specs["yaml"], "--latex")
    assert code == 0, err
    assert r"\begin{align*}" in out and r"\mathbb{1}\left[Z_{1} > 0\right]" in out and r"\odot" in out
    code, out, err = run(capsys, "show", specs["yaml"], "--c", "--color", "never")
    assert code == 0, err
    assert out.startswith("/* bpcompile") and "int bp_train_loss(" in out and "\x1b[" not in out
    pytest.importorskip("pygments")
    code, out, _ = run(capsys, "show", specs["yaml"], "--c", "--color", "always")
    assert code == 0 and "\x1b[" in out
    dot = tmp_path / "g.dot"
    code, out, err = run(capsys, "show", specs["py"], "--graph", dot)
    assert code == 0, err
    text = dot.read_text()
    assert text.startswith('digraph "tiny"') and "cluster_forward" in text and "cluster_backward_loss" in text
    assert text.count("{") == text.count("}")
    assert "dZ1" in text and str(dot) in out
    assert not dot.with_suffix(".svg").exists()  # a .dot path is the DOT text only


def _fake_dot(folder: Path, monkeypatch, body: str) -> Path:
    """A `dot` program first on PATH: reads the graph on stdin, then runs `body` (sh)."""
    folder.mkdir(exist_ok=True)
    script = folder / "dot"
    script.write_text(f"#!/bin/sh\ncat > /dev/null\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return script


def _written(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf"])
def test_show_graph_draws_the_format_its_suffix_names(capsys, specs, tmp_path, monkeypatch, suffix):
    _fake_dot(tmp_path / "bin", monkeypatch, 'printf "drawn as %s" "$1"')
    target = tmp_path / "out" / f"g{suffix.upper() if suffix == '.png' else suffix}"  # the case does not matter
    code, out, err = run(capsys, "show", specs["py"], "--graph", target)
    assert code == 0, err
    assert target.read_bytes() == f"drawn as -T{suffix[1:]}".encode() and str(target) in out
    assert _written(target.parent) == {target.name}  # no DOT beside it, no temporary left


def test_show_graph_without_graphviz_fails_and_points_to_dot(capsys, specs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    target = tmp_path / "g.png"
    code, out, err = run(capsys, "show", specs["py"], "--graph", target)
    assert code == 1 and err.count("\n") == 1
    assert "needs Graphviz" in err and "g.dot" in err and "needs no Graphviz" in err
    assert _written(tmp_path) == set()
    code, out, err = run(capsys, "show", specs["py"], "--graph", tmp_path / "g.dot")  # works without it
    assert code == 0, err
    assert (tmp_path / "g.dot").read_text().startswith('digraph "tiny"')


def test_show_graph_reports_a_failing_graphviz(capsys, specs, tmp_path, monkeypatch):
    _fake_dot(tmp_path / "bin", monkeypatch, 'echo "Error: <stdin>: syntax error in line 3" >&2; exit 1')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for where in (out_dir / "g.svg", f"{out_dir}{os.sep}"):  # a file, and a folder (NAME.dot + NAME.svg)
        code, out, err = run(capsys, "show", specs["py"], "--graph", where)
        assert code == 1 and err.count("\n") == 1
        assert "failed with exit status 1" in err and "syntax error in line 3" in err
        assert _written(out_dir) == set()  # nothing written, not even the .dot


def test_show_graph_refuses_an_unknown_suffix(capsys, specs, tmp_path):
    for name in ("g.jpg", "graph"):
        code, out, err = run(capsys, "show", specs["py"], "--graph", tmp_path / name)
        assert code == 1 and "unknown format" in err and ".dot, .svg, .png, .pdf" in err
    assert _written(tmp_path) == set()


def test_show_graph_into_a_folder_names_the_files_after_the_graph(capsys, specs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    folder = tmp_path / "graphs"
    code, out, err = run(capsys, "show", specs["py"], "--graph", f"{folder}{os.sep}")  # created
    assert code == 0, err
    assert _written(folder) == {"tiny.dot"} and "install Graphviz" in out
    _fake_dot(tmp_path / "bin", monkeypatch, 'printf "<svg/>"')
    monkeypatch.chdir(folder)
    code, out, err = run(capsys, "show", specs["py"], "--graph")  # no FILE: the current folder
    assert code == 0, err
    assert _written(folder) == {"tiny.dot", "tiny.svg"} and (folder / "tiny.svg").read_text() == "<svg/>"
    assert (folder / "tiny.dot").read_text().startswith('digraph "tiny"')


# --- check -------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,params", [("py", "W1 b1 W2 b2"), ("fancy", "W1 b1 W2 b2 W3 b3"),
                                           ("bn", "W1 bn1_gamma bn1_beta W2 b2")])
def test_check_passes(capsys, specs, which, params):
    code, out, err = run(capsys, "check", specs[which], "--batch", "3")
    assert code == 0, out + err
    assert "all gradients match" in out
    rows = [line.split() for line in out.splitlines() if line.split()[-1:] in (["ok"], ["MISMATCH"])]
    assert [r[0] for r in rows] == params.split()  # every trained parameter, running statistics excluded
    assert all(r[-1] == "ok" for r in rows)


@pytest.mark.parametrize("kind", ["nll", "cross_entropy"])
def test_onnx_class_losses_build_the_loss_they_name(capsys, tmp_path, build_dir, kind):
    """--loss nll:LABELS is torch's nll_loss of the output (-mean of the score at the label),
    cross_entropy:LABELS its softmax cross-entropy: on raw scores the two differ."""
    pytest.importorskip("onnx", reason="needs the [onnx] extra")
    from bpcompile.tools.spec import load_spec
    g = bp.Graph("scores")
    g.output("scores", g.input("x", ("batch", 4)) @ g.param("W", (4, 3), init="normal"))
    path = tmp_path / "scores.onnx"
    bp.to_onnx(bp.compile(g, "float64", seed=1), path)
    code, out, err = run(capsys, "show", path, "--loss", f"{kind}:labels", "--grad")
    assert code == 0, err
    assert ("nll_pick" in out) == (kind == "nll")
    code, out, err = run(capsys, "check", path, "--loss", f"{kind}:labels", "--batch", "3")
    assert code == 0 and "all gradients match" in out, out + err
    model = bp.compile(load_spec(path, loss=f"{kind}:labels").graph, "float64", seed=2)
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(5, 4)), rng.integers(0, 3, 5).astype(np.int32)
    scores = model.forward(x=x)["scores"]
    log_probs = scores if kind == "nll" else scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    assert model.loss(x=x, labels=labels) == pytest.approx(-np.mean(log_probs[np.arange(5), labels]), rel=1e-12)
    assert model._loss_spec(None)["classifier"] == {"output": "scores", "labels": "labels"}


def test_check_reports_a_wrong_gradient(capsys, specs, monkeypatch):
    original = bp.CompiledModel.loss_and_grad

    def wrong(self, loss=None, **inputs):
        value, grads = original(self, loss=loss, **inputs)
        grads["b1"] = grads["b1"] * 1.01
        return value, grads
    monkeypatch.setattr(bp.CompiledModel, "loss_and_grad", wrong)
    code, out, err = run(capsys, "check", specs["py"])
    assert code == 1
    assert re.search(r"^\s+b1 .*MISMATCH$", out, re.M)
    assert err.count("\n") == 1 and "gradient mismatch in loss/b1" in err


# --- export ------------------------------------------------------------------------------------

def _make(folder: Path, *variables: str) -> None:
    flags = "CFLAGS=-std=c99 -O2 -Wall -Wextra -Werror -pedantic"
    done = subprocess.run(["make", "-s", flags, *variables], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _run_main(folder: Path, *args: str) -> list[float]:
    done = subprocess.run(["./main", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step ")]


needs_toolchain = pytest.mark.skipif(not (HAVE_CC and HAVE_MAKE), reason="needs a C compiler and make")


@needs_toolchain
def test_export_trains_exactly_like_the_python_module(capsys, specs, tmp_path):
    out_dir = tmp_path / "lib"
    code, out, err = run(capsys, "export", specs["py"], "-o", out_dir, "--dtype", "float64", "--batch", "6",
                         "--steps", "4")
    assert code == 0, err
    for name in ("model.h", "model.c", "Makefile", "main.c", "params.bin"):
        assert (out_dir / name).is_file() and name in out
    assert "#include <Python.h>" not in (out_dir / "model.c").read_text()
    _make(out_dir)
    assert (out_dir / "libmodel.a").is_file()
    c_losses = _run_main(out_dir, "-seed", "7", "-save", "trained.bin")
    assert len(c_losses) == 4 and c_losses[-1] < c_losses[0]

    model = bp.compile(tiny_graph(), "float64", optimizer=bp.optim.Adam(lr=1e-2), seed=3)
    assert {k: v.tolist() for k, v in export.read_param_file(out_dir / "params.bin").items()} == \
        {k: v.tolist() for k, v in model.params.items()}  # params.bin: the Python model's initial parameters
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 6}, seed=7, dtype=np.float64)
    py_losses = [model.train_step(**data) for _ in range(4)]
    np.testing.assert_allclose(c_losses, py_losses, rtol=1e-12, atol=0)

    restored = bp.compile(tiny_graph(), "float64", optimizer=bp.optim.Adam(lr=1e-2), seed=99)
    restored.load(out_dir / "trained.bin")  # the C library's file, read by CompiledModel.load
    assert restored.step == 4
    for name, value in model.params.items():
        np.testing.assert_allclose(restored.params[name], value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(restored._state_flat, model._state_flat, rtol=1e-12, atol=1e-15)
    assert restored.train_step(**data) == pytest.approx(model.train_step(**data), rel=1e-12)


@needs_toolchain
def test_export_yaml_float32_with_a_cblas(capsys, specs, tmp_path):
    sob = pytest.importorskip("scipy_openblas32")
    out_dir = tmp_path / "blas"
    code, out, err = run(capsys, "export", specs["yaml"], "-o", out_dir, "--batch", "5", "--steps", "3")
    assert code == 0, err
    libdir = sob.get_lib_dir()
    _make(out_dir, f"BLAS_LIBS=-L{libdir} -l{sob.get_library()} -Wl,-rpath,{libdir}",
          f"BLAS_CFLAGS=-I{sob.get_include_dir()}", "BLAS_GEMM=scipy_cblas_sgemm", "BLAS_MIN_FLOPS=0")
    assert "scipy_cblas_sgemm" in subprocess.run(["nm", "libmodel.a"], cwd=out_dir, capture_output=True,
                                                 text=True).stdout
    c_losses = _run_main(out_dir)
    model = bp.compile(tiny_graph(), "float32", optimizer=bp.optim.Adam(lr=1e-2), seed=3)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 5}, seed=0, dtype=np.float32)
    py_losses = [model.train_step(**data) for _ in range(3)]
    np.testing.assert_allclose(c_losses, py_losses, rtol=2e-5)


EXPORTED_OPTIMIZERS = {
    "sgd-nesterov-stepdecay": bp.optim.SGD(lr=bp.schedules.StepDecay(0.1, step_size=2, gamma=0.5), momentum=0.9,
                                           nesterov=True),
    "adamw-warmup-cosine-clip": bp.optim.AdamW(lr=bp.schedules.LinearWarmup(bp.schedules.Cosine(0.02, total_steps=4),
                                                                            warmup_steps=2), clip_norm=0.5),
    "rmsprop-momentum": bp.optim.RMSprop(lr=0.01, momentum=0.5, weight_decay=0.01),
    "adagrad": bp.optim.Adagrad(lr=0.05, lr_decay=0.01, weight_decay=0.01),
    "adadelta": bp.optim.Adadelta(lr=1.0, weight_decay=0.01),
    "adamax-clip": bp.optim.Adamax(lr=0.01, clip_norm=0.5),
    "adam-amsgrad": bp.optim.Adam(lr=0.01, amsgrad=True),
    "rmsprop-centered": bp.optim.RMSprop(lr=0.01, centered=True, momentum=0.5),
    "nadam": bp.optim.NAdam(lr=0.01, weight_decay=0.01),
    "adamw-param-groups": bp.optim.AdamW(lr=0.01, weight_decay=0.1, param_groups=[
        {"params": ["b1", "b2"], "weight_decay": 0.0}, {"params": ["W2"], "lr_scale": 0.5}]),
    "sgd-param-groups-schedule": bp.optim.SGD(lr=bp.schedules.StepDecay(0.1, step_size=2, gamma=0.5), momentum=0.9,
                                              param_groups=[{"params": ["W1"], "lr_scale": 2.0, "weight_decay": 0.05}]),
}


def _state_by_param(model: bp.CompiledModel) -> dict[str, np.ndarray]:
    """Each optimizer slot of each parameter (the padding between parameters left out)."""
    size, out = model.meta["param_size"], {}
    for j in range(model.meta["state_size"] // size):
        for p in model.meta["params"]:
            start = j * size + p["offset"]
            out[f"slot {j} of {p['name']}"] = model._state_flat[start:start + int(np.prod(p["shape"]))]
    return out


@needs_toolchain
@pytest.mark.parametrize("optimizer", [pytest.param(o, id=k) for k, o in EXPORTED_OPTIMIZERS.items()])
def test_export_optimizers_and_schedules_match_python(tmp_path, optimizer):
    """The exported C library trains as the module: the same losses, parameters and optimizer state."""
    graph = tiny_graph()
    export.export_model(graph, tmp_path, "float64", optimizer, seed=1, batch=4, steps=5)
    _make(tmp_path)
    c_losses = _run_main(tmp_path, "-save", "trained.bin")
    model = bp.compile(graph, "float64", optimizer=optimizer, seed=1)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 4}, seed=0, dtype=np.float64)
    np.testing.assert_allclose(c_losses, [model.train_step(**data) for _ in range(5)], rtol=1e-12)
    restored = bp.compile(graph, "float64", optimizer=optimizer, seed=2)
    restored.load(tmp_path / "trained.bin")
    for name, value in model.params.items():
        np.testing.assert_allclose(restored.params[name], value, rtol=1e-12, atol=1e-15, err_msg=name)
    expected = _state_by_param(model)
    for name, value in _state_by_param(restored).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-12, atol=1e-15, err_msg=name)


@needs_toolchain
def test_export_batch_norm_and_dropout_yaml(capsys, specs, tmp_path):
    """Running statistics (updated by the train step) and dropout's random stream (model seed and
    step counter) behave in the C library exactly as in the Python module."""
    from bpcompile.tools.spec import load_spec
    code, out, err = run(capsys, "export", specs["bn"], "-o", tmp_path, "--batch", "7", "--steps", "4", "--make")
    assert code == 0, err
    assert re.search(r"built\s+\S+libmodel\.a \([\d,]+ bytes\)", out)
    c_losses = _run_main(tmp_path, "-save", "trained.bin")
    spec = load_spec(specs["bn"])
    model = bp.compile(spec.graph, "float64", optimizer=spec.optimizer, seed=spec.seed)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 7}, seed=0, dtype=np.float64)
    np.testing.assert_allclose(c_losses, [model.train_step(**data) for _ in range(4)], rtol=1e-12)
    restored = bp.compile(spec.graph, "float64", optimizer=spec.optimizer, seed=spec.seed)
    restored.load(tmp_path / "trained.bin")
    for name in ("bn1_gamma.running_mean", "bn1_gamma.running_var", "W1"):
        np.testing.assert_allclose(restored.params[name], model.params[name], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(restored.forward(x=data["x"])["output"], model.forward(x=data["x"])["output"],
                               rtol=1e-12)


def test_show_batch_norm_and_dropout_modes(capsys, specs):
    code, out, err = run(capsys, "show", specs["bn"], "--grad")
    assert code == 0, err
    assert "Forward pass (training mode" in out and "Forward pass in evaluation mode" in out
    assert "uniform((batch, 10))" in out and "running_mean" in out.split("evaluation mode")[1]  # dropout's draw
    assert "mode_select" not in out


@needs_toolchain
def test_export_forward_only_model(tmp_path):
    g = bp.Graph("fwd")
    x = g.input("x", ("n", 3))
    w = g.param("w", (3, 2), init="ones")
    g.output("y", bp.tanh(x @ w))
    export.export_model(g, tmp_path, "float64", batch=4)
    _make(tmp_path)
    done = subprocess.run(["./main"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    total = float(re.search(r"output y sum (\S+)", done.stdout).group(1))
    data = export.synthetic_inputs([{"name": "x", "shape": ["n", 3], "dtype": "float"}], {"n": 4})
    assert total == pytest.approx(np.tanh(data["x"].astype(np.float64) @ np.ones((3, 2))).sum(), rel=1e-6)


# --- parameter files ---------------------------------------------------------------------------

def test_param_file_round_trip_and_errors(tmp_path, build_dir):
    model = bp.compile(tiny_graph(), "float32", optimizer=bp.optim.Adam(lr=1e-2), seed=3)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(4, 8)), "y": rng.integers(0, 3, size=4)}
    for _ in range(2):
        model.train_step(**data)
    path = tmp_path / "ckpt.bin"
    export.save_model_params(model, path)
    assert export.is_param_file(path) and not export.is_param_file(tmp_path / "missing")
    contents = export.read_param_file_full(path)
    assert contents.step == 2 and set(contents.state) == {"m", "v"} and contents.dtype == np.float32
    other = bp.compile(tiny_graph(), "float32", optimizer=bp.optim.Adam(lr=1e-2), seed=5)
    other.load(path)
    assert other.step == 2
    assert other.train_step(**data) == model.train_step(**data)

    params = {k: np.asarray(v, dtype=np.float64) for k, v in model.params.items()}
    export.write_param_file(tmp_path / "p64.bin", params)  # params only, float64: converted on load
    other.load(tmp_path / "p64.bin")
    assert other.step == 0 and not other._state_flat.any()
    assert export.read_param_file(tmp_path / "p64.bin")["W1"].dtype == np.float64

    bad = dict(params, W1=np.zeros((8, 15)))
    export.write_param_file(tmp_path / "bad.bin", bad)
    with pytest.raises(CheckpointError, match="'W1' has shape"):
        other.load(tmp_path / "bad.bin")
    export.write_param_file(tmp_path / "extra.bin", dict(params, W9=np.zeros(2)))
    with pytest.raises(CheckpointError, match="'W9' is not a parameter"):
        other.load(tmp_path / "extra.bin")
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="damaged"):
        export.read_param_file(truncated)


# --- bench -------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["py", "yaml"])
def test_bench(capsys, specs, which):
    code, out, err = run(capsys, "bench", specs[which], "--steps", "3", "--batch", "8")
    assert code == 0, err
    for text in ("cold compile", "cached compile", "train step", "median", "forward", "peak memory", "workspace"):
        assert text in out, text


# --- bad specs: one line on stderr, exit 1, never a traceback ----------------------------------

GOOD_HEAD = "inputs:\n  x: {shape: [batch, 8]}\n  y: {shape: [batch], dtype: int32}\n"
BAD_SPECS = {
    "typo.yaml": (GOOD_HEAD + "layer:\n  - {type: dense, units: 3}\nloss: softmax_cross_entropy\n",
                  r"typo\.yaml:4: layer: unknown key 'layer' \(did you mean 'layers'\?\)"),
    "key.yaml": (GOOD_HEAD + "layers:\n  - {type: dense, units: 16}\n  - {type: dense, unit: 3}\n",
                 r"key\.yaml:6: layers\[1\]\.unit: unknown key 'unit' \(did you mean 'units'\?\); expected one of"),
    "layer.yaml": (GOOD_HEAD + "layers:\n  - {type: dense, units: 16}\n  - relux\n",
                   r"layer\.yaml:6: layers\[1\]: unknown layer 'relux' \(did you mean 'relu'\?\)"),
    "units.yaml": (GOOD_HEAD + "layers:\n  - {type: dense, units: ten}\n",
                   r"units\.yaml:5: layers\[0\]\.units: expected a positive integer, got 'ten'"),
    "shape.yaml": ("inputs:\n  x: {shape: [batch, 8]}\n  t: {shape: [batch, 4]}\ninput: x\n"
                   "layers:\n  - {type: dense, units: 3}\nloss: {type: mse, target: t}\n",
                   r"shape\.yaml:7: loss: shape mismatch: mse: prediction \(batch, 3\) and target \(batch, 4\)"),
    "sympy.yaml": (GOOD_HEAD + "functions:\n  mish: {expr: 'z * tanh(log(1 + exp(z))', symbols: [z]}\n"
                   "layers:\n  - {type: dense, units: 3, activation: mish}\n",
                   r"sympy\.yaml:5: functions\.mish\.expr: invalid SymPy expression"),
    "unsafe.yaml": (GOOD_HEAD + "functions:\n  f: {expr: \"__import__('os').getcwd()\", symbols: [z]}\n"
                    "layers:\n  - f\n", r"functions\.f\.expr: unsupported syntax"),
    "symbol.yaml": (GOOD_HEAD + "functions:\n  f: {expr: 'z * q', symbols: [z]}\nlayers:\n  - f\n",
                    r"functions\.f\.expr: unknown name 'q'"),
    "optimizer.yaml": (GOOD_HEAD + "layers:\n  - {type: dense, units: 3}\nloss: softmax_cross_entropy\n"
                       "optimizer: {type: adamm}\n",
                       r"optimizer\.type: unknown optimizer 'adamm' \(did you mean 'adam"),
    "syntax.yaml": ("inputs:\n  x: {shape: [batch, 8]\nlayers: []\n", r"syntax\.yaml:3: invalid YAML"),
    "shape.py": ("import bpcompile as bp\ng = bp.Graph('bad')\nx = g.input('x', ('batch', 8))\n"
                 "w = g.param('w', (7, 3))\ng.output('y', x @ w)\ngraph = g\n",
                 r"shape\.py:5: ShapeError: matmul: shapes \(batch, 8\) and \(7, 3\) do not align"),
    "syntax.py": ("def build(:\n    pass\n", r"syntax\.py:1: SyntaxError"),
    "empty.py": ("x = 1\n", r"empty\.py: defines neither a module-level 'graph'"),
    "spec.txt": ("hello\n", r"spec\.txt: unknown spec type '\.txt'"),
    # an activation is an elementwise layer or a function, not a layer with parameters
    "activation.yaml": (GOOD_HEAD + "layers:\n  - {type: dense, units: 3, activation: lm_head}\n",
                        r"layers\[0\]\.activation: unknown activation 'lm_head'; expected one of softmax, log_softmax, "
                        r"abs, .*relu, .*tanh, leaky_relu, elu$"),
    "builtin.yaml": (GOOD_HEAD + "functions:\n  layer_norm: 'z * 2'\nlayers:\n  - layer_norm\n",
                     r"builtin\.yaml:5: functions\.layer_norm: 'layer_norm' is a built-in layer"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_specs_give_one_line(capsys, tmp_path, name):
    text, pattern = BAD_SPECS[name]
    path = tmp_path / name
    path.write_text(text)
    for command in ("build", "show"):
        code, out, err = run(capsys, command, path)
        assert code == 1
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(pattern, err), err


def test_bad_spec_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(BAD_SPECS["typo.yaml"][0])
    done = subprocess.run([sys.executable, "-m", "bpcompile.tools.cli", "check", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("bpcompile check: error: ")
    missing = subprocess.run([sys.executable, "-m", "bpcompile.tools.cli", "build", str(tmp_path / "nope.py")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "nope.py: no such file" in missing.stderr


def test_yaml_spec_without_pyyaml(capsys, specs, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    code, _, err = run(capsys, "build", specs["yaml"])
    assert code == 1 and "pip install" in err and "pyyaml" in err.lower()


def test_parse_sympy_is_safe_and_complete():
    import sympy as sp

    from bpcompile.tools.spec import parse_sympy
    z = sp.Symbol("z", real=True)
    assert parse_sympy("z^2 + 3*z", ["z"]) == z**2 + 3 * z
    assert parse_sympy("Piecewise((z, z > 0), (0.1*z, True))", ["z"]).has(sp.Piecewise)
    assert parse_sympy("log1p(exp(-abs(z))) + max(z, 0)", ["z"]).has(sp.Max)
    for bad in ("z.real", "(lambda: 1)()", "[z]", "open('x')", "z if z else 1", "z +"):
        with pytest.raises(ValueError):
            parse_sympy(bad, ["z"])


def test_a_layer_kind_is_one_entry_of_the_layer_table(tmp_path, monkeypatch):
    """A new entry of spec.LAYERS is a layer kind of YAML specs: its settings are checked, it
    builds, and the list of layers in error messages names it."""
    from bpcompile.tools.spec import LAYERS, Layer, SpecError, load_spec

    def scaled(stack, x, settings, at):
        factor = stack.r.number(settings.get("factor", 2), at.where + ("factor",))
        return stack.call(at.where, lambda: x * factor)

    monkeypatch.setitem(LAYERS, "scaled", Layer({"factor": "a number (2)"}, scaled, activation=True))
    path = tmp_path / "scaled.yaml"
    path.write_text(GOOD_HEAD + "input: x\nlayers:\n  - {type: scaled, factor: 3}\n"
                    "  - {type: dense, units: 2, activation: scaled}\n")
    graph = load_spec(path).graph
    x = np.arange(16.0).reshape(2, 8)
    params = {n: np.full(p.shape, 0.5) for n, p in graph.params.items()}
    out = bp.evaluate([graph.outputs["output"]], {"x": x}, params)[0]
    np.testing.assert_allclose(out, 2 * (3 * x @ params["W1"] + params["b1"]))
    path.write_text(GOOD_HEAD + "layers:\n  - {type: scaled, factr: 3}\n")
    with pytest.raises(SpecError, match=r"layers\[0\]\.factr: unknown key 'factr' \(did you mean 'factor'\?\); "
                                        r"expected one of type, factor$"):
        load_spec(path)
    path.write_text(GOOD_HEAD + "layers:\n  - scaledd\n")
    with pytest.raises(SpecError, match=r"unknown layer 'scaledd' \(did you mean 'scaled'\?\); expected one of "
                                        r"dense, .*, elu, scaled$"):
        load_spec(path)


def test_explanation_uses_autodiff_nodes():
    from bpcompile.autodiff import reverse as autodiff
    from bpcompile.tools import explain
    g = tiny_graph()
    spec = g.losses["loss"]
    params = [g.params[n] for n in g.params]
    _, grads = explain.cotangents(spec.node, params)
    assert all(a is b for a, b in zip(grads, autodiff.grad(spec.node, params)))
    text = explain.explain_text(explain.explain(g))
    assert "dW2 = H1ᵀ · dlogits" in re.sub(r" +", " ", text)


def test_spec_module_doc_example_loads(tmp_path):
    """The YAML example in bpcompile.tools.spec's docstring is a valid spec."""
    from bpcompile.tools import spec as spec_mod
    doc = spec_mod.__doc__
    block = textwrap.dedent(doc[doc.index("    name: mlp"):doc.index("Layers:")])
    path = tmp_path / "doc.yaml"
    path.write_text(block)
    loaded = spec_mod.load_spec(path)
    assert list(loaded.graph.params) == ["W1", "b1", "W2", "b2"] and loaded.optimizer.kind == "adam"
