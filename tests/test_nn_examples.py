"""The model-family examples (CNN, LSTM, GAN, batch norm + dropout), run on small settings with
their own assertions active; each example's `main(argv)` returns its numbers, checked here too.
The digits examples are skipped when scikit-learn is missing."""

from __future__ import annotations

import importlib.util

import pytest
from testutil import check_script_shape, load_example

SCRIPTS = ["cnn_digits", "lstm_sequence", "gan_mixture", "batchnorm_dropout"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_is_a_script_with_main(name):
    check_script_shape(name)


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
    # the example's defaults (3000 steps, lr 2e-3): seeds 0-5 reach 7 or 8 of the 8 modes with 85-95% of
    # the samples near one, under OpenBLAS and MKL alike
    result = load_example("gan_mixture").main(["--steps", "3000", "--min-modes", "7", "--min-near", "0.6",
                                               "--out", str(out)])
    assert result["modes"] >= 7
    if importlib.util.find_spec("matplotlib"):
        assert out.is_file() and out.stat().st_size > 1000


def test_batchnorm_dropout_eval_is_deterministic(build_dir):
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    result = load_example("batchnorm_dropout").main(["--epochs", "15", "--min-accuracy", "0.95"])
    assert result["test_accuracy"] >= 0.95
    assert result["per_sample_diff"] < 1e-5
