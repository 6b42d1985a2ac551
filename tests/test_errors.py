"""Errors a user can act on: ShapeError when a node is made, InputError for bad call data (never
a crash, never a silently wrong result), CompileError carrying the compiler's message and the
path of the generated source."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

import bpcompile as bp
import bpcompile.build.cffi_build as bpbuild

# --- ShapeError at graph build time ------------------------------------------------------


def test_matmul_misalignment_names_both_shapes():
    g = bp.Graph("shape_mm")
    x = g.input("x", ("batch", 3))
    W = g.param("W", (4, 2))
    with pytest.raises(bp.ShapeError) as e:
        x @ W
    msg = str(e.value)
    assert "(batch, 3)" in msg and "(4, 2)" in msg
    with pytest.raises(bp.ShapeError) as e:
        bp.matmul(W, x)  # (4, 2) @ (batch, 3)
    assert "(4, 2)" in str(e.value) and "(batch, 3)" in str(e.value)


def test_broadcast_mismatch_names_both_shapes():
    g = bp.Graph("shape_bc")
    x = g.input("x", ("batch", 3))
    b = g.param("b", (4,))
    with pytest.raises(bp.ShapeError) as e:
        x + b
    msg = str(e.value)
    assert "(batch, 3)" in msg and "(4,)" in msg
    v = g.param("v", (5, 3))
    with pytest.raises(bp.ShapeError) as e:
        bp.tanh(x) * v  # named dim "batch" against a fixed 5
    assert "(batch, 3)" in str(e.value) and "(5, 3)" in str(e.value)


def test_loss_must_be_scalar():
    g = bp.Graph("shape_loss")
    x = g.input("x", ("batch", 3))
    W = g.param("W", (3, 5))
    with pytest.raises(bp.ShapeError) as e:
        g.loss(x @ W)
    assert "(batch, 5)" in str(e.value)
    assert not g.losses


def test_mse_shape_mismatch():
    g = bp.Graph("shape_mse")
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    with pytest.raises(bp.ShapeError) as e:
        bp.mse(x, t)
    assert "(batch, 3)" in str(e.value) and "(batch, 2)" in str(e.value)


def test_softmax_cross_entropy_label_errors():
    g = bp.Graph("shape_ce")
    x = g.input("x", ("batch", 3))
    yf = g.input("yf", ("batch",))  # float labels
    yw = g.input("yw", ("batch", 2), dtype="int32")  # wrong label shape
    logits = x @ g.param("W", (3, 4))
    with pytest.raises(bp.ShapeError) as e:
        bp.softmax_cross_entropy(logits, yf)
    assert "int32" in str(e.value) and "(batch,)" in str(e.value)
    with pytest.raises(bp.ShapeError) as e:
        bp.softmax_cross_entropy(logits, yw)
    msg = str(e.value)
    assert "(batch, 4)" in msg and "(batch, 2)" in msg and "(batch,)" in msg


# --- InputError at call time ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(build_dir):
    """A float32 softmax classifier: x (batch, 4) -> 3 classes, labels y (batch,) int32."""
    g = bp.Graph("err_clf")
    x = g.input("x", ("batch", 4))
    y = g.input("y", ("batch",), dtype="int32")
    W = g.param("W", (4, 3), init="glorot_uniform")
    b = g.param("b", (3,), init="normal")
    logits = x @ W + b
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    model = bp.compile(g, dtype="float32", optimizer=bp.optim.SGD(lr=0.1, momentum=0.9), seed=3)
    return g, model


def _data(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.integers(0, 3, size=n).astype(np.int32)


def _expected_logits(model, X):
    return X.astype(np.float64) @ model.params["W"].astype(np.float64) + model.params["b"].astype(np.float64)


def test_unknown_input_is_named(clf):
    _, model = clf
    X, Y = _data()
    with pytest.raises(bp.InputError) as e:
        model.loss(x=X, y=Y, z=X)
    assert "'z'" in str(e.value)
    with pytest.raises(bp.InputError, match="'z'"):
        model.forward(x=X, z=X)


def test_inputs_are_validated_on_every_call(build_dir):
    """A call that repeats an earlier call's input layout must still reject unknown names and
    malformed extra inputs (inputs of the model that this entry point does not read)."""
    g = bp.Graph("err_extra")
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    z = g.input("z", ("batch", 3))  # read by the forward output only
    W = g.param("W", (3, 2))
    g.output("o", z @ W)
    g.loss(bp.mse(x @ W, t))
    model = bp.compile(g, dtype="float64")
    X, T = np.ones((4, 3)), np.ones((4, 2))
    bad_calls = [dict(x=X, t=T, q=X), dict(x=X, t=T, z=np.ones((7, 5))), dict(x=X, t=T, z="abc")]
    for bad in bad_calls:  # on a model that has not been called yet
        with pytest.raises(bp.InputError):
            model.loss(**bad)
    model.loss(x=X, t=T, z=X)  # a valid call with three inputs
    for bad in bad_calls:  # the same number of inputs as the valid call
        with pytest.raises(bp.InputError):
            model.loss(**bad)
    model.loss_and_grad(x=X, t=T, z=X)
    with pytest.raises(bp.InputError, match="'q'"):
        model.loss_and_grad(x=X, t=T, q=X)
    model.train_step(x=X, t=T, z=X)
    with pytest.raises(bp.InputError, match="'q'"):
        model.train_step(x=X, t=T, q=X)
    assert model.step == 1


def test_missing_input_is_named(clf):
    _, model = clf
    X, Y = _data()
    with pytest.raises(bp.InputError) as e:
        model.loss(x=X)
    assert "'y'" in str(e.value)
    with pytest.raises(bp.InputError, match="'x'"):
        model.train_step(y=Y)
    assert model.step == 0


def test_wrong_fixed_dim_names_input_and_shapes(clf):
    _, model = clf
    X, Y = _data()
    with pytest.raises(bp.InputError) as e:
        model.forward(x=X[:, :3])
    msg = str(e.value)
    assert "'x'" in msg and "(5, 3)" in msg and "4" in msg and "batch" in msg
    with pytest.raises(bp.InputError) as e:
        model.forward(x=X[None])  # one dimension too many
    assert "'x'" in str(e.value) and "(1, 5, 4)" in str(e.value)


def test_inconsistent_named_dim(clf):
    _, model = clf
    X, _ = _data(5)
    _, Y4 = _data(4)
    with pytest.raises(bp.InputError) as e:
        model.loss(x=X, y=Y4)
    msg = str(e.value)
    assert "batch" in msg and "4" in msg and "5" in msg


@pytest.mark.parametrize("bad", [
    pytest.param([["a", "b", "c", "d"]] * 5, id="strings"),
    pytest.param(np.array([object()] * 20, dtype=object).reshape(5, 4), id="objects"),
    pytest.param([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], id="ragged"),
    pytest.param(np.ones((5, 4), dtype=np.complex128), id="complex"),
    pytest.param(None, id="none"),
])
def test_non_numeric_data_is_an_input_error(clf, bad):
    _, model = clf
    _, Y = _data()
    with pytest.raises(bp.InputError, match="'x'"):
        model.loss(x=bad, y=Y)
    with pytest.raises(bp.InputError, match="'x'"):
        model.forward(x=bad)


def test_float_labels_rejected(clf):
    _, model = clf
    X, Y = _data()
    with pytest.raises(bp.InputError) as e:
        model.loss(x=X, y=Y.astype(np.float64))
    assert "'y'" in str(e.value) and "int" in str(e.value)


def test_labels_beyond_int32_and_scalars_rejected(clf):
    _, model = clf
    X, Y = _data()
    huge = Y.astype(np.int64)
    huge[2] = 2**40  # would wrap around to a valid-looking class index in int32
    with pytest.raises(bp.InputError, match="'y'"):
        model.loss(x=X, y=huge)
    with pytest.raises(bp.InputError, match="'x'"):
        model.forward(x=3.0)
    with pytest.raises(bp.InputError, match="'y'"):
        model.loss(x=X, y=1)


def test_zero_size_batch_rejected(clf):
    _, model = clf
    X, Y = _data()
    with pytest.raises(bp.InputError, match="batch"):
        model.loss(x=X[:0], y=Y[:0])
    with pytest.raises(bp.InputError, match="batch"):
        model.forward(x=np.zeros((0, 4)))


@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 3], [0, 1, -1, 2, 0], [7, 8, 9, 10, 11]])
def test_labels_out_of_range_leave_params_untouched(clf, labels):
    g, _ = clf
    X, Y = _data()
    bad = np.asarray(labels, dtype=np.int32)
    opt = bp.optim.SGD(lr=0.1, momentum=0.9)
    model, twin = (bp.compile(g, dtype="float32", optimizer=opt, seed=3) for _ in range(2))
    model.train_step(x=X, y=Y)  # so the momentum buffer is not all zeros
    twin.train_step(x=X, y=Y)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(bp.InputError) as e:
        model.train_step(x=X, y=bad)
    assert "'y'" in str(e.value) and "[0, 3)" in str(e.value)
    with pytest.raises(bp.InputError):
        model.loss(x=X, y=bad)
    with pytest.raises(bp.InputError):
        model.loss_and_grad(x=X, y=bad)
    assert model.step == 1
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
    # optimizer state and step count untouched too: the next valid step equals the twin's
    assert model.train_step(x=X, y=Y) == twin.train_step(x=X, y=Y)
    for k in before:
        np.testing.assert_array_equal(model.params[k], twin.params[k], err_msg=k)


def test_float64_accepted_by_float32_model(clf):
    _, model = clf
    X, Y = _data()
    out = model.forward(x=X)["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _expected_logits(model, X.astype(np.float32)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, model.forward(x=X.astype(np.float32))["logits"])
    # int64 labels are accepted for an int32 input, python lists too
    assert model.loss(x=X, y=Y.astype(np.int64)) == model.loss(x=X.tolist(), y=Y.tolist())


def test_non_contiguous_and_read_only_inputs(clf):
    _, model = clf
    X, Y = _data(6)
    base = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    strided = base[::2, ::2]  # (6, 4), not contiguous
    assert not strided.flags.c_contiguous
    fortran = np.asfortranarray(X.astype(np.float32))
    transposed = np.ascontiguousarray(X.astype(np.float32).T).T
    ro = X.astype(np.float32)
    ro.flags.writeable = False
    labels = np.repeat(Y, 2)[::2]  # a strided int array
    assert not labels.flags.c_contiguous
    for arr in (strided, fortran, transposed, ro):
        expected = _expected_logits(model, np.array(arr, dtype=np.float64))
        np.testing.assert_allclose(model.forward(x=arr)["logits"], expected, rtol=1e-5, atol=1e-5)
        assert model.loss(x=arr, y=labels) == model.loss(x=np.ascontiguousarray(arr), y=np.ascontiguousarray(labels))
    assert not ro.flags.writeable


# --- CompileError --------------------------------------------------------------------------


@pytest.fixture
def clean_compiler_cache():
    bpbuild.compiler.cache_clear()
    yield
    bpbuild.compiler.cache_clear()


def _small_graph(name):
    g = bp.Graph(name)
    x = g.input("x", ("batch", 3))
    W = g.param("W", (3, 2))
    g.output("o", bp.tanh(x @ W))
    return g


def _failing_cc(tmp_path: Path) -> Path:
    """A 'compiler' that reports a version but fails every compilation with a known message."""
    cc = tmp_path / "failing-cc"
    cc.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "failing-cc 1.0"; exit 0; fi\n'
                  'echo "failing-cc: error: simulated failure 1234" >&2\nexit 1\n')
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    return cc


BAD_FLAG = "-fbpcompile-no-such-flag"


def _break_compiler(how: str, tmp_path: Path, monkeypatch) -> str:
    """Make the next build fail; returns a string the compiler's message must contain."""
    if how == "cc":
        monkeypatch.setenv("CC", str(_failing_cc(tmp_path)))
        return "simulated failure 1234"
    flags = bpbuild.model_flags
    monkeypatch.setattr(bpbuild, "model_flags", lambda: [*flags(), BAD_FLAG])
    return BAD_FLAG


