"""Every registered op is checked: its forward value and, for a differentiable op, every gradient
it takes part in appear in a row of the gradient tables (tests/test_op_gradients.py,
tests/test_nn_ops.py), which compare compiled float64 gradients with the NumPy reference and
central finite differences. An op added without a row fails here, naming it."""

from __future__ import annotations

import numpy as np
import test_nn_ops
import test_op_gradients

import bpcompile as bp
from bpcompile.ops import (  # noqa: F401 - every op registered
    OPS,
    batched,
    conv,
    embeddings,
    normalization,
    pool,
    recurrent,
    regularization,
    slicing,
    transformer,
)

# graph leaves: no op to check
NOT_OPS = {"input", "param"}
# ops that only second derivatives reach (none today: name each with the test that checks it)
SECOND_ORDER: dict[str, str] = {}


def _ops_of(graph: bp.Graph, lowered: bool = True) -> set[str]:
    """The ops of a graph's losses and of their gradients (backward ops, the aux values they read),
    and, when `lowered`, the ops the simplify pass's rewrites lower them to (direct convolutions),
    which `show --grad` does not reach: it writes the graph before that pass."""
    roots = []
    for spec in graph.losses.values():
        params = [graph.params[n] for n in graph.trained_params(spec.name)]
        roots += [spec.node, *[g for g in bp.grad(spec.node, params) if g is not None]]
    nodes = bp.ir.topo_order(roots)
    if lowered:
        nodes += bp.ir.topo_order(bp.passes.simplify(roots))
    aux = [a for n in nodes if OPS[n.op].aux for a in OPS[n.op].aux(n)]  # extra results of the same kernels
    return {node.op for node in nodes + aux}


def _covered() -> dict[str, list[str]]:
    covered: dict[str, list[str]] = {}
    tables = [(test_op_gradients, lambda row: test_op_gradients.build(row, 2, np.random.default_rng(0))),
              (test_nn_ops, lambda row: test_nn_ops.build(row, np.random.default_rng(0)))]
    for module, build in tables:
        for row in module.ROWS:
            graph, _ = build(row)
            for op in _ops_of(graph):
                covered.setdefault(op, []).append(f"{module.__name__}:{row.name}")
    return covered


def test_every_registered_op_has_a_gradient_row() -> None:
    covered = _covered()
    missing = sorted(set(OPS) - set(covered) - NOT_OPS - set(SECOND_ORDER))
    assert not missing, f"ops with no row in the gradient tables: {missing}"
    stale = sorted(set(SECOND_ORDER) & set(covered))
    assert not stale, f"rows reach {stale} now: drop them from SECOND_ORDER"


def test_every_backward_op_is_reached_from_its_forward_op() -> None:
    """The rows reach each op's backward: every op with a VJP that has inputs to differentiate
    shows up together with a gradient op of its own family in some row."""
    covered = _covered()
    for op, rows in covered.items():
        if op.endswith("_grad") and op[: -len("_grad")] in OPS:
            forward = op[: -len("_grad")]
            assert forward in covered, f"{op} is reached but {forward} is not"
            assert set(rows) & set(covered[forward]), f"no row differentiates {forward} into {op}"


def test_every_registered_op_has_a_reference_and_a_display_rule() -> None:
    """An op is one unit: with its VJP it declares the NumPy reference the gradient tables compare
    against and the display rule `bpcompile show` and the kernel comments write it with."""
    no_ref = sorted(op for op, d in OPS.items() if op not in NOT_OPS and not callable(d.ref))
    no_display = sorted(op for op, d in OPS.items() if not callable(d.display))
    assert not no_ref, f"ops with no NumPy reference: {no_ref}"
    assert not no_display, f"ops with no display rule (register(..., display=...)): {no_display}"


# ops `bpcompile show` never writes: training mode is shown, so every mode_select is resolved; the
# GRU backward's scratch is an extra result of its kernel that no node reads
NEVER_SHOWN = {"mode_select", "gru_grad_scratch"}


def test_show_writes_every_op_with_its_display_rule(monkeypatch) -> None:
    """`show --grad` of every gradient-table row, in text and LaTeX: each op the rows reach is
    written through its own rule (recorded here), and the rules hold up on real graphs."""
    import dataclasses

    from bpcompile.tools import explain
    used: set[str] = set()

    def recording(op: str, rule):
        def display(node, args, notation):
            used.add(op)
            text, prec = rule(node, args, notation)
            assert isinstance(text, str) and text and prec in range(1, 6), (op, text, prec)
            return text, prec
        return display

    for op, d in list(OPS.items()):
        monkeypatch.setitem(OPS, op, dataclasses.replace(d, display=recording(op, d.display)))
    reached: set[str] = set()
    tables = [(test_op_gradients, lambda row: test_op_gradients.build(row, 2, np.random.default_rng(0))),
              (test_nn_ops, lambda row: test_nn_ops.build(row, np.random.default_rng(0)))]
    for module, build in tables:
        for row in module.ROWS:
            graph, _ = build(row)
            reached |= _ops_of(graph, lowered=False)
            ex = explain.explain(graph)
            assert explain.explain_text(ex) and explain.explain_latex(ex), row.name
    missing = sorted(reached - used - NOT_OPS - NEVER_SHOWN)
    assert not missing, f"ops the rows reach that show --grad does not write with their rule: {missing}"
