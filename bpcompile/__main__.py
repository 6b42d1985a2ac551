"""`python -m bpcompile`: the same as the `bpcompile` command."""

import sys

from .tools.cli import main

sys.exit(main())
