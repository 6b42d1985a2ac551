"""`bpcompile show`: a model's derivatives and its backward pass, as a person would write them.

* **Elementwise derivatives**: for every elementwise function of the forward pass, each partial
  derivative as `sympy.diff` derived it and as bpcompile uses it after simplification, and
  whether it was rewritten in terms of the function's own output y (sigmoid' = y - y², ...).
* **Forward and backward passes** as tensor equations in topological order::

      Z1 = x · W1 + b1                dZ1 = dH1 ⊙ 𝟙[Z1 > 0]
      H1 = relu(Z1)                   dW1 = xᵀ · dZ1
                                      db1 = Σ_batch dZ1

  `·` is a matrix product, `⊙` an elementwise one, `Σ_batch` a sum over the batch dimension.
  Each equation is annotated with the name (tN) of the node that computes it in the generated
  C, whose kernel comments use the same names, so every C statement traces back to it.
* The same in LaTeX (`--latex`), and Graphviz DOT of the forward and backward graphs (`--graph`).

Names: inputs and parameters keep theirs; named outputs and losses theirs; the k-th matrix
product's pre-activation is Zk (a product feeding only a bias add is shown inline), the
activation of Zk is Hk, other values are T1, T2, ...; the gradient of V is dV.

The backward graph is rebuilt here with the very VJP rules `autodiff.grad` uses (nodes are
interned, so it yields the same node objects) to learn which node is the gradient of which.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from ..autodiff import reverse as autodiff
from ..ir.graph import INT, Graph, Node, shape_str, topo_order
from ..ops import core as ops
from ..ops.display import ADD, ATOM, MUL, POW, UNARY, Notation, Shown, TexNotation, number, tex_escape
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS, OUT, Fn
from .formulas import TexPrinter, TextPrinter

ODOT = r"\odot"
ARITHMETIC = {"add", "sub", "mul", "div", "neg", "pow"}
NOT_ACTIVATIONS = {"exp", "log", "sqrt", "square", "abs"}
ARGUMENT_NAMES = {1: ("x",), 2: ("a", "b")}


# --- naming -----------------------------------------------------------------------------------

def tex_name(name: str, grad_of: dict[str, str] | None = None) -> str:
    """W1 -> W_{1}, logits -> \\mathrm{logits}; a gradient name dZ1 -> \\mathrm{d}Z_{1}."""
    if grad_of and name in grad_of:
        return r"\mathrm{d}" + tex_name(grad_of[name])
    m = re.fullmatch(r"([A-Za-z]+)_?(\d+)", name)
    if m:
        letters, digits = m.groups()
        head = letters if len(letters) == 1 else rf"\mathrm{{{letters}}}"
        return f"{head}_{{{digits}}}"
    if len(name) == 1 and name.isalpha():
        return name
    return rf"\mathrm{{{tex_escape(name)}}}"


def _view_root(node: Node) -> Node:
    while node.op == "reshape":
        node = node.inputs[0]
    return node


def _trained_params(graph: Graph, loss: str) -> list[str]:
    if hasattr(graph, "trained_params"):
        return graph.trained_params(loss)
    spec = graph.losses[loss]
    return list(spec.params or graph.params)


def _specialize(nodes: list[Node], training: bool) -> list[Node]:
    from ..passes import pipeline as passes
    if not hasattr(passes, "specialize"):
        return list(nodes)
    return passes.specialize(list(nodes), training)


def _is_builtin(fn: Fn) -> bool:
    spec = ew_mod.BUILTIN.get(fn.name)
    return spec is not None and fn.expr == spec[0] and fn.nargs == spec[1]


def _is_named_function(fn: Fn) -> bool:
    """Shown as name(args): built-ins as defined, leaky_relu/elu, and users' own functions."""
    if _is_builtin(fn):
        return fn.name not in ARITHMETIC
    if fn.name in ("leaky_relu", "elu"):
        return True
    return fn.nargs > 0 and fn.display != tuple(f"a{i}" for i in range(fn.nargs)) and "/" not in fn.name


@dataclass
class Equation:
    """One line of the forward or backward pass: name = formula."""

    name: str
    node: Node | None
    text: str
    tex: str
    c_names: list[str] = field(default_factory=list)


