"""The ops: for each, its shape rule (the function that makes the node), its vector-Jacobian
rule (in graph ops, so the backward graph is a graph like any other), its NumPy reference, and
the kernel kind that lowers it (templates/<kind>.c.j2).

Elementwise ops are all one op, "ew", carrying a SymPy `Fn`; their VJP multiplies the incoming
gradient by each partial derivative SymPy derived, so none is written by hand.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy as sp

from ..errors import CompileError, ShapeError
from ..ir.graph import (
    FLOAT,
    Dim,
    Node,
    Shape,
    broadcast_shapes,
    canonical_dim,
    dim_size,
    product_dim,
    shape_str,
    size_factors,
)
from ..ir.kernel import Kernel
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS, OUT, Fn
from .display import ATOM, MUL, POW, UNARY, Display, Notation, Shown, called, leaf

VJP = Callable[[Node, Node], Sequence["Node | None"]]
Ref = Callable[[Node, list[np.ndarray], dict[str, int]], np.ndarray]


@dataclass(frozen=True)
class OpDef:
    """How one op differentiates, evaluates in NumPy, and lowers (its kernel template)."""

    vjp: VJP | None
    ref: Ref
    kernel: str
    # extra results the same kernel writes (multi-output ops), as nodes of kernel kind "aux"
    aux: Callable[[Node], list[Node]] | None = None
    # how the op is written in formulas (`bpcompile show`, kernel comments): see ops.display
    display: Display | None = None
    # for a fused backward node with no VJP of its own: the same value in ops with VJP rules, in
    # terms of the node's inputs; autodiff differentiates that instead, so gradients of gradients
    # go through the op
    expand: Callable[[Node], Node] | None = None


OPS: dict[str, OpDef] = {}


def register(name: str, *, vjp: VJP | None, ref: Ref, kernel: str,
             aux: Callable[[Node], list[Node]] | None = None, display: Display | None = None,
             expand: Callable[[Node], Node] | None = None) -> None:
    """Declare an op: its VJP (None for leaves), NumPy reference, kernel kind, the extra results
    its kernel writes, its display rule (tests/test_op_coverage.py requires one per op), and, for
    a fused backward node, its expansion into differentiable ops (see OpDef.expand)."""
    OPS[name] = OpDef(vjp=vjp, ref=ref, kernel=kernel, aux=aux, display=display, expand=expand)


# Lowering: each kernel kind's builder, which returns the context of templates/<kind>.c.j2. The op
# families register theirs next to their ops; codegen reads this table and never the other way
# round, so building graphs loads neither codegen nor Jinja2.
Builder = Callable[[Kernel, Any], dict[str, Any]]  # (kernel, codegen.Context) -> template context
BUILDERS: dict[str, Builder] = {}
FAILING_KINDS: set[str] = set()  # kinds whose C function validates data and may return an error code
TEMPLATES: dict[str, str] = {}  # kernel kind -> its template file, where it is not <kind>.c.j2


def register_kernel(kind: str, builder: Builder, failing: bool = False, template: str | None = None) -> None:
    """Add a kernel kind: `builder` returns the context of its template (templates/<kind>.c.j2, or
    `template` when kinds share one: the LSTM, GRU and RNN forward kernels), whose function
    takes (dims, inputs..., outputs...) and returns int (non-zero: bad data) when `failing`.
    Templates open their function with `{{ signature }}` (kernel_signature). A context with
    `split` = {"what": ..., "work": C expression} runs on the thread pool: the signature is then
    `<name>_part(dims, part, parts, ...)`, the template renders the function over that piece's
    share of the work, and templates/parallel.c.j2 wraps it under the kernel's name. The builder
    gets a `codegen.Context` (the model's dims, dtype and formula printer) as its second argument."""
    BUILDERS[kind] = builder
    if template is not None:
        TEMPLATES[kind] = template
    if failing:
        FAILING_KINDS.add(kind)


Rule = Callable[[Node], "Node | None"]
REWRITES: list[Rule] = []  # peephole rules of op families, applied by passes.simplify with its own


def register_rewrite(rule: Rule) -> None:
    """Add a rewrite rule (a node -> its replacement, or None) for the simplify pass."""
    REWRITES.append(rule)


def _no_grad(op: str) -> VJP:
    def rule(node: Node, g: Node):
        raise CompileError(f"{op} (from {node}) has no second-derivative rule: it is itself a derivative; "
                           "differentiate the graph that produced it once only")
    return rule


def _need_float(x: Node, what: str) -> None:
    if x.dtype != FLOAT:
        raise ShapeError(f"{what} needs a float tensor, got {x.dtype} tensor of shape {shape_str(x.shape)}")


def _check_tensor(x: Any, what: str) -> Node:
    if not isinstance(x, Node):
        raise TypeError(f"{what} expects a graph tensor, got {type(x).__name__}")
    return x


# --- leaves ------------------------------------------------------------------------------

register("input", vjp=None, ref=lambda node, args, dims: None, kernel="leaf", display=leaf)
register("param", vjp=None, ref=lambda node, args, dims: None, kernel="leaf", display=leaf)


# --- elementwise ---------------------------------------------------------------------------

Operand = Node | numbers.Real


def _constant(value: numbers.Real) -> sp.Expr:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a tensor or a real number, got {value!r}")
    value = float(value) if not isinstance(value, numbers.Integral) else int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"constant {value} is not finite")
    if isinstance(value, float) and value.is_integer() and math.fabs(value) < 2**53:
        value = int(value)  # 1.0 * x folds to x
    return sp.Integer(value) if isinstance(value, int) else sp.Float(value)


