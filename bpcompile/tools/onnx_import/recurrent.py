"""Recurrent layers: each direction of an ONNX LSTM / GRU / RNN node as bp.lstm / bp.gru /
bp.rnn, the gate blocks in bpcompile's (PyTorch's) order."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...ir.graph import Node
from ...ops import core as ops
from ...ops import slicing, transformer
from ...ops.recurrent import gru, lstm, rnn
from .importer import _Importer, _op
from .reading import _plain
from .values import Value

# Where bpcompile's (PyTorch's) gate blocks sit in ONNX's weights: LSTM i, f, g, o are ONNX's
# blocks i, f, c, o of its order (i, o, f, c); GRU r, z, n are blocks r, z, h of (z, r, h).
_GATES = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}


@_op("LSTM", "GRU", "RNN")
def _recurrent(im: _Importer, args: list) -> tuple:
    """Each direction as bp.lstm / bp.gru / bp.rnn over (batch, time, features); the reverse one
    over the time-reversed sequence, its outputs reversed back; a relu RNN unrolled into
    products, sums and relus (bpcompile's RNN op is tanh). Returns Y, Y_h (and Y_c) in ONNX's
    layouts."""
    kind = im.node.op_type
    attrs = _recurrent_attrs(im, kind)
    layout, directions = int(attrs.get("layout", 0)), _directions(im, attrs)
    for index, what in ((4, "sequence_lens (sequences of their own lengths)"), (7, "P (peephole weights)")):
        if len(args) > index and args[index] is not None:
            raise im.fail(f"input {what} is not supported")
    x = im.tensor(args[0])
    if x.ndim != 3:
        raise im.fail(f"X must have 3 dims, got shape {x.shape}")
    seq = ops.transpose(x, (1, 0, 2)) if layout == 0 else x  # (batch, time, features)
    w, r = im.tensor(args[1]), im.tensor(args[2])
    hidden = int(attrs.get("hidden_size", r.shape[-1]))
    gates = len(_GATES[kind])
    if r.shape != (len(directions), gates * hidden, hidden):
        raise im.fail(f"R must have shape {(len(directions), gates * hidden, hidden)} for hidden_size={hidden} and "
                      f"{len(directions)} direction(s), got {r.shape}")
    bias = im.tensor(args[3]) if len(args) > 3 and args[3] is not None else None
    runs = []
    for d, (reverse, relu) in enumerate(directions):
        b = _direction(bias, d, 0)
        b_ih, b_hh = (None, None) if b is None else (slicing.slice(b, 0, 0, gates * hidden),
                                                     slicing.slice(b, 0, gates * hidden, None))
        weights = [_gate_order(kind, t, hidden) for t in (_direction(w, d, 0), _direction(r, d, 0), b_ih, b_hh)]
        states = [_initial_state(im, args[i] if len(args) > i else None, d, layout) for i in (5, 6)]
        source = _reversed_time(im, seq, attrs) if reverse else seq
        out, *last = _run(im, kind, relu, source, weights, states)
        runs.append((_reversed_time(im, out, attrs) if reverse else out, last))
    return _onnx_outputs(runs, layout)


def _recurrent_attrs(im: _Importer, kind: str) -> dict[str, Any]:
    allowed = {"hidden_size": None, "direction": None, "layout": None, "activations": None}
    if kind == "LSTM":
        allowed["input_forget"] = 0
    if kind == "GRU":
        allowed["linear_before_reset"] = None
    attrs = im.only(allowed)
    if int(attrs.get("layout", 0)) not in (0, 1):
        raise im.fail(f"attribute layout={attrs['layout']} is not supported (only 0 or 1)")
    if kind == "GRU" and int(attrs.get("linear_before_reset", 0)) != 1:
        raise im.fail(f"attribute linear_before_reset={int(attrs.get('linear_before_reset', 0))} is not supported "
                      "(only 1: the reset gate applied after the recurrent product, as PyTorch's GRU)")
    return attrs


def _directions(im: _Importer, attrs: dict) -> list[tuple[bool, bool]]:
    """(reversed, relu) for each direction the node runs."""
    direction = _plain(attrs.get("direction", "forward"))
    reverses = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if reverses is None:
        raise im.fail(f"attribute direction={direction!r} is not supported")
    kind = im.node.op_type
    default = _ACTIVATIONS[kind]
    given = [a.lower() for a in _plain(attrs.get("activations", list(default) * len(reverses)))]
    per = [tuple(given[i:i + len(default)]) for i in range(0, len(given), len(default))]
    accepted = (default, ("relu",)) if kind == "RNN" else (default,)
    if len(given) != len(default) * len(reverses) or any(p not in accepted for p in per):
        raise im.fail(f"attribute activations={_plain(attrs['activations'])} is not supported (only "
                      f"{' or '.join(str(list(a)) for a in accepted)} for each direction)")
    return [(reverse, p == ("relu",)) for reverse, p in zip(reverses, per)]


def _direction(t: Node | None, d: int, axis: int) -> Node | None:
    """Direction d of a tensor stacking the directions along `axis`, without that axis."""
    if t is None:
        return None
    part = slicing.slice(t, axis, d, d + 1)
    return ops.reshape(part, tuple(n for i, n in enumerate(t.shape) if i != axis))


def _gate_order(kind: str, t: Node | None, hidden: int) -> Node | None:
    """ONNX's gate blocks (rows of a weight, entries of a bias) in bpcompile's order."""
    if t is None or kind == "RNN":
        return t
    return slicing.concat([slicing.slice(t, 0, k * hidden, (k + 1) * hidden) for k in _GATES[kind]], axis=0)


def _initial_state(im: _Importer, value: Value | None, d: int, layout: int) -> Node | None:
    """Direction d of initial_h / initial_c as (batch, hidden); None for zeros (the default)."""
    if value is None or _is_zeros(value):
        return None
    return _direction(im.tensor(value), d, 0 if layout == 0 else 1)


def _is_zeros(value: Value) -> bool:
    """A constant of zeros, or slices and reshapes of a filled tensor of zeros (torch's
    exporter writes ConstantOfShape(batch, hidden) for absent initial states)."""
    if isinstance(value, np.ndarray):
        return value.dtype != object and not np.any(value)
    while isinstance(value, Node) and value.op in ("slice", "reshape"):
        value = value.inputs[0]
    return isinstance(value, Node) and value.op == "ew" and not value.inputs and value.attrs["fn"].expr == 0


def _reversed_time(im: _Importer, seq: Node, attrs: dict) -> Node:
    """seq (batch, time, width) with its steps in reverse order: the product with the reversing
    permutation of a fixed length (a gather by reversed indices), exact for finite values."""
    steps = seq.shape[1]
    if not isinstance(steps, int):
        raise im.fail(f"attribute direction={_plain(attrs.get('direction'))!r} over the runtime sequence length "
                      f"{steps!r} is not supported (only over a fixed length)")
    return ops.matmul(transformer.constant(np.eye(steps)[::-1].copy()), seq)


def _run(im: _Importer, kind: str, relu: bool, seq: Node, weights: list, states: list) -> tuple:
    """One direction: (outputs (batch, time, hidden), last h[, last c])."""
    w_ih, w_hh, b_ih, b_hh = weights
    h0, c0 = states
    if kind == "LSTM":
        out, (h, c) = lstm(seq, w_ih, w_hh, b_ih, b_hh, h0, c0)
        return out, h, c
    if kind == "GRU":
        return gru(seq, w_ih, w_hh, b_ih, b_hh, h0)
    if relu:
        return _relu_rnn(im, seq, w_ih, w_hh, b_ih, b_hh, h0)
    return rnn(seq, w_ih, w_hh, b_ih, b_hh, h0)


def _relu_rnn(im: _Importer, seq: Node, w_ih: Node, w_hh: Node, b_ih: Node | None, b_hh: Node | None,
              h0: Node | None) -> tuple[Node, Node]:
    """h_t = relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), unrolled over a fixed number of steps."""
    batch, steps, _ = seq.shape
    if not isinstance(steps, int):
        raise im.fail(f"attribute activations=['Relu'] over the runtime sequence length {steps!r} is not supported "
                      "(only over a fixed length: bpcompile's RNN op is tanh, a relu RNN is unrolled)")
    hidden = w_hh.shape[1]
    xp = ops.matmul(seq, ops.transpose(w_ih))
    for b in (b_ih, b_hh):
        xp = xp if b is None else xp + b
    recurrent, h, outs = ops.transpose(w_hh), h0, []
    for t in range(steps):
        a = ops.reshape(slicing.slice(xp, 1, t, t + 1), (batch, hidden))
        h = ops.relu(a if h is None else a + ops.matmul(h, recurrent))
        outs.append(ops.reshape(h, (batch, 1, hidden)))
    return slicing.concat(outs, axis=1), h


def _onnx_outputs(runs: list[tuple[Node, list[Node]]], layout: int) -> tuple:
    """Y (time, directions, batch, hidden) and Y_h, Y_c (directions, batch, hidden), or with the
    batch first when layout=1, from each direction's (outputs, last states)."""
    def with_axis(t: Node, axis: int) -> Node:
        return ops.reshape(t, t.shape[:axis] + (1,) + t.shape[axis:])

    if layout == 0:
        y = slicing.concat([with_axis(ops.transpose(out, (1, 0, 2)), 1) for out, _ in runs], axis=1)
    else:
        y = slicing.concat([with_axis(out, 2) for out, _ in runs], axis=2)
    axis = 0 if layout == 0 else 1
    last = [slicing.concat([with_axis(states[k], axis) for _, states in runs], axis=axis)
            for k in range(len(runs[0][1]))]
    return (y, *last)
