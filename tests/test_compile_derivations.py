"""Partials stored in the build folder (symbolic.stored): a later compile reads them back instead of
deriving them again, gets the same C, and an entry that is damaged, edited or names a class that is
not SymPy's is derived afresh. The built-in functions' partials ship with bpcompile: current, used by
a first compile (which then derives none of them), and a wrong one is not used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sympy as sp

import bpcompile as bp
from bpcompile.symbolic import functions, stored


def graph(name: str) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 4))
    h = x @ g.param("W", (4, 3), init="normal")
    out = bp.gelu(h) + bp.sigmoid(h)
    g.output("o", out)
    g.loss(bp.mean(out * bp.softplus(h)))
    return g


@pytest.fixture(autouse=True)
def without_shipped(monkeypatch, request):
    """The folder's store alone (the built-ins' shipped partials would answer first), but in the tests
    of the shipped partials."""
    if "shipped" not in request.node.name:
        monkeypatch.setattr(stored, "_shipped", dict)
    functions._derive_cached.cache_clear()
    yield
    functions._derive_cached.cache_clear()


def entries(root: Path) -> list[Path]:
    return sorted((root / stored.FOLDER).glob("*.json"))


def test_a_compile_reads_back_the_partials_an_earlier_one_stored(tmp_path, monkeypatch):
    functions._derive_cached.cache_clear()
    first = bp.compile(graph("stored_a"), dtype="float64", build_dir=tmp_path)
    assert len(entries(tmp_path)) >= 3  # gelu, sigmoid, softplus at least
    functions._derive_cached.cache_clear()  # as a new process would start
    def derived_again(expr):
        raise AssertionError(f"derived again: {expr}")
    monkeypatch.setattr(functions, "_simplified", derived_again)
    with stored.stored_in(tmp_path):
        again = bp.lower(graph("stored_a"), "float64", bp.optim.SGD(lr=0.01))
    assert again.sources.model_c == first.c_source


def test_a_damaged_or_edited_entry_is_derived_afresh(tmp_path):
    with stored.stored_in(tmp_path):
        want = functions.builtin("tanh").partial(0)
    [entry] = [p for p in entries(tmp_path) if "tanh" in p.read_text()]
    data = json.loads(entry.read_text())
    data["expr"] = stored.encode(sp.Integer(1) - functions.OUT)  # 1 - y: a wrong derivative of tanh
    entry.write_text(json.dumps(data))
    functions._derive_cached.cache_clear()
    with stored.stored_in(tmp_path):
        assert functions.builtin("tanh").partial(0) == want
    assert json.loads(entry.read_text())["expr"] == stored.encode(want.expr)  # rewritten
    entry.write_text("{not json")
    functions._derive_cached.cache_clear()
    with stored.stored_in(tmp_path):
        assert functions.builtin("tanh").partial(0) == want


def test_an_entry_naming_anything_but_sympy_classes_is_not_read(tmp_path):
    symbols = {s.name: s for s in functions.ARGS}
    assert stored.decode(["Add", ["Symbol", "a0"], ["Integer", "2"]], symbols) == functions.ARGS[0] + 2
    for tree in (["system", ["Integer", "1"]], ["__class__", ["Integer", "1"]], ["S", "__dict__"],
                 ["Symbol", "not_an_argument"]):
        key = stored.entry_key("test", repr(tree))
        (tmp_path / stored.FOLDER).mkdir(exist_ok=True)
        (tmp_path / stored.FOLDER / f"{key}.json").write_text(json.dumps({"expr": tree}))
        with stored.stored_in(tmp_path):
            assert stored.load(key, symbols) is None


def test_without_a_folder_nothing_is_stored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    functions._derive_cached.cache_clear()
    functions.builtin("silu").partial(0)
    assert not (tmp_path / stored.FOLDER).exists() and not (tmp_path / "build").exists()


def test_the_shipped_partials_are_current():
    assert stored.SHIPPED.read_text(encoding="utf-8") == functions.shipped_text(), (
        "builtin_partials.json is out of date: run python -m bpcompile.symbolic.write_shipped")


def test_a_first_compile_derives_no_shipped_partial(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(stored, "_shipped", dict)
        fresh = bp.lower(graph("shipped_a"), "float64", bp.optim.SGD(lr=0.01))
    functions._derive_cached.cache_clear()
    def derived(expr):
        raise AssertionError(f"derived: {expr}")
    monkeypatch.setattr(functions, "_simplified", derived)
    with stored.stored_in(tmp_path):
        shipped = bp.lower(graph("shipped_a"), "float64", bp.optim.SGD(lr=0.01))
    assert shipped.sources.model_c == fresh.sources.model_c
    assert not entries(tmp_path)  # nothing derived, so nothing stored


def test_a_wrong_shipped_partial_is_not_used(monkeypatch):
    want = functions.builtin("tanh").partial(0)
    key = stored.shipped_key(functions.builtin("tanh")._key[1], "1", "0")
    wrong = dict(stored._shipped()[key], expr=stored.encode(sp.Integer(1) - functions.OUT))  # 1 - y
    monkeypatch.setattr(stored, "_shipped", lambda: {key: wrong})
    functions._derive_cached.cache_clear()
    assert functions.builtin("tanh").partial(0) == want
