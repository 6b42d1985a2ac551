"""Graph passes between autodiff and codegen: simplify, fuse, schedule, and plan memory.

Each pass is small and the order is the explicit list in `schedule()`:
simplify (rewrite rules to a fixed point) -> dead-code (only what the entry's results reach)
-> fusion (elementwise clusters) -> kernel order -> storage and liveness of workspace buffers.
Common subexpressions need no pass: nodes are interned.
"""

from __future__ import annotations

import functools
import heapq
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from ..ir.graph import FLOAT, Node, size_factors, topo_order
from ..ir.kernel import Kernel
from ..ops import core as ops
from ..symbolic.functions import ARGS, Fn, dag_postorder

# --- simplify: rewrite rules and one driver -----------------------------------------------

Rule = ops.Rule


def _fold_transpose_into_matmul(node: Node) -> Node | None:
    """matmul(transpose(a), b) -> matmul(a, b, ta): GEMM reads the operand transposed, no copy."""
    if node.op != "matmul":
        return None
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    if a.op == "transpose" and a.ndim == 2 and a.attrs["axes"] == (1, 0):
        return ops.matmul_node(a.inputs[0], b, not ta, tb)
    if b.op == "transpose" and b.ndim == 2 and b.attrs["axes"] == (1, 0) and (not tb or b.inputs[0].ndim == 2):
        return ops.matmul_node(a, b.inputs[0], ta, not tb)
    return None


def _drop_trivial_reduce(node: Node) -> Node | None:
    """A sum over axes of size 1 is a reshape."""
    if node.op == "reduce" and not node.attrs["mean"] and all(node.inputs[0].shape[a] == 1 for a in node.attrs["axes"]):
        return ops.reshape(node.inputs[0], node.shape)
    return None


RULES: list[Rule] = [_fold_transpose_into_matmul, _drop_trivial_reduce]


def simplify(roots: list[Node], rules: list[Rule] | None = None) -> list[Node]:
    """Apply `rules` (by default RULES and the op families' ops.REWRITES) bottom-up until none
    fires; returns the rewritten roots."""
    rules = [*RULES, *ops.REWRITES] if rules is None else rules
    memo: dict[Node, Node] = {}

    def rebuild(node: Node) -> Node:
        if node in memo:
            return memo[node]
        new_inputs = tuple(memo[x] for x in node.inputs)
        current = node if new_inputs == node.inputs else _with_inputs(node, new_inputs)
        changed = True
        while changed:
            changed = False
            for rule in rules:
                replaced = rule(current)
                if replaced is not None and replaced is not current:
                    current, changed = rebuild_fresh(replaced), True
                    break
        memo[node] = current
        return current

    def rebuild_fresh(node: Node) -> Node:
        for x in topo_order([node]):
            if x not in memo:
                rebuild(x)
        return memo[node]

    for node in topo_order(roots):
        rebuild(node)
    return [memo[r] for r in roots]


def specialize(roots: list[Node], training: bool) -> list[Node]:
    """Resolve every mode_select to its training or its evaluation side."""
    def pick(node: Node) -> Node | None:
        if node.op == "mode_select":
            return node.inputs[0 if training else 1]
        return None
    return simplify(roots, [pick])


def _with_inputs(node: Node, inputs: tuple[Node, ...]) -> Node:
    return Node(node.op, inputs, node.attrs, node.shape, node.dtype)


# --- storage --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Storage:
    """Where a value lives: an input/output slot, a parameter/gradient offset, or the workspace."""

    kind: str  # "input", "param", "grad", "output", "ws", "state"
    index: int  # slot number, element offset, or workspace buffer number
    name: str = ""


@dataclass
class Buffer:
    """A workspace buffer: its element count as factors, dtype, and live kernel interval."""

    node: Node
    coef: int
    dims: tuple[str, ...]
    start: int
    end: int


@dataclass
class Schedule:
    order: list[Node]
    kernels: list[Kernel]
    storage: dict[Node, Storage]
    buffers: list[Buffer]


# --- fusion -----------------------------------------------------------------------------------

def _consumers(order: list[Node]) -> dict[Node, list[Node]]:
    users: dict[Node, dict[Node, None]] = defaultdict(dict)  # an ordered set: users in graph order
    for node in order:
        for x in node.inputs:
            users[x][node] = None
    return defaultdict(list, {x: list(us) for x, us in users.items()})


# A fused cluster is printed as one SymPy expression per output, which CSE, the C99 rewrites and
# the printer walk as a tree (every use of a member repeated in full) and recursively (a few
# frames per level): its tree size and depth are capped, and so is its number of nodes, so that
# a long chain or a value reused at every step (x + f(x) repeated: 2**n terms) makes several
# kernels instead of one formula that never finishes printing or overflows Python's stack.
FUSE_MAX_NODES = 128
FUSE_MAX_TREE = 2000
FUSE_MAX_DEPTH = 60