def ew(fn: Fn, *operands: Operand, shape: Shape | None = None) -> Node:
    """Apply an elementwise function; numbers and constants fold into its expression.

    The output has the broadcast shape of the tensor operands (or `shape`, which they must
    broadcast to). Repeated operands are merged and unused ones dropped.
    """
    if len(operands) != fn.nargs:
        raise TypeError(f"{fn.name} takes {fn.nargs} arguments, got {len(operands)}")
    nodes: list[Node] = []
    subs: dict[sp.Symbol, sp.Expr] = {}
    shapes, names = [], []
    for i, value in enumerate(operands):
        if isinstance(value, Node):
            shapes.append(value.shape)
            names.append(f"argument {i + 1}")
            if value.op == "ew" and not value.inputs:  # a constant: fold it in
                subs[ARGS[i]] = value.attrs["fn"].expr
            elif value in nodes:
                subs[ARGS[i]] = ARGS[nodes.index(value)]
            else:
                subs[ARGS[i]] = ARGS[len(nodes)]
                nodes.append(value)
        else:
            subs[ARGS[i]] = _constant(value)
    try:
        out_shape = broadcast_shapes(shapes, names)
    except ShapeError as e:
        raise ShapeError(f"{fn.name}: {e}") from None
    if shape is not None:
        if broadcast_shapes([out_shape, shape], ["operands", "target"]) != tuple(shape):
            raise ShapeError(f"{fn.name}: operands of shape {shape_str(out_shape)} do not broadcast "
                             f"to {shape_str(shape)}")
        out_shape = tuple(shape)
    expr = fn.expr.xreplace(subs)
    infinite = expr.has(sp.oo, -sp.oo) and not fn.expr.has(sp.oo, -sp.oo)  # only a where() may hold ±inf
    if expr.has(sp.zoo, sp.nan) or infinite:
        raise ValueError(f"{fn.name}: the constants given make it undefined ({expr})")
    used = [i for i, _ in enumerate(nodes) if expr.has(ARGS[i])]
    if len(used) != len(nodes):
        expr = expr.xreplace({ARGS[old]: ARGS[new] for new, old in enumerate(used)})
        nodes = [nodes[i] for i in used]
    if expr != fn.expr or len(nodes) != fn.nargs:
        fn = Fn(fn.name, expr, len(nodes))
    if len(nodes) == 1 and expr == ARGS[0] and nodes[0].shape == out_shape:
        return nodes[0]
    return Node("ew", nodes, {"fn": fn}, out_shape, FLOAT)


