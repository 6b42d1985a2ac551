"""python -m bpcompile.symbolic.write_shipped: rewrite builtin_partials.json, the partials of the
built-in functions that ship with bpcompile (symbolic.stored), after a change to a built-in function
or to how partials are derived; tests/test_compile_derivations.py fails until it is rewritten."""

from __future__ import annotations

from . import functions, stored


def main() -> None:
    stored.SHIPPED.write_text(functions.shipped_text(), encoding="utf-8")
    print(f"wrote {stored.SHIPPED}")


if __name__ == "__main__":
    main()
