"""The symbolic layer on its own: derivatives of the built-in elementwise functions as SymPy
derives them (rewritten in the output y where cheaper), user functions, and how elementwise
nodes fold constants, merge operands and intern."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import sympy as sp

import bpcompile as bp
from bpcompile.symbolic import functions as symbolic
from bpcompile.symbolic.functions import ARGS, OUT

a0, a1 = ARGS[0], ARGS[1]
y = OUT

# points where every built-in is defined and smooth (away from the kinks at 0)
DOMAIN = {
    "log": (0.1, 4.0), "sqrt": (0.1, 4.0), "pow": (0.2, 3.0),
}
RNG_POINTS = 12


def _points(name: str, nargs: int, seed: int) -> list[tuple[float, ...]]:
    rng = np.random.default_rng(seed)
    lo, hi = DOMAIN.get(name, (-3.0, 3.0))
    pts = []
    while len(pts) < RNG_POINTS:
        p = tuple(float(v) for v in rng.uniform(lo, hi, size=nargs))
        if name == "div" and abs(p[1]) < 0.2:
            continue
        if any(abs(v) < 0.05 for v in p):  # relu, abs, softplus, bce have kinks / Heaviside(0)
            continue
        pts.append(p)
    return pts


def _value(expr: sp.Expr, subs: dict) -> float:
    v = sp.N(expr.subs(subs), 30)
    assert v.is_real is not False, (expr, subs, v)
    return float(v)


def _check_in_output(name: str, expected: sp.Expr):
    p = symbolic.builtin(name).partial(0)
    assert p.uses_output, f"{name}' is not written in the output y: {p.expr}"
    assert p.expr.free_symbols == {OUT}, p.expr
    assert sp.simplify(p.expr - expected) == 0, p.expr
    return p


def test_sigmoid_derivative_in_output():
    p = _check_in_output("sigmoid", y - y**2)
    assert sp.simplify(p.raw - sp.diff(1 / (1 + sp.exp(-a0)), a0)) == 0


def test_tanh_derivative_in_output():
    _check_in_output("tanh", 1 - y**2)


def test_exp_derivative_is_output():
    p = _check_in_output("exp", y)
    assert p.expr == y


def test_sqrt_derivative_in_output():
    _check_in_output("sqrt", 1 / (2 * y))


def test_sqrt_derivative_value():
    p = symbolic.builtin("sqrt").partial(0)
    for x in (0.25, 1.0, 2.5):
        subs = {a0: x, OUT: math.sqrt(x)}
        assert _value(p.expr, subs) == pytest.approx(0.5 / math.sqrt(x), rel=1e-14)


def test_relu_derivative_is_heaviside():
    p = symbolic.builtin("relu").partial(0)
    assert not p.uses_output
    assert p.expr.has(sp.Heaviside)
    assert sp.simplify(p.expr - sp.Heaviside(a0)) == 0
    for x in (-2.0, -0.01, 0.01, 3.0):
        assert _value(p.expr, {a0: x}) == (1.0 if x > 0 else 0.0)


def test_softplus_derivative_is_sigmoid():
    p = symbolic.builtin("softplus").partial(0)
    for x in (-30.0, -4.0, -0.7, 0.3, 1.9, 8.0, 30.0):
        assert _value(p.expr, {a0: x}) == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-13, abs=1e-300)


def test_gelu_derivative_matches_finite_differences():
    fn = symbolic.builtin("gelu")
    p = fn.partial(0)

    def gelu(x: float) -> float:
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    h = 1e-5
    for x in (-3.1, -1.0, -0.2, 0.05, 0.8, 2.4):
        fd = (gelu(x + h) - gelu(x - h)) / (2 * h)
        assert _value(p.expr, {a0: x, OUT: gelu(x)}) == pytest.approx(fd, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("name", sorted(symbolic.BUILTIN))
def test_every_builtin_partial_equals_sympy_diff(name):
    fn = symbolic.builtin(name)
    assert fn.nargs == symbolic.BUILTIN[name][1]
    for i in range(fn.nargs):
        p = fn.partial(i)
        assert p.raw == sp.diff(fn.expr, ARGS[i]), "raw is not what sympy.diff gives"
        assert p.uses_output == p.expr.has(OUT)
        if fn.nargs > 1:
            assert not p.uses_output
        for pt in _points(name, fn.nargs, seed=zlib.crc32(name.encode()) + i):
            subs = dict(zip(ARGS, pt))
            subs[OUT] = _value(fn.expr, subs)
            want = _value(p.raw, subs)
            assert _value(p.expr, subs) == pytest.approx(want, rel=1e-12, abs=1e-14), (name, i, pt)


@pytest.mark.parametrize("fn", [symbolic.leaky_relu_fn(0.2), symbolic.elu_fn(0.5)], ids=["leaky_relu", "elu"])
def test_piecewise_builtin_partials(fn):
    p = fn.partial(0)
    h = 1e-6
    f = sp.lambdify(a0, fn.expr, "math")
    for x in (-2.0, -0.3, 0.4, 1.7):
        fd = (f(x + h) - f(x - h)) / (2 * h)
        assert _value(p.expr, {a0: x, OUT: f(x)}) == pytest.approx(fd, rel=1e-7)


def test_partial_index_out_of_range():
    with pytest.raises(IndexError):
        symbolic.builtin("tanh").partial(1)


# --- user functions ---------------------------------------------------------------------------


def test_user_function_with_two_arguments_gets_both_partials():
    z, w = sp.symbols("z w")
    op = bp.elementwise("swish_w", z * sp.exp(-w**2) + sp.sin(z * w), z, w)
    fn = op.fn
    assert fn.nargs == 2 and fn.display == ("z", "w")
    dz, dw = fn.partial(0), fn.partial(1)
    assert sp.simplify(dz.expr - (sp.exp(-a1**2) + a1 * sp.cos(a0 * a1))) == 0
    assert sp.simplify(dw.expr - (-2 * a0 * a1 * sp.exp(-a1**2) + a0 * sp.cos(a0 * a1))) == 0
    assert not dz.uses_output and not dw.uses_output
    # in a graph, both operands receive a gradient
    g = bp.Graph("sym_user2")
    x = g.input("x", ("batch", 3))
    b = g.param("b", (3,))
    c = g.param("c", (3,))
    g.loss(bp.sum(op(x * c, b)))
    grads = bp.grad(g.losses["loss"].node, [b, c])
    assert all(gr is not None and gr.shape == (3,) for gr in grads)
    rng = np.random.default_rng(0)
    X, B, C = rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=3)
    gb, gc = bp.reference.evaluate(grads, {"x": X}, {"b": B, "c": C})
    u = X * C
    np.testing.assert_allclose(gb, np.sum(-2 * u * B * np.exp(-B**2) + u * np.cos(u * B), axis=0), rtol=1e-12)
    np.testing.assert_allclose(gc, np.sum((np.exp(-B**2) + B * np.cos(u * B)) * X, axis=0), rtol=1e-12)


def test_user_function_assumptions_do_not_matter():
    t = sp.Symbol("t", positive=True)
    op = bp.elementwise("sym_pos_log", sp.log(t) * t, t)
    assert op.fn.expr == sp.log(a0) * a0
    assert sp.simplify(op.fn.partial(0).expr - (sp.log(a0) + 1)) == 0


@pytest.mark.parametrize("bad", [
    pytest.param(lambda z, w: (z * w, (z,)), id="free-symbol"),
    pytest.param(lambda z, w: (sp.I * z, (z,)), id="complex"),
    pytest.param(lambda z, w: (sp.sqrt(-1) * z + 1, (z,)), id="complex-sqrt"),
    pytest.param(lambda z, w: (z + w, (z, z)), id="repeated-symbol"),
    pytest.param(lambda z, w: (z * 2, (z * 2,)), id="argument-not-a-symbol"),
    pytest.param(lambda z, w: (sp.Eq(z, 1), (z,)), id="not-an-expression"),
    pytest.param(lambda z, w: (z / 0, (z,)), id="zoo"),
])
def test_invalid_user_functions(bad):
    z, w = sp.symbols("z w")
    expr, symbols = bad(z, w)
    with pytest.raises(ValueError):
        bp.elementwise("bad_fn", expr, *symbols)


def test_free_symbol_error_names_it():
    z, k = sp.symbols("z k")
    with pytest.raises(ValueError, match="k"):
        bp.elementwise("scaled", k * z, z)


# --- folding, merging, interning ----------------------------------------------------------------


def _graph():
    g = bp.Graph("sym_nodes")
    return g, g.input("x", ("batch", 4)), g.param("W", (4, 3)), g.param("b", (3,))


def test_constants_fold_into_one_node():
    _, x, _, _ = _graph()
    for node in (x * 2, 2 * x, x * 2.0, bp.mul(x, 2)):
        assert node.op == "ew" and node.inputs == (x,)
        fn = node.attrs["fn"]
        assert fn.nargs == 1 and fn.expr == 2 * a0
        assert sp.Integer(2) in fn.expr.atoms(sp.Number)
    node = x * bp.const(3.5)
    assert node.inputs == (x,) and node.attrs["fn"].expr == sp.Float(3.5) * a0
    node = 1.5 / x
    assert node.inputs == (x,) and sp.simplify(node.attrs["fn"].expr - sp.Float(1.5) / a0) == 0
    assert x * 1 is x and x + 0 is x and x * 1.0 is x


def test_repeated_operand_is_merged():
    _, x, _, _ = _graph()
    sq = x * x
    assert sq.op == "ew" and sq.inputs == (x,)
    assert sq.attrs["fn"].nargs == 1 and sq.attrs["fn"].expr == a0**2
    p = sq.attrs["fn"].partial(0)
    assert p.expr == 2 * a0
    d = x - x  # operands cancel: a constant zero of x's shape
    assert d.op == "ew" and d.inputs == () and d.attrs["fn"].expr == 0 and d.shape == x.shape


def test_nodes_are_interned():
    g, x, W, b = _graph()
    first = bp.tanh(x @ W + b)
    second = bp.tanh(x @ W + b)
    assert first is second
    assert (x @ W) is (x @ W)
    assert bp.sum(first, axis=0) is bp.sum(first, axis=0)
    assert bp.sigmoid(x) is not bp.tanh(x)
    other = bp.Graph("sym_nodes")  # same names, other graph: other nodes
    assert other.input("x", ("batch", 4)) is not x
    assert symbolic.builtin("tanh") is symbolic.builtin("tanh")
    z = sp.Symbol("z")
    assert bp.elementwise("sym_mish", z * sp.tanh(sp.log(1 + sp.exp(z))), z).fn is \
        bp.elementwise("sym_mish", z * sp.tanh(sp.log(1 + sp.exp(z))), z).fn
    with pytest.raises(AttributeError):
        first.op = "x"
