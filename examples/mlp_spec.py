"""A model spec for the `bpcompile` command: a 784-256-10 MLP (ReLU), softmax cross-entropy, Adam.

    bpcompile build examples/mlp_spec.py          # compile the native module (cached)
    bpcompile show examples/mlp_spec.py --grad    # derivatives and the backward pass
    bpcompile check examples/mlp_spec.py          # gradients vs finite differences
    bpcompile export examples/mlp_spec.py -o mlp_c  # a standalone C99 library

A spec defines `build()` returning a bp.Graph (or a module-level `graph`), and optionally
`optimizer`, `dtype` and `seed`, which the commands use as their defaults.
"""

import bpcompile as bp

dtype = "float32"
seed = 0
optimizer = bp.optim.Adam(lr=1e-3)


def build() -> bp.Graph:
    g = bp.Graph("mlp")
    x = g.input("x", ("batch", 784))
    y = g.input("y", ("batch",), dtype="int32")
    W1 = g.param("W1", (784, 256), init="he_normal")
    b1 = g.param("b1", (256,))
    W2 = g.param("W2", (256, 10), init="glorot_uniform")
    b2 = g.param("b2", (10,))
    h1 = bp.relu(x @ W1 + b1)
    logits = h1 @ W2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g