@dataclass(frozen=True)
class _FnShape:
    """Of a function's expression as a tree: its size, its depth, and for each argument how
    often it occurs and how deep (0 where it does not)."""

    size: int
    depth: int
    uses: tuple[int, ...]
    arg_depth: tuple[int, ...]


@functools.cache
def _fn_shape(fn: Fn) -> _FnShape:
    memo: dict[sp.Basic, _FnShape] = {}
    args = {a: i for i, a in enumerate(ARGS[:fn.nargs])}
    none = (0,) * fn.nargs
    for e in dag_postorder(fn.expr):  # each distinct subexpression once
        if e in args:
            one = tuple(int(i == args[e]) for i in range(fn.nargs))
            memo[e] = _FnShape(0, 0, one, none)
            continue
        parts = [memo[a] for a in e.args]
        memo[e] = _FnShape(
            min(1 + sum(p.size for p in parts), FUSE_MAX_TREE + 1),
            1 + max((p.depth for p in parts), default=0),
            tuple(map(sum, zip(none, *(p.uses for p in parts)))),
            tuple(max((p.arg_depth[i] + 1 for p in parts if p.uses[i]), default=0) for i in range(fn.nargs)))
    return memo[fn.expr]


def _fused_shape(members: list[Node], outputs: list[Node], member_set: set[Node]) -> tuple[int, int]:
    """The summed tree size of the outputs' fused expressions, and their largest depth (members
    in graph order)."""
    size: dict[Node, int] = {}
    depth: dict[Node, int] = {}
    for m in members:
        shape = _fn_shape(m.attrs["fn"])
        inner = [(x, n, d) for x, n, d in zip(m.inputs, shape.uses, shape.arg_depth) if x in member_set]
        size[m] = shape.size + sum(n * (size[x] - 1) for x, n, _ in inner) + sum(shape.uses)
        depth[m] = max([shape.depth] + [d + depth[x] for x, _, d in inner])
    return sum(size[o] for o in outputs), max(depth[o] for o in outputs)


def fuse_elementwise(order: list[Node], results: set[Node]) -> list[list[Node]]:
    """Group elementwise nodes of one shape into clusters computed by one loop.

    Growing from a consumer towards its producers, a producer joins when the cluster stays a
    node of an acyclic kernel graph: no path leaves the cluster and comes back.
    """
    index = {n: i for i, n in enumerate(order)}
    users = _consumers(order)
    reach = [0] * len(order)  # bit set of nodes reachable downstream of each node (itself included)
    for i in reversed(range(len(order))):
        bits = 1 << i
        for u in users[order[i]]:
            bits |= reach[index[u]]
        reach[i] = bits
    clustered: set[Node] = set()
    clusters: list[list[Node]] = []
    for root in reversed(order):
        if root.op != "ew" or root in clustered:
            continue
        members, mask = [root], 1 << index[root]
        outputs = [root]  # members whose value leaves the cluster (a member's users never join)
        leaves_reach = _outside_reach(root, users, index, reach, mask)
        frontier = list(root.inputs)
        while frontier and len(members) < FUSE_MAX_NODES:
            p = frontier.pop()
            if p.op != "ew" or p in clustered or p.shape != root.shape or (mask >> index[p]) & 1:
                continue
            if (leaves_reach >> index[p]) & 1:
                continue  # a path from the cluster through outside nodes reaches p
            outside = [u for u in users[p] if not (mask >> index[u]) & 1]
            if any(reach[index[u]] & mask for u in outside):
                continue  # p's value would leave the cluster and come back into it
            grown = sorted(members + [p], key=index.__getitem__)
            grown_outputs = outputs + [p] if outside or p in results else outputs
            size, depth = _fused_shape(grown, grown_outputs, set(grown))
            if size > FUSE_MAX_TREE or depth > FUSE_MAX_DEPTH:
                continue  # p stays an input: its own kernel computes it
            members, outputs = grown, grown_outputs
            mask |= 1 << index[p]
            for u in outside:
                leaves_reach |= reach[index[u]]
            frontier.extend(p.inputs)
        members.sort(key=index.__getitem__)
        clustered.update(members)
        clusters.append(members)
        # contract the cluster in `reach`: whatever reaches one member reaches all any member
        # reaches, so a later cluster cannot form a cycle with this one in the kernel graph
        # (nothing to do for one node: what reaches it reaches all it reaches; only nodes before
        # the root can reach a member)
        if len(members) > 1:
            closure = 0
            for m in members:
                closure |= reach[index[m]]
            for i in range(index[root]):
                if reach[i] & mask:
                    reach[i] |= closure
    return clusters


