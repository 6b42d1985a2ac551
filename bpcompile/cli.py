"""The `bpcompile` command (its subcommands live in this module)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("bpcompile: the command-line tool is not available in this version; use the Python API "
          "(see README.md)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
