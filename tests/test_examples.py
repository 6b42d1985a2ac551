"""The runnable examples in examples/, run on small settings with their own assertions active.

Each example's `main(argv)` is imported by path and called; it raises AssertionError when its
claim fails (gradients equal to the hand-derived deltas, MSE below 1e-3, agreement with the
exact solutions, >= 97% digits accuracy, Mish's derivative), and returns its numbers, which
are checked here too. The digits example and the scikit-learn comparison are skipped when
scikit-learn is missing. Models are built in the session's temporary build folder.
"""

from __future__ import annotations

import importlib.util

import pytest
from testutil import check_script_shape, load_example

SCRIPTS = ["two_layer_sigmoid", "relu_regression", "linear_logistic", "digits_mlp", "custom_mish"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_is_a_script_with_main(name):
    """A module docstring, main(argv=None) with argparse, and the __main__ guard."""
    check_script_shape(name)


def test_two_layer_sigmoid_matches_hand_derived_deltas(build_dir, capsys):
    result = load_example("two_layer_sigmoid").main(["--samples", "6", "--steps", "3"])
    assert result["max_grad_error"] < 1e-10
    assert result["step_error"] < 1e-10
    assert result["final_loss"] < result["loss"]
    assert "grad W1  (compiled | hand-derived)" in capsys.readouterr().out


def test_relu_regression_reaches_mse_below_1e_3(build_dir):
    result = load_example("relu_regression").main([])  # the full run: 1000 points, well under a second
    assert result["train_mse"] < 1e-3
    assert result["test_mse"] < 1e-3


def test_linear_and_logistic_regression_match_exact_solutions(build_dir, capsys):
    result = load_example("linear_logistic").main(["--steps", "800", "--no-sklearn"])
    assert result["linear_error"] < 1e-4
    assert result["logistic_newton_error"] < 1e-4
    assert "scikit-learn comparison skipped" in capsys.readouterr().out


def test_logistic_regression_matches_scikit_learn(build_dir):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")
    result = load_example("linear_logistic").main(["--steps", "800"])
    assert result["logistic_sklearn_error"] < 1e-4


def test_digits_mlp_reaches_97_percent(build_dir, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")
    out = tmp_path / "curves.png"
    result = load_example("digits_mlp").main(["--out", str(out)])
    assert result["test_accuracy"] >= 0.97
    assert result["seconds_per_epoch"] > 0
    printed = capsys.readouterr().out
    assert "time per epoch" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in printed and not out.exists()


def test_custom_mish_derivative_and_training(build_dir, capsys):
    result = load_example("custom_mish").main(["--epochs", "10", "--samples", "500"])
    assert result["fd_error"] < 1e-8
    assert result["kernel_error"] < 1e-12
    assert result["mse_after"] < result["mse_before"] / 10
    assert "mish'(z) = " in capsys.readouterr().out


def test_gpt_adder_learns_to_add(build_dir, capsys):
    """The tiny GPT on a shortened schedule: held-out sums answered exactly by greedy decoding."""
    accuracy = load_example("gpt_adder").main(["--steps", "300", "--min-accuracy", "0"])
    assert accuracy >= 0.97
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and "+" in printed.splitlines()[-1]
