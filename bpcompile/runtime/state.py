"""A compiled model's parameters under PyTorch's names and layouts: state dicts, and
checkpoints in the safetensors format.

Each parameter carries its state-dict key and whether that layout is its transpose (meta.json's
"state_key" and "state_transposed", set by the bp.nn layers through
`Graph.name_in_state_dict`): a Dense layer "fc1" stores its weight (in, out) and gives
"fc1.weight" as (out, in), as torch.nn.Linear holds it. Names are never guessed from shapes, so a
square weight comes out right.

A `.safetensors` checkpoint holds the state dict (readable by `safetensors.numpy.load_file` and,
after dropping the "bpcompile." keys, by torch's `load_state_dict`), the optimizer state as the
tensor "bpcompile.optimizer_state", and the step count and the model's signature in the file's
metadata. The safetensors package is the optional extra `bpcompile[safetensors]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError

OPTIMIZER_KEY = "bpcompile.optimizer_state"
SIGNATURE_KEY, STEP_KEY, LOSS_STEPS_KEY = "bpcompile.signature", "bpcompile.step", "bpcompile.loss_steps"
BATCHES_TRACKED = "num_batches_tracked"  # PyTorch's batch-norm counter: written as the step count, read and ignored


def _key(p: dict) -> str:
    return p.get("state_key", p["name"])


def _counter(p: dict) -> str | None:
    """The key of PyTorch's batch-norm counter that follows a running variance, if `p` is one."""
    suffix = ".running_var"
    key = _key(p)
    return key[:-len(suffix)] + "." + BATCHES_TRACKED if not p["trainable"] and key.endswith(suffix) else None


def _counters(model: Any) -> list[str]:
    return [c for c in map(_counter, model.meta["params"]) if c]


def state_dict(model: Any) -> dict[str, np.ndarray]:
    """Every parameter (running statistics included) as a fresh array, keyed and laid out as
    PyTorch's state_dict of the same layers."""
    out = {}
    for p in model.meta["params"]:
        value = model.params[p["name"]]
        out[_key(p)] = np.array(value.T if p.get("state_transposed") else value, order="C")  # a copy
        counter = _counter(p)
        if counter:
            out[counter] = np.asarray(model.step, dtype=np.int64)
    return out


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_state_dict(model: Any, state: Mapping[str, Any], strict: bool = True) -> None:
    """Set parameters from a state dict keyed as `state_dict` names them (NumPy arrays or torch
    tensors). Missing, unexpected (with strict) or misshapen entries are all listed in one
    InputError, and then nothing is changed."""
    if not isinstance(state, Mapping):
        raise InputError(f"load_state_dict expects a mapping of names to arrays, got {type(state).__name__}")
    expected = {_key(p): p for p in model.meta["params"]}
    ignored = set(_counters(model))
    problems, values = [], {}
    for key, p in expected.items():
        if key not in state:
            continue
        shape = tuple(reversed(p["shape"])) if p.get("state_transposed") else tuple(p["shape"])
        try:
            value = _as_array(state[key])
        except (TypeError, ValueError, RuntimeError) as e:
            problems.append(f"{key!r} is not an array ({e})")
            continue
        if value.shape != shape or value.dtype.kind not in "fiub":
            problems.append(f"{key!r} has shape {value.shape} and dtype {value.dtype}, "
                            f"expected numbers of shape {shape}")
            continue
        values[p["name"]] = value.T if p.get("state_transposed") else value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    if strict and missing:
        problems.append(f"missing {missing}")
    if strict and unexpected:
        problems.append(f"unexpected {unexpected} (this model's keys are {list(expected)})")
    if problems:
        raise InputError(f"load_state_dict into model {model.name!r}: {'; '.join(problems)}; nothing was changed")
    for name, value in values.items():
        model.params[name][...] = value


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix == ".safetensors"


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("checkpoints in .safetensors need the safetensors package: "
                          "pip install 'bpcompile[safetensors]'") from None
    return safetensors


def safetensors_bytes(model: Any) -> bytes:
    """The model's checkpoint in the safetensors format (state dict, optimizer state, step)."""
    st = _safetensors()
    tensors = state_dict(model)
    if OPTIMIZER_KEY in tensors:
        raise CheckpointError(f"parameter key {OPTIMIZER_KEY!r} is reserved for the optimizer state")
    if model.meta["state_size"]:
        tensors[OPTIMIZER_KEY] = np.ascontiguousarray(model._state_flat[:model.meta["state_size"]])
    metadata = {SIGNATURE_KEY: json.dumps(model._signature()), STEP_KEY: str(model.step),
                LOSS_STEPS_KEY: json.dumps([model.loss_steps[n] for n in model._losses])}
    return st.numpy.save(tensors, metadata=metadata)


def read_safetensors(model: Any, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors checkpoint as the arrays of an .npz one ("param/<name>" in bpcompile's
    layouts, "state", "step", "signature"), for the same validation."""
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except Exception as e:  # safetensors raises its own SafetensorError on damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if SIGNATURE_KEY not in metadata:
        raise CheckpointError(f"{path}: not a bpcompile checkpoint (no {SIGNATURE_KEY!r} in its metadata); "
                              "a plain state dict loads with model.load_state_dict(safetensors.numpy.load_file(path))")
    try:
        step = int(metadata.get(STEP_KEY, ""))
        loss_steps = json.loads(metadata[LOSS_STEPS_KEY]) if LOSS_STEPS_KEY in metadata else None
        if loss_steps is not None:
            loss_steps = np.asarray(loss_steps, dtype=np.int64)
    except (ValueError, TypeError):
        raise CheckpointError(f"{path}: damaged checkpoint (step {metadata.get(STEP_KEY)!r}, "
                              f"loss steps {metadata.get(LOSS_STEPS_KEY)!r})") from None
    files = {"signature": np.asarray(metadata[SIGNATURE_KEY]), "step": np.asarray(step, dtype=np.int64),
             "state": tensors.get(OPTIMIZER_KEY, np.zeros(0))}
    if loss_steps is not None:
        files["loss_steps"] = loss_steps
    for p in model.meta["params"]:
        value = tensors.get(_key(p))
        if value is not None:
            files[f"param/{p['name']}"] = value.T if p.get("state_transposed") and value.ndim == 2 else value
    return files
