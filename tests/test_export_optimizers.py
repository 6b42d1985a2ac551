"""The standalone C export of NAdam and of parameter groups: the C library trains a small MLP as
the compiled Python module does (losses, parameters and optimizer state at rtol 1e-12 in
float64) and as torch.optim does, its per-step hyperparameters are the module's, and parameter
files resume training exactly from C in Python and from Python in C. NAdam's momentum product,
which the library carries from step to step, follows the step count across loads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_export_losses import build as build_two_losses
from test_export_losses import check_trajectory, drive
from test_loss_steps import SCHEDULE, gan_graph

import bpcompile as bp
from bpcompile.tools import export

CC = os.environ.get("CC", "gcc")
pytestmark = pytest.mark.skipif(shutil.which(CC) is None or shutil.which("make") is None,
                                reason="needs a C compiler and make")
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic"]
BATCH, STEPS, MORE = 4, 6, 3

CASES = {
    "nadam": lambda: bp.optim.NAdam(lr=0.01, weight_decay=0.01),
    "nadam-decoupled-param-groups": lambda: bp.optim.NAdam(
        lr=0.02, weight_decay=0.05, momentum_decay=0.01, decoupled_weight_decay=True,
        param_groups=[{"params": ["b1", "b2"], "weight_decay": 0.0, "lr_scale": 0.5}]),
    "adamw-param-groups": lambda: bp.optim.AdamW(  # nanoGPT's: only matrices decay; here W2 at half the rate
        lr=0.01, weight_decay=0.1,
        param_groups=[{"params": ["b1", "b2"], "weight_decay": 0.0}, {"params": ["W2"], "lr_scale": 0.5}]),
    "sgd-param-groups-schedule": lambda: bp.optim.SGD(
        lr=bp.schedules.StepDecay(0.1, step_size=2, gamma=0.5), momentum=0.9, weight_decay=0.01,
        param_groups=[{"params": ["b1", "b2"], "weight_decay": 0.0, "lr_scale": 2.0}]),
}

# Links against an exported one-loss library. `./driver FILE STEPS [FILE STEPS ...]` prints the
# hyperparameters bp_model_hyper gives steps 1..4 at the exported schedule's rate, then loads each
# FILE in turn into the same model and trains STEPS steps on in0.raw, in1.raw, ... (raw values in
# BP_INPUT_* order), printing each loss.
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv)
{
    bp_model m;
    void *data[BP_NUM_INPUTS_ALLOC] = {NULL};
    if (bp_model_create(&m, NULL) != 0)
        return 2;
    for (int64_t step = 1; step <= 4; ++step) {
        double hyper[BP_NUM_HYPER];
        bp_model_hyper(step, bp_model_lr(step), hyper);
        printf("hyper");
        for (int k = 0; k < BP_NUM_HYPER; ++k)
            printf(" %.17g", hyper[k]);
        printf("\n");
    }
    for (int k = 0; k < BP_NUM_INPUTS; ++k) {
        char name[32];
        const size_t size = bp_model_inputs[k].is_int ? sizeof(int32_t) : sizeof(bp_model_real);
        const size_t n = (size_t)bp_model_input_size(&m, k);
        snprintf(name, sizeof name, "in%d.raw", k);
        FILE *f = fopen(name, "rb");
        data[k] = malloc(size * n);
        if (!f || !data[k] || fread(data[k], size, n, f) != n)
            return 3;
        fclose(f);
    }
    for (int a = 1; a + 1 < argc; a += 2) {
        if (bp_model_load(&m, argv[a]) != 0) {
            fprintf(stderr, "%s\n", m.error);
            return 1;
        }
        for (long s = strtol(argv[a + 1], NULL, 10); s > 0; --s) {
            bp_model_real loss = 0;
            void *out[1] = {&loss};
            if (BP_DEFAULT_TRAIN(&m, (const void *const *)data, out) != 0) {
                fprintf(stderr, "%s\n", m.error);
                return 1;
            }
            printf("loss %.17g\n", (double)loss);
        }
    }
    for (int k = 0; k < BP_NUM_INPUTS; ++k)
        free(data[k]);
    bp_model_destroy(&m);
    return 0;
}
"""


