"""Codegen: scheduled kernels -> C source, through Jinja2 templates and a SymPy C99 printer.

This module holds the `Context` kernel builders are handed and the assembly of the whole C
module; the printer is in `codegen.printer`, the core kinds' builders in `codegen.kernels`.
Scalar formulas are printed by `CPrinter` after `sympy.cse`; every loop, signature, load and
store is in `templates/`. Python only computes the data the templates fill in: names, sizes,
index expressions and printed formulas. Each kernel's comment lists the graph nodes it computes.
"""

from __future__ import annotations

import collections
import functools
import keyword
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import sympy as sp

from ..errors import CompileError
from ..ir.graph import INT, Node, Shape
from ..ir.kernel import Kernel, Mono
from ..ops.core import BUILDERS, FAILING_KINDS, OPS, TEMPLATES
from ..ops.display import ADD, ATOM, Notation, Shown
from ..passes.pipeline import Schedule, Storage, view_root
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS
from . import kernels  # noqa: F401 - registers the builders of the core kernel kinds
from .printer import CPrinter, print_formulas

# --- identifiers and comments ----------------------------------------------------------------

C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern float for goto
if inline int long register restrict return short signed sizeof static struct switch typedef union unsigned void
volatile while _Bool _Complex _Imaginary bool true false NULL main""".split())


def c_identifier(name: str, taken: set[str]) -> str:
    """A valid C identifier for a user name, distinct from every name in `taken` (then added)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    if base[0].isdigit():
        base = "_" + base
    if base in C_KEYWORDS or keyword.iskeyword(base) or base.startswith("__"):
        base = base + "_"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def comment_text(text: str) -> str:
    """Text safe as one line of a comment, C block comment or `#` line of a Makefile/shell script: no
    comment terminator or opener, no line break or other control character (each becomes a space),
    no trailing backslash (a line continuation)."""
    one_line = "".join(c if c.isprintable() else " " for c in str(text))
    return one_line.replace("*/", "* /").replace("/*", "/ *").rstrip("\\")


def file_stem(name: str, default: str = "model") -> str:
    """A file name stem made from a user name that stays inside the folder it is joined to: only
    letters, digits, `_`, `-` and inner dots (no separators, no `..`, no leading dot), at most 64 characters."""
    stem = re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip(".")[:64].strip(".")
    return re.sub(r"\.{2,}", ".", stem) or default


# --- what kernel builders get: the model's dims, dtype and printer (sizes: ir.kernel.Mono) -------

@dataclass
class Context:
    """What kernel builders need from the model: dtype, the C names of dims, the printer.

    `dims[len(dim_index)]` and `dims[len(dim_index) + 1]` hold the model seed and the step
    counter, for kernels that draw random numbers (`rng_decls`)."""

    dtype: str
    dim_index: dict[str, int]
    dim_c: dict[str, str]
    used_dims: set[str] = field(default_factory=set)
    node_ids: dict[Node, int] = field(default_factory=dict)
    printed: dict[tuple, tuple[list[tuple[str, str]], list[str]]] = field(default_factory=dict)

    def formulas(self, outputs: list[sp.Expr], leaves: list[sp.Symbol],
                 prefix: str = "x") -> tuple[list[tuple[str, str]], list[str]]:
        """print_formulas of `outputs` over the leaf symbols `leaves` (printed as their names),
        once per module: a model's repeated layers (and a loss over 1,000 parameters) repeat the
        same few formulas."""
        key = (tuple(outputs), tuple(leaves), prefix)
        if key not in self.printed:
            printer = self.printer()
            for s in leaves:
                printer.names[s] = s.name
            self.printed[key] = print_formulas(outputs, printer, prefix)
        return self.printed[key]

    def rng_decls(self) -> dict[str, int]:
        return {"seed_index": len(self.dim_index), "counter_index": len(self.dim_index) + 1}

    def c(self, m: Mono) -> str:
        """A Mono as C text, recording which dims the kernel must declare."""
        self.used_dims.update(m.dims)
        parts = [self.dim_c[d] for d in m.dims]
        if m.coef != 1 or not parts:
            parts.insert(0, str(m.coef))
        return "*".join(parts)

    def size(self, shape: Shape) -> str:
        return self.c(Mono.of(shape))

    def printer(self) -> CPrinter:
        names = {ew_mod.dim_symbol(d): c for d, c in self.dim_c.items()}
        return CPrinter(self.dtype, names)

    def dim_decls(self) -> list[dict[str, Any]]:
        return [{"c": self.dim_c[d], "index": self.dim_index[d]} for d in sorted(self.used_dims)]



