"""model.c compiled as two translation units in parallel (BP_PART, templates/bp_runtime.h): the
split is decided by the kernels' size alone, balanced, and a module built in parts computes what
the same module built whole does; the file still compiles whole (an export, `bpcompile show`)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import bpcompile as bp
import bpcompile.build.cffi_build as bpbuild
from bpcompile.codegen import module as codegen


def mlp(name: str) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 12))
    y = g.input("y", ("batch",), dtype="int32")
    h = x
    for i, (a, b) in enumerate([(12, 40), (40, 24), (24, 5)]):
        h = h @ g.param(f"W{i}", (a, b), init="he_normal") + g.param(f"b{i}", (b,))
        if i < 2:
            h = bp.tanh(h)
    g.output("logits", h)
    g.loss(bp.softmax_cross_entropy(h, y))
    return g


def test_small_kernels_stay_in_one_part_and_larger_ones_split_evenly():
    assert codegen.part_of_each([100, 200, 300]) == [0, 0, 0]
    sizes = [9000, 7000, 5000, 4000, 3000, 2000, 1000]
    where = codegen.part_of_each(sizes)
    assert set(where) == {0, 1} and where == codegen.part_of_each(list(sizes))  # a function of the sizes
    load = [codegen.PART0_EXTRA_CHARS, 0]
    for size, part in zip(sizes, where):
        load[part] += size
    assert abs(load[0] - load[1]) <= max(sizes)


def test_a_module_built_in_parts_computes_what_the_whole_one_does(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 12)), rng.integers(0, 5, 9).astype(np.int32)
    split = bp.compile(mlp("parts_split"), dtype="float64", optimizer=bp.optim.Adam(lr=0.01), build_dir=tmp_path)
    commands = json.loads((split.build_path / "build.json").read_text())["commands"]
    assert [sum(f"-DBP_PART={k}" in c for c in commands) for k in (-1, 0, 1)] == [1, 1, 1]  # runtime.c, 2 parts
    assert "#if BP_IN_PART(1)" in split.c_source and "BP_KERNEL void k0_gemm(" in split.c_source
    monkeypatch.setattr(codegen, "SPLIT_MIN_CHARS", 10**9)
    whole = bp.compile(mlp("parts_split"), dtype="float64", optimizer=bp.optim.Adam(lr=0.01), build_dir=tmp_path)
    assert "BP_IN_PART" not in whole.c_source.split("#endif /* BP_RUNTIME_H */")[1]
    commands = json.loads((whole.build_path / "build.json").read_text())["commands"]
    assert [sum(f"-DBP_PART={k}" in c for c in commands) for k in (-1, 0, 1)] == [1, 1, 0]
    for model in (split, whole):  # one thread pool in the module, whichever way it was compiled
        module_file = json.loads((model.build_path / "meta.json").read_text())["module_file"]
        symbols = subprocess.run(["nm", module_file], cwd=model.build_path, capture_output=True, text=True).stdout
        assert [line.split()[-1] for line in symbols.splitlines()].count("bp_pool") == 1
    for _ in range(3):
        assert split.train_step(x=x, y=y) == whole.train_step(x=x, y=y)
    for name in split.params:
        np.testing.assert_array_equal(split.params[name], whole.params[name])


def test_a_split_source_still_compiles_whole_without_warnings(tmp_path):
    lowered = bp.lower(mlp("parts_whole"), "float32", bp.optim.SGD(lr=0.1))
    assert lowered.sources.parts == 2
    (tmp_path / "model.c").write_text(lowered.sources.model_c)
    (tmp_path / "model.h").write_text(lowered.sources.model_h)
    cc = bpbuild.compiler()[0]
    done = subprocess.run([cc, *bpbuild.model_flags(), "-Werror", "-c", "model.c", "-o", "model.o"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("part", [0, 1])
def test_each_part_compiles_alone_without_warnings(tmp_path, part):
    lowered = bp.lower(mlp("parts_alone"), "float32", bp.optim.Adam(lr=0.1))
    (tmp_path / "model.c").write_text(lowered.sources.model_c)
    (tmp_path / "model.h").write_text(lowered.sources.model_h)
    cc = bpbuild.compiler()[0]
    done = subprocess.run([cc, *bpbuild.model_flags(), "-Werror", f"-DBP_PART={part}", "-c", "model.c", "-o",
                           "model.o"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    symbols = subprocess.run(["nm", "model.o"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert (" T bp_train_loss" in symbols) == (part == 0)  # the entry points: part 0 alone
