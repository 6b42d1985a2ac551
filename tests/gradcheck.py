"""The tests' gradient checks: bpcompile's own (bpcompile/tools/gradcheck.py), which
`bpcompile check` and the random-graph fuzzer use too."""

from bpcompile.tools.gradcheck import check_model_gradients, directional_fd
from bpcompile.tools.gradcheck import graph_inputs as random_inputs

__all__ = ["check_model_gradients", "directional_fd", "random_inputs"]