@dataclass
class Derivative:
    """A partial derivative of an elementwise function as SymPy derived and simplified it."""

    fn: Fn
    arg: str
    raw: sp.Expr
    simplified: sp.Expr
    uses_output: bool


@dataclass
class LossPass:
    name: str
    seed: Equation
    equations: list[Equation]
    grads: dict[str, Node]
    same: dict[str, list[str]] = field(default_factory=dict)  # gradient -> values with that same gradient


class _Formulas(Notation):
    """The text notation, with elementwise formulas written by an explanation (SymPy's printers)."""

    def __init__(self, ex: Explanation):
        self.ex = ex

    def formula(self, node: Node, args: Sequence[Shown]) -> Shown:
        return self.ex._render_ew(node, list(args), self.tex)


class _TexFormulas(TexNotation, _Formulas):
    """The LaTeX notation, with elementwise formulas written by an explanation."""


class Explanation:
    """The names, equations and derivatives of one graph (optionally tied to its lowered C)."""

    def __init__(self, graph: Graph, c_names: dict[Node, str] | None = None):
        self.graph = graph
        self._notations = {False: _Formulas(self), True: _TexFormulas(self)}
        self.c_names = c_names or {}
        outputs = list(graph.outputs.values())
        losses = {name: spec.node for name, spec in graph.losses.items()}
        backward = {}
        for lname, spec in graph.losses.items():
            names = _trained_params(graph, lname)
            cot, grads = cotangents(spec.node, [graph.params[n] for n in names])
            backward[lname] = (cot, grads, names)
        # training mode, as the compiler lowers losses and gradients: every mode_select resolved to
        # its training side (batch statistics, dropout); outputs in evaluation mode are listed apart
        nodes = topo_order(outputs + list(losses.values()) + [n for c, g, _ in backward.values()
                                                               for n in [*c, *c.values(), *g]])
        train = dict(zip(nodes, _specialize(nodes, True)))
        self.outputs = [train[o] for o in outputs]
        self.loss_nodes = {name: train[node] for name, node in losses.items()}
        self.forward_order = topo_order(self.outputs + list(self.loss_nodes.values()))
        self.forward_set = set(self.forward_order)
        self.backward: dict[str, tuple[dict[Node, Node], list[Node], list[str]]] = {}
        for lname, (cot, grads, names) in backward.items():
            self.backward[lname] = ({train[k]: train[v] for k, v in cot.items()}, [train[g] for g in grads], names)
        evaluation = _specialize(outputs, False)
        self.eval_outputs = {name: node for name, node in zip(graph.outputs, evaluation)
                             if node is not train[graph.outputs[name]]}
        self.names: dict[Node, str] = {}
        self.grad_of: dict[str, str] = {}  # gradient name -> the name of the value it is the gradient of
        self.backward_names: dict[Node, str] = {}
        self.inlined: set[Node] = set()
        self._name_forward()

    # --- names ----------------------------------------------------------------------------
    def _unique(self, base: str, taken: set[str]) -> str:
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        return name

    def _name_forward(self) -> None:
        g = self.graph
        taken = set(g.inputs) | set(g.params) | set(g.outputs) | set(g.losses)
        users: dict[Node, list[Node]] = {}
        for node in self.forward_order:
            for x in node.inputs:
                users.setdefault(x, []).append(node)
        backward_refs: set[Node] = set()
        for _cot, grads, _ in self.backward.values():
            for node in topo_order(grads):
                if node not in self.forward_set:
                    backward_refs.update(x for x in node.inputs if x in self.forward_set)
        out_names = {}
        for name, node in zip(g.outputs, self.outputs):
            out_names.setdefault(node, name)
        for name, node in self.loss_nodes.items():
            out_names.setdefault(node, name)
        layer: dict[Node, int] = {}
        k = 0
        for node in self.forward_order:
            if node.op == "matmul":
                k += 1
                layer[node] = k
        counter = 0
        for node in self.forward_order:
            if node.op in ("input", "param"):
                self.names[node] = node.attrs["name"]
                continue
            if node in out_names:
                self.names[node] = out_names[node]
                continue
            fn = node.attrs.get("fn") if node.op == "ew" else None
            if node.op == "reshape" and ops.only_unit_dims_differ(node.inputs[0].shape, node.shape):
                self.inlined.add(node)  # adds or drops size-1 dims only: shown as its operand
                continue
            if node.op == "matmul":
                consumers = users.get(node, [])
                c = consumers[0] if len(consumers) == 1 else None
                if (c is not None and c.op == "ew" and _is_builtin(c.attrs["fn"]) and c.attrs["fn"].name in
                        ("add", "sub") and node not in backward_refs and c.inputs[0] is node):
                    self.inlined.add(node)
                    continue
                self.names[node] = self._unique(f"A{layer[node]}", taken)
                continue
            if (fn is not None and fn.name in ("add", "sub") and len(node.inputs) == 2 and node.inputs[0].op == "matmul"
                    and _view_root(node.inputs[1]).op == "param"):  # a pre-activation: x @ W + b
                self.names[node] = self._unique(f"Z{layer[node.inputs[0]]}", taken)
                continue
            if (fn is not None and len(node.inputs) == 1 and _is_named_function(fn) and fn.name not in NOT_ACTIVATIONS
                    and re.fullmatch(r"Z\d+", self.names.get(node.inputs[0], ""))):
                self.names[node] = self._unique("H" + self.names[node.inputs[0]][1:], taken)
                continue
            counter += 1
            self.names[node] = self._unique(f"T{counter}", taken)

    # --- rendering --------------------------------------------------------------------------
    def render(self, node: Node, tex: bool, top: bool = False) -> tuple[str, int]:
        """(formula, precedence) of `node` in terms of named values, by its op's display rule."""
        if not top and node in self.names:
            return (tex_name(self.names[node], self.grad_of) if tex else self.names[node]), ATOM
        args = [self.render(x, tex) for x in node.inputs]
        return ops.OPS[node.op].display(node, args, self._notations[tex])

    def _render_ew(self, node: Node, args: list[tuple[str, int]], tex: bool) -> tuple[str, int]:
        fn: Fn = node.attrs["fn"]
        if not node.inputs:
            value = fn.expr
            text = number(float(value)) if value.is_number else str(value)
            return text, ATOM if not text.startswith("-") else UNARY

        def p(i: int, level: int) -> str:
            text, prec = args[i]
            if prec >= level:
                return text
            return rf"\left({text}\right)" if tex else f"({text})"
        if _is_builtin(fn) and fn.name in ARITHMETIC:
            if fn.name == "add":
                return f"{p(0, ADD)} + {p(1, ADD)}", ADD
            if fn.name == "sub":
                return f"{p(0, ADD)} - {p(1, MUL)}", ADD
            if fn.name == "mul":
                return f"{p(0, MUL)} {ODOT if tex else '⊙'} {p(1, MUL)}", MUL
            if fn.name == "div":
                if tex:
                    return rf"\frac{{{args[0][0]}}}{{{args[1][0]}}}", ATOM
                return f"{p(0, MUL)} / {p(1, POW)}", MUL
            if fn.name == "neg":
                return f"-{p(0, POW)}", UNARY
            if fn.name == "pow":
                return (f"{p(0, ATOM)}^{{{args[1][0]}}}" if tex else f"{p(0, ATOM)}^{p(1, ATOM)}"), POW
        if _is_named_function(fn):
            joined = ", ".join(a for a, _ in args)
            if tex:
                return rf"\operatorname{{{tex_escape(fn.name)}}}\left({joined}\right)", ATOM
            return f"{fn.name}({joined})", ATOM
        short = self._short_derivative(node, args, tex)
        if short is not None:
            return short, MUL
        # a formula: a derivative (the incoming gradient times SymPy's partial), a broadcast,
        # or an op with constants folded in
        placeholders = [sp.Symbol(f"_a{i}", real=True) for i in range(len(node.inputs))]
        expr = fn.expr.xreplace(dict(zip(ARGS, placeholders)))
        names = {s: (a if prec == ATOM else (rf"\left({a}\right)" if tex else f"({a})"))
                 for s, (a, prec) in zip(placeholders, args)}
        if tex:
            return TexPrinter(names).doprint(expr), ADD if isinstance(expr, sp.Add) else MUL
        text = TextPrinter(names, placeholders).doprint(expr)
        if isinstance(expr, sp.Add):
            return text, ADD
        if isinstance(expr, sp.Symbol):
            return text, ATOM
        return text, MUL if isinstance(expr, sp.Mul) else ATOM

    def _short_derivative(self, node: Node, args: list[tuple[str, int]], tex: bool) -> str | None:
        """g ⊙ f'(x) for the gradient through a function whose derivative is too long to inline
        (the derivative table lists it); None to print the formula itself."""
        fn: Fn = node.attrs["fn"]
        m = re.fullmatch(r"d(.+)/d(.+)", fn.name)
        if not m or not node.inputs:
            return None
        fname, arg = m.groups()
        coeff, rest = fn.expr.as_independent(ARGS[0], as_Add=False)
        if rest != ARGS[0] or len(TextPrinter({}).doprint(coeff)) <= 40:
            return None
        operands = set(node.inputs[1:])
        for f in self.forward_order:
            ffn = f.attrs.get("fn") if f.op == "ew" else None
            if ffn is None or ffn.name != fname or not operands <= set(f.inputs) | {f}:
                continue
            display = _display(ffn)
            inputs = ", ".join(self.render(x, tex)[0] for x in f.inputs)
            g_text = args[0][0] if args[0][1] >= MUL else f"({args[0][0]})"
            if tex:
                name = rf"\operatorname{{{tex_escape(fname)}}}"
                head = f"{name}'" if ffn.nargs == 1 else rf"\partial_{{{tex_escape(arg)}}} {name}"
                return rf"{g_text} {ODOT} {head}\left({inputs}\right)"
            if ffn.nargs == 1:
                return f"{g_text} ⊙ {fname}'({inputs})"
            if arg in display:
                return f"{g_text} ⊙ ∂{fname}/∂{arg}({inputs})"
        return None

    def _c(self, *nodes: Node) -> list[str]:
        return [self.c_names[n] for n in nodes if n in self.c_names]

    # --- equations ----------------------------------------------------------------------------
    def forward_equations(self) -> list[Equation]:
        out = []
        for node in self.forward_order:
            if node.op in ("input", "param") or node in self.inlined:
                continue
            name = self.names[node]
            parts = [x for x in node.inputs if x in self.inlined] + [node]
            out.append(Equation(name, node, self.render(node, False, top=True)[0],
                                self.render(node, True, top=True)[0], self._c(*parts)))
        return out

    def eval_equations(self) -> list[Equation]:
        """The outputs in evaluation mode (model.forward), where they differ from training mode."""
        if not self.eval_outputs:
            return []
        order = [n for n in topo_order(list(self.eval_outputs.values())) if n not in self.forward_set]
        out_for = {node: name for name, node in self.eval_outputs.items()}
        saved, taken = self.names, set(self.names.values())
        self.names = dict(saved)
        try:
            counter, named = 0, []
            for node in order:
                if node.op in ("input", "param"):
                    self.names[node] = node.attrs["name"]
                    continue
                if node.op == "reshape" and ops.only_unit_dims_differ(node.inputs[0].shape, node.shape):
                    continue
                if node in out_for:
                    self.names[node] = out_for[node]
                else:
                    counter += 1
                    self.names[node] = self._unique(f"E{counter}", taken)
                named.append(node)
            return [Equation(self.names[n], n, self.render(n, False, top=True)[0], self.render(n, True, top=True)[0],
                             self._c(n)) for n in named]
        finally:
            self.names = saved

    def backward_pass(self, loss: str) -> LossPass:
        cot, grads, param_names = self.backward[loss]
        loss_node = self.loss_nodes[loss]
        order = [n for n in topo_order(grads) if n not in self.forward_set]
        owner: dict[Node, Node] = {}  # backward node -> the (latest) forward node it is the gradient of
        for fwd in self.forward_order:
            gnode = cot.get(fwd)
            if gnode is not None and fwd not in self.inlined and fwd.dtype != INT:
                owner[gnode] = fwd
        users: dict[Node, int] = {}
        for node in order:
            for x in node.inputs:
                users[x] = users.get(x, 0) + 1
        names = dict(self.names)
        self.names, saved = names, self.names
        taken = set(saved.values())
        seed_node = cot[loss_node]
        try:
            seed_name = "d" + saved[loss_node]
            self.grad_of[seed_name] = saved[loss_node]
            names[seed_node] = seed_name
            taken.add(seed_name)
            seed = Equation(seed_name, seed_node, "1", "1")
            pending: list[tuple[str, Node]] = []
            counter = 0
            for node in order:
                if node is seed_node:
                    continue
                if node in owner:
                    fwd_name = saved[owner[node]]
                    names[node] = self._unique("d" + fwd_name, taken)
                    self.grad_of[names[node]] = fwd_name
                    pending.append((names[node], node))
                elif users.get(node, 0) > 1 and ops.OPS[node.op].kernel != "view":
                    counter += 1
                    names[node] = self._unique(f"G{counter}", taken)
                    pending.append((names[node], node))
            equations = [Equation(name, node, self.render(node, False, top=True)[0],
                                  self.render(node, True, top=True)[0], self._c(node)) for name, node in pending]
            grad_nodes = dict(zip(param_names, grads))
            same: dict[str, list[str]] = {}
            for fwd in self.forward_order:  # values whose gradient is another value's, unchanged
                gnode = cot.get(fwd)
                if gnode is None or fwd in self.inlined or fwd.dtype == INT or owner.get(gnode) is fwd:
                    continue
                alias = "d" + saved[fwd]
                self.grad_of.setdefault(alias, saved[fwd])
                if gnode in names and gnode not in self.forward_set:
                    same.setdefault(names[gnode], []).append(alias)
                elif fwd.op == "param" or gnode in self.forward_set:  # e.g. d(x * W)/dW = x
                    equations.append(Equation(alias, gnode, self.render(gnode, False)[0],
                                              self.render(gnode, True)[0], self._c(gnode)))
            for pname, gnode in grad_nodes.items():  # parameters the loss does not reach: zero
                if gnode.op == "ew" and not gnode.inputs and gnode is not seed_node:
                    equations.append(Equation("d" + pname, gnode, "0", "0"))
                    self.grad_of["d" + pname] = pname
        finally:
            self.backward_names = names
            self.names = saved
        return LossPass(loss, seed, equations, grad_nodes, same)

    def derivatives(self) -> list[Derivative]:
        """Every elementwise function of the forward pass and its partial derivatives."""
        out, seen = [], set()
        for node in self.forward_order:
            if node.op != "ew" or not node.inputs:
                continue
            fn: Fn = node.attrs["fn"]
            if fn in seen:
                continue
            seen.add(fn)
            display = _display(fn)
            for i, x in enumerate(node.inputs):
                if x.dtype == INT:
                    continue
                partial = fn.partial(i)
                out.append(Derivative(fn, display[i], partial.raw, partial.expr, partial.uses_output))
        return out