def mlp() -> bp.Graph:
    g = bp.Graph("export_optim_mlp")
    x = g.input("x", ("batch", 5))
    y = g.input("y", ("batch",), dtype="int32")
    W1, b1 = g.param("W1", (5, 8), init="he_normal"), g.param("b1", (8,), init="normal")
    W2, b2 = g.param("W2", (8, 3), init="glorot_uniform"), g.param("b2", (3,), init="normal")
    logits = bp.tanh(x @ W1 + b1) @ W2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def run(folder: Path, *args: str) -> list[str]:
    done = subprocess.run(list(args), cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def main_losses(folder: Path, *args: str) -> list[float]:
    """The losses ./main prints (its synthetic batch, seed 0)."""
    return [float(line.split()[-1]) for line in run(folder, "./main", *args) if line.startswith("step ")]


def module(case: str, seed: int = 1) -> bp.CompiledModel:
    return bp.compile(mlp(), "float64", optimizer=CASES[case](), seed=seed)


def batch(model: bp.CompiledModel) -> dict[str, np.ndarray]:
    return export.synthetic_inputs(model.meta["inputs"], {"batch": BATCH}, seed=0, dtype=np.float64)


def assert_file_holds(path: Path, model: bp.CompiledModel) -> None:
    """The parameter file at `path` holds `model`'s parameters, optimizer state and step count."""
    saved = export.read_param_file_full(path)
    assert saved.step == model.step
    export.save_model_params(model, path.with_suffix(".ref"))
    reference = export.read_param_file_full(path.with_suffix(".ref"))
    assert set(saved.state) == set(reference.state) == set(model.optimizer.slots)
    for name, value in reference.params.items():
        np.testing.assert_allclose(saved.params[name], value, rtol=1e-12, atol=0, err_msg=name)
    for slot, values in reference.state.items():
        for name, value in values.items():
            np.testing.assert_allclose(saved.state[slot][name], value, rtol=1e-12, atol=0, err_msg=f"{slot}/{name}")


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, build_dir, tmp_path_factory) -> tuple[str, Path]:
    """(case, folder): the MLP exported with the case's optimizer, made with -Werror -pedantic,
    trained STEPS steps by ./main (saved as c.bin), and DRIVER linked against it."""
    folder = tmp_path_factory.mktemp(request.param)
    export.export_model(mlp(), folder, "float64", CASES[request.param](), seed=1, batch=BATCH, steps=STEPS)
    run(folder, "make", "-s", "CFLAGS=" + " ".join(CFLAGS))
    (folder / "driver.c").write_text(DRIVER)
    run(folder, CC, *CFLAGS, "driver.c", "libmodel.a", "-lm", "-pthread", "-o", "driver")
    return request.param, folder


def test_c_training_equals_the_module_and_resumes_both_ways(exported):
    case, folder = exported
    c_losses = main_losses(folder, "-save", "c.bin")
    model = module(case)
    data = batch(model)
    np.testing.assert_allclose(c_losses, [model.train_step(**data) for _ in range(STEPS)], rtol=1e-12, atol=0)
    assert_file_holds(folder / "c.bin", model)

    resumed = module(case, seed=7)  # the C checkpoint, resumed in Python
    resumed.load(folder / "c.bin")
    assert resumed.step == STEPS
    for _ in range(MORE):
        assert resumed.train_step(**data) == pytest.approx(model.train_step(**data), rel=1e-12, abs=0)
    export.save_model_params(resumed, folder / "python.bin")
    assert_file_holds(folder / "python.bin", model)

    again = main_losses(folder, "-params", "python.bin", "-steps", str(MORE), "-save", "c2.bin")  # and back in C
    np.testing.assert_allclose(again, [model.train_step(**data) for _ in range(MORE)], rtol=1e-12, atol=0)
    assert_file_holds(folder / "c2.bin", model)
    assert model.step == STEPS + 2 * MORE


def test_hyperparameters_and_loads_mid_run_follow_the_step_count(exported):
    """bp_model_hyper gives Optimizer.step_hyper's values (step, rate, NAdam's product); loading a
    later file, then the initial one, into a model that trained, continues from each file's step
    count (NAdam's running product too) as the Python module does."""
    case, folder = exported
    main_losses(folder, "-save", "c.bin")
    model = module(case)
    data = batch(model)
    for k, value in enumerate(data.values()):
        value.tofile(folder / f"in{k}.raw")
    out = run(folder, "./driver", "params.bin", "3", "c.bin", "2", "params.bin", "2")
    optimizer = CASES[case]()
    hyper = [[float(v) for v in line.split()[1:]] for line in out if line.startswith("hyper")]
    expected = [list(optimizer.step_hyper(step, optimizer.lr_at(step)).values()) for step in range(1, 5)]
    np.testing.assert_allclose(hyper, expected, rtol=1e-15, atol=0)
    python = []
    for path, steps in (("params.bin", 3), ("c.bin", 2), ("params.bin", 2)):
        model.load(folder / path)
        python += [model.train_step(**data) for _ in range(steps)]
    losses = [float(line.split()[1]) for line in out if line.startswith("loss")]
    np.testing.assert_allclose(losses, python, rtol=1e-12, atol=0)
    assert losses[-2:] == losses[:2]  # the initial file again: the same first steps


def torch_optimizer(case: str, params: dict):
    """torch.optim's equivalent of CASES[case] on torch tensors `params`, and its scheduler."""
    import torch
    biases, W1, W2 = [params["b1"], params["b2"]], params["W1"], params["W2"]
    if case == "nadam":
        return torch.optim.NAdam(list(params.values()), lr=0.01, weight_decay=0.01), None
    if case == "nadam-decoupled-param-groups":
        groups = [{"params": [W1, W2]}, {"params": biases, "weight_decay": 0.0, "lr": 0.01}]
        return torch.optim.NAdam(groups, lr=0.02, weight_decay=0.05, momentum_decay=0.01,
                                 decoupled_weight_decay=True), None
    if case == "adamw-param-groups":
        groups = [{"params": [W1]}, {"params": biases, "weight_decay": 0.0}, {"params": [W2], "lr": 0.005}]
        return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1), None
    groups = [{"params": [W1, W2]}, {"params": biases, "weight_decay": 0.0, "lr": 0.2}]
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01)
    return sgd, torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)