@pytest.mark.parametrize("how", ["cc", "flag"])
def test_compile_error_carries_compiler_message_and_source(build_dir, tmp_path, monkeypatch, clean_compiler_cache,
                                                           how):
    name = f"broken_{how}"
    needle = _break_compiler(how, tmp_path, monkeypatch)
    with pytest.raises(bp.CompileError) as e:
        bp.compile(_small_graph(name), dtype="float64")
    err = e.value
    assert needle in str(err) and needle in err.compiler_output
    assert repr(name) in str(err)
    assert err.source_path and err.source_path in str(err)
    assert Path(err.source_path).name == "model.c"
    # nothing is left where the cache would take it for a finished build
    assert not any((p / "meta.json").is_file() for p in build_dir.glob(f"{name}-*"))


@pytest.mark.parametrize("how", ["cc", "flag"])
def test_compile_error_source_path_exists(build_dir, tmp_path, monkeypatch, clean_compiler_cache, how):
    _break_compiler(how, tmp_path, monkeypatch)
    with pytest.raises(bp.CompileError) as e:
        bp.compile(_small_graph(f"broken_src_{how}"), dtype="float64")
    source = Path(e.value.source_path)
    assert source.is_file(), f"the reported source {source} does not exist"
    assert "bp_forward" in source.read_text()


