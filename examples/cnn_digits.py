"""A small CNN on scikit-learn's bundled 8x8 handwritten digits.

conv 3x3 (1->16) + ReLU -> conv 3x3 (16->32) + ReLU -> max-pool 2x2 -> dense 512->64 + ReLU
-> dense 64->10, trained with Adam. Convolutions lower to im2col + one GEMM each (bias and
ReLU fused into the elementwise loop that follows); the whole forward + backward + Adam update
is one native call per step. The script prints the test accuracy (asserted >= 97%) and the
median time of one `train_step` at the chosen batch size.

Needs scikit-learn (the digits ship inside it: nothing is downloaded).

Run: python examples/cnn_digits.py [--epochs 15] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bpcompile as bp


def build_graph(channels: tuple[int, int] = (16, 32), hidden: int = 64) -> bp.Graph:
    c1, c2 = channels
    g = bp.Graph("cnn_digits")
    x = g.input("x", ("batch", 1, 8, 8))
    y = g.input("y", ("batch",), dtype="int32")
    net = bp.nn.Sequential(
        bp.nn.Conv2d(g, 1, c1, 3, padding=1, activation="relu"),
        bp.nn.Conv2d(g, c1, c2, 3, padding=1, activation="relu"),
        lambda t: bp.flatten(bp.max_pool2d(t, 2)),
        bp.nn.Dense(g, c2 * 4 * 4, hidden, activation="relu"),
        bp.nn.Dense(g, hidden, 10),
    )
    logits = net(x)
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def load_splits(seed: int) -> tuple[dict, dict]:
    """(train, test): 80% / 20% stratified; pixels scaled to [0, 1], shaped (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return {"x": x_train, "y": y_train}, {"x": x_test, "y": y_test}


def time_train_step(model: bp.CompiledModel, batch: dict, repeats: int = 30) -> float:
    """Median seconds of one train_step on `batch` (after a warm-up call); restores the model."""
    saved = {k: v.copy() for k, v in model.params.items()}
    state, step = model._state_flat.copy(), model.step
    model.train_step(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_step(**batch)
        times.append(time.perf_counter() - start)
    for k, v in saved.items():
        model.params[k][...] = v
    model._state_flat[...] = state
    model.step = step
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.97, help="asserted test accuracy")
    parser.add_argument("--timing-repeats", type=int, default=50, help="train_step calls timed (0: none)")
    args = parser.parse_args(argv)

    try:
        train, test = load_splits(args.seed)
    except ImportError as e:
        raise SystemExit(f"this example needs scikit-learn for the digits data ({e})") from None
    print(f"digits: {len(train['x'])} training and {len(test['x'])} test images, 1x8x8")
    start = time.perf_counter()
    model = bp.compile(build_graph(tuple(args.channels)), dtype="float32", optimizer=bp.optim.Adam(lr=args.lr),
                       seed=args.seed)
    print(f"compiled {model.name!r}: {model.param_count} parameters in {time.perf_counter() - start:.2f} s")

    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=False)
    every = max(1, args.epochs // 5)
    for e in range(every - 1, args.epochs, every):
        print(f"epoch {e + 1:3d}  train loss {history['loss'][e]:.4f}  ({history['seconds'][e]:.3f} s)")
    result = model.evaluate(test)
    print(f"test: loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
          f"({round(result['accuracy'] * len(test['x']))}/{len(test['x'])} correct)")

    step_time = float("nan")
    if args.timing_repeats:
        batch = {k: v[:args.batch_size] for k, v in train.items()}
        step_time = time_train_step(model, batch, args.timing_repeats)
        print(f"train_step at batch {args.batch_size}: {step_time * 1e3:.3f} ms median of {args.timing_repeats} "
              f"({args.batch_size / step_time:,.0f} images/s)")
    assert result["accuracy"] >= args.min_accuracy, f"test accuracy {result['accuracy']:.4f} < {args.min_accuracy}"
    print(f"OK: test accuracy >= {args.min_accuracy}")
    return {"test_accuracy": result["accuracy"], "test_loss": result["loss"], "step_seconds": step_time}


if __name__ == "__main__":
    main()
