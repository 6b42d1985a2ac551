"""The optimizers of the standalone C export: each optimizer's learning-rate schedule and per-step
hyperparameters printed to C by the SymPy printer from the formulas the runtime evaluates
(`Schedule.formula`, `Optimizer.hyper_formula`, over the namespaces of `bpcompile.train.formula`),
so that the library and the Python module compute the same values from one definition."""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from ..train.formula import Symbolic, symbolic
from ..train.optim import Optimizer
from ..train.schedules import FromFunction, Schedule, schedule_from_config

# what a model without an optimizer gets: rate 0, no hyperparameters
NO_OPTIMIZER = {"kind": "no", "doc": "no optimizer", "hyper": [], "schedule_doc": "no optimizer",
                "lr": {"temps": [], "value": "0.0"}, "product": None, "hyper_temps": [], "formulas": []}


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
    """One optimizer's printed C; refuses an optimizer or schedule whose Python values do not
    come from a formula (an overridden `hyper` or `__call__`)."""
    name = type(optimizer).__name__
    if isinstance(optimizer.lr, FromFunction):
        notes.append(f"the learning rate of {name} is a Python function: the library uses its first value, "
                     f"{optimizer.lr.config()['lr']!r}, for every step (set m.lr to change it)")
    m = symbolic()
    names, exprs = _hyper_exprs(optimizer, m)
    if len(m.products) > 1:
        raise ExportError(f"optimizer {name}: the export carries one running product per optimizer, this one has "
                          f"{sorted(m.products)}")
    temps, values = _print(exprs)
    product = None
    for pname, factor in m.products.items():
        factor_temps, (factor_value,) = _print([factor])
        product = {"name": pname, "temps": factor_temps, "value": factor_value}
    lr_temps, (lr_value,) = _print([_lr_expr(optimizer.lr, m)])
    return {"kind": name, "doc": optimizer.describe(), "hyper": names, "schedule_doc": str(optimizer.lr.config()),
            "lr": {"temps": lr_temps, "value": lr_value}, "product": product, "hyper_temps": temps,
            "formulas": [{"name": n, "value": v} for n, v in zip(names, values, strict=True)]}


def _hyper_exprs(optimizer: Optimizer, m: Symbolic) -> tuple[list[str], list[Any]]:
    """The hyperparameters of Optimizer.step_hyper (its own, then each parameter group's, named
    `<name>_g<k>`, at its lr_scale) as SymPy expressions of `step` and `lr`."""
    name = type(optimizer).__name__
    names = list(optimizer.hyper_names())
    exprs: dict[str, Any] = {}
    for k in range(len(optimizer.param_groups) + 1):
        member = optimizer.group(k)
        scale = optimizer.param_groups[k - 1]["lr_scale"] if k else 1.0
        try:
            values = member.hyper_formula(m.step, m.lr if scale == 1.0 else m.lr * scale, m)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise ExportError(f"optimizer {name}: its hyper_formula has no symbolic form to print ({e})") from e
        exprs.update({h + (f"_g{k}" if k else ""): v for h, v in values.items()})
    missing = [h for h in names if h not in exprs]
    if missing or type(optimizer).hyper is not Optimizer.hyper:
        what = f"hyperparameter {missing[0]!r} has" if missing else "its hyper() overrides hyper_formula() and has"
        raise ExportError(f"optimizer {name}: {what} no C formula (the export prints hyper_formula(step, lr, m))")
    if list(exprs) != names:
        raise ExportError(f"optimizer {name}: hyperparameters {names} are not its groups' in order "
                          f"({list(exprs)}); the export cannot lay out the hyper array")
    return names, [m.sp.sympify(exprs[h]) for h in names]


def _lr_expr(schedule: Schedule, m: Symbolic) -> Any:
    """The schedule's rate as a SymPy expression of `step`. A Python function's rate is its first
    value, as its config stores it."""
    try:
        schedule = schedule_from_config(schedule.config())  # FromFunction, nested too: its config's Constant
    except (KeyError, TypeError):
        pass  # a schedule class of the user's: its own formula
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
