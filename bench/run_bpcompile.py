"""bpcompile, through its public API (shared/DESIGN.md): bp.Graph -> bp.compile -> train_step.

    python bench/run_bpcompile.py --workload W2 --json
    python bench/run_bpcompile.py --workload W2 --variant openblas   # OpenBLAS even if MKL is installed

bpcompile is imported as installed, else from this repository's working tree. The weights
are passed as ``init=<ndarray>`` so the losses match the other runners step for step.
``bp.compile`` uses its default build directory: run.py points $BPCOMPILE_BUILD_DIR at a
fresh temporary folder per run, so the reported compile time is a cold build.

The GPT (W7) needs bp.layer_norm and bp.attention (issue 14); while bpcompile lacks them its
runs are "skipped" with "not available: ...". Its graph takes ``idx`` (B, T) and ``labels``
(B*T,), int32 inputs of fixed shape, and trains the mean cross-entropy of the (B*T, vocab)
logits.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
from workloads import CNN, GPT, MLP, Workload, cnn_feature_shapes, gpt_layer_names, init_params, make_batch

if importlib.util.find_spec("bpcompile") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent))
bp = common.optional_import("bpcompile")

CORE_API = ("Graph", "compile", "optim", "relu", "tanh", "softplus", "mse",
            "softmax_cross_entropy")
FAMILY_API = {"CNN": ("conv2d", "max_pool2d", "flatten"), "LSTM": ("lstm",),
              "GPT": ("embedding", "layer_norm", "attention", "gelu", "reshape", "transpose",
                      "slice")}


def _has(name: str) -> bool:
    try:  # bp.<name> imports its module lazily: one being written may raise anything
        getattr(bp, name)
    except Exception:  # noqa: BLE001
        return False
    return True


def _require(names: tuple[str, ...]) -> None:
    missing = [n for n in names if not _has(n)]
    if missing:
        raise common.Skip(f"not available: bpcompile has no {', '.join('bp.' + n for n in missing)}")


class GraphBuilder:
    """Declares the workload's parameters (with the shared initial values) and its model."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.g = bp.Graph(w.name.lower())
        self.init = init_params(w)

    def param(self, name: str) -> Any:
        value = self.init[name]
        return self.g.param(name, value.shape, init=value)

    def activation(self, h: Any) -> Any:
        assert isinstance(self.w.model, MLP)
        if self.w.model.activation == "relu":
            return bp.relu(h)
        return h * bp.tanh(bp.softplus(h))  # Mish from primitives

    def mlp(self, m: MLP, x: Any) -> Any:
        n = len(m.sizes) - 1
        for i in range(n):
            x = x @ self.param(f"W{i}") + self.param(f"b{i}")
            if i < n - 1:
                x = self.activation(x)
        return x

    def cnn(self, m: CNN, x: Any) -> Any:
        for i in range(len(cnn_feature_shapes(m)) - 1):
            x = bp.conv2d(x, self.param(f"conv{i}_w"), self.param(f"conv{i}_b"),
                          padding=m.padding)
            x = bp.max_pool2d(bp.relu(x), m.pool)
        return bp.flatten(x) @ self.param("fc_w") + self.param("fc_b")

    def lstm(self, x: Any) -> Any:
        weights = [self.param(n) for n in ("W_ih", "W_hh", "b_ih", "b_hh")]
        _, (h, _) = bp.lstm(x, *weights)  # h: (batch, hidden), the last hidden state
        return h @ self.param("fc_w") + self.param("fc_b")

    def layer_norm(self, x: Any, weight: str, bias: str) -> Any:
        assert isinstance(self.w.model, GPT)
        return bp.layer_norm(x, self.param(weight), self.param(bias), eps=self.w.model.eps)

    def attention(self, m: GPT, n: dict[str, str], h: Any) -> Any:
        bsz, t, c = self.w.batch, m.block, m.embed
        qkv = h @ self.param(n["attn_w"]) + self.param(n["attn_b"])  # (B, T, 3C)
        q, k, v = (bp.transpose(bp.reshape(bp.slice(qkv, 2, i * c, (i + 1) * c),
                                           (bsz, t, m.heads, m.head_dim)), (0, 2, 1, 3))
                   for i in range(3))  # each (B, H, T, d)
        y = bp.attention(q, k, v, causal=True)  # (B, H, T, d)
        y = bp.reshape(bp.transpose(y, (0, 2, 1, 3)), (bsz, t, c))
        return y @ self.param(n["proj_w"]) + self.param(n["proj_b"])

    def mlp_block(self, n: dict[str, str], h: Any) -> Any:
        u = bp.gelu(h @ self.param(n["fc_w"]) + self.param(n["fc_b"]))  # erf form
        return u @ self.param(n["fc2_w"]) + self.param(n["fc2_b"])

    def gpt(self, m: GPT) -> Any:
        idx = self.g.input("idx", (self.w.batch, m.block), dtype="int32")
        labels = self.g.input("labels", (self.w.batch * m.block,), dtype="int32")
        x = bp.embedding(idx, self.param("wte")) + self.param("wpe")  # (B, T, C)
        for layer in range(m.layers):
            n = gpt_layer_names(layer)
            x = x + self.attention(m, n, self.layer_norm(x, n["ln1_w"], n["ln1_b"]))
            x = x + self.mlp_block(n, self.layer_norm(x, n["ln2_w"], n["ln2_b"]))
        x = self.layer_norm(x, "lnf_w", "lnf_b")
        logits = bp.reshape(x @ self.param("lm_w"), (self.w.batch * m.block, m.vocab))
        self.g.output("logits", logits)
        self.g.loss(bp.softmax_cross_entropy(logits, labels))
        return self.g

    def build(self) -> Any:
        w, m = self.w, self.w.model
        if isinstance(m, GPT):
            return self.gpt(m)
        x_np, y_np = make_batch(w)
        x = self.g.input("x", ("batch", *x_np.shape[1:]))
        if w.loss == "softmax_ce":
            y = self.g.input("y", ("batch",), dtype="int32")
        else:
            y = self.g.input("y", ("batch", *y_np.shape[1:]))
        if isinstance(m, MLP):
            out = self.mlp(m, x)
        elif isinstance(m, CNN):
            out = self.cnn(m, x)
        else:
            out = self.lstm(x)
        self.g.output("out", out)
        loss_fn = bp.softmax_cross_entropy if w.loss == "softmax_ce" else bp.mse
        self.g.loss(loss_fn(out, y))
        return self.g


