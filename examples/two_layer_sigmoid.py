"""The textbook two-layer sigmoid network without biases, and its hand-derived deltas.

    h = sigma(W1 x),   y_hat = sigma(W2 h),   loss = binary cross-entropy(y_hat, y)

Backpropagation by hand gives the familiar deltas

    delta2 = y_hat - y                      (sigmoid + cross-entropy: the sigmoid' cancels)
    delta1 = W2^T delta2 * h (1 - h)        (back through W2, then through sigma' = h(1-h))
    grad W2 = delta2 h^T,   grad W1 = delta1 x^T

This script compiles the network with bpcompile, asks the compiled module for its gradients
(`model.loss_and_grad`), computes the deltas above in NumPy, prints the two side by side and
asserts that they agree. It then takes a few fused SGD steps (`model.train_step`) and checks
that each one moved the weights by exactly -lr times the hand-derived gradient.

Run: python examples/two_layer_sigmoid.py [--samples 8] [--inputs 3] [--hidden 4] [--outputs 2]
"""

from __future__ import annotations

import argparse

import numpy as np

import bpcompile as bp


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def build_graph(n_in: int, n_hidden: int, n_out: int) -> bp.Graph:
    g = bp.Graph("two_layer_sigmoid")
    # bpcompile (like NumPy and PyTorch) is row-major: a batch of samples is a matrix whose
    # ROWS are the samples, x has shape (batch, n_in), and a layer is x @ W with W of shape
    # (n_in, n_hidden). The textbook writes column vectors and W1 x with W1 of shape
    # (n_hidden, n_in). So our W1 is the textbook's W1 transposed, and every formula below
    # appears transposed: textbook W1 x  ==  our x @ W1 (one row per sample).
    x = g.input("x", ("batch", n_in))
    y = g.input("y", ("batch", n_out))
    w1 = g.param("W1", (n_in, n_hidden), init="normal")
    w2 = g.param("W2", (n_hidden, n_out), init="normal")
    h = bp.sigmoid(x @ w1)           # h = sigma(W1 x), no bias
    z2 = h @ w2                      # the pre-sigmoid output W2 h
    g.output("y_hat", bp.sigmoid(z2))
    g.output("h", h)
    # Cross-entropy of sigma(z2) against y, written on the logits z2 so it is numerically
    # stable for any z2. It is the MEAN over all batch * n_out elements (PyTorch's default).
    g.loss(bp.binary_cross_entropy_with_logits(z2, y))
    return g


