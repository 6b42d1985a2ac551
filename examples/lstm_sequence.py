"""An LSTM that learns to continue noisy sine waves.

Each sample is a sine wave of random frequency (0.1 to 0.3 rad/step), phase and amplitude
(0.5 to 1.0), observed with Gaussian noise (std 0.05) for `--length` steps; the target is the
next clean value. A one-layer LSTM (PyTorch's gate layout) reads the sequence and a dense
layer maps its last hidden state to the prediction, trained with Adam on mean squared error.
The time dimension is a runtime size: the same compiled model is then evaluated on
sequences twice as long as it was trained on.

The script asserts a test MSE below `--max-mse` (default 0.005, vs about 0.3 for always
predicting 0), and with `--bench` times one train_step of an LSTM with input 32, hidden 128,
length 32, batch 32 (the median of repeated calls).

Run: python examples/lstm_sequence.py [--steps 1500] [--bench]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bpcompile as bp


def build_graph(hidden: int = 32, n_in: int = 1, name: str = "lstm_sine") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", "time", n_in))
    t = g.input("t", ("batch", 1))
    _, (h, _) = bp.nn.LSTM(g, n_in, hidden)(x)
    pred = bp.nn.Dense(g, hidden, 1)(h)
    g.output("pred", pred)
    g.loss(bp.mse(pred, t))
    return g


def sine_batch(rng: np.random.Generator, batch: int, length: int, noise: float = 0.05) -> dict[str, np.ndarray]:
    freq = rng.uniform(0.1, 0.3, (batch, 1))
    phase = rng.uniform(0, 2 * np.pi, (batch, 1))
    amp = rng.uniform(0.5, 1.0, (batch, 1))
    steps = np.arange(length + 1)[None, :]
    clean = amp * np.sin(freq * steps + phase)
    x = clean[:, :length] + rng.normal(0, noise, (batch, length))
    return {"x": x[:, :, None], "t": clean[:, length:]}


def bench_lstm(n_in: int = 32, hidden: int = 128, length: int = 32, batch: int = 32, repeats: int = 30) -> float:
    """Median seconds of one train_step (forward, BPTT, Adam) of a one-layer LSTM."""
    g = bp.Graph("lstm_bench")
    x = g.input("x", ("batch", "time", n_in))
    t = g.input("t", ("batch", hidden))
    _, (h, _) = bp.nn.LSTM(g, n_in, hidden)(x)
    g.loss(bp.mse(h, t))
    model = bp.compile(g, dtype="float32", optimizer=bp.optim.Adam(lr=1e-3))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(batch, length, n_in)).astype(np.float32),
            "t": rng.normal(size=(batch, hidden)).astype(np.float32)}
    model.train_step(**data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_step(**data)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-mse", type=float, default=0.005, help="asserted test MSE")
    parser.add_argument("--bench", action="store_true", help="time the input-32/hidden-128/length-32/batch-32 LSTM")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    model = bp.compile(build_graph(args.hidden), dtype="float32",
                       optimizer=bp.optim.Adam(lr=bp.schedules.Cosine(args.lr, args.steps, args.lr / 20),
                                               clip_norm=1.0),
                       seed=args.seed)
    test = sine_batch(np.random.default_rng(args.seed + 1), 1000, args.length)
    baseline = float(np.mean(test["t"] ** 2))
    print(f"LSTM (hidden {args.hidden}) on noisy sines of length {args.length}: {model.param_count} parameters; "
          f"predicting 0 scores MSE {baseline:.4f}")
    start = time.perf_counter()
    every = max(1, args.steps // 5)
    for step in range(1, args.steps + 1):
        loss = model.train_step(**sine_batch(rng, args.batch_size, args.length))
        if step % every == 0:
            print(f"step {step:5d}  batch MSE {loss:.5f}  test MSE {model.loss(**test):.5f}")
    seconds = time.perf_counter() - start
    mse = model.loss(**test)
    longer = sine_batch(np.random.default_rng(args.seed + 2), 1000, 2 * args.length)
    mse_long = model.loss(**longer)
    print(f"trained {args.steps} steps in {seconds:.2f} s ({seconds / max(args.steps, 1) * 1e3:.3f} ms per step "
          "incl. data generation)")
    print(f"test MSE {mse:.5f} (length {args.length}); {mse_long:.5f} on length {2 * args.length} "
          "(same compiled model, runtime time dimension)")
    result = {"test_mse": mse, "test_mse_long": mse_long, "baseline_mse": baseline}
    if args.bench:
        step = bench_lstm()
        print(f"benchmark: LSTM input 32, hidden 128, length 32, batch 32: train_step {step * 1e3:.3f} ms "
              "(median)")
        result["bench_step_seconds"] = step
    assert mse < args.max_mse, f"test MSE {mse:.5f} is not below {args.max_mse}"
    print(f"OK: test MSE < {args.max_mse}")
    return result


if __name__ == "__main__":
    main()