def make_optimizer(w: Workload) -> Any:
    cls = {"sgd": bp.optim.SGD, "adam": bp.optim.Adam}[w.optimizer.name]
    return cls(lr=w.optimizer.lr)


def build(w: Workload, variant: str) -> common.Trainer:
    _require(CORE_API)
    if not isinstance(w.model, MLP):
        _require(FAMILY_API[type(w.model).__name__])
    graph = GraphBuilder(w).build()
    model = bp.compile(graph, dtype="float32", optimizer=make_optimizer(w), seed=0)
    x, y = make_batch(w)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if isinstance(w.model, GPT):
        labels = np.ascontiguousarray(y.reshape(-1))
        return common.Trainer(lambda: model.train_step(idx=x, labels=labels))
    return common.Trainer(lambda: model.train_step(x=x, y=y))


def version() -> str:
    where = next(iter(getattr(bp, '__path__', [])), '?')
    blas = bp.build.blas()
    blas_name = f"{blas['name']} {blas['version']}" if blas else "no BLAS"
    return f"{getattr(bp, '__version__', '?')} from {where}, {blas_name}, {bp.num_threads()} threads"


VARIANTS = ("default", "openblas")  # default: the BLAS bpcompile picks (MKL on Intel when installed)

if __name__ == "__main__":
    if "--variant" in sys.argv[:-1] and sys.argv[sys.argv.index("--variant") + 1] == "openblas":
        os.environ["BPCOMPILE_BLAS"] = "openblas"  # before bpcompile first chooses its BLAS
    common.run_cli("bpcompile", build, variants=VARIANTS, requires=("bpcompile",), version=version)