def _display(fn: Fn) -> tuple[str, ...]:
    if fn.display != tuple(f"a{i}" for i in range(fn.nargs)):
        return fn.display
    if fn.name == "bce_with_logits":
        return ("z", "t")
    return ARGUMENT_NAMES.get(fn.nargs, tuple(f"a{i}" for i in range(fn.nargs)))


def _out_symbol(display: Sequence[str]) -> sp.Symbol:
    return sp.Symbol("y" if "y" not in display else "out")


def pretty_fn(fn: Fn, expr: sp.Expr | None = None, tex: bool = False) -> str:
    """An expression of `fn` with its display argument names (and y for its output)."""
    display = _display(fn)
    mapping = {ARGS[i]: sp.Symbol(n) for i, n in enumerate(display)}
    mapping[OUT] = _out_symbol(display)
    e = (fn.expr if expr is None else expr).xreplace(mapping)
    if tex:
        return sp.latex(e)
    return sp.sstr(e)


def cotangents(loss: Node, wrt: Sequence[Node]) -> tuple[dict[Node, Node], list[Node]]:
    """The gradient of `loss` with respect to every node between it and `wrt`, and the gradients
    of `wrt` - with `autodiff.grad`'s rules and order, so the nodes are the ones it returns."""
    cot = autodiff.cotangents(loss, wrt)
    return cot, [cot.get(w, ops.const(0.0, w.shape)) for w in wrt]


