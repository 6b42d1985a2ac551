"""Batch normalization and dropout in an MLP on the 8x8 digits: training mode vs eval mode.

64 -> dense 256 -> batch norm -> ReLU -> dropout(p) -> dense 128 -> batch norm -> ReLU ->
dropout(p) -> dense 10. Training calls (`train_step`, `loss`, `loss_and_grad`) normalize
with batch statistics and drop units with masks from the model's counter-based generator
(keyed by the model seed and the step: a second model with the same seed trains to the same
bits); `forward` uses the running statistics that every `train_step` updates (saved in
checkpoints) and no dropout, so it is deterministic and each sample's output does not depend
on the rest of the batch.

The script trains, then shows (and asserts): two eval forwards are identical; one sample
alone gets the same logits as inside a batch; the training-mode loss of a batch changes from
step to step (new dropout masks) while a model with the same seed reproduces it exactly; and
the test accuracy (asserted >= 96% by default).

Needs scikit-learn (the digits ship inside it).

Run: python examples/batchnorm_dropout.py [--epochs 30] [--dropout 0.3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bpcompile as bp


def build_graph(p: float, hidden: tuple[int, int] = (256, 128)) -> bp.Graph:
    g = bp.Graph("bn_dropout_mlp")
    x = g.input("x", ("batch", 64))
    y = g.input("y", ("batch",), dtype="int32")
    h1, h2 = hidden
    net = bp.nn.Sequential(
        bp.nn.Dense(g, 64, h1, bias=False), bp.nn.BatchNorm(g, h1), bp.relu, bp.nn.Dropout(p, salt=1),
        bp.nn.Dense(g, h1, h2, bias=False), bp.nn.BatchNorm(g, h2), bp.relu, bp.nn.Dropout(p, salt=2),
        bp.nn.Dense(g, h2, 10),
    )
    logits = net(x)
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def load_splits(seed: int) -> tuple[dict, dict]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return {"x": x_train, "y": y_train}, {"x": x_test, "y": y_test}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.96)
    args = parser.parse_args(argv)

    try:
        train, test = load_splits(args.seed)
    except ImportError as e:
        raise SystemExit(f"this example needs scikit-learn for the digits data ({e})") from None
    graph = build_graph(args.dropout)
    running = [n for n in graph.params if n not in graph.trainable]
    print(f"MLP with batch norm and dropout p={args.dropout}; running statistics (non-trainable): {running}")

    def make() -> bp.CompiledModel:
        return bp.compile(graph, dtype="float32", optimizer=bp.optim.Adam(lr=args.lr), seed=args.seed)

    model = make()
    start = time.perf_counter()
    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=False)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.2f} s; final training loss "
          f"{history['loss'][-1]:.4f}")
    print(f"running mean of the first batch norm (first 4 units): "
          f"{np.round(model.params['bn1.weight.running_mean'][:4], 3)}")

    # eval mode: deterministic, and per sample
    first, second = model.forward(x=test["x"])["logits"], model.forward(x=test["x"])["logits"]
    identical = bool(np.array_equal(first, second))
    alone = model.forward(x=test["x"][:1])["logits"]
    per_sample = float(np.max(np.abs(alone - first[:1])))
    print(f"eval forward twice: identical = {identical}; one sample alone vs in the batch: max diff {per_sample:.2e}")
    assert identical and per_sample < 1e-5

    # training mode: the dropout mask changes with the step, reproducibly across models of one seed
    batch = {k: v[:args.batch_size] for k, v in train.items()}
    twin = make()
    for k in model.params:
        twin.params[k][...] = model.params[k]
    twin._state_flat[...] = model._state_flat
    twin.step = model.step
    losses = [model.train_step(**batch) for _ in range(3)]
    twin_losses = [twin.train_step(**batch) for _ in range(3)]
    print(f"training-mode loss of one batch over 3 steps: {np.round(losses, 5)} (twin model: "
          f"{np.round(twin_losses, 5)})")
    assert losses == twin_losses and len(set(losses)) == 3

    logits = model.forward(x=test["x"])["logits"]
    accuracy = float(np.mean(logits.argmax(axis=1) == test["y"]))
    shifted = logits - logits.max(axis=1, keepdims=True)
    eval_loss = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(logits)), test["y"]]))
    print(f"test (eval mode): loss {eval_loss:.4f}, accuracy {accuracy:.4f}; the same data in training mode: "
          f"loss {model.loss(**test):.4f}")
    assert accuracy >= args.min_accuracy, f"test accuracy {accuracy:.4f} < {args.min_accuracy}"
    print(f"OK: eval-mode forward is deterministic, test accuracy >= {args.min_accuracy}")
    return {"test_accuracy": accuracy, "eval_loss": eval_loss, "per_sample_diff": per_sample}


if __name__ == "__main__":
    main()