def test_compile_after_failure_succeeds(build_dir, monkeypatch, clean_compiler_cache):
    flags = bpbuild.model_flags
    monkeypatch.setattr(bpbuild, "model_flags", lambda: [*flags(), BAD_FLAG])
    with pytest.raises(bp.CompileError):
        bp.compile(_small_graph("fail_then_ok"), dtype="float64")
    monkeypatch.setattr(bpbuild, "model_flags", flags)
    model = bp.compile(_small_graph("fail_then_ok"), dtype="float64")
    X = np.ones((2, 3))
    np.testing.assert_allclose(model.forward(x=X)["o"], np.tanh(X @ model.params["W"]), rtol=1e-12)


def test_missing_compiler_is_a_compile_error(build_dir, monkeypatch, clean_compiler_cache):
    monkeypatch.setenv("CC", "/nonexistent/bpcompile-cc")
    with pytest.raises(bp.CompileError, match="bpcompile-cc"):
        bp.compile(_small_graph("no_cc"), dtype="float64")


# --- no raw Jinja2, cffi or OS exception escapes bp.compile: a CompileError naming the model and the stage

def _broken_template(monkeypatch, name: str, text: str) -> None:
    """Templates as shipped, but `name` replaced by `text`."""
    import jinja2

    from bpcompile.codegen import module as codegen
    real = codegen.environment

    def environment() -> jinja2.Environment:
        env = real()
        env.loader = jinja2.ChoiceLoader([jinja2.DictLoader({name: text}), env.loader])
        return env
    monkeypatch.setattr(codegen, "environment", environment)