# --- text output ------------------------------------------------------------------------------

def summary_lines(graph: Graph) -> list[str]:
    ins = ", ".join(f"{n} {shape_str(x.shape)}{' int32' if x.dtype == INT else ''}" for n, x in graph.inputs.items())
    params = ", ".join(f"{n} {shape_str(x.shape)}" for n, x in graph.params.items())
    lines = [f"Model {graph.name!r}", f"  inputs      {ins or '-'}", f"  parameters  {params or '-'}"]
    if graph.outputs:
        lines.append(f"  outputs     {', '.join(graph.outputs)}")
    if graph.losses:
        lines.append(f"  losses      {', '.join(graph.losses)}")
    return lines


def _table(equations: list[Equation], indent: str = "  ") -> list[str]:
    width = max((len(e.name) for e in equations), default=0)
    body = [f"{indent}{e.name.ljust(width)} = {e.text}" for e in equations]
    col = min(max((len(b) for b in body), default=0), 76) + 3
    lines = []
    for b, e in zip(body, equations):
        lines.append((b.ljust(col - 3) + "   " + ", ".join(e.c_names)) if e.c_names else b)
    return lines


def derivative_lines(ex: Explanation) -> list[str]:
    lines = ["Elementwise derivatives (SymPy: derived by sympy.diff, then simplified)"]
    current = None
    for d in ex.derivatives():
        display = _display(d.fn)
        if d.fn is not current:
            current = d.fn
            lines.append(f"  {d.fn.name}({', '.join(display)}) = {pretty_fn(d.fn)}")
        raw, used = pretty_fn(d.fn, d.raw), pretty_fn(d.fn, d.simplified)
        if d.uses_output:
            note = f"rewritten in terms of the output {_out_symbol(display)} = {d.fn.name}({', '.join(display)})"
        elif d.raw == d.simplified:
            note = "unchanged by simplification"
        else:
            note = "simplified; in terms of the inputs"
        head = f"    ∂/∂{d.arg}"
        lines.append(f"{head}  derived     {raw}")
        lines.append(f"{' ' * len(head)}  simplified  {used}   ({note})")
    if len(lines) == 1:
        lines.append("  (none)")
    return lines


