"""Reverse-mode automatic differentiation on the graph IR: `grad` builds the gradient graph
from each op's vector-Jacobian product in the ops registry."""

from .reverse import cotangents, grad

__all__ = ["cotangents", "grad"]
