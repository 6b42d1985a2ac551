"""The runtime support compiled apart (build.runtime_object): once per build folder and settings,
linked into every module, compiled again when its cached object does not verify, and a compile
that fails reported with the runtime's source kept beside the failed build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_build_cache import mlp_graph

import bpcompile as bp
from bpcompile.build import runtime_object


def objects(root: Path) -> list[Path]:
    return sorted((root / runtime_object.FOLDER).glob("*.o"))


def data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(4, 3)), "t": rng.normal(size=(4, 2))}


def test_models_of_one_folder_share_one_compiled_runtime(tmp_path, monkeypatch):
    begun = []
    begin = runtime_object._begin
    monkeypatch.setattr(runtime_object, "_begin", lambda *args: begun.append(args) or begin(*args))
    first = bp.compile(mlp_graph("rt_first", hidden=5), dtype="float64", build_dir=tmp_path)
    assert len(begun) == 1  # begun by bp.compile before the lowering, and that compile used
    [obj] = objects(tmp_path)
    record = json.loads(obj.with_suffix(".json").read_text())
    assert record == {"size": obj.stat().st_size, "sha256": record["sha256"]}
    assert (first.build_path / "runtime.c").read_text().count("bp_set_num_threads(int n)") == 1
    def no_compile(*args):
        raise AssertionError("the runtime was compiled again")
    monkeypatch.setattr(runtime_object, "_begin", no_compile)
    second = bp.compile(mlp_graph("rt_second", hidden=7), dtype="float64", build_dir=tmp_path)
    assert objects(tmp_path) == [obj]
    commands = json.loads((second.build_path / "build.json").read_text())["commands"]
    assert "-DBP_PART=-1" in commands[0] and "runtime.o" in commands[-1]  # compiled apart, linked in
    assert np.isfinite(second.train_step(**data()))


def test_the_float32_and_float64_runtimes_are_two_objects(tmp_path):
    bp.compile(mlp_graph("rt_f64"), dtype="float64", build_dir=tmp_path)
    bp.compile(mlp_graph("rt_f32"), dtype="float32", build_dir=tmp_path)
    assert len(objects(tmp_path)) == 2


def test_a_damaged_runtime_object_is_compiled_again(tmp_path):
    bp.compile(mlp_graph("rt_damaged_a"), dtype="float64", build_dir=tmp_path)
    [obj] = objects(tmp_path)
    good = obj.read_bytes()
    obj.write_bytes(good[:100] + b"\0" * (len(good) - 100))  # same size, other bytes
    model = bp.compile(mlp_graph("rt_damaged_b"), dtype="float64", build_dir=tmp_path)
    assert obj.read_bytes() == good  # gcc's output again, not the damaged bytes
    want = bp.reference.loss_and_grad(model.graph, data(), {k: v.copy() for k, v in model.params.items()})[0]
    assert model.loss_and_grad(**data())[0] == pytest.approx(want, rel=1e-12)


def test_a_runtime_that_does_not_compile_is_reported_with_its_source(tmp_path, monkeypatch):
    command = runtime_object.command
    monkeypatch.setattr(runtime_object, "command", lambda defines: [*command(defines)[:1], "-fbpcompile-no-such-flag",
                                                                    *command(defines)[1:]])
    with pytest.raises(bp.CompileError, match="runtime support") as caught:
        bp.compile(mlp_graph("rt_failing"), dtype="float64", build_dir=tmp_path)
    assert "-fbpcompile-no-such-flag" in str(caught.value)
    source = Path(caught.value.source_path)
    assert source.name == "runtime.c" and source.parent.name.endswith(".failed") and source.is_file()
    assert not objects(tmp_path)
    assert not list((tmp_path / runtime_object.FOLDER).glob(".tmp-*"))  # its temporary folder removed