def explain_text(ex: Explanation, grad: bool = True) -> str:
    lines = summary_lines(ex.graph) + [""]
    if grad:
        lines += derivative_lines(ex) + [""]
    c_note = "   (right: the node computing it in the generated C)" if ex.c_names else ""
    lines.append("Forward pass" + (" (training mode, as the loss and its gradients see it)" if ex.eval_outputs else "")
                 + c_note)
    lines += _table(ex.forward_equations())
    evaluation = ex.eval_equations()
    if evaluation:
        lines += ["", "Forward pass in evaluation mode (model.forward: running statistics, no dropout), where it "
                  "differs"]
        lines += _table(evaluation)
    if grad:
        for loss in ex.graph.losses:
            lp = ex.backward_pass(loss)
            lines += ["", f"Backward pass of loss {loss!r} (reverse mode, in topological order)"]
            lines += _table([lp.seed] + lp.equations)
            if lp.same:
                groups = "; ".join(f"{' = '.join(v)} = {k}" for k, v in lp.same.items())
                lines.append(f"  (passed on unchanged: {groups})")
        lines += ["", "Notation: · matrix product, ⊙ elementwise product, ᵀ transpose, Σ_d sum over dimension d,",
                  "𝟙[c] 1 where c holds else 0, dV the gradient of the loss with respect to V."]
    return "\n".join(lines) + "\n"


