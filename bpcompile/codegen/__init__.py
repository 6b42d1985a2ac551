"""C code generation: the SymPy-to-C printer, index algebra, the kernel builders registered per
kernel kind, and the assembly of the whole C module from the Jinja2 templates in `templates/`."""

from .module import (
    BUILDERS,
    Builder,
    Context,
    CPrinter,
    EntryCode,
    ModuleRenderer,
    Mono,
    describe,
    environment,
    kernel_signature,
    register_kernel,
    template_dir,
)

__all__ = ["BUILDERS", "Builder", "Context", "CPrinter", "EntryCode", "ModuleRenderer", "Mono", "describe",
           "environment", "kernel_signature", "register_kernel", "template_dir"]
