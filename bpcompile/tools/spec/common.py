"""What every kind of model spec shares: the loaded `Spec`, its `SpecError`, the dtypes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BPError

DTYPES = ("float32", "float64")


class SpecError(BPError, ValueError):
    """A model spec that cannot be loaded: the message is one line naming file, place and problem."""

    def __init__(self, path: str | Path, where: str, message: str, line: int | None = None):
        self.path, self.where, self.line = str(path), where, line
        self.message = " ".join(str(message).split())  # always one line
        loc = self.path + (f":{line}" if line else "")
        super().__init__(f"{loc}: {where + ': ' if where else ''}{self.message}")


@dataclass
class Spec:
    """A loaded model spec: the graph and the settings the commands default to."""

    path: Path
    kind: str  # "python", "yaml" or "onnx"
    graph: Any  # bp.Graph
    dtype: str = "float32"
    optimizer: Any = None  # bp.optim.Optimizer or None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.graph.name
