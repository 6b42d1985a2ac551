"""`bp.compile`: the pipeline from a Graph to a loaded native model, stage by stage.

graph -> autodiff (one backward graph per loss) -> passes.schedule per entry point
(forward, loss_*, grad_*, train_*) -> codegen (one C file) -> build (cffi + gcc, cached)
-> runtime.CompiledModel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from .autodiff import reverse as autodiff
from .build import cffi_build as build
from .build import runtime_object
from .codegen import module as codegen
from .codegen.printer import CPrinter, print_formulas
from .ir.graph import Graph, Node, named_dims, topo_order
from .passes import pipeline as passes
from .passes.pipeline import Storage
from .runtime.model import CompiledModel
from .symbolic.stored import stored_in
from .train import formula
from .train.optim import SGD, Optimizer, PerLoss, as_optimizer, hyper_by_name

PARAM_ALIGN = 16  # elements: every parameter starts on a 64-byte boundary in float32
DEFAULT_BLAS_MIN_FLOPS = 64 * 64 * 64
DEFAULT_PARALLEL_MIN_WORK = 32768  # elements of a loop, or multiply-adds / 16 of a product


@dataclass
class EntryPlan:
    """An entry point before scheduling: its results (and, for train_*, the update)."""

    name: str
    doc: str
    results: list[tuple[Storage, Node]]
    loss: str | None = None
    trains: list[str] = field(default_factory=list)
    training: bool = True


@dataclass
class Lowered:
    """Everything `compile` produces before the build: sources, metadata, and the schedules."""

    sources: build.Sources
    entries: list[codegen.EntryCode]
    node_names: dict[Node, str]
    graph: Graph
    init_arrays: dict[str, np.ndarray]


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


def _param_layout(graph: Graph) -> tuple[dict[str, int], int]:
    offsets, offset = {}, 0
    for name, node in graph.params.items():
        offsets[name] = offset
        size = int(np.prod(node.shape, dtype=np.int64))
        offset += -(-size // PARAM_ALIGN) * PARAM_ALIGN
    return offsets, offset


def _entry_plans(graph: Graph, offsets: dict[str, int], optimizer: Optimizer | PerLoss | None) -> list[EntryPlan]:
    plans = []
    if graph.outputs:
        results = [(Storage("output", k, name), node) for k, (name, node) in enumerate(graph.outputs.items())]
        plans.append(EntryPlan("forward", f"named outputs {list(graph.outputs)} (evaluation mode)", results,
                               training=False))
    taken: set[str] = set()
    for lname, spec in graph.losses.items():
        suffix = codegen.c_identifier(lname, taken)
        names = graph.trained_params(lname)
        grads = autodiff.grad(spec.node, [graph.params[n] for n in names])
        loss_result = [(Storage("output", 0, lname), spec.node)]
        grad_results = loss_result + [(Storage("grad", offsets[n], n), g) for n, g in zip(names, grads)]
        plans.append(EntryPlan(f"loss_{suffix}", f"loss {lname!r}", loss_result, lname))
        plans.append(EntryPlan(f"eval_{suffix}", f"loss {lname!r} in evaluation mode", loss_result, lname,
                               training=False))
        plans.append(EntryPlan(f"grad_{suffix}", f"loss {lname!r} and the gradients of {names}", grad_results, lname))
        if optimizer is not None:
            kind = optimizer.for_loss(lname).kind
            state = [(Storage("param", offsets[n], n), v) for n, v in graph.state_updates.items()]
            plans.append(EntryPlan(f"train_{suffix}", f"one training step on loss {lname!r}: forward, backward, "
                                   f"{kind} update of {names}", grad_results + state, lname, names))
            # the train step in two calls (data-parallel training reduces the gradients in between):
            # the same kernels without the update, and the update alone from the gradient buffer
            plans.append(EntryPlan(f"backward_{suffix}", f"loss {lname!r}, the gradients of {names} into the "
                                   "gradient buffer and the running statistics: train step without the update",
                                   grad_results + state, lname))
            plans.append(EntryPlan(f"update_{suffix}", f"the {kind} update of {names} from the gradient "
                                   "buffer: the last part of a train step", [], lname, names))
    return plans


def _update_context(optimizer: Optimizer, trains: list[str], graph: Graph, offsets: dict[str, int],
                    param_size: int, renderer: codegen.ModuleRenderer) -> dict[str, Any]:
    """The update loop's template context: ranges of the flat buffer, slots, printed formulas,
    one set per parameter group (each group's constants are its own hyperparameters), and the
    hyperparameters it reads, printed from Optimizer.hyper_formula as C of the `hyper` array's
    step, learning rate and running products."""
    p, g = sp.Symbol("p", real=True), sp.Symbol("g", real=True)
    slots = {s: sp.Symbol(f"s_{s}", real=True) for s in optimizer.slots}
    group_of = optimizer.group_of(list(graph.params))
    printer = renderer.context().printer()
    m = formula.symbolic()
    group_hyper = optimizer.group_hyper(m.step, m.lr, m)
    groups, used, formulas = [], set(), []
    for k in sorted({group_of[n] for n in trains}):
        suffix = f"_g{k}" if k else ""
        hyper = {h: sp.Symbol(h + suffix, real=True) for h in group_hyper[k]}
        new_p, new_slots = optimizer.group(k).update(p, g, slots, hyper)
        for sym in [p, g, *slots.values(), *hyper.values()]:
            printer.names[sym] = sym.name
        outputs = [new_slots[s] for s in optimizer.slots] + [new_p]
        temps, values = print_formulas(outputs, printer, prefix=f"u{k}_" if k else "u")
        used |= set().union(*(e.free_symbols for e in outputs))
        members = [n for n in trains if group_of[n] == k]
        ranges = _merged_ranges([(offsets[n], _next_offset(n, graph, offsets, param_size)) for n in members])
        label = f"group {k} ({members}): " if optimizer.param_groups else ""
        formulas += [f"{label}{s} <- {sp.sstr(new_slots[s])}" for s in optimizer.slots]
        formulas.append(f"{label}p <- {sp.sstr(new_p)}")
        groups.append({"ranges": ranges, "temps": temps, "new_param": values[-1],
                       "slots": [{"name": f"s_{s}", "offset": j * param_size, "value": values[j]}
                                 for j, s in enumerate(optimizer.slots)]})
    inputs, hyper_temps, hyper = _hyper_code(optimizer, m, hyper_by_name(group_hyper), {sym.name for sym in used})
    return {
        "doc": codegen.comment_text(optimizer.describe()),
        "formulas": [codegen.comment_text(f) for f in formulas],
        "inputs": inputs, "hyper_temps": hyper_temps, "hyper": hyper,
        "clip": repr(optimizer.clip_norm) if optimizer.clip_norm else None,
        "ranges": [r for grp in groups for r in grp["ranges"]],
        "groups": groups,
    }


def _hyper_code(optimizer: Optimizer, m: formula.Symbolic, exprs: dict[str, Any],
                used: set[str]) -> tuple[list[dict], list[tuple[str, str]], list[dict]]:
    """The C (in double) of the hyperparameters named in `used` (of `exprs`, the optimizer's
    all_hyper in the symbolic namespace `m`), from the `hyper` array's entries
    (Optimizer.hyper_names: step, learning rate, running products): the entries read, common
    subexpressions, and each hyperparameter with its formula (for the comment)."""
    names = [h for h in exprs if h in used]
    entries = {m.step: "step", m.lr: "lr", **{sp.Symbol(n, positive=True): n for n in optimizer.running_products()}}
    c_names = {sym: f"hyper_{name}" for sym, name in entries.items()}
    outputs = [sp.sympify(exprs[h]) for h in names]
    temps, values = print_formulas(outputs, CPrinter("float64", dict(c_names)), prefix="hyper_x")
    read = set().union(*(e.free_symbols for e in outputs))
    order = list(optimizer.hyper_names())
    inputs = [{"c": c, "index": order.index(entries[sym])} for sym, c in c_names.items() if sym in read]
    hyper = [{"name": h, "value": v, "formula": codegen.comment_text(f"{h} = {sp.sstr(e)}")}
             for h, v, e in zip(names, values, outputs, strict=True)]
    return inputs, temps, hyper


def _next_offset(name: str, graph: Graph, offsets: dict[str, int], param_size: int) -> int:
    names = list(graph.params)
    i = names.index(name)
    return offsets[names[i + 1]] if i + 1 < len(names) else param_size


def _merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _classifier(graph: Graph, loss: Node) -> dict[str, str] | None:
    """{output, labels} when a loss is softmax cross-entropy (or nll_loss) of a named output and
    an input: the output's argmax is the predicted class, so fit and evaluate report accuracy."""
    for node in topo_order([loss]):
        scores_labels = _scores_and_labels(node)
        if scores_labels is not None and scores_labels[1].op == "input":
            for name, out in graph.outputs.items():
                if out is scores_labels[0]:
                    return {"output": name, "labels": scores_labels[1].attrs["name"]}
    return None


def _scores_and_labels(node: Node) -> tuple[Node, Node] | None:
    """(class scores, labels) of a softmax_ce node, or of the pick of bp.nll_loss (the labels
    reach it through an embedding lookup of the class index)."""
    if node.op == "softmax_ce":
        return node.inputs[0], node.inputs[1]
    if node.op == "ew" and node.attrs["fn"].name == "nll_pick" and len(node.inputs) == 3 \
            and node.inputs[0].op == "embedding":
        lookup = node.inputs[0]
        return node.inputs[1], lookup.inputs[lookup.attrs["label_arg"]]
    return None


def _label_classes(roots: list[Node]) -> dict[str, int]:
    """For integer inputs used as class labels, the number of classes (for error messages)."""
    classes = {}
    for node in topo_order(roots):
        labels = node.inputs[1] if node.op in ("softmax_ce", "softmax_ce_grad") else None
        while labels is not None and labels.op == "reshape":  # labels (batch, T) flattened to (T*batch,)
            labels = labels.inputs[0]
        if labels is not None and labels.op == "input":
            classes[labels.attrs["name"]] = node.inputs[0].shape[-1]
        elif "label_arg" in node.attrs and node.inputs[node.attrs["label_arg"]].op == "input":  # embedding ids
            classes[node.inputs[node.attrs["label_arg"]].attrs["name"]] = node.attrs["classes"]
    return classes


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return int(value)


def _options(blas_min_flops: int, parallel_min_work: int) -> dict[str, int]:
    """The thresholds the C is generated for (the runtime's and the kernels' alike)."""
    return {"blas_min_flops": _count("blas_min_flops", blas_min_flops),
            "parallel_min_work": _count("parallel_min_work", parallel_min_work)}


def lower(graph: Graph, dtype: str = "float32", optimizer: Optimizer | PerLoss | dict | None = None,
          blas_min_flops: int = DEFAULT_BLAS_MIN_FLOPS, parallel_min_work: int = DEFAULT_PARALLEL_MIN_WORK) -> Lowered:
    """Run every stage but the C compiler: the sources and metadata of the native module."""
    if not isinstance(graph, Graph):
        raise TypeError(f"compile expects a bp.Graph, got {type(graph).__name__}")
    if not graph.outputs and not graph.losses:
        raise ValueError(f"graph {graph.name!r} has no outputs and no loss: nothing to compile")
    dtype = _dtype_name(dtype)
    optimizer = as_optimizer(optimizer)
    if isinstance(optimizer, PerLoss):
        optimizer.check_losses({name: graph.trained_params(name) for name in graph.losses})
    offsets, param_size = _param_layout(graph)
    plans = _entry_plans(graph, offsets, optimizer)
    for plan in plans:
        modal = passes.specialize([node for _, node in plan.results], plan.training)
        plan.results = [(dest, node) for (dest, _), node in zip(plan.results, modal)]
    simplified = passes.simplify([node for plan in plans for _, node in plan.results])
    it = iter(simplified)
    for plan in plans:
        plan.results = [(dest, next(it)) for dest, _ in plan.results]
    order = topo_order(simplified)
    node_names = {n: (n.attrs["name"] if n.op in ("input", "param") else f"t{i}") for i, n in enumerate(order)}
    dims = sorted({d for node in graph.inputs.values() for d in node.shape if isinstance(d, str)})
    taken: set[str] = set()
    param_c = {n: codegen.c_identifier(n, taken) for n in graph.params}
    input_c = {n: codegen.c_identifier(n, taken) for n in graph.inputs}
    options = _options(blas_min_flops, parallel_min_work)
    renderer = codegen.ModuleRenderer(graph.name, dtype, dims, node_names, param_c, input_c, options)
    entries, entry_meta = [], {}
    updates: dict[tuple, dict[str, Any]] = {}
    for plan in plans:
        roots = [node for _, node in plan.results]
        reached = set(topo_order(roots))
        needed = [n for n, node in graph.inputs.items() if node in reached]
        known = {d for n in needed for d in graph.inputs[n].shape if isinstance(d, str)}
        for d in sorted({d for node in reached for d in named_dims(node.shape)} - known):
            source = next((n for n, node in graph.inputs.items() if d in node.shape), None)
            if source is not None and source not in needed:
                needed.append(source)  # read only for its size (e.g. the loss of x - x)
                known.update(x for x in graph.inputs[source].shape if isinstance(x, str))
        _check_dims_known(graph, roots, needed)

        def leaf_storage(node: Node, needed=needed) -> Storage:
            name = node.attrs["name"]
            if node.op == "input":
                return Storage("input", needed.index(name), name)
            return Storage("param", offsets[name], name)

        sched = passes.schedule(plan.results, leaf_storage)
        update = None
        if plan.trains:  # train_* and update_* run the same update: its formulas are derived and printed once
            key = (plan.loss, tuple(plan.trains))
            if key not in updates:
                updates[key] = _update_context(optimizer.for_loss(plan.loss), plan.trains, graph, offsets, param_size,
                                               renderer)
            update = updates[key]
        entries.append(codegen.EntryCode(plan.name, plan.doc, sched, update))
        entry_meta[plan.name] = {
            "inputs": needed,
            "buffers": [[b.coef, list(b.dims), b.start, b.end] for b in sched.buffers],
            "results": [{"name": dest.name, "shape": list(node.shape)} for dest, node in plan.results
                        if dest.kind == "output"],
        }
    c_source = renderer.module(entries)
    header = renderer.header(entries)
    cdef = "\n".join([codegen.entry_prototype(e.name, dtype) for e in entries]
                     + [codegen.POOL_PROTOTYPE, codegen.PLAN_PROTOTYPE])
    classes = _label_classes(simplified)
    init_arrays = {n: v for n, v in graph.param_init.items() if not isinstance(v, str)}
    meta = {
        "format": 1,
        "name": graph.name,
        "dtype": dtype,
        "dims": dims,
        "inputs": [{"name": n, "shape": list(node.shape), "dtype": node.dtype, "classes": classes.get(n)}
                   for n, node in graph.inputs.items()],
        "params": [{"name": n, "shape": list(node.shape), "offset": offsets[n], "trainable": n in graph.trainable,
                    "init": graph.param_init[n] if isinstance(graph.param_init[n], str) else "array",
                    "state_key": graph.state_names.get(n, (n, False))[0],
                    "state_transposed": graph.state_names.get(n, (n, False))[1]}
                   for n, node in graph.params.items()],
        "param_size": param_size,
        "state_size": len(optimizer.slots) * param_size if optimizer else 0,
        "optimizer": optimizer.config() if optimizer else None,
        "outputs": list(graph.outputs),
        "losses": [{"name": lname, "params": graph.trained_params(lname),
                    "classifier": _classifier(graph, spec.node),
                    # entry kind ("loss", "eval", "grad", "train") -> entry name, e.g. "train_d"
                    "entries": {plan.name.split("_", 1)[0]: plan.name for plan in plans if plan.loss == lname}}
                   for lname, spec in graph.losses.items()],
        "entries": entry_meta,
    }
    sources = build.Sources(graph.name, c_source, header, cdef, meta, codegen.runtime_source(dtype, options),
                            arrays=init_arrays, parts=renderer.parts)
    return Lowered(sources, entries, node_names, graph, init_arrays)


def _check_dims_known(graph: Graph, roots: list[Node], inputs: list[str]) -> None:
    """Every named dim of a computed value must come from an input the entry is given."""
    known = {d for n in inputs for d in graph.inputs[n].shape if isinstance(d, str)}
    for node in topo_order(roots):
        for d in sorted(named_dims(node.shape)):
            if d not in known:
                raise ValueError(f"graph {graph.name!r}: dimension {d!r} of {node} is not the size of any input "
                                 "this computation reads")


_UNSET: Any = object()  # compile() without an optimizer argument: SGD(lr=0.01) if the graph has a loss


def compile(graph: Graph, dtype: str = "float32", optimizer: Optimizer | PerLoss | dict | None = _UNSET, seed: int = 0,
            build_dir: str | Path | None = None, *, blas_min_flops: int = DEFAULT_BLAS_MIN_FLOPS,
            parallel_min_work: int = DEFAULT_PARALLEL_MIN_WORK) -> CompiledModel:
    """Compile `graph` to a native module (cached in `build_dir`) and load it.

    `optimizer` (when not given: SGD(lr=0.01) if the graph has a loss) is fused into `train_step`;
    optimizer=None compiles the forward, loss and gradient calls only (no train_step);
    `seed` draws the initial parameters. Products of at least `blas_min_flops` multiply-adds
    with every dimension >= 16 call OpenBLAS, others run as generated loops; 0 sends every
    product to OpenBLAS. Loops of at least `parallel_min_work` elements, products of at least
    16 times as many multiply-adds, and recurrent layers of as much work are split across the
    thread pool (`bp.set_num_threads`); 0 splits everything that can be split.
    """
    if optimizer is _UNSET:
        optimizer = SGD(lr=0.01) if graph.losses else None
    optimizer = as_optimizer(optimizer)
    build.start_probes()  # the compiler's answers, while the graph is lowered
    root = Path(build_dir) if build_dir is not None else build.default_build_root()
    if isinstance(graph, Graph):  # gcc compiles the runtime on another core while the graph is lowered
        name = _dtype_name(dtype)
        runtime_object.start(codegen.runtime_source(name, _options(blas_min_flops, parallel_min_work)), name, root)
    with stored_in(root):  # partials derived by earlier processes building here are read back
        lowered = lower(graph, dtype, optimizer, blas_min_flops, parallel_min_work)
    path = build.build(lowered.sources, root)
    model = CompiledModel(path, seed=seed, optimizer=copy.deepcopy(optimizer), init_arrays=lowered.init_arrays)
    model.graph = graph
    return model
