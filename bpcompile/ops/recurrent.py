"""Recurrent layers (LSTM, GRU, tanh RNN) on (batch, time, features).

Each projects the whole input sequence with one GEMM (graph level, so its gradients are the
ordinary matmul/reduce ones), then runs a recurrent core op whose kernel loops over time (one
`bp_gemm` per step for the hidden-to-hidden product) and whose backward kernel is
backpropagation through time. The cell formulas and their derivatives come from the SymPy
cell programs of `symbolic.cells`, printed by the kernel context's formula printer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp

from ..errors import ShapeError
from ..ir.graph import FLOAT, Node, Shape, shape_str
from ..ir.kernel import Kernel
from ..symbolic.cells import Cell, gru_cell, lstm_cell, rnn_cell
from .core import _check_tensor, _need_float, _no_grad, const, matmul_node, reduce_, register, register_kernel, reshape
from .display import called
from .shared import _aux_of, _c, _multi_output
from .slicing import slice

if TYPE_CHECKING:  # kernel builders are handed a codegen.Context; ops never imports codegen
    from ..codegen.module import Context

__all__ = ["lstm", "gru", "rnn"]


def _formulas(ctx: Context, loads: list[tuple[sp.Symbol, str]], outputs: list[sp.Expr],
              stores: list[str]) -> dict[str, Any]:
    temps, values = ctx.formulas(outputs, [s for s, _ in loads], prefix="e")
    return {"loads": [{"name": s.name, "value": v} for s, v in loads], "temps": temps,
            "stores": [{"target": t, "value": v} for t, v in zip(stores, values)]}


# --- recurrent layers: the graph-level functions ------------------------------------------------

def _check_seq(x: Node, what: str) -> None:
    _need_float(_check_tensor(x, what), what)
    if x.ndim != 3 or not isinstance(x.shape[2], int):
        raise ShapeError(f"{what} expects (batch, time, features) with fixed features, got {shape_str(x.shape)}")


def _recurrent_inputs(what: str, gates: int, x: Node, w_ih: Node, w_hh: Node, b_ih: Node | None,
                      b_hh: Node | None, states: Sequence[tuple[str, Node | None]]) -> tuple[int, list[Node]]:
    _check_seq(x, what)
    for name, t in (("W_ih", w_ih), ("W_hh", w_hh)):
        _need_float(_check_tensor(t, f"{what} {name}"), f"{what} {name}")
    if w_hh.ndim != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ShapeError(f"{what}: W_hh must be ({gates}*hidden, hidden), got {shape_str(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if w_ih.shape != (gates * hidden, x.shape[2]):
        raise ShapeError(f"{what}: input {shape_str(x.shape)} and W_hh {shape_str(w_hh.shape)} need W_ih of shape "
                         f"{shape_str((gates * hidden, x.shape[2]))}, got {shape_str(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and _check_tensor(b, f"{what} {name}").shape != (gates * hidden,):
            raise ShapeError(f"{what}: {name} must have shape ({gates * hidden},), got {shape_str(b.shape)}")
    out = []
    batch = x.shape[0]
    for name, s in states:
        if s is None:
            s = const(0.0, (batch, hidden))
        elif _check_tensor(s, f"{what} {name}").shape != (batch, hidden):
            raise ShapeError(f"{what}: {name} must have shape {shape_str((batch, hidden))} for input "
                             f"{shape_str(x.shape)}, got {shape_str(s.shape)}")
        out.append(s)
    return hidden, out


def _last_step(seq: Node) -> Node:
    return reshape(slice(seq, 1, -1), (seq.shape[0], seq.shape[2]))


def time_shift(x: Node, first: Node) -> Node:
    """(B, T, H) -> (B, T, H) with step t holding x's step t-1 and step 0 holding `first` (B, H):
    the previous hidden state of every step."""
    return Node("time_shift", (x, first), {}, x.shape, FLOAT)


def _time_unshift(g: Node) -> Node:
    return Node("time_unshift", (g,), {}, g.shape, FLOAT)


def _time_shift_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    x, first = args
    return np.concatenate([first[:, None, :], x[:, :-1]], axis=1)


def _time_unshift_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    g = args[0]
    return np.concatenate([g[:, 1:], np.zeros_like(g[:, :1])], axis=1)


register("time_shift", vjp=lambda node, g: [_time_unshift(g), _first_step(g)], ref=_time_shift_ref,
         kernel="time_shift", display=called())
register("time_unshift", vjp=lambda node, g: [time_shift(g, const(0.0, (g.shape[0], g.shape[2])))],
         ref=_time_unshift_ref, kernel="time_shift", display=called())


def _first_step(seq: Node) -> Node:
    return reshape(slice(seq, 1, 0, 1), (seq.shape[0], seq.shape[2]))


def _time_shift_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    node = k.nodes[0]
    b, t, h = node.shape
    return {"unshift": node.op == "time_unshift", "B": _c(ctx, b), "T": _c(ctx, t), "H": h}


register_kernel("time_shift", _time_shift_builder)


def _input_projection(x: Node, w_ih: Node, b_ih: Node | None, b_hh: Node | None) -> Node:
    xp = matmul_node(x, w_ih, False, True)  # (B, T, gates*H): one GEMM for the whole sequence
    bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
    return xp if bias is None else xp + bias


def lstm(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
         h0: Node | None = None, c0: Node | None = None) -> tuple[Node, tuple[Node, Node]]:
    """A one-layer LSTM over (batch, time, features), PyTorch's equations and layouts: gates
    (i, f, g, o), W_ih (4H, in), W_hh (4H, H). Returns (outputs (B, T, H), (h_T, c_T)).
    The time dim may be a runtime size."""
    hidden, (h0, c0) = _recurrent_inputs("lstm", 4, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0), ("c0", c0)))
    xp = _input_projection(x, W_ih, b_ih, b_hh)
    hc = Node("lstm_core", (xp, W_hh, h0, c0), {}, (x.shape[0], x.shape[1], 2 * hidden), FLOAT)
    out = slice(hc, 2, 0, hidden)
    return out, (_last_step(out), _last_step(slice(hc, 2, hidden, 2 * hidden)))


def gru(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
        h0: Node | None = None) -> tuple[Node, Node]:
    """A one-layer GRU, PyTorch's equations (gates r, z, n; b_hh's n part inside r * (...)).
    Returns (outputs (B, T, H), h_T)."""
    hidden, (h0,) = _recurrent_inputs("gru", 3, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0),))
    xp = _input_projection(x, W_ih, b_ih, None)
    bhh = b_hh if b_hh is not None else const(0.0, (3 * hidden,))
    h = Node("gru_core", (xp, W_hh, bhh, h0), {}, (x.shape[0], x.shape[1], hidden), FLOAT)
    return h, _last_step(h)


def rnn(x: Node, W_ih: Node, W_hh: Node, b_ih: Node | None = None, b_hh: Node | None = None,  # noqa: N803
        h0: Node | None = None) -> tuple[Node, Node]:
    """A one-layer Elman RNN, h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).
    Returns (outputs (B, T, H), h_T)."""
    _, (h0,) = _recurrent_inputs("rnn", 1, x, W_ih, W_hh, b_ih, b_hh, (("h0", h0),))
    xp = _input_projection(x, W_ih, b_ih, b_hh)
    h = Node("rnn_core", (xp, W_hh, h0), {}, xp.shape, FLOAT)
    return h, _last_step(h)


# --- recurrent cores: VJPs ---------------------------------------------------------------------

def _lstm_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, h0, c0 = node.inputs
    hidden = w_hh.shape[1]
    (gates,) = _aux_of(node)
    dxp = Node("lstm_grad", (w_hh, c0, node, gates, g), {}, xp.shape, FLOAT)
    dh0, dc0 = _aux_of(dxp)
    hprev = time_shift(slice(node, 2, 0, hidden), h0)
    return [dxp, matmul_node(dxp, hprev, True, False), dh0, dc0]


def _gru_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, bhh, h0 = node.inputs
    (gates,) = _aux_of(node)
    dxp = Node("gru_grad", (w_hh, h0, node, gates, g), {}, xp.shape, FLOAT)
    dhp, dh0, _ = _aux_of(dxp)
    hprev = time_shift(node, h0)
    return [dxp, matmul_node(dhp, hprev, True, False), reduce_(dhp, (0, 1), keepdims=False, mean=False), dh0]


def _rnn_vjp(node: Node, g: Node) -> list[Node]:
    xp, w_hh, h0 = node.inputs
    dxp = Node("rnn_grad", (w_hh, node, g), {}, xp.shape, FLOAT)
    (dh0,) = _aux_of(dxp)
    return [dxp, matmul_node(dxp, time_shift(node, h0), True, False), dh0]


# --- recurrent cores: NumPy references (independent of the generated C) -----------------------

def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _lstm_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    xp, w_hh, h, c = args
    b, t, g4 = xp.shape
    hid = g4 // 4
    hc, gates = np.zeros((b, t, 2 * hid)), np.zeros((b, t, g4))
    for s in range(t):
        a = xp[:, s] + h @ w_hh.T
        i, f, g, o = _sigmoid(a[:, :hid]), _sigmoid(a[:, hid:2 * hid]), np.tanh(a[:, 2 * hid:3 * hid]), \
            _sigmoid(a[:, 3 * hid:])
        c = f * c + i * g
        h = o * np.tanh(c)
        hc[:, s, :hid], hc[:, s, hid:] = h, c
        gates[:, s] = np.concatenate([i, f, g, o], axis=1)
    return hc, gates


def _lstm_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, ...]:
    w_hh, c0, hc, gates, g = args
    b, t, h2 = hc.shape
    hid = h2 // 2
    dxp = np.zeros((b, t, 4 * hid))
    dh, dc = np.zeros((b, hid)), np.zeros((b, hid))
    for s in reversed(range(t)):
        i, f, gg, o = (gates[:, s, k * hid:(k + 1) * hid] for k in range(4))
        c = hc[:, s, hid:]
        cp = hc[:, s - 1, hid:] if s else c0
        dh = dh + g[:, s, :hid]
        tc = np.tanh(c)
        dc = dc + g[:, s, hid:] + dh * o * (1 - tc ** 2)
        da = np.concatenate([dc * gg * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - gg ** 2),
                             dh * tc * o * (1 - o)], axis=1)
        dxp[:, s] = da
        dh = da @ w_hh
        dc = dc * f
    return dxp, dh, dc


def _gru_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    xp, w_hh, bhh, h = args
    b, t, g3 = xp.shape
    hid = g3 // 3
    out, gates = np.zeros((b, t, hid)), np.zeros((b, t, 4 * hid))
    for s in range(t):
        hp = h @ w_hh.T + bhh
        r = _sigmoid(xp[:, s, :hid] + hp[:, :hid])
        z = _sigmoid(xp[:, s, hid:2 * hid] + hp[:, hid:2 * hid])
        hn = hp[:, 2 * hid:]
        n = np.tanh(xp[:, s, 2 * hid:] + r * hn)
        h = (1 - z) * n + z * h
        out[:, s] = h
        gates[:, s] = np.concatenate([r, z, n, hn], axis=1)
    return out, gates


def _gru_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, ...]:
    w_hh, h0, hs, gates, g = args
    b, t, hid = hs.shape
    dxp, dhp = np.zeros((b, t, 3 * hid)), np.zeros((b, t, 3 * hid))
    dh = np.zeros((b, hid))
    for s in reversed(range(t)):
        r, z, n, hn = (gates[:, s, k * hid:(k + 1) * hid] for k in range(4))
        hprev = hs[:, s - 1] if s else h0
        dh = dh + g[:, s]
        dn = dh * (1 - z) * (1 - n ** 2)
        dz = dh * (hprev - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dxp[:, s] = np.concatenate([dr, dz, dn], axis=1)
        dhp[:, s] = np.concatenate([dr, dz, dn * r], axis=1)
        dh = dhp[:, s] @ w_hh + dh * z
    return dxp, dhp, dh, np.zeros((b, hid))


def _rnn_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    xp, w_hh, h = args
    out = np.zeros(xp.shape)
    for s in range(xp.shape[1]):
        h = np.tanh(xp[:, s] + h @ w_hh.T)
        out[:, s] = h
    return out


def _rnn_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    w_hh, hs, g = args
    dxp = np.zeros(hs.shape)
    dh = np.zeros((hs.shape[0], hs.shape[2]))
    for s in reversed(range(hs.shape[1])):
        da = (dh + g[:, s]) * (1 - hs[:, s] ** 2)
        dxp[:, s] = da
        dh = da @ w_hh
    return dxp, dh


def _state_shape(node: Node) -> Shape:
    """(B, H) of a recurrent backward node (its first input is W_hh)."""
    return (node.shape[0], node.inputs[0].shape[1])


def _seq_shape(width: Callable[[int], int]) -> Callable[[Node], Shape]:
    def shape(node: Node) -> Shape:
        return (node.shape[0], node.shape[1], width(node.inputs[1].shape[1] if node.op.endswith("_core")
                                                    else node.inputs[0].shape[1]))
    return shape


_multi_output("lstm_core", "lstm", _lstm_vjp, _lstm_ref, [("lstm_gates", _seq_shape(lambda h: 4 * h))])
_multi_output("lstm_grad", "lstm_grad", _no_grad("lstm_grad"), _lstm_grad_ref,
              [("lstm_grad_h0", _state_shape), ("lstm_grad_c0", _state_shape)])
_multi_output("gru_core", "gru", _gru_vjp, _gru_ref, [("gru_gates", _seq_shape(lambda h: 4 * h))])
_multi_output("gru_grad", "gru_grad", _no_grad("gru_grad"), _gru_grad_ref,
              [("gru_grad_hp", _seq_shape(lambda h: 3 * h)), ("gru_grad_h0", _state_shape),
               ("gru_grad_scratch", _state_shape)])
register("rnn_core", vjp=_rnn_vjp, ref=_rnn_ref, kernel="rnn", display=called())
_multi_output("rnn_grad", "rnn_grad", _no_grad("rnn_grad"), _rnn_grad_ref, [("rnn_grad_h0", _state_shape)])


# --- recurrent cores: kernel builders -------------------------------------------------------------
#
# Index expressions use the template's locals: b (batch row), t (time step), j (hidden unit),
# B, T (sizes), and the kernel's in*/out* arrays.

def _seq(array: str, width: int, offset: int = 0, step: str = "t") -> str:
    """Element j (plus `offset`) of row (b, step) of a (B, T, width) array."""
    return f"{array}[(b*T + {step})*{width} + {offset} + j]" if offset else f"{array}[(b*T + {step})*{width} + j]"


def _state(array: str, hidden: int) -> str:
    return f"{array}[b*{hidden} + j]"


def _sizes(k: Kernel, ctx: Context, hidden: int, gates: int) -> dict[str, Any]:
    """Sizes of a recurrent kernel, and its split across the thread pool by batch rows (each
    row's recurrence is independent of the others')."""
    node = k.nodes[0]
    B, T = _c(ctx, node.shape[0]), _c(ctx, node.shape[1])
    return {"B": B, "T": T, "H": hidden, "GH": gates * hidden,
            "split": {"what": "its batch rows", "work": f"({B})*({T})*{gates * hidden * hidden // 16}"}}


def _lstm_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,4H), in1 W_hh, in2 h0, in3 c0; outputs: out0 hc (B,T,2H), out1 gates (B,T,4H)
    hidden = k.nodes[0].inputs[1].shape[1]
    cell, s = lstm_cell()
    H = hidden
    loads = [(s["xi"], _seq("in0", 4 * H)), (s["xf"], _seq("in0", 4 * H, H)), (s["xg"], _seq("in0", 4 * H, 2 * H)),
             (s["xo"], _seq("in0", 4 * H, 3 * H)), (s["hi"], _seq("out1", 4 * H)),
             (s["hf"], _seq("out1", 4 * H, H)), (s["hg"], _seq("out1", 4 * H, 2 * H)),
             (s["ho"], _seq("out1", 4 * H, 3 * H)),
             (s["cp"], f"(t ? {_seq('out0', 2 * H, H, 't - 1')} : {_state('in3', H)})")]
    outs = [s["i"], s["f"], s["g"], s["o"], s["c"], s["h"]]
    stores = [_seq("out1", 4 * H), _seq("out1", 4 * H, H), _seq("out1", 4 * H, 2 * H), _seq("out1", 4 * H, 3 * H),
              _seq("out0", 2 * H, H), _seq("out0", 2 * H)]
    body = _formulas(ctx, loads, [cell.expr(o) for o in outs], stores)
    return {**_sizes(k, ctx, H, 4), "kind": "LSTM", "seq": "out0", "seq_width": 2 * H, "h0": "in2",
            "whh": "in1", "dst": "out1", "dst_width": 4 * H, **body}


def _gru_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,3H), in1 W_hh, in2 b_hh, in3 h0; outputs: out0 h (B,T,H), out1 gates (B,T,4H)
    H = k.nodes[0].inputs[1].shape[1]
    cell, s = gru_cell()
    loads = [(s["xr"], _seq("in0", 3 * H)), (s["xz"], _seq("in0", 3 * H, H)), (s["xn"], _seq("in0", 3 * H, 2 * H)),
             (s["hr"], _seq("out1", 4 * H)), (s["hz"], _seq("out1", 4 * H, H)), (s["hnr"], _seq("out1", 4 * H, 2 * H)),
             (s["br"], "in2[j]"), (s["bz"], f"in2[{H} + j]"), (s["bn"], f"in2[{2 * H} + j]"),
             (s["hp"], f"(t ? {_seq('out0', H, 0, 't - 1')} : {_state('in3', H)})")]
    outs = [s["r"], s["z"], s["n"], s["hn"], s["h"]]
    stores = [_seq("out1", 4 * H), _seq("out1", 4 * H, H), _seq("out1", 4 * H, 2 * H), _seq("out1", 4 * H, 3 * H),
              _seq("out0", H)]
    body = _formulas(ctx, loads, [cell.expr(o) for o in outs], stores)
    return {**_sizes(k, ctx, H, 3), "kind": "GRU", "seq": "out0", "seq_width": H, "h0": "in3",
            "whh": "in1", "dst": "out1", "dst_width": 4 * H, **body}


def _rnn_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 xp (B,T,H), in1 W_hh, in2 h0; output: out0 h (B,T,H)
    H = k.nodes[0].inputs[1].shape[1]
    cell, s = rnn_cell()
    loads = [(s["x"], _seq("in0", H)), (s["hh"], _seq("out0", H))]
    body = _formulas(ctx, loads, [cell.expr(s["h"])], [_seq("out0", H)])
    return {**_sizes(k, ctx, H, 1), "kind": "tanh RNN", "seq": "out0", "seq_width": H, "h0": "in2",
            "whh": "in1", "dst": "out0", "dst_width": H, **body}


def _lstm_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 c0, in2 hc, in3 gates, in4 g (B,T,2H);
    # outputs: out0 dxp (B,T,4H), out1 dh (running; dh0 at the end), out2 dc (running; dc0)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = lstm_cell()
    dh, dc = Cell.leaf("dh"), Cell.leaf("dc")
    stored = [s["i"], s["f"], s["g"], s["o"], s["c"], s["cp"]]
    loads = [(s["i"], _seq("in3", 4 * H)), (s["f"], _seq("in3", 4 * H, H)), (s["g"], _seq("in3", 4 * H, 2 * H)),
             (s["o"], _seq("in3", 4 * H, 3 * H)), (s["c"], _seq("in2", 2 * H, H)),
             (s["cp"], f"(t ? {_seq('in2', 2 * H, H, 't - 1')} : {_state('in1', H)})"),
             (dh, f"{_seq('in4', 2 * H)} + {_state('out1', H)}"),
             (dc, f"{_seq('in4', 2 * H, H)} + {_state('out2', H)}")]
    grads = cell.backward({s["h"]: dh, s["c"]: dc}, [s["xi"], s["xf"], s["xg"], s["xo"], s["cp"]], set(stored))
    stores = [_seq("out0", 4 * H), _seq("out0", 4 * H, H), _seq("out0", 4 * H, 2 * H), _seq("out0", 4 * H, 3 * H),
              _state("out2", H)]
    body = _formulas(ctx, loads, grads, stores)
    return {"kind": "LSTM", **_sizes(k, ctx, H, 4),
            "whh": "in0", "dh": "out1", "dc": "out2", "dpre": "out0", "scratch": None, **body}


def _gru_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 h0, in2 h (B,T,H), in3 gates (B,T,4H), in4 g (B,T,H);
    # outputs: out0 dxp (B,T,3H), out1 dhp (B,T,3H), out2 dh (running; dh0), out3 scratch (B,H)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = gru_cell()
    dh = Cell.leaf("dh")
    stored = [s["r"], s["z"], s["n"], s["hn"], s["hp"]]
    loads = [(s["r"], _seq("in3", 4 * H)), (s["z"], _seq("in3", 4 * H, H)), (s["n"], _seq("in3", 4 * H, 2 * H)),
             (s["hn"], _seq("in3", 4 * H, 3 * H)),
             (s["hp"], f"(t ? {_seq('in2', H, 0, 't - 1')} : {_state('in1', H)})"),
             (dh, f"{_seq('in4', H)} + {_state('out2', H)}")]
    d = cell.backward({s["h"]: dh}, [s["xr"], s["xz"], s["xn"], s["hnr"], s["hp"]], set(stored))
    outs = [d[0], d[1], d[2], d[0], d[1], d[3], d[4]]
    stores = [_seq("out0", 3 * H), _seq("out0", 3 * H, H), _seq("out0", 3 * H, 2 * H),
              _seq("out1", 3 * H), _seq("out1", 3 * H, H), _seq("out1", 3 * H, 2 * H), _state("out3", H)]
    body = _formulas(ctx, loads, outs, stores)
    return {"kind": "GRU", **_sizes(k, ctx, H, 3),
            "whh": "in0", "dh": "out2", "dc": None, "dpre": "out1", "scratch": "out3", **body}


def _rnn_grad_builder(k: Kernel, ctx: Context) -> dict[str, Any]:
    # inputs: in0 W_hh, in1 h (B,T,H), in2 g; outputs: out0 dxp (B,T,H), out1 dh (running; dh0)
    H = k.nodes[0].inputs[0].shape[1]
    cell, s = rnn_cell()
    dh = Cell.leaf("dh")
    loads = [(s["h"], _seq("in1", H)), (dh, f"{_seq('in2', H)} + {_state('out1', H)}")]
    (da,) = cell.backward({s["h"]: dh}, [s["x"]], {s["h"]})
    body = _formulas(ctx, loads, [da], [_seq("out0", H)])
    return {"kind": "tanh RNN", **_sizes(k, ctx, H, 1),
            "whh": "in0", "dh": "out1", "dc": None, "dpre": "out0", "scratch": None, **body}


for _kind, _builder in (("lstm", _lstm_builder), ("gru", _gru_builder), ("rnn", _rnn_builder)):
    register_kernel(_kind, _builder, template="recurrent.c.j2")
for _kind, _builder in (("lstm_grad", _lstm_grad_builder), ("gru_grad", _gru_grad_builder),
                        ("rnn_grad", _rnn_grad_builder)):
    register_kernel(_kind, _builder, template="recurrent_grad.c.j2")