Builder = Callable[[Kernel, Context], dict[str, Any]]


# --- describing nodes (kernel comments, `bpcompile show`) -------------------------------------

class _CommentNotation(Notation):
    """Kernel comments: the plain-text notation of `bpcompile show`, with an elementwise node
    written as its function, or as its SymPy formula over the operands' names."""

    def formula(self, node: Node, args: Sequence[Shown]) -> Shown:
        fn, names = node.attrs["fn"], [a for a, _ in args]
        if not names:
            return f"fill({fn.expr})", ATOM
        if fn.name in ew_mod.BUILTIN and fn.expr == ew_mod.BUILTIN[fn.name][0]:
            return f"{fn.name}({', '.join(names)})", ATOM
        return str(fn.expr.xreplace({ARGS[i]: sp.Symbol(a) for i, a in enumerate(names)})), ADD


_COMMENTS = _CommentNotation()


def describe(node: Node, name: Callable[[Node], str]) -> str:
    """A one-line formula for what a node computes, in terms of its inputs' names (its op's
    display rule, as `bpcompile show` writes it)."""
    return OPS[node.op].display(node, [(name(x), ATOM) for x in node.inputs], _COMMENTS)[0]


# --- rendering a whole module ------------------------------------------------------------------

@dataclass
class EntryCode:
    """An entry point to render: its name, doc line, and schedule."""

    name: str
    doc: str
    schedule: Schedule
    update: dict[str, Any] | None = None


