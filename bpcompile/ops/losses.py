"""PyTorch's losses: mse, binary cross-entropy with logits, softmax cross-entropy (with label
smoothing) and nll_loss, built from graph ops, and the fused softmax cross-entropy op with its
gradient. Loaded with `ops.core`: every graph needs a loss."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import sympy as sp

from ..errors import ShapeError
from ..ir.graph import FLOAT, INT, Node, shape_str
from ..symbolic import functions as ew_mod
from ..symbolic.functions import ARGS, Fn
from .core import (
    _check_tensor,
    _log_softmax_ref,
    _need_float,
    _softmax_ref,
    ew,
    log_softmax,
    mean,
    reduced_count,
    register,
    reshape,
    softmax,
    square,
    sum,
)
from .display import UNARY, Notation, Shown

# --- losses -------------------------------------------------------------------------------
# PyTorch's losses and reductions: "mean" (the default) or "sum" over every element (over every
# label for the class-label losses). Built from graph ops, so each differentiates like any other.

REDUCTIONS = ("mean", "sum")


def _same_shape(a: Node, b: Node, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{what}: prediction {shape_str(a.shape)} and target {shape_str(b.shape)} "
                         "must have the same shape")


def _check_reduction(reduction: Any, what: str) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction


def _reduced(values: Node, reduction: str) -> Node:
    return mean(values) if reduction == "mean" else sum(values)


def _check_labels(scores: Node, labels: Node, what: str, scores_name: str) -> None:
    """Float scores (..., classes) and int32 labels of shape scores.shape[:-1]."""
    _check_tensor(scores, what)
    _check_tensor(labels, what)
    _need_float(scores, f"{what} {scores_name}")
    if labels.dtype != INT:
        raise ShapeError(f"{what}: labels must be an int32 tensor, got {labels.dtype} {shape_str(labels.shape)}")
    if scores.ndim < 1 or labels.shape != scores.shape[:-1]:
        raise ShapeError(f"{what}: {scores_name} {shape_str(scores.shape)} need labels of shape "
                         f"{shape_str(scores.shape[:-1])}, got labels {shape_str(labels.shape)}")


def mse(prediction: Node, target: Node, reduction: str = "mean") -> Node:
    """Squared error, averaged ("mean", PyTorch's default) or summed ("sum") over all elements."""
    _check_tensor(prediction, "mse")
    _check_tensor(target, "mse")
    _check_reduction(reduction, "mse")
    _same_shape(prediction, target, "mse")
    return _reduced(square(prediction - target), reduction)


def binary_cross_entropy_with_logits(logits: Node, target: Node, reduction: str = "mean") -> Node:
    """max(z,0) - z t + log(1 + exp(-|z|)) (stable for any z), averaged ("mean") or summed ("sum")
    over all elements."""
    _check_tensor(logits, "binary_cross_entropy_with_logits")
    _check_tensor(target, "binary_cross_entropy_with_logits")
    _check_reduction(reduction, "binary_cross_entropy_with_logits")
    _same_shape(logits, target, "binary_cross_entropy_with_logits")
    return _reduced(ew(ew_mod.builtin("bce_with_logits"), logits, target), reduction)


def softmax_cross_entropy(logits: Node, labels: Node, reduction: str = "mean", label_smoothing: float = 0.0) -> Node:
    """-log softmax(logits)[label] with integer labels (class on the last axis), averaged over the
    labels ("mean") or summed ("sum"), as torch's F.cross_entropy. With `label_smoothing` e, the
    target puts 1 - e on the label and e / classes on every class (torch's definition):
    (1 - e) * the loss above + e * the mean (or sum) of -log softmax(logits) summed over classes / classes."""
    _check_labels(logits, labels, "softmax_cross_entropy", "logits")
    _check_reduction(reduction, "softmax_cross_entropy")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    loss = Node("softmax_ce", (logits, labels), {}, (), FLOAT)  # fused: the mean over the labels
    if reduction == "sum":
        rows = reduced_count(labels.shape, tuple(range(labels.ndim)))
        loss = ew(Fn("times_rows", ARGS[0] * rows, 1), loss)
    smoothing = float(label_smoothing)
    if smoothing == 0.0:
        return loss
    # -sum over classes of log softmax / classes, reduced over the labels: for "mean" that is the
    # mean over every element; for "sum", the sum over every element / classes
    spread = -_reduced(log_softmax(logits), reduction)
    if reduction == "sum":
        spread = spread / logits.shape[-1]
    return (1.0 - smoothing) * loss + smoothing * spread


_NLL_PICK = Fn("nll_pick", sp.Piecewise((-ARGS[1], sp.Eq(ARGS[0], ARGS[2])), (0, True)), 3,
               ("label", "log_prob", "class"))


def nll_loss(log_probs: Node, labels: Node, reduction: str = "mean") -> Node:
    """-log_probs[label] with integer labels (class on the last axis), averaged over the labels
    ("mean") or summed ("sum"), as torch's F.nll_loss (e.g. of bp.log_softmax(logits)). A label
    outside [0, classes) makes the call raise InputError."""
    from .embeddings import embedding  # the family ops load after core (they import it)
    from .transformer import constant
    _check_labels(log_probs, labels, "nll_loss", "log_probs")
    _check_reduction(reduction, "nll_loss")
    classes = log_probs.shape[-1]
    if not isinstance(classes, int):
        raise ShapeError(f"nll_loss: the class axis of log_probs {shape_str(log_probs.shape)} must have a fixed size")
    index = constant(np.arange(classes, dtype=np.float64).reshape(classes, 1))
    label = embedding(labels, index)  # (..., 1): each label as a number, checked to be in [0, classes)
    picked = ew(_NLL_PICK, label, log_probs, reshape(index, (classes,)))  # -log_probs at the label, else 0
    return _reduced(sum(picked, axis=-1), reduction)


def _softmax_ce_vjp(node: Node, g: Node) -> list[Node | None]:
    logits, labels = node.inputs
    return [g * Node("softmax_ce_grad", (logits, labels), {}, logits.shape, FLOAT), None]


def _softmax_ce_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    logits, labels = args
    logp = _log_softmax_ref(logits.reshape(-1, logits.shape[-1]))
    return -np.mean(logp[np.arange(logp.shape[0]), labels.reshape(-1).astype(np.int64)])


def _softmax_ce_grad_ref(node: Node, args: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
    logits, labels = args
    flat = logits.reshape(-1, logits.shape[-1])
    p = _softmax_ref(flat)
    p[np.arange(flat.shape[0]), labels.reshape(-1).astype(np.int64)] -= 1.0
    return (p / flat.shape[0]).reshape(logits.shape)


def _softmax_ce_grad_vjp(node: Node, g: Node) -> list[Node | None]:
    """softmax_ce_grad = (softmax(x) - onehot(labels)) / rows: its VJP is softmax's,
    p * (g - sum(g * p)) / rows, the labels' part being constant (a gradient penalty on a
    cross-entropy loss differentiates through it)."""
    logits, labels = node.inputs
    p = softmax(logits)
    rows = reduced_count(labels.shape, tuple(range(labels.ndim)))
    centred = g - sum(g * p, axis=-1, keepdims=True)
    return [ew(Fn("softmax_ce_hvp", ARGS[0] * ARGS[1] / rows, 2), p, centred), None]


def _softmax_ce_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """mean_batch -log softmax(logits)[labels]."""
    logits, labels = args[0][0], args[1][0]
    picked = rf"-\log {n.call('softmax', logits)}_{{{labels}}}" if n.tex else f"-log softmax({logits})[{labels}]"
    return n.reduction("mean", [str(d) for d in node.inputs[1].shape], picked), UNARY


def _softmax_ce_grad_display(node: Node, args: Sequence[Shown], n: Notation) -> Shown:
    """(softmax(logits) - onehot(labels)) / rows: the mean's gradient with respect to the logits."""
    logits, labels = args[0][0], args[1][0]
    return n.fraction(f"{n.call('softmax', logits)} - {n.call('onehot', labels)}", n.rows(node.inputs[1].shape))


register("softmax_ce", vjp=_softmax_ce_vjp, ref=_softmax_ce_ref, kernel="softmax_ce", display=_softmax_ce_display)
register("softmax_ce_grad", vjp=_softmax_ce_grad_vjp, ref=_softmax_ce_grad_ref, kernel="softmax_ce",
         display=_softmax_ce_grad_display)
