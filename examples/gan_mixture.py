"""A GAN whose generator learns a 2-D mixture of Gaussians.

The data: 8 Gaussians (std 0.05) evenly spaced on a circle of radius 2. The generator maps
2-D standard normal noise through a 64-64 ReLU MLP to a point; the discriminator, a 64-64
leaky-ReLU MLP, outputs a logit. One graph declares both losses, each training its own
parameters, all in one parameter buffer:

    g.loss(d_loss, name="d", params=D.params)   # BCE(D(real), 1) + BCE(D(G(z)), 0)
    g.loss(g_loss, name="g", params=G.params)   # BCE(D(G(z)), 1), the non-saturating loss

and training alternates model.train_step(loss="d", z=..., real=...) and
model.train_step(loss="g", z=...), each with its own Adam state.

The script reports how many of the 8 modes the generator covers (a mode is covered when at
least 2% of the samples lie within 4 std of it) and the fraction of samples near some mode,
asserts both, and writes a PNG of generated samples over the data (when matplotlib is
installed).

Run: python examples/gan_mixture.py [--steps 3000] [--out gan_mixture.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import bpcompile as bp

MODES = 8
RADIUS = 2.0
STD = 0.05


def centers() -> np.ndarray:
    angles = 2 * np.pi * np.arange(MODES) / MODES
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def sample_data(rng: np.random.Generator, n: int) -> np.ndarray:
    return centers()[rng.integers(0, MODES, n)] + rng.normal(0, STD, (n, 2))


def build_graph(hidden: int = 64) -> bp.Graph:
    g = bp.Graph("gan_mixture")
    z = g.input("z", ("batch", 2))
    real = g.input("real", ("batch", 2))
    gen = bp.nn.Sequential(bp.nn.Dense(g, 2, hidden, activation="relu", name="G1"),
                           bp.nn.Dense(g, hidden, hidden, activation="relu", name="G2"),
                           bp.nn.Dense(g, hidden, 2, name="G3"))
    leaky = lambda t: bp.leaky_relu(t, 0.2)  # noqa: E731
    disc = bp.nn.Sequential(bp.nn.Dense(g, 2, hidden, activation=leaky, name="D1"),
                            bp.nn.Dense(g, hidden, hidden, activation=leaky, name="D2"),
                            bp.nn.Dense(g, hidden, 1, name="D3"))
    fake = gen(z)
    d_real, d_fake = disc(real), disc(fake)
    bce = bp.binary_cross_entropy_with_logits
    d_loss = bce(d_real, bp.const(1.0, d_real.shape)) + bce(d_fake, bp.const(0.0, d_fake.shape))
    g_loss = bce(d_fake, bp.const(1.0, d_fake.shape))
    g.loss(d_loss, name="d", params=disc.params)
    g.loss(g_loss, name="g", params=gen.params)
    g.output("fake", fake)
    return g


def mode_stats(samples: np.ndarray) -> tuple[int, float]:
    """(modes covered, fraction of samples within 4 std of a mode)."""
    dist = np.linalg.norm(samples[:, None, :] - centers()[None], axis=2)
    near = dist.min(axis=1) < 4 * STD
    nearest = dist.argmin(axis=1)
    counts = np.bincount(nearest[near], minlength=MODES)
    return int(np.sum(counts >= 0.02 * len(samples))), float(near.mean())


def plot(samples: np.ndarray, data: np.ndarray, out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(data[:, 0], data[:, 1], s=4, alpha=0.3, label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=4, alpha=0.5, label="generator")
    ax.set(aspect="equal", xlim=(-3, 3), ylim=(-3, 3), title="bpcompile GAN: samples vs data")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="discriminator + generator steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-modes", type=int, default=MODES, help="asserted number of modes covered")
    parser.add_argument("--min-near", type=float, default=0.5, help="asserted fraction of samples near a mode")
    parser.add_argument("--out", type=Path, default=Path("gan_mixture.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    model = bp.compile(build_graph(), dtype="float32", optimizer=bp.optim.Adam(lr=args.lr, betas=(0.5, 0.999)),
                       seed=args.seed)
    print(f"GAN on a mixture of {MODES} Gaussians: {model.param_count} parameters, losses "
          f"{[spec['name'] for spec in model.meta['losses']]}")
    start = time.perf_counter()
    every = max(1, args.steps // 5)
    for step in range(1, args.steps + 1):
        real = sample_data(rng, args.batch_size)
        d = model.train_step(loss="d", z=rng.normal(size=(args.batch_size, 2)), real=real)
        gl = model.train_step(loss="g", z=rng.normal(size=(args.batch_size, 2)))
        if step % every == 0:
            modes, near = mode_stats(model.forward(z=rng.normal(size=(2000, 2)))["fake"])
            print(f"step {step:5d}  D loss {d:.3f}  G loss {gl:.3f}  modes covered {modes}/{MODES}  "
                  f"near a mode {near:.2f}")
    seconds = time.perf_counter() - start
    samples = model.forward(z=np.random.default_rng(args.seed + 1).normal(size=(4000, 2)))["fake"]
    modes, near = mode_stats(samples)
    print(f"{args.steps} D+G steps in {seconds:.2f} s; final: {modes}/{MODES} modes covered, "
          f"{near:.1%} of samples within {4 * STD} of a mode")
    if not args.no_plot and plot(samples, sample_data(np.random.default_rng(2), 4000), args.out):
        print(f"samples vs data written to {args.out}")
    assert modes >= args.min_modes, f"only {modes} modes covered"
    assert near >= args.min_near, f"only {near:.2f} of the samples are near a mode"
    print(f"OK: >= {args.min_modes} modes covered, >= {args.min_near:.0%} of samples near a mode")
    return {"modes": modes, "near": near, "seconds": seconds}


if __name__ == "__main__":
    main()
