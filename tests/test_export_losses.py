"""The standalone C export of a model with several named losses: each loss's train step runs its
own optimizer (or a shared one) with its own step count, as the Python module does (whose
trajectory tests/test_loss_steps.py checks against one torch optimizer per network), and the
parameter files carry every loss's count between the C library and Python."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_loss_steps import SCHEDULE, gan_graph

import bpcompile as bp
from bpcompile.errors import CheckpointError
from bpcompile.tools import export

CC = os.environ.get("CC", "gcc")
needs_toolchain = pytest.mark.skipif(shutil.which(CC) is None or shutil.which("make") is None,
                                     reason="needs a C compiler and make")
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic"]

# A driver of the exported library of a graph with losses "d" and "g": load PARAMS, read the
# inputs from DATA (raw values in BP_INPUT_* order), train one step per loss named on the command
# line ("+d": in two calls, backward_d then update_d), printing the loss and every parameter after
# each, then save the parameters, state and step counts to SAVE.
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "model.h"

static const bp_model_entry split_steps[2][2] = {{bp_model_backward_d, bp_model_update_d},
                                                  {bp_model_backward_g, bp_model_update_g}};

static void print_steps(const bp_model *m)
{
    printf("steps %lld", (long long)m->step);
    for (int l = 0; l < BP_NUM_LOSSES; ++l)
        printf(" %s=%lld", bp_model_loss_names[l], (long long)m->loss_steps[l]);
    printf("\n");
}

int main(int argc, char **argv)
{
    bp_model m;
    void *data[BP_NUM_INPUTS_ALLOC] = {NULL};
    if (argc < 4 || bp_model_create(&m, NULL) != 0)
        return 2;
    if (bp_model_load(&m, argv[1]) != 0) {
        fprintf(stderr, "%s\n", m.error);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    for (int k = 0; k < BP_NUM_INPUTS; ++k) {
        const size_t n = (size_t)bp_model_input_size(&m, k);
        data[k] = malloc(sizeof(bp_model_real) * n);
        if (!f || !data[k] || fread(data[k], sizeof(bp_model_real), n, f) != n)
            return 3;
    }
    fclose(f);
    print_steps(&m);
    for (int a = 4; a < argc; ++a) {
        const int split = argv[a][0] == '+';
        int l = 0;
        while (l < BP_NUM_LOSSES && strcmp(bp_model_loss_names[l], argv[a] + split) != 0)
            ++l;
        bp_model_real loss = 0;
        void *out[1] = {&loss};
        const void *const *in = (const void *const *)data;
        if (l == BP_NUM_LOSSES)
            return 4;
        if (split ? split_steps[l][0](&m, in, out) != 0 || split_steps[l][1](&m, in, NULL) != 0
                  : bp_model_train_steps[l](&m, in, out) != 0)
            return 5;
        printf("loss %s %.17g\n", argv[a], (double)loss);
        for (int p = 0; p < BP_NUM_PARAMS; ++p) {
            printf("param %s", bp_model_params[p].name);
            for (int64_t i = 0; i < bp_model_params[p].size; ++i)
                printf(" %.17g", (double)m.params[bp_model_params[p].offset + i]);
            printf("\n");
        }
    }
    print_steps(&m);
    if (bp_model_save(&m, argv[3]) != 0) {
        fprintf(stderr, "%s\n", m.error);
        return 1;
    }
    for (int k = 0; k < BP_NUM_INPUTS; ++k)
        free(data[k]);
    bp_model_destroy(&m);
    return 0;
}
"""

OPTIMIZERS = {
    "adam-d-sgd-momentum-g": lambda: {"d": bp.optim.Adam(lr=4e-2, betas=(0.5, 0.999)),
                                      "g": bp.optim.SGD(lr=0.1, momentum=0.9)},
    "one-adam-shared": lambda: bp.optim.Adam(lr=0.1, betas=(0.5, 0.999)),
    "one-adam-object-in-a-dict": lambda: (lambda adam: {"d": adam, "g": adam})(bp.optim.Adam(lr=0.05)),
    "schedules-clip-weight-decay": lambda: {
        "d": bp.optim.AdamW(lr=bp.schedules.LinearWarmup(bp.schedules.Cosine(0.05, total_steps=4), warmup_steps=2),
                            weight_decay=0.1),
        "g": bp.optim.SGD(lr=bp.schedules.StepDecay(0.2, step_size=2, gamma=0.5), momentum=0.5, nesterov=True,
                          clip_norm=0.5, weight_decay=0.01)},  # g's gradient norm is about 0.7: clipped
}


