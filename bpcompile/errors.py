"""The exceptions bpcompile raises: each names what was wrong and what was expected."""

from __future__ import annotations


class BPError(Exception):
    """Base class of every error bpcompile raises on purpose."""


class ShapeError(BPError, ValueError):
    """Operands whose shapes (or dtypes) do not fit an op, raised when the node is made."""


class InputError(BPError, ValueError):
    """A call to a compiled model with unknown, missing or malformed inputs."""


class CompileError(BPError, RuntimeError):
    """The C compiler rejected the generated source; carries its message and the source path."""

    def __init__(self, message: str, source_path: str | None = None, compiler_output: str = ""):
        self.message = message
        self.source_path = source_path
        self.compiler_output = compiler_output
        text = message
        if source_path:
            text += f"\n  generated source: {source_path}"
        if compiler_output:
            text += "\n  compiler output:\n" + compiler_output.rstrip()
        super().__init__(text)


class CheckpointError(BPError, ValueError):
    """A checkpoint that does not belong to this model, or that is damaged."""


class ExportError(BPError, ValueError):
    """A model the standalone C export cannot express (an optimizer without a formula, a missing size)."""
