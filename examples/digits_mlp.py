"""Handwritten digits: an MLP on scikit-learn's bundled 8x8 digits, trained with Adam.

The 1797 digits images ship inside scikit-learn (`sklearn.datasets.load_digits`), so nothing
is downloaded. The script splits them into training, validation and test sets, trains a
64-256-10 ReLU MLP with `model.fit(..., validation=...)`, prints the time per epoch and the
validation curve, asserts at least 97% accuracy on the held-out test set, and draws the loss
and accuracy curves into a PNG (when matplotlib is installed).

Needs scikit-learn (`pip install "bpcompile[examples]"`); matplotlib is optional.

Run: python examples/digits_mlp.py [--epochs 40] [--out digits_curves.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import bpcompile as bp


def build_graph(hidden: int = 256) -> bp.Graph:
    g = bp.Graph("digits_mlp")
    x = g.input("x", ("batch", 64))
    y = g.input("y", ("batch",), dtype="int32")
    w1 = g.param("W1", (64, hidden), init="he_normal")
    b1 = g.param("b1", (hidden,))
    w2 = g.param("W2", (hidden, 10), init="glorot_uniform")
    b2 = g.param("b2", (10,))
    logits = bp.relu(x @ w1 + b1) @ w2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def load_splits(seed: int) -> tuple[dict, dict, dict]:
    """(train, validation, test) dicts: 60% / 20% / 20%, stratified, pixels standardized."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                      random_state=seed)
    # Standardize each pixel with statistics of the training set only (+0.1 in the scale:
    # some border pixels are almost always 0). bpcompile converts the float64 arrays to the
    # model's float32 once, in fit.
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0) + 0.1
    x_train, x_val, x_test = ((a - mean) / scale for a in (x_train, x_val, x_test))
    return {"x": x_train, "y": y_train}, {"x": x_val, "y": y_val}, {"x": x_test, "y": y_test}


def plot_curves(history: dict[str, list[float]], out: Path) -> bool:
    """Loss and accuracy per epoch into a PNG; False (with a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], label="training")
    ax_loss.plot(epochs, history["val_loss"], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, history["val_accuracy"], label="validation", color="C1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    ax_acc.grid(alpha=0.3)
    fig.suptitle("bpcompile: 64-256-10 MLP on the 8x8 digits (Adam)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.97, help="asserted test accuracy")
    parser.add_argument("--out", type=Path, default=Path("digits_curves.png"), help="PNG of the curves")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = parser.parse_args(argv)

    try:
        train, val, test = load_splits(args.seed)
    except ImportError as e:
        raise SystemExit(f"this example needs scikit-learn for the digits data ({e}): "
                         'pip install "bpcompile[examples]"') from None
    print(f"digits: {len(train['x'])} training, {len(val['x'])} validation, {len(test['x'])} test images (8x8)")
    start = time.perf_counter()
    model = bp.compile(build_graph(args.hidden), dtype="float32", optimizer=bp.optim.Adam(lr=args.lr),
                       seed=args.seed)
    print(f"compiled {model.name!r}: 64-{args.hidden}-10 MLP, {model.param_count} parameters, "
          f"{time.perf_counter() - start:.2f} s (cached builds load in milliseconds)")

    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        validation=val, verbose=False)
    every = max(1, args.epochs // 10)
    for e in range(every - 1, args.epochs, every):
        print(f"epoch {e + 1:3d}  train loss {history['loss'][e]:.4f}  val loss {history['val_loss'][e]:.4f}  "
              f"val accuracy {history['val_accuracy'][e]:.3f}  ({history['seconds'][e] * 1e3:.1f} ms)")
    # the median: robust to the odd epoch slowed by something else running on the machine
    per_epoch = float(np.median(history["seconds"])) if args.epochs else float("nan")
    steps = -(-len(train["x"]) // args.batch_size)
    if args.epochs:
        mean_epoch = float(np.mean(history["seconds"]))
        print(f"time per epoch: {per_epoch * 1e3:.2f} ms median, {mean_epoch * 1e3:.2f} ms mean "
              f"({steps} steps of batch {args.batch_size}: {per_epoch / steps * 1e6:.1f} us per train_step, "
              f"{len(train['x']) / per_epoch:,.0f} samples/s)")

    final = model.evaluate(test)
    print(f"test: loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f} "
          f"({round(final['accuracy'] * len(test['x']))}/{len(test['x'])} correct)")
    if not args.no_plot and args.epochs and plot_curves(history, args.out):
        print(f"loss and accuracy curves written to {args.out}")
    assert final["accuracy"] >= args.min_accuracy, (
        f"test accuracy {final['accuracy']:.4f} is below {args.min_accuracy}")
    print(f"OK: test accuracy >= {args.min_accuracy}")
    return {"test_accuracy": final["accuracy"], "test_loss": final["loss"], "seconds_per_epoch": per_epoch}


if __name__ == "__main__":
    main()