def dropout_gan() -> bp.Graph:
    """gan_graph() with dropout in loss "d": the C library must draw the Python module's stream."""
    g = bp.Graph("export_losses_dropout")
    x = g.input("x", ("batch", 3))
    a, b = g.param("a", (3, 2), init="normal"), g.param("b", (2,), init="normal")
    out = x @ a + b
    g.loss(bp.mean(bp.square(bp.dropout(out, 0.25))), name="d", params=["a"])
    g.loss(bp.mean(bp.tanh(out)), name="g", params=["b"])
    return g


def build(folder: Path, optimizer, graph: bp.Graph | None = None) -> None:
    """Export `graph` (default gan_graph()) with `optimizer` (float64, seed 1), make it, and link
    DRIVER against it."""
    export.export_model(graph or gan_graph(), folder, "float64", optimizer, seed=1, batch=5, steps=2)
    done = subprocess.run(["make", "-s", "CFLAGS=" + " ".join(CFLAGS)], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder / "driver.c").write_text(DRIVER)
    done = subprocess.run([CC, *CFLAGS, "driver.c", "libmodel.a", "-lm", "-pthread", "-o", "driver"], cwd=folder,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def drive(folder: Path, params: Path, x: np.ndarray, save: Path, losses) -> tuple[list, list]:
    """Run DRIVER: ([(loss, value, {param: values}) per step], [(step, {loss: count}) before, after])."""
    x.astype(np.float64).tofile(folder / "x.raw")
    done = subprocess.run(["./driver", str(params), "x.raw", str(save), *losses], cwd=folder, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    steps, counts = [], []
    for line in done.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "loss":
            steps.append((rest[0], float(rest[1]), {}))
        elif kind == "param":
            steps[-1][2][rest[0]] = np.array([float(v) for v in rest[1:]])
        else:
            counts.append((int(rest[0]), {k: int(v) for k, v in (item.split("=") for item in rest[1:])}))
    return steps, counts


def python_step(model, loss: str, x: np.ndarray) -> float:
    """One train step of `model` on `loss` ("+d": backward, then apply_gradients); the loss."""
    if not loss.startswith("+"):
        return model.train_step(loss=loss, x=x)
    value = model.backward(loss=loss[1:], x=x)
    model.apply_gradients(loss=loss[1:])
    return value


def check_trajectory(model, x: np.ndarray, steps: list, losses) -> None:
    """The C steps equal the Python module's, loss by loss and parameter by parameter."""
    assert [s[0] for s in steps] == list(losses)
    for loss, value, params in steps:
        assert value == pytest.approx(python_step(model, loss, x), rel=1e-12)
        for name, got in params.items():
            np.testing.assert_allclose(got, model.params[name].ravel(), rtol=1e-12, atol=0)


@needs_toolchain
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_each_loss_trains_with_its_own_optimizer_and_step_count(build_dir, tmp_path, which):
    build(tmp_path, OPTIMIZERS[which]())
    model = bp.compile(gan_graph(), "float64", optimizer=OPTIMIZERS[which](), seed=1)
    x = np.random.default_rng(0).normal(size=(5, 3))
    steps, counts = drive(tmp_path, tmp_path / "params.bin", x, tmp_path / "trained.bin", SCHEDULE)
    check_trajectory(model, x, steps, SCHEDULE)
    assert counts == [(0, {"d": 0, "g": 0}), (7, {"d": 4, "g": 3})] and model.loss_steps == {"d": 4, "g": 3}

    # the C library's checkpoint resumes in Python with every count ...
    resumed = bp.compile(gan_graph(), "float64", optimizer=OPTIMIZERS[which](), seed=5)
    resumed.load(tmp_path / "trained.bin")
    assert resumed.step == 7 and resumed.loss_steps == {"d": 4, "g": 3}
    np.testing.assert_allclose(resumed._state_flat, model._state_flat, rtol=1e-12, atol=0)
    # ... and the Python module's resumes in C
    export.save_model_params(model, tmp_path / "python.bin")
    more = ("g", "+g", "d", "+g")
    steps, counts = drive(tmp_path, tmp_path / "python.bin", x, tmp_path / "again.bin", more)
    assert counts == [(7, {"d": 4, "g": 3}), (11, {"d": 5, "g": 6})]
    check_trajectory(resumed, x, steps, more)
    check_trajectory(model, x, steps, more)


@needs_toolchain
def test_split_steps_and_dropout_follow_the_python_module(build_dir, tmp_path):
    """backward_* + update_* is a train step (its own loss's step count, the hyperparameters of
    its optimizer), and dropout draws the stream of the coming step in both halves."""
    optimizer = OPTIMIZERS["adam-d-sgd-momentum-g"]
    build(tmp_path, optimizer(), dropout_gan())
    model = bp.compile(dropout_gan(), "float64", optimizer=optimizer(), seed=1)
    x = np.random.default_rng(3).normal(size=(5, 3))
    losses = ("+d", "d", "+g", "+d", "g", "+d")
    steps, counts = drive(tmp_path, tmp_path / "params.bin", x, tmp_path / "trained.bin", losses)
    check_trajectory(model, x, steps, losses)
    assert counts[-1] == (6, {"d": 4, "g": 2}) and model.loss_steps == {"d": 4, "g": 2}


@needs_toolchain
def test_main_trains_the_losses_in_turn(build_dir, tmp_path):
    build(tmp_path, OPTIMIZERS["adam-d-sgd-momentum-g"]())
    model = bp.compile(gan_graph(), "float64", optimizer=OPTIMIZERS["adam-d-sgd-momentum-g"](), seed=1)
    data = export.synthetic_inputs(model.meta["inputs"], {"batch": 5}, seed=0, dtype=np.float64)
    done = subprocess.run(["./main", "-steps", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [(int(w[1]), w[2]) for w in lines] == [(1, "d"), (1, "g"), (2, "d"), (2, "g")]
    expected = [model.train_step(loss=w[2], **data) for w in lines]
    np.testing.assert_allclose([float(w[-1]) for w in lines], expected, rtol=1e-12)

    done = subprocess.run(["./main", "-steps", "3", "-loss", "g", "-save", "g.bin"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    saved = export.read_param_file_full(tmp_path / "g.bin")
    assert saved.step == 3 and saved.loss_steps == {"d": 0, "g": 3}
    done = subprocess.run(["./main", "-loss", "critic"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no loss critic" in done.stderr


@needs_toolchain
def test_the_c_loader_refuses_step_counts_of_other_losses(build_dir, tmp_path):
    build(tmp_path, OPTIMIZERS["one-adam-shared"]())
    params = export.read_param_file(tmp_path / "params.bin")
    x = np.zeros((5, 3))
    x.tofile(tmp_path / "x.raw")
    export.write_param_file(tmp_path / "other.bin", params, step=2, loss_steps={"d": 1, "critic": 1})
    done = subprocess.run(["./driver", "other.bin", "x.raw", "out.bin"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "the model has no loss critic" in done.stderr
    export.write_param_file(tmp_path / "half.bin", params, step=2, loss_steps={"d": 2})
    done = subprocess.run(["./driver", "half.bin", "x.raw", "out.bin"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "none for loss g" in done.stderr
    # a file of before per-loss counts (state, one step count): every loss resumes at that count
    state = {"m": {n: np.zeros(v.shape) for n, v in params.items()}, "v": {n: np.ones(v.shape) for n, v in
                                                                         params.items()}}
    export.write_param_file(tmp_path / "old.bin", params, step=3, state=state)
    _, counts = drive(tmp_path, tmp_path / "old.bin", x, tmp_path / "out.bin", ())
    assert counts[0] == (3, {"d": 3, "g": 3})


def test_parameter_files_keep_each_losss_count(build_dir, tmp_path):
    x = np.random.default_rng(2).normal(size=(4, 3))
    model = bp.compile(gan_graph(), "float64", optimizer={"d": bp.optim.Adam(lr=0.1), "g": bp.optim.SGD(lr=0.1)})
    for loss in SCHEDULE:
        model.train_step(loss=loss, x=x)
    export.save_model_params(model, tmp_path / "ck.bin")
    contents = export.read_param_file_full(tmp_path / "ck.bin")
    assert (tmp_path / "ck.bin").read_bytes()[8:12] == (2).to_bytes(4, "little")
    assert contents.step == 7 and contents.loss_steps == {"d": 4, "g": 3}
    resumed = bp.compile(gan_graph(), "float64", optimizer={"d": bp.optim.Adam(lr=0.1), "g": bp.optim.SGD(lr=0.1)},
                         seed=4)
    resumed.load(tmp_path / "ck.bin")
    assert resumed.step == 7 and resumed.loss_steps == {"d": 4, "g": 3}
    for loss in ("g", "d"):
        assert resumed.train_step(loss=loss, x=x) == model.train_step(loss=loss, x=x)

    export.write_param_file(tmp_path / "other.bin", contents.params, state=contents.state, step=7,
                            loss_steps={"d": 4, "critic": 3})
    with pytest.raises(CheckpointError, match=r"losses \['critic', 'd'\]; model 'loss_steps_gan' has losses"):
        resumed.load(tmp_path / "other.bin")
    assert resumed.loss_steps == {"d": 5, "g": 4}  # refused before anything changed
    with pytest.raises(ValueError, match="step count must be a whole number"):
        export.write_param_file(tmp_path / "bad.bin", contents.params, loss_steps={"d": -1})


def test_one_loss_keeps_the_version_1_file_and_api(build_dir, tmp_path):
    g = bp.Graph("one_loss")
    x = g.input("x", ("batch", 3))
    w = g.param("w", (3,), init="normal")
    g.loss(bp.mean(bp.square(x * w)))
    model = bp.compile(g, "float64", optimizer=bp.optim.Adam(lr=0.1))
    model.train_step(x=np.ones((2, 3)))
    export.save_model_params(model, tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes()[8:12] == (1).to_bytes(4, "little")
    assert export.read_param_file_full(tmp_path / "one.bin").loss_steps == {}
    export.export_model(g, tmp_path / "lib", "float64", bp.optim.Adam(lr=0.1))
    header = (tmp_path / "lib" / "model.h").read_text()
    assert "double bp_model_lr(int64_t step);" in header and "void bp_model_hyper(" in header
    assert "loss_steps" not in header  # one loss: m->step is its count, as before
    per_loss = export.export_model(gan_graph(), tmp_path / "gan", "float64",
                                   {"d": bp.optim.Adam(lr=0.1), "g": bp.optim.SGD(lr=0.1)})
    header = (per_loss.path / "model.h").read_text()
    assert "bp_model_hyper(" not in header and "int64_t loss_steps[BP_NUM_LOSSES];" in header


@needs_toolchain
def test_loss_names_are_inert_in_the_c(build_dir, tmp_path):
    g = bp.Graph("named")
    x = g.input("x", ("batch", 2))
    a, b = g.param("a", (2,), init="normal"), g.param("b", (2,), init="normal")
    names = ('critic */ #error', 'gen "\\" ??=')
    g.loss(bp.mean(bp.square(x * a)), name=names[0], params=["a"])
    g.loss(bp.mean(bp.tanh(x * a + b)), name=names[1], params=["b"])
    optimizer = {names[0]: bp.optim.Adam(lr=0.1), names[1]: bp.optim.SGD(lr=0.1, momentum=0.5)}
    export.export_model(g, tmp_path, "float64", optimizer, batch=2, steps=1)
    done = subprocess.run(["make", "-s", "CFLAGS=" + " ".join(CFLAGS)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(["./main", "-save", "t.bin"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [line.split(" loss ")[0][len("step 1 "):] for line in done.stdout.splitlines()[1:]] == list(names)
    assert export.read_param_file_full(tmp_path / "t.bin").loss_steps == dict.fromkeys(names, 1)
