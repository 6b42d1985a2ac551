"""Quickstart: compile a two-layer MLP and train it on a synthetic three-class spiral.

Run: python examples/quickstart.py   (add --epochs N to train longer)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bpcompile as bp


def spirals(n_per_class: int, classes: int = 3, noise: float = 0.5, seed: int = 0):
    """Points on interleaved spiral arms, one arm per class."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = 3 * np.pi * r + 2 * np.pi * c / classes + rng.normal(0, noise, n_per_class)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(x))
    return x[order].astype(np.float32), y[order].astype(np.int32)


def build_graph(hidden: int = 64, classes: int = 3) -> bp.Graph:
    g = bp.Graph("spiral_mlp")
    x = g.input("x", ("batch", 2))
    y = g.input("y", ("batch",), dtype="int32")
    w1 = g.param("W1", (2, hidden), init="he_normal")
    b1 = g.param("b1", (hidden,))
    w2 = g.param("W2", (hidden, hidden), init="he_normal")
    b2 = g.param("b2", (hidden,))
    w3 = g.param("W3", (hidden, classes), init="glorot_uniform")
    b3 = g.param("b3", (classes,))
    h = bp.relu(x @ w1 + b1)
    h = bp.relu(h @ w2 + b2)
    logits = h @ w3 + b3
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    x, y = spirals(1000)
    split = 2400
    train, test = {"x": x[:split], "y": y[:split]}, {"x": x[split:], "y": y[split:]}

    start = time.perf_counter()
    model = bp.compile(build_graph(), dtype="float32", optimizer=bp.optim.Adam(lr=1e-2), seed=0)
    print(f"compiled {model.name!r}: {model.param_count} parameters in {time.perf_counter() - start:.2f} s "
          f"-> {model.build_path}")
    print(f"before training: {model.evaluate(test)}")
    history = model.fit(train, epochs=args.epochs, batch_size=64, validation=test, verbose=False)
    for epoch in range(0, args.epochs, max(1, args.epochs // 10)):
        print(f"epoch {epoch + 1:3d}  train loss {history['loss'][epoch]:.4f}  "
              f"test loss {history['val_loss'][epoch]:.4f}  test accuracy {history['val_accuracy'][epoch]:.3f}")
    final = model.evaluate(test)
    step_us = 1e6 * sum(history["seconds"]) / (args.epochs * -(-split // 64))
    print(f"final: test loss {final['loss']:.4f}, test accuracy {final['accuracy']:.3f}, "
          f"{step_us:.1f} us per training step (batch 64)")


if __name__ == "__main__":
    main()