def const(value: float, shape: Shape = ()) -> Node:
    """A tensor filled with one number."""
    return Node("ew", (), {"fn": Fn("const", _constant(value), 0)}, tuple(shape), FLOAT)


def _ew_vjp(node: Node, g: Node) -> list[Node | None]:
    fn: Fn = node.attrs["fn"]
    n = len(node.inputs)
    shift = {ARGS[k]: ARGS[k + 1] for k in range(n)}
    shift[OUT] = ARGS[n + 1]
    grads: list[Node | None] = []
    for i, x in enumerate(node.inputs):
        if x.dtype != FLOAT:
            grads.append(None)
            continue
        partial = fn.partial(i)
        if partial.expr == 0:
            grads.append(None)
            continue
        expr = ARGS[0] * partial.expr.xreplace(shift)
        grad_fn = Fn(f"d{fn.name}/d{fn.display[i] if i < len(fn.display) else i}", expr, n + 2)
        grads.append(unbroadcast(ew(grad_fn, g, *node.inputs, node, shape=node.shape), x.shape))
    return grads


def _lambdify(fn: Fn) -> Callable:
    cached = _LAMBDIFIED.get(fn)
    if cached is None:
        dims = sorted((s for s in fn.expr.free_symbols if ew_mod.is_dim_symbol(s)), key=str)
        modules = [{"Heaviside": lambda x, *_: np.where(np.asarray(x) > 0, 1.0, 0.0),
                    "erf": np.vectorize(math.erf, otypes=[float])}, "numpy"]
        f = sp.lambdify(list(ARGS[:fn.nargs]) + dims, fn.expr, modules=modules)
        cached = (f, [ew_mod.dim_name(s) for s in dims])
        _LAMBDIFIED[fn] = cached
    return cached


_LAMBDIFIED: dict[Fn, tuple] = {}


def _ew_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    f, dim_names = _lambdify(node.attrs["fn"])
    with np.errstate(all="ignore"):
        value = f(*[np.asarray(a, dtype=np.float64) for a in args], *[dims[d] for d in dim_names])
    return np.broadcast_to(np.asarray(value, dtype=np.float64), concrete(node.shape, dims)).copy()


register("ew", vjp=_ew_vjp, ref=_ew_ref, kernel="elementwise",
         display=lambda node, args, n: n.formula(node, args))  # SymPy's formula, printed by the notation


def concrete(shape: Shape, dims: dict[str, int]) -> tuple[int, ...]:
    """A shape with its named (and product) dims replaced by their runtime sizes."""
    return tuple(dim_size(d, dims) for d in shape)


