"""Linear and logistic regression by gradient descent, checked against exact solutions.

* Linear regression: a one-layer model x @ w + b trained with full-batch gradient descent on
  the mean squared error, compared with the closed-form least-squares solution
  (`np.linalg.lstsq` on [x, 1]).
* Logistic regression: sigmoid(x @ w + b) trained with full-batch gradient descent on the
  mean binary cross-entropy, compared with Newton's method (IRLS) in NumPy and, when
  scikit-learn is installed, with `sklearn.linear_model.LogisticRegression` without a penalty
  (the same unregularized maximum-likelihood problem).

Both losses are convex, so gradient descent must land on the same weights; the script prints
both solutions and asserts that they agree.

Run: python examples/linear_logistic.py [--samples 500] [--features 3] [--steps 3000]
"""

from __future__ import annotations

import argparse

import numpy as np

import bpcompile as bp


def linear_graph(features: int) -> bp.Graph:
    g = bp.Graph("linear_regression")
    x = g.input("x", ("batch", features))
    y = g.input("y", ("batch", 1))
    w = g.param("w", (features, 1), init="zeros")
    b = g.param("b", (1,))
    prediction = x @ w + b
    g.output("y", prediction)
    g.loss(bp.mse(prediction, y))
    return g


def logistic_graph(features: int) -> bp.Graph:
    g = bp.Graph("logistic_regression")
    x = g.input("x", ("batch", features))
    y = g.input("y", ("batch", 1))
    w = g.param("w", (features, 1), init="zeros")
    b = g.param("b", (1,))
    logits = x @ w + b
    g.output("p", bp.sigmoid(logits))
    g.loss(bp.binary_cross_entropy_with_logits(logits, y))
    return g


def train_full_batch(model: bp.CompiledModel, data: dict[str, np.ndarray], steps: int) -> list[float]:
    """Plain gradient descent: every step sees the whole data set (one native call each)."""
    return [model.train_step(**data) for _ in range(steps)]


def report(label: str, names: list[str], ours: np.ndarray, theirs: np.ndarray, their_name: str) -> float:
    print(f"  {'':6s} {'gradient descent':>18s} {their_name:>18s}")
    for name, a, b in zip(names, ours, theirs):
        print(f"  {name:6s} {a:18.6f} {b:18.6f}")
    err = float(np.max(np.abs(ours - theirs)))
    print(f"  {label}: max |difference| {err:.1e}")
    return err


def newton_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Unregularized logistic regression by Newton's method (IRLS), coefficients then intercept."""
    a = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(a.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-a @ theta))
        hessian = a.T @ (a * (p * (1 - p))[:, None])
        theta -= np.linalg.solve(hessian, a.T @ (p - y))
    return theta


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000, help="gradient-descent steps for each model")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--tol", type=float, default=1e-4, help="asserted agreement of the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn comparison")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n, d = args.samples, args.features
    names = [f"w{i + 1}" for i in range(d)] + ["b"]
    results: dict[str, float] = {}

    # --- linear regression -------------------------------------------------------------------
    x = rng.normal(size=(n, d))
    true_w, true_b = rng.normal(size=d), 0.7
    y = x @ true_w + true_b + 0.1 * rng.normal(size=n)
    model = bp.compile(linear_graph(d), dtype="float64", optimizer=bp.optim.SGD(lr=args.lr), seed=args.seed)
    losses = train_full_batch(model, {"x": x, "y": y[:, None]}, args.steps)
    ours = np.concatenate([model.params["w"][:, 0], model.params["b"]])
    exact, *_ = np.linalg.lstsq(np.hstack([x, np.ones((n, 1))]), y, rcond=None)
    exact_mse = float(np.mean((np.hstack([x, np.ones((n, 1))]) @ exact - y) ** 2))
    print(f"linear regression: {n} samples, {d} features, {args.steps} gradient-descent steps (lr {args.lr})")
    print(f"  MSE {losses[0]:.4f} -> {model.loss(x=x, y=y[:, None]):.6f}   (least squares: {exact_mse:.6f})")
    results["linear_error"] = report("vs least squares", names, ours, exact, "np.linalg.lstsq")
    assert results["linear_error"] < args.tol, "gradient descent did not reach the least-squares solution"

    # --- logistic regression -----------------------------------------------------------------
    x = rng.normal(size=(n, d))
    true_w, true_b = rng.normal(size=d) * 1.5, -0.3
    # labels drawn from the model's own probabilities: overlapping classes, so the
    # unregularized maximum-likelihood solution is finite
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-(x @ true_w + true_b)))).astype(np.float64)
    model = bp.compile(logistic_graph(d), dtype="float64", optimizer=bp.optim.SGD(lr=args.lr * 4), seed=args.seed)
    data = {"x": x, "y": labels[:, None]}
    losses = train_full_batch(model, data, args.steps)
    ours = np.concatenate([model.params["w"][:, 0], model.params["b"]])
    accuracy = float(np.mean((model.predict(x=x)["p"][:, 0] > 0.5) == (labels > 0.5)))
    print(f"logistic regression: {n} samples, {d} features, {args.steps} gradient-descent steps (lr {args.lr * 4})")
    print(f"  cross-entropy {losses[0]:.4f} -> {model.loss(**data):.6f}, training accuracy {accuracy:.3f}")
    newton = newton_logistic(x, labels)
    results["logistic_newton_error"] = report("vs Newton", names, ours, newton, "Newton (IRLS)")
    assert results["logistic_newton_error"] < args.tol, "gradient descent did not reach the maximum-likelihood fit"

    try:
        if args.no_sklearn:
            raise ImportError("--no-sklearn")
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        print(f"  (scikit-learn comparison skipped: {e}; pip install scikit-learn to run it)")
    else:
        # No penalty: the same unregularized problem (scikit-learn's default is an L2 penalty with
        # C=1). scikit-learn >= 1.8 spells that C=inf and deprecates penalty=None, older ones need it.
        import sklearn
        major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
        unpenalized = {"C": np.inf} if (major, minor) >= (1, 8) else {"penalty": None}
        clf = LogisticRegression(**unpenalized, tol=1e-12, max_iter=10_000).fit(x, labels)
        sk = np.concatenate([clf.coef_[0], clf.intercept_])
        results["logistic_sklearn_error"] = report("vs scikit-learn", names, ours, sk, "LogisticRegression")
        assert results["logistic_sklearn_error"] < args.tol, "gradient descent disagrees with scikit-learn"
    print(f"OK: gradient descent agrees with the exact solutions to {args.tol:g}")
    return results


if __name__ == "__main__":
    main()