def explain_latex(ex: Explanation, grad: bool = True) -> str:
    def align(equations: list[Equation]) -> list[str]:
        rows = [rf"  {tex_name(e.name, ex.grad_of)} &= {e.tex}" for e in equations]
        return [r"\begin{align*}", " \\\\\n".join(rows), r"\end{align*}"]
    lines = [f"% bpcompile show: model {ex.graph.name!r}"]
    if grad:
        lines += ["% Elementwise derivatives: as sympy.diff derived them, then as simplified", r"\begin{align*}"]
        rows = []
        for d in ex.derivatives():
            display = _display(d.fn)
            arg = sp.latex(sp.Symbol(d.arg))
            f = rf"\operatorname{{{tex_escape(d.fn.name)}}}({', '.join(sp.latex(sp.Symbol(a)) for a in display)})"
            row = rf"  \frac{{\partial}}{{\partial {arg}}} {f} &= {pretty_fn(d.fn, d.raw, tex=True)}"
            if d.raw != d.simplified:
                row += rf" = {pretty_fn(d.fn, d.simplified, tex=True)}"
            if d.uses_output:
                row += rf" && \text{{with }} {sp.latex(_out_symbol(display))} = {f}"
            rows.append(row)
        lines += [" \\\\\n".join(rows) if rows else "", r"\end{align*}"]
    lines.append("% Forward pass" + (" (training mode)" if ex.eval_outputs else ""))
    lines += align(ex.forward_equations())
    evaluation = ex.eval_equations()
    if evaluation:
        lines.append("% Forward pass in evaluation mode (model.forward), where it differs")
        lines += align(evaluation)
    if grad:
        for loss in ex.graph.losses:
            lp = ex.backward_pass(loss)
            lines.append(f"% Backward pass of loss {loss!r} (reverse mode, in topological order)")
            lines += align([lp.seed] + lp.equations)
    return "\n".join(lines) + "\n"


