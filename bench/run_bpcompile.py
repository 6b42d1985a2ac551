"""bpcompile, through its public API (shared/DESIGN.md): bp.Graph -> bp.compile -> train_step.

    python bench/run_bpcompile.py --workload W2 --json
    python bench/run_bpcompile.py --workload W2 --variant openblas   # OpenBLAS even if MKL is installed

bpcompile is imported as installed, else from this repository's working tree. The weights
are passed as ``init=<ndarray>`` so the losses match the other runners step for step.
``bp.compile`` uses its default build directory: run.py points $BPCOMPILE_BUILD_DIR at a
fresh temporary folder per run, so the reported compile time is a cold build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
from workloads import CNN, MLP, Workload, cnn_feature_shapes, init_params, make_batch

if importlib.util.find_spec("bpcompile") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent))
bp = common.optional_import("bpcompile")

CORE_API = ("Graph", "compile", "optim", "relu", "tanh", "softplus", "mse",
            "softmax_cross_entropy")
FAMILY_API = {"CNN": ("conv2d", "max_pool2d", "flatten"), "LSTM": ("lstm",)}


def _require(names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(bp, n)]
    if missing:
        raise common.Skip(f"bpcompile has no {', '.join('bp.' + n for n in missing)}")


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

    def build(self) -> Any:
        w, m = self.w, self.w.model
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
    return common.Trainer(lambda: model.train_step(x=x, y=y))


def version() -> str:
    where = next(iter(getattr(bp, '__path__', [])), '?')
    blas = bp.build.blas()
    blas_name = f"{blas['name']} {blas['version']}" if blas else "no BLAS"
    return f"{getattr(bp, '__version__', '?')} from {where}, {blas_name}, {bp.num_threads()} threads"


VARIANTS = ("default", "openblas")  # default: the BLAS bpcompile picks (MKL when installed)

if __name__ == "__main__":
    if "--variant" in sys.argv[:-1] and sys.argv[sys.argv.index("--variant") + 1] == "openblas":
        os.environ["BPCOMPILE_BLAS"] = "openblas"  # before bpcompile first chooses its BLAS
    common.run_cli("bpcompile", build, variants=VARIANTS, requires=("bpcompile",), version=version)
