"""The optimizers of the standalone C export: each optimizer's learning-rate schedule and running
products (NAdam's momentum product) printed to C by the SymPy printer from the formulas the
runtime evaluates (`Schedule.formula`, `Optimizer.running_products`, over the namespaces of
`bpcompile.train.formula`). The hyperparameters themselves need nothing here: the update kernel,
the module's and the library's alike, computes them from the step, the rate and the products."""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from ..train.formula import Symbolic, symbolic
from ..train.optim import Optimizer
from ..train.schedules import FromFunction, Schedule

# what a model without an optimizer gets: rate 0, no hyperparameters
NO_OPTIMIZER = {"kind": "no", "doc": "no optimizer", "hyper": [], "schedule_doc": "no optimizer",
                "lr": {"temps": [], "value": "0.0"}, "product": None, "formulas": []}


def optimizer_contexts(optimizer: Any, losses: list[dict], notes: list[str]) -> tuple[list[dict], list[dict]]:
    """The template contexts of the distinct optimizers (the printed C of their learning-rate
    schedule and per-step hyperparameters) and of the named losses (index, C name, optimizer index).

    Losses sharing one optimizer object share its C functions, never its step count. A model
    without an optimizer gets one placeholder (rate 0, no hyperparameters)."""
    if optimizer is None:
        return [NO_OPTIMIZER], []
    chosen = [optimizer.for_loss(spec["name"]) for spec in losses] or [optimizer]
    distinct = list({id(o): o for o in chosen}.values())
    contexts = [_optimizer_context(o, notes) for o in distinct]
    losses_ctx = [{"name": spec["name"], "c": spec["entries"]["loss"][len("loss_"):], "index": k,
                   "optimizer": next(i for i, o in enumerate(distinct) if o is chosen[k])}
                  for k, spec in enumerate(losses)]
    return contexts, losses_ctx


def _optimizer_context(optimizer: Optimizer, notes: list[str]) -> dict[str, Any]:
    """One optimizer's printed C: its schedule, and what its train entry points read from the
    hyper array (Optimizer.step_hyper: the step, the learning rate and each running product,
    carried from step to step; the update computes the hyperparameters from them)."""
    name = type(optimizer).__name__
    if isinstance(optimizer.lr, FromFunction):
        notes.append(f"the learning rate of {name} is a Python function: the library uses its first value, "
                     f"{optimizer.lr.config()['lr']!r}, for every step (set m.lr to change it)")
    m = symbolic()
    products = optimizer.running_products()
    if len(products) > 1:
        raise ExportError(f"optimizer {name}: the export carries one running product per optimizer, this one has "
                          f"{sorted(products)}")
    product = None
    for pname, factor in products.items():
        factor_temps, (factor_value,) = _print([m.sp.sympify(factor(m.step, m))])
        product = {"name": pname, "temps": factor_temps, "value": factor_value}
    values = {"step": "(double)step", "lr": "lr", **{p: p for p in products}}
    names = list(optimizer.hyper_names())
    if set(names) != set(values):
        raise ExportError(f"optimizer {name}: its hyper array {names} holds values the export does not compute")
    lr_temps, (lr_value,) = _print([_lr_expr(optimizer.lr, m)])
    return {"kind": name, "doc": optimizer.describe(), "hyper": names, "schedule_doc": str(optimizer.lr.config()),
            "lr": {"temps": lr_temps, "value": lr_value}, "product": product,
            "formulas": [{"name": n, "value": values[n]} for n in names]}


def _lr_expr(schedule: Schedule, m: Symbolic) -> Any:
    """The schedule's rate as a SymPy expression of `step` (a Python function's rate: its first
    value, as its config stores it; FromFunction.formula)."""
    kind = type(schedule).__name__
    if type(schedule).__call__ is not Schedule.__call__:
        raise ExportError(f"learning-rate schedule {kind!r} has no C formula: its __call__ overrides "
                          "formula(step, m), which the export prints")
    try:
        return m.sp.sympify(schedule.formula(m.step, m))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ExportError(f"learning-rate schedule {kind!r} has no C formula ({e}); use a constant rate or a "
                          "bp.schedules schedule") from e


def _print(exprs: list[Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """C (double) of `exprs` in `step`, `lr` and running products: common subexpressions as
    (temp, C), then each expression."""
    from ..codegen.printer import CPrinter, print_formulas
    return print_formulas(exprs, CPrinter("float64", {}), prefix="x")
