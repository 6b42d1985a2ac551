"""C code generation: the SymPy-to-C printer, index algebra, the kernel builders registered per
kernel kind, and the assembly of the whole C module from the Jinja2 templates in `templates/`."""

from ..ops.core import register_kernel
from .module import (
    BUILDERS,
    Builder,
    Context,
    EntryCode,
    ModuleRenderer,
    Mono,
    describe,
    environment,
    kernel_signature,
    template_dir,
)
from .printer import CPrinter

__all__ = ["BUILDERS", "Builder", "Context", "CPrinter", "EntryCode", "ModuleRenderer", "Mono", "describe",
           "environment", "kernel_signature", "register_kernel", "template_dir"]
