"""The package layout: stages import each other in one direction only, no module-level import
cycles, and a process that only loads, trains and checkpoints a built model stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bpcompile"

# The pipeline, in import order: a stage may import the stages before it (and itself).
PIPELINE = ("ir", "symbolic", "ops", "autodiff", "passes", "codegen", "build", "compiler", "tools")
# Stages outside the pipeline and who besides themselves may import them.
SIDE = {"errors": set(PIPELINE) | {"nn", "runtime", "train"},  # the exceptions: everyone
        "runtime": {"compiler", "tools"},
        "train": {"compiler", "tools", "runtime"}}
# The frontend layer bp.nn: builds graphs from ops, so it sits between ops and autodiff.
FRONTEND = {"nn": {"ir", "symbolic", "ops"}}
# What runtime and train may import at all: a process that loads a built model needs no more.
LIGHT = {"runtime", "train", "errors"}
HEAVY_LIBRARIES = {"sympy", "jinja2", "cffi.recompiler", "cffi.verifier", "setuptools"}

# Imports that go against the direction today. The test fails on any import not listed here,
# and on an entry that is gone (remove it then). All are function-level imports. (Imports under
# `if TYPE_CHECKING:` are for type hints only and never run: they are not counted.)
KNOWN_VIOLATIONS = {
    # Graph.param checks an init= argument with the initializers' rules
    ("bpcompile.ir.graph", "bpcompile.train.init"),
    # Tensor operators (x + y, x @ W) build ops nodes: ir <-> ops
    ("bpcompile.ir.graph", "bpcompile.ops.core"),
    ("bpcompile.ir.graph", "bpcompile.ops"),
    # the NumPy reference's loss_and_grad differentiates with autodiff
    ("bpcompile.ops.reference", "bpcompile.autodiff.reverse"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bpcompile"


def _import_nodes(node: ast.AST, top_level_only: bool):
    """The import statements under `node`; with top_level_only, none inside a function body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for c in child.orelse for n in _import_nodes(ast.Module([c], []), top_level_only))
        elif not (top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            yield from _import_nodes(child, top_level_only)


def imports(module: str, top_level_only: bool) -> set[str]:
    """The modules `module` imports (bpcompile's own as full names, others as given)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = list(_import_nodes(ast.parse(path.read_text()), top_level_only))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
    return found


# Modules with no bpcompile imports of their own that every stage may read: plain shape arithmetic,
# and what a build records about its target (written by build, checked by runtime).
LEAVES = {"bpcompile.ir.dims", "bpcompile.runtime.target"}


def allowed(importer: str, imported: str) -> bool:
    if imported in LEAVES:
        return True
    a, b = stage(importer), stage(imported)
    if a == b or a in ("bpcompile", "__main__") or b == "bpcompile":
        return True  # within a stage; bpcompile/__init__ (the public facade), __main__, __version__
    if b in SIDE:
        return a in SIDE[b]
    if a in FRONTEND:
        return b in FRONTEND[a]
    if b in FRONTEND:
        return a in PIPELINE and PIPELINE.index(a) > PIPELINE.index("ops")
    if a in LIGHT:
        return False
    return PIPELINE.index(b) < PIPELINE.index(a)


def test_leaves_import_nothing_of_bpcompile():
    for leaf in LEAVES:
        own = {i for i in imports(leaf, top_level_only=False) if i.startswith("bpcompile")}
        assert not own, f"{leaf} imports {sorted(own)}: a leaf module stays import-free"


def test_every_module_is_in_a_known_stage():
    stages = {stage(m) for m in MODULES}
    assert stages <= set(PIPELINE) | set(SIDE) | set(FRONTEND) | {"bpcompile", "__main__"}, stages


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists the packages a wheel holds: every folder of bpcompile with an
    __init__.py is one of them (a package left out imports in the repository, not once installed)."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    missing = sorted(packages - listed)
    assert not missing, f"packages missing from pyproject.toml's [tool.setuptools] packages: {missing}"


def test_imports_go_in_the_pipeline_direction():
    found = {(m, i) for m in MODULES for i in imports(m, top_level_only=False)
             if i in MODULES and not allowed(m, i)}
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, f"imports against the stage direction (see tests/test_layout.py): {new}"
    stale = sorted(KNOWN_VIOLATIONS - found)
    assert not stale, f"KNOWN_VIOLATIONS lists imports that are gone, remove them: {stale}"


def test_known_violations_are_function_level_imports():
    top = {(m, i) for m in MODULES for i in imports(m, top_level_only=True)}
    module_level = sorted(top & KNOWN_VIOLATIONS)
    assert not module_level, f"a known violation became a module-level import: {module_level}"


def test_light_stages_need_no_sympy_jinja2_or_compiler_at_module_level():
    for module in MODULES:
        if stage(module) in LIGHT:
            heavy = {i for i in imports(module, top_level_only=True)
                     if any(i == h or i.startswith(h + ".") for h in HEAVY_LIBRARIES) or i == "cffi"}
            assert not heavy, f"{module} imports {sorted(heavy)} at module level"


def test_no_module_level_import_cycles():
    def parents(m: str) -> set[str]:
        parts = m.split(".")
        return {".".join(parts[:k]) for k in range(1, len(parts))}

    graph = {m: {i for i in imports(m, top_level_only=True) if i in MODULES and i != m and i not in parents(m)}
             for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail(f"module-level import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_function_level_and_relative_imports():
    found = imports("bpcompile.runtime.model", top_level_only=False)
    assert {"bpcompile.errors", "bpcompile.train.init", "bpcompile.runtime.paramfile"} <= found
    assert "bpcompile.runtime.paramfile" not in imports("bpcompile.runtime.model", top_level_only=True)
    assert not allowed("bpcompile.ir.graph", "bpcompile.codegen.module")
    assert allowed("bpcompile.compiler", "bpcompile.runtime.model")
    assert not allowed("bpcompile.runtime.model", "bpcompile.symbolic.functions")


def test_load_train_and_checkpoint_stay_light(tmp_path):
    """A process that bp.load()s a build, trains, saves and loads a checkpoint imports neither
    SymPy, Jinja2, cffi's compiler parts nor bpcompile's compiler stages."""
    import bpcompile as bp

    g = bp.Graph("light")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("batch", 2))
    out = x @ g.param("W", (3, 2)) + g.param("b", (2,))
    g.output("out", out)
    g.loss(bp.mse(out, y))
    model = bp.compile(g, optimizer=bp.optim.Adam(lr=0.01), seed=0)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import bpcompile as bp
        model = bp.load({str(model.build_path)!r})
        x, y = np.ones((4, 3)), np.zeros((4, 2))
        first = model.train_step(x=x, y=y)
        model.save({str(tmp_path / 'ckpt')!r})
        model.load({str(tmp_path / 'ckpt')!r})
        assert np.isfinite(model.train_step(x=x, y=y)) and np.isfinite(first)
        heavy = {sorted(HEAVY_LIBRARIES)!r} + ["bpcompile.symbolic", "bpcompile.ops", "bpcompile.autodiff",
                 "bpcompile.passes", "bpcompile.codegen", "bpcompile.build", "bpcompile.compiler",
                 "bpcompile.tools.cli", "bpcompile.tools.spec", "bpcompile.tools.explain"]
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_building_graphs_loads_no_backend():
    """Declaring a model with every op family (convolution, recurrent, attention, ...) and
    differentiating it imports neither codegen, the passes, Jinja2 nor cffi: the op families
    register their kernel builders in the ops registry, which codegen reads."""
    script = textwrap.dedent("""
        import sys
        import bpcompile as bp
        from bpcompile import nn
        g = bp.Graph("frontend_only")
        img = g.input("img", ("batch", 1, 8, 8))
        h = bp.relu(nn.Conv2d(g, 1, 2, 3, name="conv")(img))
        h = bp.max_pool2d(h, 2)
        seq = g.input("seq", ("batch", 5, 4))
        out, _ = nn.LSTM(g, 4, 6, name="lstm")(seq)
        x = nn.LayerNorm(g, 6, name="ln")(out)
        att = bp.attention(x, x, x, causal=True)
        loss = bp.mean(bp.flatten(h)) + bp.mean(att)
        g.loss(loss)
        from bpcompile.autodiff import grad
        grad(loss, list(g.params.values()))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jinja2", "cffi")
                       or m.startswith(("bpcompile.codegen", "bpcompile.passes", "bpcompile.build")))
        print(heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


# Private names used across subpackages today, as (importer, owner, name). The test fails on a use
# not listed here and on an entry that is gone.
KNOWN_PRIVATE_USES: set[tuple[str, str, str]] = set()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The full name of the module an ImportFrom reads from."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: str, source: str | None = None) -> set[tuple[str, str]]:
    """(owner module, name) for every `_name` that `module` takes from another bpcompile module:
    imported by name, or read as an attribute of an imported bpcompile module (function-level
    imports included). `source` stands in for the module's text (for the checker's own test)."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    aliases: dict[str, str] = {}  # local name -> bpcompile module it is bound to
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name): a.name for a in node.names if a.name in MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom):
            owner = _resolve(module, node)
            for a in node.names:
                if f"{owner}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{owner}.{a.name}"
                if owner in MODULES and _is_private(a.name):
                    found.add((owner, a.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _is_private(node.attr)):
            found.add((aliases[node.value.id], node.attr))
    return found


def _top_package(module: str) -> str:
    """The subpackage a module belongs to (a top-level module is its own)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cross_package_private_uses() -> set[tuple[str, str, str]]:
    return {(m, owner, name) for m in MODULES for owner, name in private_uses(m)
            if _top_package(owner) != _top_package(m)}


def test_no_private_name_is_used_across_subpackages():
    """A `_name` is its subpackage's own: what another stage needs is public API (or lives there)."""
    uses = cross_package_private_uses()
    assert uses - KNOWN_PRIVATE_USES == set(), "private names used from another subpackage"
    assert KNOWN_PRIVATE_USES - uses == set(), "known private uses that are gone: remove them from the list"


def test_the_private_name_checker_sees_imports_and_attributes():
    assert ("bpcompile.ops.core", "_need_float") in private_uses("bpcompile.ops.slicing")  # same subpackage
    source = textwrap.dedent("""
        import bpcompile.passes.pipeline as pl
        from ..autodiff import reverse as ad
        def f(order, node):
            from ..ir.graph import _GRAPHS
            return ad._nodes_between(order, set()), pl._view_root(node), ad.grad, ad.__name__
        """)
    assert private_uses("bpcompile.tools.explain", source) == {
        ("bpcompile.passes.pipeline", "_view_root"), ("bpcompile.autodiff.reverse", "_nodes_between"),
        ("bpcompile.ir.graph", "_GRAPHS")}
    assert _top_package("bpcompile.ops.slicing") == _top_package("bpcompile.ops.core")
    assert _top_package("bpcompile.compiler") != _top_package("bpcompile.ops.core")


def test_the_lazy_table_names_each_op_where_its_family_declares_it():
    """`bp.NAME` loads on first use from the module bpcompile's lazy table names: each entry
    resolves to that module's own object, and every public op a family module declares in its
    `__all__` is reachable as bp.NAME or, for building blocks, as bp.ops.NAME."""
    import importlib

    import bpcompile as bp
    for name, module in bp._LAZY.items():
        mod = importlib.import_module(f"bpcompile.{module}")
        assert getattr(bp, name) is getattr(mod, name), f"bp.{name} is not bpcompile.{module}.{name}"
    for family in ("slicing", "conv", "pool", "embeddings", "regularization", "normalization", "recurrent",
                   "transformer", "batched"):
        mod = importlib.import_module(f"bpcompile.ops.{family}")
        for name in mod.__all__:
            assert getattr(bp.ops, name) is getattr(mod, name), f"bp.ops.{name} is not ops.{family}.{name}"
            if bp._LAZY.get(name, f"ops.{family}") != f"ops.{family}":
                raise AssertionError(f"bp.{name} is listed under {bp._LAZY[name]}, declared in ops.{family}")


# Each module one concern, none over MAX_MODULE_LINES lines. The test fails on a module over the
# limit that is not listed here, and on a listed one that is back under it (remove it then).
MAX_MODULE_LINES = 700
KNOWN_LONG_MODULES: set[str] = set()


def test_no_module_is_over_the_line_limit():
    long = {m for m, path in MODULES.items() if len(path.read_text().splitlines()) > MAX_MODULE_LINES}
    new = sorted(long - KNOWN_LONG_MODULES)
    assert not new, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {new}"
    stale = sorted(KNOWN_LONG_MODULES - long)
    assert not stale, f"KNOWN_LONG_MODULES lists modules now under {MAX_MODULE_LINES} lines, remove them: {stale}"
