"""A 2-4-1 ReLU network learns y = x1 - x2 from 1000 random points, with plain SGD and MSE.

The target is exactly representable (x1 - x2 = relu(x1 - x2) - relu(x2 - x1)), so a small
ReLU network trained by stochastic gradient descent should drive the mean squared error
towards zero. The script prints the training and held-out MSE as it learns, a few predictions,
and asserts that the final MSE is below 1e-3.

Run: python examples/relu_regression.py [--samples 1000] [--epochs 100] [--lr 0.05]
"""

from __future__ import annotations

import argparse

import numpy as np

import bpcompile as bp


def build_graph(hidden: int = 4) -> bp.Graph:
    g = bp.Graph("relu_regression")
    x = g.input("x", ("batch", 2))
    y = g.input("y", ("batch", 1))
    w1 = g.param("W1", (2, hidden), init="he_normal")
    b1 = g.param("b1", (hidden,))
    w2 = g.param("W2", (hidden, 1), init="glorot_uniform")
    b2 = g.param("b2", (1,))
    prediction = bp.relu(x @ w1 + b1) @ w2 + b2
    g.output("y", prediction)
    g.loss(bp.mse(prediction, y))
    return g


def dataset(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, size=(n, 2))
    return {"x": x, "y": (x[:, 0] - x[:, 1])[:, None]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000, help="training points")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1e-3, help="asserted bound on the final MSE")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    train, test = dataset(args.samples, rng), dataset(1000, rng)
    model = bp.compile(build_graph(args.hidden), dtype="float32", optimizer=bp.optim.SGD(lr=args.lr), seed=args.seed)
    print(f"compiled {model.name!r}: 2-{args.hidden}-1 ReLU network, {model.param_count} parameters")
    print(f"before training: MSE {model.loss(**train):.4f}")

    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=False)
    every = max(1, args.epochs // 10)
    for epoch in range(every - 1, args.epochs, every):
        print(f"epoch {epoch + 1:4d}  mean training MSE over the epoch {history['loss'][epoch]:.2e}")

    train_mse, test_mse = model.loss(**train), model.loss(**test)
    seconds = sum(history["seconds"])
    print(f"final: training MSE {train_mse:.2e}, held-out MSE {test_mse:.2e} "
          f"({args.epochs} epochs of SGD in {seconds:.2f} s)")
    probe = np.array([[0.5, 0.25], [-0.3, 0.6], [0.9, -0.9], [0.0, 0.0]])
    predicted = model.predict(x=probe)["y"][:, 0]
    for (x1, x2), p in zip(probe, predicted):
        print(f"  x1 = {x1:+.2f}, x2 = {x2:+.2f}:  x1 - x2 = {x1 - x2:+.4f}, network {p:+.4f}")
    assert train_mse < args.target, f"training MSE {train_mse:.2e} is not below {args.target:g}"
    assert test_mse < args.target, f"held-out MSE {test_mse:.2e} is not below {args.target:g}"
    print(f"OK: final MSE below {args.target:g}")
    return {"train_mse": float(train_mse), "test_mse": float(test_mse), "seconds": seconds}


if __name__ == "__main__":
    main()
