"""The graph IR: interned `Node`s with static or symbolic shapes, the user-facing `Tensor` and
`Graph` builders, the shape helpers shared by every stage, and the topological order. Every
other stage reads this one; it imports no other stage at module level."""

from .graph import (
    FLOAT,
    INT,
    RESERVED_INPUT_NAMES,
    Dim,
    Graph,
    LossSpec,
    Node,
    Shape,
    Tensor,
    broadcast_shapes,
    canonical_dim,
    check_shape,
    dim_factors,
    dim_size,
    graph_of,
    named_dims,
    product_dim,
    shape_str,
    size_factors,
    structural_hash,
    topo_order,
)

__all__ = ["FLOAT", "INT", "RESERVED_INPUT_NAMES", "Dim", "Graph", "LossSpec", "Node", "Shape", "Tensor",
           "broadcast_shapes", "canonical_dim", "check_shape", "dim_factors", "dim_size", "graph_of", "named_dims",
           "product_dim", "shape_str", "size_factors", "structural_hash", "topo_order"]