def template_dir() -> Path:
    """The C templates: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the bpcompile package folder
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "module.c.j2").is_file():
            return candidate
    raise FileNotFoundError(f"bpcompile's C templates are missing (looked in {here / 'templates'})")


@functools.cache
def runtime_c() -> str:
    """templates/bp_runtime.h, the runtime support every module starts with (real C, not a template)."""
    return (template_dir() / "bp_runtime.h").read_text()


def runtime_source(dtype: str, options: dict[str, Any]) -> str:
    """runtime.c: the runtime support alone (templates/runtime.c.j2), the part of every module that
    depends on the dtype and the thresholds only, so the build compiles it once for many models.
    Rendered once per process for each (`bp.compile` starts gcc on it, then `lower` hands it on)."""
    return _runtime_source(dtype, tuple(sorted(options.items())))


@functools.cache
def _runtime_source(dtype: str, options: tuple[tuple[str, Any], ...]) -> str:
    return environment().get_template("runtime.c.j2").render(dtype=dtype, options=dict(options),
                                                             runtime_c=runtime_c())


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir()), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


class ModuleRenderer:
    """Renders kernels (deduplicated across entries) and entry functions into one C file."""

    def __init__(self, model_name: str, dtype: str, dim_names: list[str], node_names: dict[Node, str],
                 param_c: dict[str, str], input_c: dict[str, str], options: dict[str, Any]):
        self.env = environment()
        self.model_name = model_name
        self.dtype = dtype
        self.dim_index = {d: i for i, d in enumerate(dim_names)}
        taken: set[str] = set()
        self.dim_c = {d: "n_" + c_identifier(d, taken) for d in dim_names}
        self.node_names = node_names
        self.param_c = param_c
        self.input_c = input_c
        self.options = options
        self.functions: list[KernelFunction] = []
        self.kernel_by_text: dict[str, str] = {}
        self.parts = 1  # translation units the module compiles as (set by `module`)
        self.kernel_by_nodes: dict[tuple, tuple[str, list[str]]] = {}
        self._node_ids: dict[Node, int] | None = None
        self._printed: dict[tuple, tuple[list[tuple[str, str]], list[str]]] = {}

    def _render(self, template: str, **context: Any) -> str:
        """A template rendered; one that fails is a CompileError naming the model and the template."""
        try:
            return self.env.get_template(template).render(**context)
        except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError) as e:
            raise CompileError(f"model {self.model_name!r}: rendering the C template {template} failed "
                               f"({type(e).__name__}: {e})") from e

    def name(self, node: Node) -> str:
        if node in self.node_names:
            return self.node_names[node]
        if node.inputs:  # an extra result of a multi-output kernel
            return f"{self.name(node.inputs[0])}.{node.op}"
        return "?"

    def context(self) -> Context:
        if self._node_ids is None:  # once per module: once per kernel made compiling quadratic
            self._node_ids = {n: int(v[1:]) for n, v in self.node_names.items()
                              if v.startswith("t") and v[1:].isdigit()}
        return Context(self.dtype, self.dim_index, self.dim_c, node_ids=self._node_ids, printed=self._printed)

    def kernel(self, k: Kernel, sched: Schedule) -> tuple[str, list[str]]:
        """Render a kernel function (or reuse an identical one); returns its name and comment lines.
        The entries of a model (loss, gradient, train step, ...) share most kernels: each is built once."""
        key = (k.kind, tuple(k.nodes), tuple(k.inputs), tuple(k.outputs))
        if key not in self.kernel_by_nodes:
            self.kernel_by_nodes[key] = self._new_kernel(k)
        return self.kernel_by_nodes[key]

    def _new_kernel(self, k: Kernel) -> tuple[str, list[str]]:
        ctx = self.context()
        body = BUILDERS[k.kind](k, ctx)
        lines = [f"{self.name(n)} = {describe(n, self.name)}  {_shape(n.shape)}" for n in k.nodes]
        if k.kind == "copy":
            lines = [f"copy of {self.name(k.nodes[0])}  {_shape(k.nodes[0].shape)}"]
        params = [{"decl": _decl(x, "in", i, const=True), "name": f"in{i}"} for i, x in enumerate(k.inputs)]
        if k.kind != "copy":
            params += [{"decl": _decl(o, "out", j, const=False), "name": f"out{j}"} for j, o in enumerate(k.outputs)]
        else:
            params += [{"decl": _decl(k.nodes[0], "out", 0, const=False), "name": "out0"}]
        split = body.pop("split", None)
        failing = k.kind in FAILING_KINDS
        common = {"fname": "KERNEL_NAME", "params": params, "real": "bp_real",
                  "whole_signature": kernel_signature(params, failing, split=False)}
        text = self._render(TEMPLATES.get(k.kind, f"{k.kind}.c.j2"),
            comment=[COMMENT_SLOT], dims=ctx.dim_decls(), failing=failing, split=split,
            signature=kernel_signature(params, failing, split=bool(split)), **common, **body)
        if split:  # the kernel's body takes (part, parts); this wrapper runs it on the pool
            text += self._render("parallel.c.j2", dims=ctx.dim_decls(), **common, **split)
        return self._function(text, k.kind, common["whole_signature"], [comment_text(s) for s in lines]), lines

    def _function(self, text: str, kind: str, signature: str, comment: list[str] | None = None) -> str:
        """The name of a rendered function (text naming itself KERNEL_NAME and holding COMMENT_SLOT
        where its comment goes), added once. Kernels equal but for the nodes their comment names (a
        loss summing 1,000 squared parameters has 1,000 of them) share one function: each call site
        is commented with its own nodes, and the function's comment names the first."""
        fname = self.kernel_by_text.get(text)
        if fname is None:
            fname = f"k{len(self.functions)}_{kind}"
            self.kernel_by_text[text] = fname
            lines = "\n *   ".join(comment or [])
            self.functions.append(KernelFunction(fname, text.replace("KERNEL_NAME", fname).replace(COMMENT_SLOT, lines),
                                                 signature.replace("KERNEL_NAME", fname) + ";"))
        return fname

    def update(self, context: dict[str, Any]) -> str:
        """The optimizer update of a train entry as a function on the thread pool; its name."""
        params = [{"decl": "bp_real *restrict params", "name": "params"},
                  {"decl": "const bp_real *restrict grads", "name": "grads"},
                  {"decl": "bp_real *restrict state", "name": "state"},
                  {"decl": "const double *restrict hyper", "name": "hyper"}]
        common = {"fname": "KERNEL_NAME", "params": params, "real": "bp_real",
                  "whole_signature": kernel_signature(params, failing=False, split=False)}
        count = sum(end - start for start, end in context["ranges"])
        text = self._render("update.c.j2",
            signature=kernel_signature(params, failing=False, split=True), **common, **context)
        text += self._render("parallel.c.j2",
            dims=[], what="each parameter range", work="0" if context["clip"] else str(count), **common)
        return self._function(text, "update", common["whole_signature"])

    def entry(self, entry: EntryCode) -> str:
        sched = entry.schedule
        pointers = self._pointer_vars(sched)
        calls = []
        for k in sched.kernels:
            fname, lines = self.kernel(k, sched)
            args = [pointers[view_root(x)]["var"] for x in k.inputs]
            if k.kind == "copy":
                args.append(self._dest_expr(k.extra["dest"], k.nodes[0]))
            else:
                args += [pointers[o]["var"] for o in k.outputs]
            calls.append({"fname": fname, "args": args, "comment": [comment_text(s) for s in lines],
                          "failing": k.kind in FAILING_KINDS})
        update = self.update(entry.update) if entry.update is not None else None
        return self._render("entry.c.j2",
            name=entry.name, doc=comment_text(entry.doc), pointers=list(pointers.values()), calls=calls,
            update=update, signature=entry_signature(entry.name, "bp_real"))

    def _pointer_vars(self, sched: Schedule) -> dict[Node, dict[str, str]]:
        out: dict[Node, dict[str, str]] = {}
        for node, st in sched.storage.items():
            ctype = "int32_t" if node.dtype == INT else "bp_real"
            const = "const " if st.kind in ("input",) else ""
            var, expr, what = self._storage_c(node, st, ctype, const)
            out[node] = {"var": var, "decl": f"{const}{ctype} *", "expr": expr,
                         "comment": comment_text(f"{what} {_shape(node.shape)}")}
        return out

    def _storage_c(self, node: Node, st: Storage, ctype: str, const: str) -> tuple[str, str, str]:
        n = self.name(node)
        if st.kind == "input":
            return f"in_{self.input_c[st.name]}", f"({const}{ctype} *)inputs[{st.index}]", f"input {st.name!r}"
        if st.kind == "param":
            return f"p_{self.param_c[st.name]}", f"params + {st.index}", f"parameter {st.name!r}"
        if st.kind == "grad":
            return f"g_{self.param_c[st.name]}", f"grads + {st.index}", f"{n}: gradient of {st.name!r}"
        if st.kind == "output":
            return f"out{st.index}", f"({ctype} *)outputs[{st.index}]", f"{n}: output {st.name!r}"
        return c_identifier(n, set()), f"({ctype} *)(ws + ws_off[{st.index}])", f"{n}: workspace buffer {st.index}"

    def _dest_expr(self, dest: Storage, node: Node) -> str:
        ctype = "int32_t" if node.dtype == INT else "bp_real"
        return self._storage_c(node, dest, ctype, "")[1]

    def module(self, entries: list[EntryCode]) -> str:
        """The C module; sets `parts`, the translation units the build compiles it as."""
        entry_texts = [self.entry(e) for e in entries]
        texts = self._shared_noted()
        where = part_of_each([len(t) for t in texts])
        self.parts = max(where, default=0) + 1
        placed = [{"text": t, "part": k, "declaration": f.declaration} for t, k, f in zip(texts, where, self.functions)]
        return self._render("module.c.j2",
            model_name=comment_text(self.model_name), dtype=self.dtype, kernels=placed, parts=self.parts,
            runtime_c=runtime_c(), entries=entry_texts, options=self.options)

    def _shared_noted(self) -> list[str]:
        """The kernel texts, each shared one saying how many node groups call it."""
        uses = collections.Counter(fname for fname, _ in self.kernel_by_nodes.values())
        texts = []
        for f in self.functions:
            n = uses[f.name]
            texts.append(f"/* {f.name}: called for {n} node groups, each call commented with its own */\n{f.text}"
                         if n > 1 else f.text)
        return texts

    def header(self, entries: list[EntryCode]) -> str:
        return self._render("model.h.j2", model_name=comment_text(self.model_name), dtype=self.dtype,
            prototypes=[entry_prototype(e.name, self.dtype) for e in entries], pool_prototype=POOL_PROTOTYPE,
            plan_prototype=PLAN_PROTOTYPE)