def unbroadcast(g: Node, shape: Shape) -> Node:
    """Sum a gradient back to the shape of the operand that was broadcast to `g.shape`."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    return reshape(reduce_(g, axes, keepdims=True, mean=False), shape)


def _binary(name: str) -> Callable[[Operand, Operand], Node]:
    fn = ew_mod.builtin(name)

    def op(a: Operand, b: Operand) -> Node:
        return ew(fn, a, b)
    op.__name__ = name
    op.__doc__ = f"Elementwise {name} with NumPy broadcasting."
    return op


def _unary(name: str) -> Callable[[Node], Node]:
    fn = ew_mod.builtin(name)

    def op(x: Node) -> Node:
        _check_tensor(x, name)
        return ew(fn, x)
    op.__name__ = name
    op.__doc__ = f"Elementwise {name}; its derivative is derived by SymPy."
    return op


add, sub, mul, div, power = (_binary(n) for n in ("add", "sub", "mul", "div", "pow"))
neg, relu, sigmoid, tanh, softplus, gelu, silu, exp, log, sqrt, square, abs = (
    _unary(n) for n in ("neg", "relu", "sigmoid", "tanh", "softplus", "gelu", "silu", "exp", "log", "sqrt",
                        "square", "abs"))


def leaky_relu(x: Node, negative_slope: float = 0.01) -> Node:
    """x if x > 0 else negative_slope * x."""
    return ew(ew_mod.leaky_relu_fn(negative_slope), _check_tensor(x, "leaky_relu"))


def elu(x: Node, alpha: float = 1.0) -> Node:
    """x if x > 0 else alpha * (exp(x) - 1)."""
    return ew(ew_mod.elu_fn(alpha), _check_tensor(x, "elu"))


def elementwise(name: str, expr: Any, *symbols: sp.Symbol) -> Callable[..., Node]:
    """Make an elementwise op from a SymPy expression of `symbols`; SymPy derives its gradient."""
    if len(symbols) == 1 and isinstance(symbols[0], tuple | list):
        symbols = tuple(symbols[0])
    if not isinstance(name, str) or not name:
        raise ValueError("an elementwise function needs a non-empty name")
    fn = ew_mod.make_fn(name, expr, tuple(symbols))

    def op(*operands: Operand) -> Node:
        return ew(fn, *operands)
    op.__name__ = name
    op.fn = fn
    op.__doc__ = f"{name}({', '.join(fn.display)}) = {fn.pretty()}"
    return op


# --- reductions and broadcasts ------------------------------------------------------------

def _norm_axes(axis: Any, ndim: int, what: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ShapeError(f"{what}: axis {a} is out of range for a tensor of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"{what}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def reduce_(x: Node, axes: tuple[int, ...], keepdims: bool, mean: bool) -> Node:
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if not axes:
        return x
    return Node("reduce", (x,), {"axes": axes, "keepdims": keepdims, "mean": mean}, shape, FLOAT)


def sum(x: Node, axis: Any = None, keepdims: bool = False) -> Node:  # noqa: A001 - NumPy's name
    """Sum over `axis` (all axes when None), as numpy.sum."""
    _need_float(_check_tensor(x, "sum"), "sum")
    return reduce_(x, _norm_axes(axis, x.ndim, "sum"), keepdims, mean=False)


def mean(x: Node, axis: Any = None, keepdims: bool = False) -> Node:
    """Mean over `axis` (all axes when None), as numpy.mean."""
    _need_float(_check_tensor(x, "mean"), "mean")
    return reduce_(x, _norm_axes(axis, x.ndim, "mean"), keepdims, mean=True)


def reduced_count(shape: Shape, axes: tuple[int, ...]) -> sp.Expr:
    """The number of elements a reduction over `axes` adds up, as a SymPy expression."""
    coef, names = size_factors(shape[a] for a in axes)
    return sp.Integer(coef) * sp.Mul(*[ew_mod.dim_symbol(n) for n in names])


def _reduce_vjp(node: Node, g: Node) -> list[Node]:
    x = node.inputs[0]
    axes = node.attrs["axes"]
    if not node.attrs["keepdims"]:
        g = reshape(g, tuple(1 if i in axes else d for i, d in enumerate(x.shape)))
    expr = ARGS[0] / reduced_count(x.shape, axes) if node.attrs["mean"] else ARGS[0]
    return [ew(Fn("broadcast", expr, 1), g, shape=x.shape)]


def _reduce_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    f = np.mean if node.attrs["mean"] else np.sum
    return f(args[0], axis=node.attrs["axes"], keepdims=node.attrs["keepdims"])


def _reduce_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """Σ_batch x, mean x: the reduced axes as subscripts, none when every axis is reduced."""
    x, axes = node.inputs[0], node.attrs["axes"]
    labels = [] if len(axes) == x.ndim else n.axes(x, axes)
    return n.reduction("mean" if node.attrs["mean"] else "Σ", labels, n.at_least(args[0], POW)), UNARY


register("reduce", vjp=_reduce_vjp, ref=_reduce_ref, kernel="reduce", display=_reduce_display)


# --- views and layout -----------------------------------------------------------------------

def reshape(x: Node, shape: Any) -> Node:
    """Same elements, new shape (a view: no copy). One dim may be -1. Named dims merge into
    product dims and split back, as in NumPy: ("batch", 8, 16) -> (-1, 16) gives ("8*batch", 16),
    which reshapes back to ("batch", 8, 16) (or to (-1, 8, 16), inferring "batch")."""
    _check_tensor(x, "reshape")
    target = tuple(shape) if isinstance(shape, tuple | list) else (shape,)
    shape = _reshape_target(x.shape, target)
    if shape == x.shape:
        return x
    if x.op == "reshape":
        return reshape(x.inputs[0], shape)
    return Node("reshape", (x,), {"shape": shape}, shape, x.dtype)


def _reshape_target(source: Shape, target: tuple) -> Shape:
    """The checked target shape of a reshape, its dims canonical and its -1 inferred."""
    what = f"reshape: cannot reshape {shape_str(source)} to {shape_str(target)}"
    dims = [_target_dim(d, what) for d in target]
    if dims.count(-1) > 1:
        raise ShapeError(f"{what}: only one dimension can be -1 (inferred), the target has {dims.count(-1)}")
    coef, names = size_factors(source)
    if -1 in dims:
        dims[dims.index(-1)] = _inferred_dim(coef, names, [d for d in dims if d != -1], what)
    new_coef, new_names = size_factors(dims)
    if (new_coef, new_names) != (coef, names):
        raise ShapeError(f"{what}: element counts differ ({product_dim(coef, names)} vs "
                         f"{product_dim(new_coef, new_names)})")
    return tuple(dims)


def _target_dim(d: Any, what: str) -> Dim:
    """One dim of a reshape target: a size >= 1, -1, or a name or product of names (made canonical)."""
    if isinstance(d, str) and d:
        return canonical_dim(d)
    if isinstance(d, int | np.integer) and not isinstance(d, bool) and (d >= 1 or d == -1):
        return int(d)
    raise ShapeError(f"{what}: invalid dimension {d!r} (a size >= 1, a dim name, or -1)")


def _inferred_dim(coef: int, names: tuple[str, ...], known: list, what: str) -> Dim:
    """The dim a -1 stands for: the element count left once the known dims are taken out."""
    kcoef, knames = size_factors(known)
    if Counter(knames) - Counter(names) or coef % kcoef:
        raise ShapeError(f"{what}: cannot infer -1, the other dims ({product_dim(kcoef, knames)}) do not divide "
                         f"the element count {product_dim(coef, names)}")
    return product_dim(coef // kcoef, (Counter(names) - Counter(knames)).elements())


def only_unit_dims_differ(a: Shape, b: Shape) -> bool:
    """Whether two shapes differ only by size-1 dims (a reshape between them adds or drops them)."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _reshape_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """reshape(x, (shape)); one that only adds or drops size-1 dims is written as x itself."""
    if only_unit_dims_differ(node.inputs[0].shape, node.shape):
        return args[0]
    return n.call("reshape", args[0][0], "(" + ", ".join(str(d) for d in node.shape) + ")"), ATOM


register("reshape", vjp=lambda node, g: [reshape(g, node.inputs[0].shape)],
         ref=lambda node, args, dims: args[0].reshape(concrete(node.shape, dims)), kernel="view",
         display=_reshape_display)


def flatten(x: Node) -> Node:
    """Keep the batch (first) dim, flatten the rest: (N, ...) -> (N, prod(...)); runtime dims
    among the rest make a product dim (("batch", "T", 8) -> ("batch", "8*T"))."""
    _check_tensor(x, "flatten")
    if x.ndim < 2:
        return x
    return reshape(x, (x.shape[0], product_dim(*size_factors(x.shape[1:]))))


def transpose(x: Node, axes: Any = None) -> Node:
    """Permute axes (reverse them when None), as numpy.transpose."""
    _check_tensor(x, "transpose")
    perm = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % max(x.ndim, 1) for a in axes)
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {axes!r} are not a permutation of {x.ndim} axes")
    if perm == tuple(range(x.ndim)):
        return x
    if x.op == "transpose":
        inner = x.attrs["axes"]
        return transpose(x.inputs[0], tuple(inner[p] for p in perm))
    return Node("transpose", (x,), {"axes": perm}, tuple(x.shape[p] for p in perm), x.dtype)


def _transpose_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """xᵀ for a matrix, transpose(x, axes) otherwise."""
    if node.attrs["axes"] == (1, 0):
        return n.at_least(args[0], ATOM) + n.TOP, POW
    return n.call("transpose", args[0][0], str(node.attrs["axes"])), ATOM


register("transpose", vjp=lambda node, g: [transpose(g, tuple(np.argsort(node.attrs["axes"])))],
         ref=lambda node, args, dims: np.transpose(args[0], node.attrs["axes"]), kernel="transpose",
         display=_transpose_display)


# --- matrix products ------------------------------------------------------------------------

def matmul_node(a: Node, b: Node, ta: bool, tb: bool) -> Node:
    """C = op(A) op(B), each operand viewed as a matrix (leading dims merged into rows)."""
    if tb and b.ndim != 2:
        raise ShapeError(f"matmul: a transposed right operand must be 2-D, got {shape_str(b.shape)}")
    rows = (a.shape[-1],) if ta else a.shape[:-1]
    inner_a = a.shape[:-1] if ta else (a.shape[-1],)
    inner_b = (b.shape[-1],) if tb else b.shape[:-1]
    cols = (b.shape[0],) if tb else (b.shape[-1],)
    if size_factors(inner_a) != size_factors(inner_b):
        raise ShapeError(f"matmul: shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not align "
                         f"(contracted dims {shape_str(inner_a)} vs {shape_str(inner_b)})")
    return Node("matmul", (a, b), {"ta": ta, "tb": tb}, rows + cols, FLOAT)



def matmul(a: Node, b: Node) -> Node:
    """Matrix product as NumPy's `@`: (..., m, k) @ (k, n) -> (..., m, n); 1-D operands allowed."""
    _check_tensor(a, "matmul")
    _check_tensor(b, "matmul")
    for x in (a, b):
        if x.dtype != FLOAT:
            raise ShapeError(f"matmul: operands must be float, got {shape_str(a.shape)} {a.dtype} @ "
                             f"{shape_str(b.shape)} {b.dtype}")
        if x.ndim == 0:
            raise ShapeError(f"matmul: operands must not be scalars, got {shape_str(a.shape)} @ {shape_str(b.shape)}")
    if b.ndim > 2:  # batched: NumPy's broadcasting of the leading dims
        from .batched import batched_matmul
        return batched_matmul(a, b)
    if a.shape[-1] != b.shape[0]:
        raise ShapeError(f"matmul: shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not align: "
                         f"{a.shape[-1]!r} (dim {a.ndim - 1}) != {b.shape[0]!r} (dim 0)")
    if b.ndim == 1:
        return reshape(matmul_node(a, reshape(b, (b.shape[0], 1)), False, False), a.shape[:-1])
    return matmul_node(a, b, False, False)


