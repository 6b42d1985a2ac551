"""One formula per schedule and per optimizer hyperparameter (bpcompile.train.formula): the floats
Python computes equal the SymPy expressions printed to C, and the printed C (the update kernel's
hyperparameters, the export's schedule and running product) computes them too; `step_dependent`
says whether the step appears; NAdam's momentum product costs one factor a step."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import sympy as sp

from bpcompile import compiler
from bpcompile.tools import export_optim
from bpcompile.train import formula, optim
from bpcompile.train.optim import OPTIMIZERS
from bpcompile.train.schedules import SCHEDULES, Constant, Cosine, LinearWarmup, StepDecay

STEPS = 40

SCHEDULE_CASES = {
    "constant": Constant(0.15),
    "step-decay-3": StepDecay(0.2, step_size=3, gamma=0.5),  # (step - 1) / 3 is not exact as step * (1/3)
    "step-decay-7": StepDecay(1.0, step_size=7, gamma=0.9),
    "cosine-min-lr": Cosine(0.3, total_steps=9, min_lr=0.01),  # and beyond total_steps
    "warmup": LinearWarmup(0.25, warmup_steps=3),
    "warmup-none": LinearWarmup(0.25, warmup_steps=0),
    "warmup-cosine": LinearWarmup(Cosine(0.3, total_steps=5), warmup_steps=2),
    "warmup-step-decay": LinearWarmup(StepDecay(0.1, step_size=4, gamma=0.3), warmup_steps=5),
}

GROUPS = [{"params": ["b"], "weight_decay": 0.0, "lr_scale": 0.5}]
OPTIMIZER_CASES = {
    "sgd": lambda: optim.SGD(lr=0.1),
    "sgd-momentum-dampening": lambda: optim.SGD(lr=0.1, momentum=0.9, dampening=0.1),
    "sgd-nesterov-groups": lambda: optim.SGD(lr=0.1, momentum=0.9, nesterov=True, param_groups=GROUPS),
    "adam": lambda: optim.Adam(lr=1e-3, betas=(0.8, 0.99)),
    "adamw-groups": lambda: optim.AdamW(lr=1e-2, weight_decay=0.1, param_groups=GROUPS),
    "rmsprop": lambda: optim.RMSprop(lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda: optim.Adagrad(lr=0.05, lr_decay=0.01),
    "adagrad-no-decay": lambda: optim.Adagrad(lr=0.05),
    "adadelta": lambda: optim.Adadelta(lr=1.0),
    "adamax": lambda: optim.Adamax(lr=2e-3),
    "nadam": lambda: optim.NAdam(lr=2e-3, momentum_decay=0.01),
    "nadam-decoupled-groups": lambda: optim.NAdam(lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True,
                                                  param_groups=GROUPS),
}


def test_every_schedule_and_optimizer_has_a_case():
    assert {type(s).__name__ for s in SCHEDULE_CASES.values()} == set(SCHEDULES)
    assert {make().kind for make in OPTIMIZER_CASES.values()} == set(OPTIMIZERS)


def symbolic_hyper(optimizer: optim.Optimizer) -> tuple[formula.Symbolic, dict[str, sp.Expr]]:
    m = formula.symbolic()
    return m, {k: sp.sympify(v) for k, v in optimizer.all_hyper(m.step, m.lr, m).items()}


def value_at(expr: sp.Expr, m: formula.Symbolic, step: int, lr: float) -> float:
    """`expr` at `step`, `lr`, its running products multiplied out."""
    subs = {m.step: step, m.lr: lr}
    for name, factor in m.products.items():
        subs[sp.Symbol(name, positive=True)] = np.prod([float(factor.subs(m.step, k)) for k in range(1, step + 1)])
    return float(expr.subs(subs).evalf(30))


@pytest.mark.parametrize("schedule", SCHEDULE_CASES.values(), ids=SCHEDULE_CASES)
def test_schedule_floats_are_its_sympy_expression(schedule):
    m = formula.symbolic()
    expr = export_optim._lr_expr(schedule, m)
    for step in range(1, STEPS + 1):
        assert schedule(step) == pytest.approx(value_at(expr, m, step, 0.0), rel=1e-14, abs=1e-300), step


@pytest.mark.parametrize("make", OPTIMIZER_CASES.values(), ids=OPTIMIZER_CASES)
def test_hyperparameter_floats_are_their_sympy_expressions(make):
    optimizer = make()
    m, exprs = symbolic_hyper(optimizer)
    for step in (*range(1, 8), 30, 3):  # and back to an earlier step: a load
        values = optimizer.all_hyper(step, 0.01, formula.NUMERIC)
        assert list(values) == list(exprs)
        for name, expr in exprs.items():
            assert values[name] == pytest.approx(value_at(expr, m, step, 0.01), rel=1e-13), (name, step)
    stepped = {m.step} | {sp.Symbol(p, positive=True) for p in m.products}
    uses_step = any(e.free_symbols & stepped for e in exprs.values())
    assert optimizer.step_dependent == uses_step


def test_nadam_momentum_product_costs_one_factor_a_step():
    optimizer = optim.NAdam(lr=0.01)
    calls = []
    mu = optimizer._mu
    optimizer._mu = lambda k, m: calls.append(k) or mu(k, m)
    exact = 1.0
    for step in range(1, 201):
        exact *= mu(step, formula.NUMERIC)
        calls.clear()
        h = optimizer.hyper(step, 0.01)
        assert len(calls) == 3  # this step's factor, and mu_t, mu_t+1 in the coefficients
        assert h["g_coef"] == 0.01 * (1 - mu(step, None)) / (1 - exact)
    optimizer.hyper(150, 0.01)  # two step counts sharing the optimizer (two losses): each continues
    for step in range(151, 160):
        calls.clear()
        optimizer.hyper(step, 0.01)
        optimizer.hyper(step + 50, 0.01)
        assert len(calls) == 6


CC = os.environ.get("CC", "gcc")
PROGRAM = """#include <math.h>
#include <stdint.h>
#include <stdio.h>