@dataclass
class KernelFunction:
    """A kernel as the module holds it: its name, its C text and the declaration of the function
    entry points call (the parts of a module split for the compiler call kernels of other parts)."""

    name: str
    text: str
    declaration: str


# A module whose kernels are this much C compiles as two translation units, one per core: gcc's
# -O3 of the kernels is most of a cold compile (0.45 s of CPU for the W2 MLP's 40,000 characters).
# Part 0 also holds the entry points (the runtime's functions are compiled apart: build.runtime_object),
# weighed as this many characters of kernels; the heaviest kernel goes first to the lighter part.
SPLIT_MIN_CHARS = 16_000
PART0_EXTRA_CHARS = 3_000


def part_of_each(sizes: list[int]) -> list[int]:
    """The part (0 or 1) each kernel of these text sizes compiles in: all 0 under SPLIT_MIN_CHARS,
    else two parts of near-equal compile work. Deterministic in the sizes, so in the source."""
    if sum(sizes) < SPLIT_MIN_CHARS:
        return [0] * len(sizes)
    load, where = [PART0_EXTRA_CHARS, 0], [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        where[i] = 0 if load[0] <= load[1] else 1
        load[where[i]] += sizes[i]
    return where


def kernel_signature(params: list[dict[str, str]], failing: bool, split: bool) -> str:
    """The C signature of a kernel function (named KERNEL_NAME until it is added): it takes the
    runtime dims, then (part, parts) when it is the body a thread-pool piece runs, then its arrays;
    it returns int (non-zero: bad data) when `failing`. Kept out of line: gcc inlining every small
    kernel into its entry function made the register allocation of a 1,000-kernel entry take minutes."""
    args = ["const int64_t *dims", *(["int64_t part", "int64_t parts"] if split else []), *(p["decl"] for p in params)]
    storage = "__attribute__((noinline)) static" if split else "BP_KERNEL"  # static unless split: bp_runtime.h
    return f"{storage} {'int' if failing else 'void'} KERNEL_NAME{'_part' if split else ''}({', '.join(args)})"


POOL_PROTOTYPE = "int bp_set_num_threads(int n);"
# templates/bp_runtime.h's workspace plan, which runtime.native calls: model.h and cffi's cdef print this
PLAN_PROTOTYPE = ("int64_t bp_plan_workspace(int64_t n, const int64_t *table, int64_t stride, const int64_t *dims, "
                  "int64_t num_dims, int64_t itemsize, int64_t *off, int64_t *work);")
COMMENT_SLOT = "@KERNEL_COMMENT@"  # where a kernel's comment lines go once its text is known to be new


def entry_signature(name: str, real: str) -> str:
    """The C signature of an entry point, the one place the entry ABI is spelled (the definition
    in the module, the declaration in model.h and cffi's cdef all use it); `real` is the C type of
    the buffers (bp_real inside the module, float or double outside)."""
    return (f"int bp_{name}(const int64_t *dims, char *ws, const int64_t *ws_off, {real} *params, "
            f"{real} *grads, {real} *state, void *const *inputs, void *const *outputs, const double *hyper)")


def entry_prototype(name: str, dtype: str) -> str:
    """The C declaration of an entry point (model.h, cffi's cdef)."""
    return entry_signature(name, "float" if dtype == "float32" else "double") + ";"


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _decl(node: Node, prefix: str, i: int, const: bool) -> str:
    ctype = "int32_t" if node.dtype == INT else "bp_real"
    return f"{'const ' if const else ''}{ctype} *restrict {prefix}{i}"
