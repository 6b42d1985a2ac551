"""Reading a YAML spec: the line of every key path, and `_Reader`'s typed access (mapping,
integer, number, name, choice, ...) whose errors name the file, line and key path."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from ...errors import BPError
from .common import SpecError
from .limits import MAX_ELEMENTS, MAX_UNITS


def _import_yaml():
    try:
        import yaml
    except ImportError:
        raise BPError("YAML specs need PyYAML: pip install 'bpcompile[cli]' (or pip install pyyaml)") from None
    return yaml


def _yaml_lines(yaml, text: str) -> dict[tuple, int]:
    """The line of every key path in the document (for error messages)."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value
                lines[path + (k,)] = key.start_mark.line + 1
                walk(value, path + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _numeric_text(value: Any) -> bool:
    """A string that reads as a number (YAML 1.1 takes `1e20`, without a dot, for text)."""
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Reader:
    """Typed access to the YAML document, raising SpecError with file, line and key path."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines = path, lines

    def error(self, where: tuple, message: str) -> SpecError:
        line = None
        for n in range(len(where), -1, -1):
            if where[:n] in self.lines:
                line = self.lines[where[:n]]
                break
        return SpecError(self.path, _path_str(where), message, line)

    def mapping(self, value: Any, where: tuple, allowed: dict[str, str], required: tuple[str, ...] = ()) -> dict:
        """Check a mapping's keys: every key known, every required key present."""
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping with keys {', '.join(allowed)}, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(where + (key,), f"unknown key {key!r}{hint}; expected one of "
                                 f"{', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.error(where, f"missing key {key!r} ({allowed[key]})")
        return value

    def integer(self, value: Any, where: tuple, minimum: int = 1, maximum: int | None = None) -> int:
        """A whole number in [minimum, maximum] (default MAX_UNITS): not a bool, float or string."""
        maximum = MAX_UNITS if maximum is None else maximum
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            hint = ", a string (write the integer in digits: YAML reads 1e20 as text)" if _numeric_text(value) else ""
            raise self.error(where, f"expected {what}, got {_describe(value)}{hint}; allowed: {minimum} to {maximum}")
        return value

    def units(self, value: Any, where: tuple, *fixed: int) -> int:
        """A count that sizes a weight with the given fixed sizes: in range, the weight too."""
        count = self.integer(value, where)
        self.count_product([*fixed, count], where, "a weight of")
        return count

    def count_product(self, counts: list[int], where: tuple, what: str) -> None:
        """The product of a shape's fixed sizes (a weight's, or an input's row) is at most MAX_ELEMENTS."""
        if math.prod(counts) > MAX_ELEMENTS:
            raise self.error(where, f"{what} {' x '.join(map(str, counts))} = {math.prod(counts)} elements, more "
                                    f"than the limit of {MAX_ELEMENTS}")

    def number(self, value: Any, where: tuple) -> float:
        """A real number; YAML reads 1e-3 (no dot) as a string, so numeric strings are accepted."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(where, f"expected a number, got {_describe(value)}")
        return float(value)

    def name(self, value: Any, where: tuple, what: str = "a name") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"expected {what}, got {_describe(value)}")
        return value

    def choice(self, value: Any, where: tuple, choices: list[str], what: str) -> str:
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(where, f"unknown {what} {_describe(value)}{hint}; expected one of {', '.join(choices)}")
        return value

    def boolean(self, value: Any, where: tuple) -> bool:
        if not isinstance(value, bool):
            raise self.error(where, f"expected true or false, got {_describe(value)}")
        return value

    def settings(self, value: Any, where: tuple, what: str) -> tuple[str, dict, tuple]:
        """A `{type: kind, ...settings}` mapping or a bare `kind` string -> (kind, settings, where)."""
        if isinstance(value, str):
            return value, {}, where
        if isinstance(value, dict):
            if "type" not in value:
                raise self.error(where, f"missing key 'type' (the kind of {what})")
            settings = {k: v for k, v in value.items() if k != "type"}
            return value["type"], settings, where
        raise self.error(where, f"expected a {what} name or a mapping with a 'type' key, got {_describe(value)}")