def _matmul_vjp(node: Node, g: Node) -> list[Node]:
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    da = matmul_node(b, g, tb, True) if ta else matmul_node(g, b, False, not tb)
    db = matmul_node(g, a, True, ta) if tb else matmul_node(a, g, not ta, False)
    return [da, db]


def _as_matrix(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _matmul_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    a, b = (_as_matrix(v) for v in args)
    a = a.T if node.attrs["ta"] else a
    b = b.T if node.attrs["tb"] else b
    return (a @ b).reshape(concrete(node.shape, dims))


def matmul_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """a · bᵀ: the transpose flags as ᵀ (of the last two axes, for a batched product)."""
    return n.product(n.side(args[0], node.attrs["ta"]), n.side(args[1], node.attrs["tb"])), MUL


register("matmul", vjp=_matmul_vjp, ref=_matmul_ref, kernel="gemm", display=matmul_display)


# --- softmax family ------------------------------------------------------------------------

def softmax(x: Node) -> Node:
    """exp(x) / sum(exp(x)) along the last axis, computed stably (max subtracted)."""
    _need_float(_check_tensor(x, "softmax"), "softmax")
    if x.ndim == 0:
        raise ShapeError("softmax needs at least one axis, got a scalar")
    return Node("softmax", (x,), {}, x.shape, FLOAT)


def log_softmax(x: Node) -> Node:
    """x - logsumexp(x) along the last axis, computed stably."""
    _need_float(_check_tensor(x, "log_softmax"), "log_softmax")
    if x.ndim == 0:
        raise ShapeError("log_softmax needs at least one axis, got a scalar")
    return Node("log_softmax", (x,), {}, x.shape, FLOAT)


def _softmax_ref(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax_ref(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


register("softmax", vjp=lambda node, g: [node * (g - sum(g * node, axis=-1, keepdims=True))],
         ref=lambda node, args, dims: _softmax_ref(args[0]), kernel="softmax", display=called())
register("log_softmax", vjp=lambda node, g: [g - exp(node) * sum(g, axis=-1, keepdims=True)],
         ref=lambda node, args, dims: _log_softmax_ref(args[0]), kernel="softmax", display=called())


# --- training / evaluation mode ----------------------------------------------------------

def mode_select(train: Node, evaluate: Node) -> Node:
    """`train` in training calls (loss, loss_and_grad, train_step), `evaluate` in forward.

    The compiler picks one side per entry point before scheduling (passes.specialize);
    gradients flow into the training side only.
    """
    if train.shape != evaluate.shape or train.dtype != evaluate.dtype:
        raise ShapeError(f"mode_select: training value {shape_str(train.shape)} and evaluation value "
                         f"{shape_str(evaluate.shape)} must have the same shape")
    return Node("mode_select", (train, evaluate), {}, train.shape, train.dtype)


register("mode_select", vjp=lambda node, g: [g, None],
         ref=lambda node, args, dims: args[0 if dims.get("__training__", 1) else 1], kernel="mode",
         display=lambda node, args, n: (n.call("training_or_eval", *(a for a, _ in args)), ATOM))


# --- random numbers ------------------------------------------------------------------------

_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: splitmix64's increment


def random_uniform(shape: Shape, salt: int) -> Node:
    """Uniform [0, 1) numbers from a counter-based generator keyed by (model seed, step, salt,
    element index): the same call of the same model always draws the same numbers."""
    return Node("random_uniform", (), {"salt": int(salt) & 0xFFFFFFFF}, tuple(shape), FLOAT)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (NumPy's uint64 arithmetic wraps as C's does)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform_stream(seed: int, counter: int, salt: int, count: int) -> np.ndarray:
    """Elements 0 .. count-1 of random stream `salt` at step `counter` of the model seeded `seed`:
    bp_random_uniform (templates/bp_runtime.h, which the dropout kernels call) in NumPy. The C is
    the implementation; this is the reference evaluator's own, kept independent of it on purpose
    (as every op's NumPy reference is), so the tests check the kernels' numbers against it."""
    key = np.uint64(((seed * GOLDEN + salt * 0xBF58476D1CE4E5B9) ^ (counter * 0xD1B54A32D192ED03)) & _MASK)
    with np.errstate(over="ignore"):
        x = key + (np.arange(count, dtype=np.uint64) + np.uint64(1)) * np.uint64(GOLDEN)
    return (mix64(mix64(x)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _random_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    shape = concrete(node.shape, dims)
    count = int(np.prod(shape, dtype=np.int64))
    stream = uniform_stream(dims.get("__seed__", 0), dims.get("__counter__", 0), node.attrs["salt"], count)
    return stream.reshape(shape)


register("random_uniform", vjp=lambda node, g: [], ref=_random_ref, kernel="random",
         display=lambda node, args, n: (n.call("uniform", "(" + ", ".join(str(d) for d in node.shape) + ")"), ATOM))