def _outside_reach(node: Node, users, index, reach, mask: int) -> int:
    bits = 0
    for u in users[node]:
        if not (mask >> index[u]) & 1:
            bits |= reach[index[u]]
    return bits


# --- the schedule ------------------------------------------------------------------------------

def schedule(results: list[tuple[Storage, Node]], leaf_storage: Callable[[Node], Storage]) -> Schedule:
    """Lower an entry point: kernels in order, storage of every value, workspace liveness."""
    roots = simplify([node for _, node in results])
    results = [(dest, node) for (dest, _), node in zip(results, roots)]
    order = topo_order(roots)
    result_nodes = {node for _, node in results}
    clusters = fuse_elementwise(order, result_nodes)
    users = _consumers(order)
    kernels: list[Kernel] = []
    cluster_of: dict[Node, int] = {}
    for members in clusters:
        member_set = set(members)
        inputs = _unique(x for m in members for x in m.inputs if x not in member_set)
        outputs = [m for m in members if m in result_nodes or any(u not in member_set for u in users[m])]
        for m in members:
            cluster_of[m] = len(kernels)
        kernels.append(Kernel("elementwise", members, inputs, outputs))
    for node in order:
        opdef = ops.OPS[node.op]
        if opdef.kernel in ("leaf", "view", "elementwise", "aux"):
            continue
        if opdef.kernel == "mode":
            raise AssertionError("mode_select must be specialized before scheduling")
        outputs = [node] + (opdef.aux(node) if opdef.aux else [])
        kernels.append(Kernel(opdef.kernel, outputs, list(node.inputs), outputs))
    kernels = _order_kernels(kernels, order)

    storage: dict[Node, Storage] = {}
    for node in order:
        if node.op in ("input", "param"):
            storage[node] = leaf_storage(node)
    copies: list[Kernel] = []
    produced = {out for k in kernels for out in k.outputs}
    for dest, node in results:
        root = view_root(node)
        if root in produced and root not in storage and dest.kind != "param":
            storage[root] = dest  # the producing kernel writes straight into the result slot
        else:
            copies.append(Kernel("copy", [node], [node], [node], {"dest": dest}))
    kernels += copies

    buffers = _workspace(kernels, storage, produced)
    for b, buf in enumerate(buffers):
        storage[buf.node] = Storage("ws", b)
    return Schedule(order, kernels, storage, buffers)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def view_root(node: Node) -> Node:
    """The node whose buffer `node` reads: views (reshapes and the like) share their input's
    storage, so kernels and the module's pointers refer to the root."""
    while ops.OPS[node.op].kernel == "view":
        node = node.inputs[0]
    return node


def _order_kernels(kernels: list[Kernel], order: list[Node]) -> list[Kernel]:
    """Topological order of the kernels, ties broken by graph order (deterministic)."""
    index = {n: i for i, n in enumerate(order)}
    producer = {out: k for k, kern in enumerate(kernels) for out in kern.nodes}
    deps = [{producer[view_root(x)] for x in kern.inputs if view_root(x) in producer} - {k}
            for k, kern in enumerate(kernels)]
    dependents: list[list[int]] = [[] for _ in kernels]
    for k, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(k)
    waiting = [len(ds) for ds in deps]
    rank = [max(index[n] for n in kern.nodes if n in index) for kern in kernels]
    ready = [(rank[k], k) for k in range(len(kernels)) if not waiting[k]]
    heapq.heapify(ready)
    done: list[int] = []
    while ready:
        _, k = heapq.heappop(ready)
        done.append(k)
        for u in dependents[k]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, (rank[u], u))
    if len(done) != len(kernels):
        raise AssertionError("the kernel graph has a cycle")
    return [kernels[k] for k in done]


def _workspace(kernels: list[Kernel], storage: dict[Node, Storage], produced: set[Node]) -> list[Buffer]:
    """Workspace buffers of the values no result slot holds, with their live kernel interval."""
    start: dict[Node, int] = {}
    end: dict[Node, int] = {}
    for k, kern in enumerate(kernels):
        for out in kern.outputs:
            if out not in storage and kern.kind != "copy":
                start.setdefault(out, k)
                end[out] = max(end.get(out, k), k)
        for x in kern.inputs:
            root = view_root(x)
            if root in start:
                end[root] = max(end[root], k)
    buffers = []
    for node, s in start.items():
        if node.dtype != FLOAT:
            raise AssertionError(f"integer intermediate {node}")
        coef, dims = size_factors(node.shape)
        buffers.append(Buffer(node, coef, dims, s, end[node]))
    return buffers