static double lr_of(int64_t step)
{
%(lr_body)s
}

static double factor(int64_t step)
{
    (void)step;
%(factor_body)s
}

int main(void)
{
    double mu_product = 1.0;
    for (int64_t step = 1; step <= %(steps)d; ++step) {
        const double lr = lr_of(step);
        mu_product *= factor(step);
        const double hyper[%(inputs)d] = {%(inputs_values)s};  /* the hyper array of a train step */
%(hyper_body)s
        const double values[%(count)d] = {%(values)s};
        printf("%%.17g", lr);
        for (int k = 0; k < %(count)d; ++k)
            printf(" %%.17g", values[k]);
        printf("\\n");
    }
    return 0;
}
"""


def _body(temps: list[tuple[str, str]], ret: str, indent: str = "    ") -> str:
    return "\n".join([f"{indent}const double {n} = {v};" for n, v in temps] + [f"{indent}{ret}"])


@pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=OPTIMIZER_CASES)
def test_printed_c_computes_the_runtimes_values(tmp_path, case):
    """The printed C (compiled at -Wall -Wextra -Werror) gives the Python values step for step,
    under each schedule: the export's schedule and running product fill the hyper array as
    Optimizer.step_hyper does, from which the update kernel's code computes every hyperparameter."""
    schedule = list(SCHEDULE_CASES.values())[list(OPTIMIZER_CASES).index(case) % len(SCHEDULE_CASES)]  # each once
    optimizer = OPTIMIZER_CASES[case]()
    optimizer.lr = schedule
    (ctx,), _ = export_optim.optimizer_contexts(optimizer, [], [])
    product = ctx["product"] or {"temps": [], "value": "1.0"}
    names = list(optimizer.all_hyper(1, 1.0, formula.NUMERIC))
    m = formula.symbolic()
    inputs, temps, hyper = compiler._hyper_code(optimizer, m, optimizer.all_hyper(m.step, m.lr, m), set(names))
    assert [h["name"] for h in hyper] == names
    body = [f"        const double {i['c']} = hyper[{i['index']}];" for i in inputs]
    body += [f"        const double {n} = {v};" for n, v in temps]
    source = PROGRAM % {"lr_body": _body(ctx["lr"]["temps"], f"(void)step;\n    return {ctx['lr']['value']};"),
                        "factor_body": _body(product["temps"], f"return {product['value']};"),
                        "inputs": len(ctx["formulas"]), "inputs_values": ", ".join(h["value"] for h in ctx["formulas"]),
                        "hyper_body": "\n".join(body), "count": len(hyper),
                        "values": ", ".join(h["value"] for h in hyper), "steps": STEPS}
    (tmp_path / "hyper.c").write_text(source)
    built = subprocess.run([CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-o", "hyper", "hyper.c", "-lm"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    lines = subprocess.run(["./hyper"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.split("\n")
    printed = np.array([[float(v) for v in line.split()] for line in lines if line])
    expected = np.array([[optimizer.lr_at(s), *optimizer.all_hyper(s, optimizer.lr_at(s), formula.NUMERIC).values()]
                         for s in range(1, STEPS + 1)])
    np.testing.assert_allclose(printed, expected, rtol=1e-14, atol=1e-300)
