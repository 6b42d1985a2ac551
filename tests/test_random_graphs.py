"""Random well-typed graphs (tests/randgraph.py) compiled and checked against the NumPy reference
interpreter and float64 finite differences: a fixed-seed subset for every test run.

The long run (thousands of graphs) is one command: `python bench/fuzz_graphs.py --count 2000`.
`BP_RANDOM_GRAPHS=N` changes how many graphs this test draws (default 30).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import randgraph as rg
from hypothesis import HealthCheck, Phase, event, given, settings

EXAMPLES = int(os.environ.get("BP_RANDOM_GRAPHS", "30"))


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its program
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=rg.graph_cases())
def test_random_graph_matches_reference_and_finite_differences(case, build_dir):
    report, bug = rg.run_case(case)
    if bug is not None:
        event(f"known bug: {bug}")
        return
    event(f"dtypes: {'+'.join(case.dtypes)}")
    assert report.models == len(case.dtypes)


def test_generator_covers_every_op_kind():
    """The op mix does not degenerate: 150 drawn programs (not compiled) use every op kind."""
    seen: Counter = Counter()

    @settings(max_examples=150, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=rg.graph_cases())
    def draw(case):
        seen.update(case.ops)
        assert "g.loss(" in case.source
        graph = case.build()  # the printed program rebuilds the same graph
        assert set(graph.inputs) == set(case.data)

    draw()
    kinds = {"relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu", "silu", "exp", "log", "sqrt",
             "square", "abs", "neg", "binary+", "binary-", "binary*", "binary/", "binary**", "sum", "mean", "matmul",
             "reshape", "transpose", "flatten", "softmax", "log_softmax", "custom1", "custom2", "loss-weighted",
             "loss-mse", "loss-bce", "loss-ce", "loss-reduce", "where", "masked_fill", "max", "min", "layer_norm",
             "attention"}
    assert kinds <= set(seen), f"never drawn: {sorted(kinds - set(seen))}"


@pytest.mark.parametrize("name", sorted(rg.KNOWN_BUGS))
@pytest.mark.xfail(strict=True, reason="bug found by the random graphs: see randgraph.KNOWN_BUGS (reproduction and "
                                       "error text); remove the entry when fixed")
def test_known_bug_is_fixed(name):
    repro, _ = rg.KNOWN_BUGS[name]
    repro()


@pytest.mark.parametrize("name", sorted(rg.FIXED_BUGS))
def test_fixed_bug_stays_fixed(name):
    rg.FIXED_BUGS[name]()
