"""Hostile and damaged input: spec and graph names, expression bombs, damaged build caches,
meta.json, torn checkpoints, runaway compiles (see the limits in README's robustness notes)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import bpcompile as bp
from bpcompile.tools.cli import main
from bpcompile.tools.spec import SpecError, load_spec

HOSTILE_MAKE = "x\nall: pwn\npwn:\n\ttouch pwned\n#"
HOSTILE_C = "x */ int g; /*"


def tiny(name: str) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    w = g.param("W", (3, 2), init="glorot_uniform")
    b = g.param("b", (2,))
    out = bp.tanh(x @ w + b)
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def _strip_c_comments(text: str) -> str:
    """C code less its comments and string literals, each taken where it starts, as a C compiler
    reads them (a quote inside a comment opens no string, a comment opener inside a string no comment)."""
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:[^"\\\n]|\\.)*"', lambda m: '""' if m.group()[0] == '"' else " ",
                  text, flags=re.S)


@pytest.mark.parametrize("name", [HOSTILE_MAKE, HOSTILE_C, "a\\", "a\r\nb\u2028c\td */ /* */"])
def test_export_writes_the_graph_name_only_as_inert_comment_text(tmp_path, name):
    from bpcompile.tools.export import export_model
    out = tmp_path / "lib"
    export_model(tiny(name), out, "float64")
    makefile = (out / "Makefile").read_text()
    first, rest = makefile.split("\n", 1)
    assert first.startswith("# ") and not first.endswith("\\")
    assert "pwn" not in rest and "touch" not in makefile.replace(first, "")
    for fname in ("model.h", "model.c", "main.c"):
        code = _strip_c_comments((out / fname).read_text())
        assert "int g;" not in code, fname
        assert "*/" not in code, fname
    # the raw name survives only as an escaped C string
    assert 'BP_MODEL_NAME "' in (out / "model.h").read_text()


# --- 3: show --graph never writes outside the chosen folder ----------------------------------

@pytest.mark.parametrize("name", ["../escaped", "ABS", "..", "a/../../b"])
def test_show_graph_file_stays_in_the_folder(tmp_path, capsys, name):
    name = name.replace("ABS", str(tmp_path / "abs_escape" / "x"))
    spec = tmp_path / "spec.py"
    spec.write_text("import bpcompile as bp\n"
                    "def build():\n"
                    f"    g = bp.Graph({name!r})\n"
                    "    x = g.input('x', ('batch', 2))\n"
                    "    w = g.param('W', (2, 2))\n"
                    "    g.output('y', bp.tanh(x @ w))\n"
                    "    return g\n")
    folder = tmp_path / "out" / "graphs"
    folder.mkdir(parents=True)
    before = set((tmp_path).rglob("*"))
    assert main(["show", str(spec), "--graph", str(folder) + "/"]) == 0
    new = set(tmp_path.rglob("*")) - before
    assert new and all(folder in p.parents for p in new), new
    assert not (tmp_path / "abs_escape").exists()


# --- 4: expression bombs and huge numbers in YAML specs ---------------------------------------

YAML_FN = """
name: bomb
inputs:
  x: {shape: [batch, 2]}
functions:
  f: {expr: "EXPR", symbols: [z]}
layers:
  - {type: dense, units: UNITS}
  - f
output: out
"""


@pytest.mark.parametrize("expr", ["z + 9**9**9", "z * 2**2**2**2**2**2", "z + (1/3)**(10**9)",
                                  "z**100000", "(" * 500 + "z" + ")" * 500, "z" + " + z" * 3000,
                                  "-" * 5000 + "z"])
def test_spec_expression_bombs_are_spec_errors(tmp_path, expr):
    path = tmp_path / "bomb.yaml"
    path.write_text(YAML_FN.replace("EXPR", expr).replace("UNITS", "3"))
    start = time.perf_counter()
    with pytest.raises(SpecError):
        load_spec(path)
    assert time.perf_counter() - start < 5


def test_spec_expression_within_limits_still_works(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(YAML_FN.replace("EXPR", "z + 2**10 * z**3 / 3**20").replace("UNITS", "3"))
    spec = load_spec(path)
    assert spec.name == "bomb"


def test_spec_huge_units_is_a_spec_error(tmp_path, capsys):
    path = tmp_path / "units.yaml"
    path.write_text(YAML_FN.replace("EXPR", "z").replace("UNITS", str(10**20)))
    with pytest.raises(SpecError, match="units"):
        load_spec(path)
    assert main(["show", str(path), "--c"]) == 1
    assert "internal error" not in capsys.readouterr().err


COUNTS_YAML = """
name: counts
seed: @SEED@
inputs:
  ids: {shape: [batch, @LEN@], dtype: int32}
  y: {shape: [batch, @LEN@], dtype: int32}