def test_c_training_equals_torch_optim(exported):
    """The C library's trajectory is torch.optim's (param groups as torch's, NAdam's momentum
    product in float64)."""
    torch = pytest.importorskip("torch", reason="needs the [torch] extra (pip install torch==2.13.0)")
    case, folder = exported
    c_losses = main_losses(folder, "-save", "c.bin")
    data = batch(module(case))
    params = {k: torch.tensor(v, requires_grad=True) for k, v in export.read_param_file(folder / "params.bin").items()}
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps NAdam's mu_product in the default dtype
    try:
        optimizer, scheduler = torch_optimizer(case, params)
        losses = []
        for _ in range(STEPS):
            optimizer.zero_grad()
            logits = torch.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
    finally:
        torch.set_default_dtype(previous)
    np.testing.assert_allclose(c_losses, losses, rtol=1e-12)
    trained = export.read_param_file(folder / "c.bin")
    for name, value in params.items():
        np.testing.assert_allclose(trained[name], value.detach().numpy(), rtol=1e-12, atol=1e-15, err_msg=name)


PER_LOSS = {
    "nadam-d-other-nadam-g": lambda: {"d": bp.optim.NAdam(lr=0.05, weight_decay=0.01),
                                      "g": bp.optim.NAdam(lr=0.1, betas=(0.5, 0.9), momentum_decay=0.01)},
    "one-nadam-for-both": lambda: bp.optim.NAdam(lr=0.05),
    "nadam-d-sgd-param-groups-g": lambda: {
        "d": bp.optim.NAdam(lr=0.05, decoupled_weight_decay=True, weight_decay=0.1),
        "g": bp.optim.SGD(lr=0.1, momentum=0.5, param_groups=[{"params": ["b"], "lr_scale": 0.5,
                                                               "weight_decay": 0.01}])},
}


@pytest.mark.parametrize("which", list(PER_LOSS))
def test_per_loss_nadam_follows_each_losss_step_count(build_dir, tmp_path, which):
    """Each loss's NAdam takes its momentum product from that loss's own step count, in C as in
    Python, and the parameter files carry the counts both ways."""
    build_two_losses(tmp_path, PER_LOSS[which]())
    model = bp.compile(gan_graph(), "float64", optimizer=PER_LOSS[which](), seed=1)
    x = np.random.default_rng(0).normal(size=(5, 3))
    steps, counts = drive(tmp_path, tmp_path / "params.bin", x, tmp_path / "trained.bin", SCHEDULE)
    check_trajectory(model, x, steps, SCHEDULE)
    assert counts[-1] == (7, {"d": 4, "g": 3})

    resumed = bp.compile(gan_graph(), "float64", optimizer=PER_LOSS[which](), seed=5)
    resumed.load(tmp_path / "trained.bin")
    assert resumed.loss_steps == {"d": 4, "g": 3}
    np.testing.assert_allclose(resumed._state_flat, model._state_flat, rtol=1e-12, atol=0)
    export.save_model_params(model, tmp_path / "python.bin")
    more = ("g", "d", "g", "g")
    steps, counts = drive(tmp_path, tmp_path / "python.bin", x, tmp_path / "again.bin", more)
    assert counts[-1] == (11, {"d": 5, "g": 6})
    check_trajectory(resumed, x, steps, more)
    check_trajectory(model, x, steps, more)


class Warped(bp.optim.SGD):
    """An optimizer whose hyper() computes a value its hyper_formula() does not declare."""

    kind = "warped"

    def hyper(self, step: int, lr: float) -> dict[str, float]:
        return {"lr": lr, "warp": 1.0 + 1.0 / step}

    def update(self, p, g, state, h):
        return p - h["lr"] * h["warp"] * g, {}


def test_a_hyperparameter_without_a_c_formula_is_refused_by_name(build_dir, tmp_path):
    """The update computes its hyperparameters in C from hyper_formula: an optimizer computing
    them another way is refused when compiled and when exported, naming what to define."""
    groups = [{"params": ["b1"], "lr_scale": 0.5}]
    message = r"optimizer Warped overrides hyper\(\); its hyperparameters are printed to C from hyper_formula"
    with pytest.raises(ValueError, match=message):
        bp.compile(mlp(), "float64", optimizer=Warped(lr=0.1, param_groups=groups))
    with pytest.raises(ValueError, match=message):
        export.export_model(mlp(), tmp_path / "lib", "float64", Warped(lr=0.1, param_groups=groups))
    assert not (tmp_path / "lib").exists()
