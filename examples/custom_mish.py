"""A custom activation from one SymPy expression: Mish(z) = z * tanh(softplus(z)).

`bp.elementwise("mish", expr, z)` turns a scalar SymPy expression into an op. Nothing else is
written by hand: SymPy differentiates the expression, bpcompile simplifies the derivative (and
keeps whichever form is cheaper to evaluate) and prints both into the generated C. This script

1. prints Mish's derivative as SymPy derived it and as bpcompile uses it,
2. checks that derivative against central finite differences in NumPy,
3. checks the compiled kernel: the gradient of sum(mish(z)) with respect to z is mish'(z),
4. trains a small Mish network on a synthetic regression problem and prints the loss falling.

Run: python examples/custom_mish.py [--epochs 60] [--samples 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
import sympy as sp

import bpcompile as bp

Z = sp.Symbol("z")
# The one expression that defines the activation: the textbook form, softplus(z) = log(1 + e^z).
# bpcompile evaluates the forward pass stably (log1p), but the derivative SymPy derives from
# this form contains e^z / (e^z + 1), which overflows to inf/inf = NaN for z > 88 in float32
# (z > 709 in float64). Pre-activations of a normalized network stay far below that; for
# unbounded inputs, write softplus in its stable form, sp.Max(z, 0) + sp.log(1 + sp.exp(-sp.Abs(z))),
# with z = sp.Symbol("z", real=True).
MISH_EXPR = Z * sp.tanh(sp.log(1 + sp.exp(Z)))
mish = bp.elementwise("mish", MISH_EXPR, Z)


def mish_numpy(z: np.ndarray) -> np.ndarray:
    """An independent NumPy Mish, for the finite-difference check."""
    return z * np.tanh(np.logaddexp(0.0, z))


def derivative_graph(points: np.ndarray) -> bp.Graph:
    """loss = sum(mish(z)) with z a parameter, so d loss / d z = mish'(z) elementwise."""
    g = bp.Graph("mish_derivative")
    z = g.param("z", points.shape, init=points)
    g.loss(bp.sum(mish(z)))
    return g


def regression_graph(hidden: int) -> bp.Graph:
    g = bp.Graph("mish_regression")
    x = g.input("x", ("batch", 2))
    y = g.input("y", ("batch", 1))
    w1 = g.param("W1", (2, hidden), init="he_normal")
    b1 = g.param("b1", (hidden,))
    w2 = g.param("W2", (hidden, hidden), init="he_normal")
    b2 = g.param("b2", (hidden,))
    w3 = g.param("W3", (hidden, 1), init="glorot_uniform")
    b3 = g.param("b3", (1,))
    h = mish(x @ w1 + b1)
    h = mish(h @ w2 + b2)
    prediction = h @ w3 + b3
    g.output("y", prediction)
    g.loss(bp.mse(prediction, y))
    return g


def target(x: np.ndarray) -> np.ndarray:
    return (np.sin(3.0 * x[:, 0]) * np.cos(2.0 * x[:, 1]) + 0.5 * x[:, 0] * x[:, 1])[:, None]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="training points of the regression")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # 1. the derivative, as SymPy derived it and as bpcompile uses it
    fn = mish.fn
    partial = fn.partial(0)
    print(f"mish(z)  = {fn.pretty()}")
    print(f"mish'(z) = {fn.pretty(partial.raw)}          (sympy.diff)")
    if partial.expr != partial.raw:
        print(f"         = {fn.pretty(partial.expr)}          (simplified: what the generated C computes)")
    else:
        print("           (sympy.simplify found no cheaper form: the generated C computes this one)")
    if partial.uses_output:
        print("           (written in terms of the output 'out', which the forward pass stores)")

    # 2. the derivative against central finite differences of an independent NumPy Mish
    points = np.linspace(-6.0, 6.0, 25)
    if partial.uses_output:
        deriv = sp.lambdify([Z, sp.Symbol("out")], fn.pretty(partial.expr), "numpy")
        derived = deriv(points, mish_numpy(points))
    else:
        derived = sp.lambdify(Z, fn.pretty(partial.expr), "numpy")(points)
    step = 1e-6
    numeric = (mish_numpy(points + step) - mish_numpy(points - step)) / (2 * step)
    fd_error = float(np.max(np.abs(derived - numeric)))
    print(f"check: SymPy's mish' vs central differences at {len(points)} points in [-6, 6]: "
          f"max |difference| {fd_error:.1e}")
    assert fd_error < 1e-8, f"SymPy's derivative disagrees with finite differences by {fd_error}"

    # 3. the compiled kernel computes that derivative
    check = bp.compile(derivative_graph(points), dtype="float64", seed=args.seed)
    _, grads = check.loss_and_grad()
    kernel_error = float(np.max(np.abs(grads["z"] - derived)))
    print(f"check: compiled gradient of sum(mish(z)) vs SymPy's mish'(z): max |difference| {kernel_error:.1e}")
    for z_value, g_value in list(zip(points, grads["z"]))[::6]:
        print(f"   mish'({z_value:+.1f}) = {g_value:+.6f}")
    assert kernel_error < 1e-12, f"the compiled backward pass differs from mish' by {kernel_error}"

    # 4. train a small Mish network
    rng = np.random.default_rng(args.seed)
    x_train = rng.uniform(-1.0, 1.0, size=(args.samples, 2))
    x_test = rng.uniform(-1.0, 1.0, size=(500, 2))
    train, test = {"x": x_train, "y": target(x_train)}, {"x": x_test, "y": target(x_test)}
    model = bp.compile(regression_graph(args.hidden), dtype="float32", optimizer=bp.optim.Adam(lr=args.lr),
                       seed=args.seed)
    print(f"training a 2-{args.hidden}-{args.hidden}-1 Mish network (Adam, lr {args.lr}) on "
          f"y = sin(3 x1) cos(2 x2) + x1 x2 / 2, {args.samples} points")
    before = model.loss(**test)
    print(f"  before training: test MSE {before:.5f}")
    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, validation=test,
                        verbose=False)
    every = max(1, args.epochs // 10)
    for e in sorted({0, 1, 2, *range(every - 1, args.epochs, every)} & set(range(args.epochs))):
        print(f"  epoch {e + 1:3d}  train MSE {history['loss'][e]:.5f}  test MSE {history['val_loss'][e]:.5f}")
    after = model.loss(**test)
    print(f"  test MSE {before:.5f} -> {after:.5f} ({before / after:.0f}x lower)")
    if args.epochs:
        assert after < before / 10, f"the Mish network did not learn: test MSE {before:.5f} -> {after:.5f}"
        assert history["loss"][-1] < history["loss"][0], "the training loss did not fall"
    print("OK: SymPy derived mish', the compiled kernel computes it, and the network trains with it")
    return {"fd_error": fd_error, "kernel_error": kernel_error, "mse_before": float(before), "mse_after": float(after)}


if __name__ == "__main__":
    main()