@pytest.mark.parametrize("text, error", [("{{ no_such_variable }}", "UndefinedError"),
                                         ("{% if %}", "TemplateSyntaxError"),
                                         ("{{ 1 // 0 }}", "ZeroDivisionError")])
@pytest.mark.parametrize("template", ["entry.c.j2", "module.c.j2"])
def test_a_failing_template_is_a_compile_error_naming_model_and_template(build_dir, monkeypatch, template, text,
                                                                         error):
    _broken_template(monkeypatch, template, text)
    with pytest.raises(bp.CompileError) as e:
        bp.compile(_small_graph("bad_template"), dtype="float64")
    message = str(e.value)
    assert "'bad_template'" in message and template in message and error in message
    assert type(e.value.__cause__).__name__ == error


def _failing_ffi(monkeypatch, method: str, error: type[Exception]) -> None:
    import cffi

    def fail(self, *args, **kwargs):
        raise error(f"simulated {method} failure")
    monkeypatch.setattr(cffi.FFI, method, fail)


@pytest.mark.parametrize("method, error", [("cdef", "CDefError"), ("emit_c_code", "VerificationError"),
                                           ("set_source", "FFIError")])
def test_a_cffi_failure_is_a_compile_error_naming_model_and_stage(build_dir, monkeypatch, method, error):
    import cffi
    _failing_ffi(monkeypatch, method, getattr(cffi, error))
    with pytest.raises(bp.CompileError) as e:
        bp.compile(_small_graph(f"bad_cffi_{method}"), dtype="float64")
    message = str(e.value)
    assert f"'bad_cffi_{method}'" in message and "cffi" in message and f"simulated {method} failure" in message
    assert isinstance(e.value.__cause__, getattr(cffi, error))


def test_a_declaration_cffi_cannot_parse_is_a_compile_error(build_dir, monkeypatch):
    from bpcompile.codegen import module as codegen
    monkeypatch.setattr(codegen, "entry_prototype", lambda name, dtype: f"int bp_{name}(int64_t *dims,;")
    with pytest.raises(bp.CompileError, match="cffi .*'bad_cdef'") as e:
        bp.compile(_small_graph("bad_cdef"), dtype="float64")
    import cffi
    assert isinstance(e.value.__cause__, cffi.CDefError)


def test_a_compiler_that_cannot_be_started_is_a_compile_error(build_dir, monkeypatch):
    """The compiler answered --version, then running it for the build failed (E2BIG, a vanished binary)."""
    import subprocess

    def popen(*args, **kwargs):
        raise OSError(7, "Argument list too long")
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(bp.CompileError, match="'no_popen'.*Argument list too long") as e:
        bp.compile(_small_graph("no_popen"), dtype="float64")
    assert isinstance(e.value.__cause__, OSError)