def hand_derived(x: np.ndarray, y: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> dict[str, np.ndarray]:
    """The deltas and gradients of the textbook, in row-major layout, in NumPy."""
    h = sigmoid(x @ w1)                  # (batch, hidden): row i is h for sample i
    y_hat = sigmoid(h @ w2)              # (batch, out)
    # The loss is the mean over batch * n_out elements, so each element's derivative
    # dL/dz2 carries a factor 1 / (batch * n_out): the textbook's per-sample delta2 = y_hat - y
    # is the derivative of the SUMMED loss.
    scale = 1.0 / y.size
    delta2 = (y_hat - y) * scale         # (batch, out): row i is delta2 of sample i (scaled)
    # textbook delta1 = W2^T delta2 * h(1-h) (column vectors); with rows as samples and our
    # W2 = textbook W2^T, the product W2^T delta2 becomes delta2 @ W2^T.
    delta1 = (delta2 @ w2.T) * h * (1.0 - h)     # (batch, hidden)
    # textbook grad W2 = delta2 h^T (an outer product per sample, summed over the batch); in
    # our transposed layout it is h^T @ delta2, of W2's shape (hidden, out). Likewise W1.
    grad_w2 = h.T @ delta2
    grad_w1 = x.T @ delta1
    loss = np.mean(np.maximum(h @ w2, 0) - (h @ w2) * y + np.log1p(np.exp(-np.abs(h @ w2))))
    return {"h": h, "y_hat": y_hat, "delta2": delta2, "delta1": delta1, "W1": grad_w1, "W2": grad_w2,
            "loss": loss}


def side_by_side(name: str, compiled: np.ndarray, hand: np.ndarray) -> None:
    print(f"grad {name}  (compiled | hand-derived)")
    for row_c, row_h in zip(compiled, hand):
        left = " ".join(f"{v:+.6f}" for v in row_c)
        right = " ".join(f"{v:+.6f}" for v in row_h)
        print(f"  [{left}]  |  [{right}]")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="batch size")
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--outputs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="SGD steps checked against the hand update")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.samples, args.inputs))
    y = (rng.random((args.samples, args.outputs)) < 0.5).astype(np.float64)

    # float64 so that compiled and hand-derived numbers can be compared to ~1e-12.
    model = bp.compile(build_graph(args.inputs, args.hidden, args.outputs), dtype="float64",
                       optimizer=bp.optim.SGD(lr=args.lr), seed=args.seed)
    # Larger weights than the "normal" init's 0.05 so the gradients are not all tiny.
    model.params["W1"][...] = rng.normal(size=model.params["W1"].shape)
    model.params["W2"][...] = rng.normal(size=model.params["W2"].shape)
    print(f"compiled {model.name!r} ({model.param_count} parameters) -> {model.build_path}")

    loss, grads = model.loss_and_grad(x=x, y=y)
    hand = hand_derived(x, y, model.params["W1"], model.params["W2"])
    out = model.forward(x=x)
    print(f"loss: compiled {loss:.12f}   hand {hand['loss']:.12f}")
    print("delta2 = (y_hat - y) / (batch * outputs), first sample:", np.round(hand["delta2"][0], 6))
    print("delta1 = delta2 W2^T * h(1-h),            first sample:", np.round(hand["delta1"][0], 6))
    side_by_side("W2", grads["W2"], hand["W2"])
    side_by_side("W1", grads["W1"], hand["W1"])

    errors = {
        "loss": abs(loss - hand["loss"]),
        "y_hat": float(np.max(np.abs(out["y_hat"] - hand["y_hat"]))),
        "h": float(np.max(np.abs(out["h"] - hand["h"]))),
        "W1": float(np.max(np.abs(grads["W1"] - hand["W1"]))),
        "W2": float(np.max(np.abs(grads["W2"] - hand["W2"]))),
    }
    print("max |compiled - hand|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for key, err in errors.items():
        assert err < 1e-10, f"{key}: compiled and hand-derived differ by {err}"

    # One fused native call per step: forward, backward and the SGD update. Each step must move
    # the weights by exactly -lr * (the hand-derived gradient at the weights before the step).
    losses = [loss]
    step_error = 0.0
    for _ in range(args.steps):
        w1, w2 = model.params["W1"].copy(), model.params["W2"].copy()
        hand = hand_derived(x, y, w1, w2)
        losses.append(model.train_step(x=x, y=y))
        step_error = max(step_error,
                         float(np.max(np.abs(model.params["W1"] - (w1 - args.lr * hand["W1"])))),
                         float(np.max(np.abs(model.params["W2"] - (w2 - args.lr * hand["W2"])))))
    final = model.loss(x=x, y=y)
    if args.steps:
        print(f"{args.steps} SGD steps (lr {args.lr}): loss {losses[0]:.6f} -> {final:.6f}; "
              f"max |W - (W_prev - lr * hand grad)| = {step_error:.1e}")
        assert step_error < 1e-10, f"train_step's update differs from the hand-derived SGD step by {step_error}"
        assert final < losses[0], "gradient descent did not lower the loss"
    print("OK: the compiled gradients are the hand-derived deltas")
    return {"loss": float(loss), "max_grad_error": max(errors["W1"], errors["W2"]), "step_error": step_error,
            "final_loss": float(final)}


if __name__ == "__main__":
    main()
