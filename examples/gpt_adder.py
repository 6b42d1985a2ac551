"""A tiny GPT that learns to add two 2-digit numbers written as characters.

Each sample is a string such as "12+34=046": two zero-padded operands and their sum in three
digits. A decoder-only transformer (token + position embeddings, `--layers` pre-norm blocks of
`--heads` causal attention heads and a GELU MLP, a final layer norm, an LM head tied to the
token embedding) reads the first 8 characters and predicts each next one; the loss is the
cross-entropy of the three answer digits only (the operands are random, so predicting them is
noise). Training uses AdamW with weight decay, a linear warm-up into a cosine decay and
gradient clipping. 1,000 of the 10,000 pairs are held out; the script reports exact-match
accuracy on them, answering greedily one digit at a time with `forward`, and asserts it
reaches `--min-accuracy`.

Run: python examples/gpt_adder.py [--steps 600] [--min-accuracy 0.99]  (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bpcompile as bp

VOCAB = "0123456789+="
T = 8  # characters read: "ab+cd=" and the first two answer digits
ANSWER = slice(5, 8)  # positions whose next character is an answer digit


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def sample(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}={a + b:03d}"


def build_graph(c: int = 128, heads: int = 4, layers: int = 2, name: str = "gpt_adder") -> bp.Graph:
    g = bp.Graph(name)
    idx = g.input("idx", ("batch", T), dtype="int32")
    target = g.input("target", ("batch", T, len(VOCAB)))  # one-hot next characters, zero off the answer
    wte = bp.nn.Embedding(g, len(VOCAB), c, init=np.random.default_rng(0).normal(0, 0.02, (len(VOCAB), c)),
                          name="wte")
    wpe = g.param("wpe", (T, c), init=np.random.default_rng(1).normal(0, 0.02, (T, c)))
    x = wte(idx) + wpe
    for i in range(layers):
        x = bp.nn.TransformerBlock(g, c, heads, name=f"h{i}")(x)
    x = bp.nn.LayerNorm(g, c, name="ln_f")(x)
    logits = x @ bp.transpose(wte.weight)  # the LM head shares the token embedding
    g.output("logits", logits)
    answer_digits = ANSWER.stop - ANSWER.start
    g.loss(-bp.mean(bp.sum(bp.log_softmax(logits) * target, axis=(1, 2))) / answer_digits)
    return g


def dataset(pairs: np.ndarray) -> dict[str, np.ndarray]:
    codes = np.array([encode(sample(a, b)) for a, b in pairs], dtype=np.int32)
    target = np.zeros((len(pairs), T, len(VOCAB)))
    rows = np.arange(len(pairs))
    for pos in range(ANSWER.start, ANSWER.stop):
        target[rows, pos, codes[:, pos + 1]] = 1.0
    return {"idx": codes[:, :T], "target": target}


def answer(model: bp.CompiledModel, pairs: np.ndarray) -> np.ndarray:
    """Greedy completions: the three answer digits, one forward pass each."""
    idx = np.zeros((len(pairs), T), dtype=np.int32)
    idx[:, :6] = [encode(f"{a:02d}+{b:02d}=") for a, b in pairs]
    digits = []
    for pos in range(ANSWER.start, ANSWER.stop):
        nxt = model.forward(idx=idx)["logits"][:, pos].argmax(axis=1)
        digits.append(nxt)
        if pos + 1 < T:
            idx[:, pos + 1] = nxt
    d = np.stack(digits, axis=1)
    return d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--min-accuracy", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    pairs = rng.permutation(np.array([(a, b) for a in range(100) for b in range(100)]))
    test_pairs, train_pairs = pairs[:1000], pairs[1000:]
    train = dataset(train_pairs)

    schedule = bp.schedules.LinearWarmup(bp.schedules.Cosine(args.lr, args.steps, min_lr=args.lr / 20),
                                         warmup_steps=min(200, args.steps // 10))
    t0 = time.perf_counter()
    model = bp.compile(build_graph(args.width, args.heads, args.layers), dtype="float32", seed=args.seed,
                       optimizer=bp.optim.AdamW(lr=schedule, betas=(0.9, 0.98), weight_decay=0.1, clip_norm=1.0))
    compiled = time.perf_counter() - t0
    print(f"compiled in {compiled:.1f} s: {sum(p.size for p in model.params.values()):,} parameters")

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = rng.integers(0, len(train_pairs), args.batch)
        loss = model.train_step(idx=train["idx"][rows], target=train["target"][rows])
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss:.4f}  lr {schedule(step):.2e}  {time.perf_counter() - t0:6.1f} s")
    trained = time.perf_counter() - t0

    got = answer(model, test_pairs)
    accuracy = float(np.mean(got == test_pairs.sum(axis=1)))
    print(f"held-out exact match: {accuracy:.2%} of {len(test_pairs)} sums "
          f"(training {trained:.1f} s, {1e3 * trained / args.steps:.1f} ms/step)")
    for (a, b), s in zip(test_pairs[:5], got[:5]):
        print(f"  {a:02d}+{b:02d}={s:03d}  {'ok' if s == a + b else f'wrong, {a + b:03d}'}")
    assert accuracy >= args.min_accuracy, f"accuracy {accuracy:.2%} < {args.min_accuracy:.0%}"
    return accuracy


if __name__ == "__main__":
    main()