# --- Graphviz -----------------------------------------------------------------------------------

def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _op_label(node: Node) -> str:
    if node.op == "ew":
        fn = node.attrs["fn"]
        if not node.inputs:
            return f"const {number(float(fn.expr)) if fn.expr.is_number else fn.expr}"
        if _is_builtin(fn) or _is_named_function(fn):
            return fn.name
        return TextPrinter({a: f"#{i}" for i, a in enumerate(ARGS)}).doprint(fn.expr)
    if node.op == "matmul":
        return "matmul" + ("ᵀ·" if node.attrs["ta"] else "") + ("·ᵀ" if node.attrs["tb"] else "")
    if node.op == "reduce":
        return ("mean" if node.attrs["mean"] else "sum") + f" axes {list(node.attrs['axes'])}"
    return node.op


def to_dot(ex: Explanation) -> str:
    """Graphviz DOT of the forward graph and each loss's backward graph (as clusters)."""
    lines = [f"digraph {_dot_quote(ex.graph.name)} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];', '  edge [color="#555555"];']
    ids: dict[Node, str] = {}

    def node_line(node: Node, name: str | None, color: str) -> str:
        nid = ids.setdefault(node, f"n{len(ids)}")
        shape = {"input": "ellipse", "param": "box"}.get(node.op, "box")
        style = "rounded,filled" if node.op not in ("input", "param") else "filled"
        label = (f"{name}\n" if name else "") + (_op_label(node) if node.op not in ("input", "param") else node.op)
        label += f"\n{shape_str(node.shape)}"
        return (f"  {nid} [label={_dot_quote(label)}, shape={shape}, style={_dot_quote(style)}, "
                f"fillcolor={_dot_quote(color)}];")

    lines += ["  subgraph cluster_forward {", '    label="forward"; color="#4477aa";']
    for node in ex.forward_order:
        color = {"input": "#ddeeff", "param": "#ffeedd"}.get(node.op, "#ffffff")
        lines.append("  " + node_line(node, ex.names.get(node), color))
    lines.append("  }")
    edges = []
    for node in ex.forward_order:
        for x in node.inputs:
            edges.append(f"  {ids[x]} -> {ids[node]};")
    for loss in ex.graph.losses:
        lp = ex.backward_pass(loss)
        names = ex.backward_names
        cluster = re.sub(r"\W", "_", loss)
        lines += [f"  subgraph cluster_backward_{cluster} {{",
                  f"    label={_dot_quote(f'backward of {loss}')}; color=\"#aa3377\";"]
        for node in topo_order(list(lp.grads.values())):
            if node in ex.forward_set or node in ids:
                continue
            lines.append("  " + node_line(node, names.get(node), "#fbe9f1"))
            for x in node.inputs:
                style = " [style=dashed]" if x in ex.forward_set else ""
                edges.append(f"  {ids[x]} -> {ids[node]}{style};")
        lines.append("  }")
        for pname, gnode in lp.grads.items():
            if gnode in ids:
                sink = f"grad_{len(ids)}"
                ids[object()] = sink  # type: ignore[index]
                lines.append(f"  {sink} [label={_dot_quote('d' + pname)}, shape=plaintext];")
                edges.append(f"  {ids[gnode]} -> {sink};")
    lines += edges + ["}"]
    return "\n".join(lines) + "\n"


def explain(graph: Graph, lowered: Any = None) -> Explanation:
    """An Explanation of `graph`, tied to the C of `lowered` (a compiler.Lowered) when given."""
    return Explanation(graph, dict(lowered.node_names) if lowered is not None else None)
