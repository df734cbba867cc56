"""The house as ARCHITECTURE.md draws it: every import of the package (function-level ones included) read from the
source, no import cycle between modules, and every room importing only the rooms below it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "lora_resize"

# room -> the rooms it may import (errors, units, options and results are importable from anywhere, but import
# little themselves: options validates against the rank registries)
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "units": {"errors"},
    "registry": set(),
    "core": {"errors", "registry"},
    "ranks": {"errors", "units", "registry", "core"},
    "models": {"registry"},
    "options": {"errors", "units", "ranks", "models"},
    "results": {"errors", "units"},
    "io": {"errors", "units", "options", "results", "_version", "core"},
    "formats": {"errors", "units", "registry", "options", "results", "core", "io", "models"},
    "report": {"errors", "units", "options", "results", "_version", "ranks", "io"},
    "testing": {"errors", "units", "core", "io", "models"},  # the tiny pipelines name LoRA modules by models
    "diffusion": {"errors", "units", "options", "results", "core", "io", "formats", "models"},
    "ops": {"errors", "units", "options", "results", "_version", "core", "ranks", "io", "formats", "report",
            "testing", "models", "diffusion"},
    "cli": {"errors", "units", "options", "results", "_version", "core", "ranks", "io", "formats", "report", "ops",
            "models", "diffusion"},
    "ui": {"errors", "units", "options", "results", "_version", "core", "ranks", "io", "formats", "report", "ops",
           "models", "cli", "diffusion"},  # the top room: the web page, over the CLI's flag parser
    "__init__": {"errors", "_version"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("lora_resize"):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_the_import_graph_is_read():
    g = graph()
    # a few edges the code is known to have, so the reader cannot pass by seeing nothing
    assert "lora_resize.core.decompose" in g["lora_resize.core.schedule"]
    assert "lora_resize.ops.resize" in g["lora_resize.cli.resize"]  # a function-level import
    assert "lora_resize.ranks.policies" in g["lora_resize.options"]


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if m.startswith(n + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(m) == 1 and not n.startswith(m + "."):
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_room_imports_only_the_rooms_below_it():
    bad = []
    for n, deps in graph().items():
        r = room(n)
        for d in deps:
            if room(d) != r and room(d) not in ALLOWED[r]:
                bad.append(f"{n} ({r}) imports {d} ({room(d)})")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("r", sorted(set(ALLOWED) - {"__init__", "errors", "_version", "units", "registry",
                                                      "options", "results"}))
def test_each_room_is_a_package_with_a_docstring(r):
    init = PACKAGE / r / "__init__.py"
    assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), r


def test_core_uses_only_numpy_torch_and_the_errors():
    outside = set()
    for p in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                outside.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                outside.update(a.name.split(".")[0] for a in node.names)
    import sys
    assert outside - set(sys.stdlib_module_names) <= {"numpy", "torch"}


def test_the_nodes_use_only_the_public_facade():
    """The ComfyUI nodes (outside the package) import `lora_resize` alone and use only names of its `__all__`: the
    package's rooms can move without breaking them (ARCHITECTURE.md: the public API is their one door)."""
    import lora_resize
    nodes = PACKAGE.parents[1] / "comfyui_lora_resize"
    used, imported = set(), set()
    for path in nodes.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.split(".")[0] == "lora_resize"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_resize":
                imported.add(node.module)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "lora_resize"):
                used.add(node.attr)
    assert imported == {"lora_resize"}, f"the nodes reach into the package: {sorted(imported - {'lora_resize'})}"
    assert used and used <= set(lora_resize.__all__), f"not in the public API: {sorted(used - set(lora_resize.__all__))}"
    for name in used:
        getattr(lora_resize, name)  # each resolves


# The names every module of a kind defines by protocol (a subcommand's HELP/add_arguments/run, a registry's
# register, a key family's FORM/MARKERS, a TypeVar): the same meaning in each, not a clash.
PROTOCOL_NAMES = {"HELP", "DESCRIPTION", "add_arguments", "run", "register", "FORM", "MARKERS", "T"}


def test_one_name_one_meaning():
    """A public top-level name is defined in one module only (protocol names aside): no two FIXED, Source or
    convert for a reader to confuse, and no constant written out twice instead of imported."""
    where: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            else:
                continue
            for d in defined:
                if not d.startswith("_") and d not in PROTOCOL_NAMES:
                    where.setdefault(d, []).append(name)
    clashes = {d: ms for d, ms in where.items() if len(ms) > 1}
    assert not clashes, f"names defined in several modules: {clashes}"
