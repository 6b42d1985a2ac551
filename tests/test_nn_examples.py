"""The model-family examples (CNN, LSTM, GAN, batch norm + dropout), run on small settings with
their own assertions active; each example's `main(argv)` returns its numbers, checked here too.
The digits examples are skipped when scikit-learn is missing."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["cnn_digits", "lstm_sequence", "gan_mixture", "batchnorm_dropout"]


def load_example(name: str) -> ModuleType:
    module_name = f"bpcompile_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_is_a_script_with_main(name):
    tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
    assert ast.get_docstring(tree), f"{name}.py has no module docstring"
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and [a.arg for a in mains[0].args.args] == ["argv"], f"{name}.py needs main(argv=None)"
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test)


def test_cnn_digits_reaches_97_percent(build_dir, capsys):
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    result = load_example("cnn_digits").main(["--timing-repeats", "3"])
    assert result["test_accuracy"] >= 0.97
    assert result["step_seconds"] > 0
    assert "train_step at batch 64" in capsys.readouterr().out


def test_lstm_learns_sine_continuation(build_dir):
    result = load_example("lstm_sequence").main(["--steps", "400", "--max-mse", "0.01"])
    assert result["test_mse"] < 0.01 < result["baseline_mse"] / 10
    assert result["test_mse_long"] < 0.05  # the same model on sequences twice as long


def test_gan_generator_covers_the_modes(build_dir, tmp_path):
    out = tmp_path / "gan.png"
    result = load_example("gan_mixture").main(["--steps", "1200", "--min-modes", "6", "--min-near", "0.4",
                                               "--out", str(out)])
    assert result["modes"] >= 6
    if importlib.util.find_spec("matplotlib"):
        assert out.is_file() and out.stat().st_size > 1000


def test_batchnorm_dropout_eval_is_deterministic(build_dir):
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    result = load_example("batchnorm_dropout").main(["--epochs", "15", "--min-accuracy", "0.95"])
    assert result["test_accuracy"] >= 0.95
    assert result["per_sample_diff"] < 1e-5
