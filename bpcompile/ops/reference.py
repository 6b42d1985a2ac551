"""A plain NumPy evaluator of the graph IR: the oracle the compiled kernels are checked against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..ir.graph import FLOAT, Graph, Node, topo_order
from . import core as ops


def evaluate(roots: Sequence[Node], inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
             dtype: type = np.float64, training: bool = True, seed: int = 0, counter: int = 0) -> list[np.ndarray]:
    """Values of `roots` given input and parameter arrays, computed op by op in NumPy.

    `training` picks the training or evaluation side of mode-dependent ops (batch norm,
    dropout); `seed` and `counter` key random streams as the compiled model's seed and step do.
    """
    dims = infer_dims(roots, inputs)
    dims.update({"__training__": int(training), "__seed__": seed, "__counter__": counter})
    values: dict[Node, np.ndarray] = {}
    for node in topo_order(list(roots)):
        if node.op == "input":
            v = np.asarray(inputs[node.attrs["name"]])
            values[node] = v.astype(dtype) if node.dtype == FLOAT else v.astype(np.int64)
        elif node.op == "param":
            values[node] = np.asarray(params[node.attrs["name"]], dtype=dtype)
        else:
            out = ops.OPS[node.op].ref(node, [values[x] for x in node.inputs], dims)
            values[node] = np.asarray(out, dtype=dtype)
    return [values[r] for r in roots]


def infer_dims(roots: Sequence[Node], inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Runtime sizes of the named dims, read off the input arrays."""
    dims: dict[str, int] = {}
    for node in topo_order(list(roots)):
        if node.op == "input":
            for d, n in zip(node.shape, np.shape(inputs[node.attrs["name"]])):
                if isinstance(d, str):
                    dims[d] = int(n)
    return dims


def loss_and_grad(graph: Graph, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                  loss: str = "loss", seed: int = 0, counter: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and its gradients, from the same backward graph the compiler lowers."""
    from ..autodiff.reverse import grad
    names = graph.trained_params(loss)
    grads = grad(graph.losses[loss].node, [graph.params[n] for n in names])
    values = evaluate([graph.losses[loss].node, *grads], inputs, params, seed=seed, counter=counter)
    return float(values[0]), dict(zip(names, values[1:]))
