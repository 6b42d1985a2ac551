"""A plain NumPy evaluator of the graph IR: the oracle the compiled kernels are checked against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..ir.graph import FLOAT, Graph, Node, graphs_newest_first, named_dims, topo_order
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
    """Runtime sizes of the named dims, read off the input arrays: of the inputs the roots
    depend on, then, for dims that only constants carry (a loss that folds to a constant, such
    as x - x), of the given inputs as their graph declares them."""
    dims: dict[str, int] = {}
    nodes = topo_order(list(roots))
    for node in nodes:
        if node.op == "input":
            _read_dims(node, inputs[node.attrs["name"]], dims)
    wanted = {d for node in nodes for d in named_dims(node.shape)} - set(dims)
    if wanted:
        for graph in graphs_newest_first():  # the newest graph declaring these inputs
            declared = [graph.inputs.get(name) for name in inputs]
            if all(node is not None and node.ndim == np.ndim(inputs[node.attrs["name"]]) for node in declared):
                for node in declared:
                    _read_dims(node, inputs[node.attrs["name"]], dims)
                break
    return dims


def _read_dims(node: Node, value: np.ndarray, dims: dict[str, int]) -> None:
    for d, n in zip(node.shape, np.shape(value)):
        if isinstance(d, str):
            dims[d] = int(n)


def loss_and_grad(graph: Graph, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                  loss: str = "loss", seed: int = 0, counter: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and its gradients, from the same backward graph the compiler lowers."""
    from ..autodiff.reverse import grad
    names = graph.trained_params(loss)
    grads = grad(graph.losses[loss].node, [graph.params[n] for n in names])
    values = evaluate([graph.losses[loss].node, *grads], inputs, params, seed=seed, counter=counter)
    return float(values[0]), dict(zip(names, values[1:]))