input: ids
layers:
  - {type: embedding, vocab: @VOCAB@, dim: @DIM@, positions: @POSITIONS@}
  - {type: transformer_block, heads: @HEADS@, mlp_ratio: @RATIO@}
  - {type: dense, units: @UNITS@}
  - {type: lm_head, units: @HEAD_UNITS@}
loss: {type: softmax_cross_entropy, target: y}
"""
# every integer of the spec format: placeholder -> (a valid value, its key path, its allowed range)
COUNTS = {"SEED": (0, "seed", "0 to 9223372036854775807"),
          "LEN": (8, "inputs.ids.shape[1]", "1 to 16777216"),
          "VOCAB": (16, "layers[0].vocab", "1 to 16777216"),
          "DIM": (8, "layers[0].dim", "1 to 16777216"),
          "POSITIONS": (8, "layers[0].positions", "1 to 16777216"),
          "HEADS": (2, "layers[1].heads", "1 to 16777216"),
          "RATIO": (4, "layers[1].mlp_ratio", "1 to 16777216"),
          "UNITS": (8, "layers[2].units", "1 to 16777216"),
          "HEAD_UNITS": (16, "layers[3].units", "1 to 16777216")}


def _counts_spec(tmp_path, **values) -> Path:
    text = COUNTS_YAML
    for key, (good, _, _) in COUNTS.items():
        text = text.replace(f"@{key}@", str(values.get(key, good)))
    path = tmp_path / "counts.yaml"
    path.write_text(text)
    return path


def test_spec_counts_within_range_load(tmp_path):
    spec = load_spec(_counts_spec(tmp_path))
    shapes = {name: p.shape for name, p in spec.graph.params.items()}
    assert shapes["wte.weight"] == (16, 8) and shapes["wte_positions"] == (8, 8) and shapes["W1"] == (8, 8)
    assert shapes["transformer_block1.mlp.c_fc.weight"] == (32, 8) and shapes["lm_head.weight"] == (16, 8)


@pytest.mark.parametrize("bad", ["1e20", "1.0e+20", str(10**20), "-3", "true", "2.5", '"7"', "[4]", "null"])
@pytest.mark.parametrize("key", list(COUNTS))
def test_spec_bad_counts_are_spec_errors_naming_key_and_range(tmp_path, key, bad):
    with pytest.raises(SpecError) as e:
        load_spec(_counts_spec(tmp_path, **{key: bad}))
    _, where, allowed = COUNTS[key]
    message = str(e.value)
    assert f" {where}: expected " in message and message.endswith(f"; allowed: {allowed}")


@pytest.mark.parametrize("values, where, words", [
    ({"VOCAB": 1 << 20, "DIM": 1 << 20}, "layers[0].dim", "1048576 x 1048576"),
    ({"DIM": 1 << 16, "POSITIONS": 1 << 17}, "layers[0].positions", "65536 x 131072"),
    ({"DIM": 1 << 12, "HEADS": 1, "RATIO": 1 << 9}, "layers[1].mlp_ratio", "4096 x 4096 x 512"),
    ({"DIM": 1 << 12, "HEADS": 1, "UNITS": 1 << 21}, "layers[2].units", "4096 x 2097152"),
])
def test_spec_weights_beyond_the_element_limit_are_spec_errors(tmp_path, values, where, words):
    with pytest.raises(SpecError, match=re.escape(f"{where}: a weight of {words} = ")):
        load_spec(_counts_spec(tmp_path, **values))


def test_spec_input_beyond_the_element_limit_is_a_spec_error(tmp_path):
    path = _counts_spec(tmp_path)
    path.write_text(path.read_text().replace("shape: [batch, 8], dtype: int32}\n  y", "shape: [batch, 65536, 65536, "
                                             "2], dtype: int32}\n  y"))
    with pytest.raises(SpecError, match=re.escape("inputs.ids.shape: an input whose fixed dimensions are 65536 x "
                                                  "65536 x 2 = 8589934592 elements, more than the limit")):
        load_spec(path)
