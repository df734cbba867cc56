"""Optional dependencies: every third-party module the package imports (read from its source, function-level imports
included) is either a required dependency of pyproject.toml or declared in errors.EXTRAS with the extra that
installs it - the table the CLI checks before any work (tests/e2e/test_cli_surface.py shows the check)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from lora_resize.errors import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
# import names whose distribution on PyPI is named otherwise
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image"}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the package files that import it (stdlib and our own left out)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "lora_resize").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top and top not in sys.stdlib_module_names and top != "lora_resize":
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def distributions(requirements: list[str]) -> set[str]:
    """Requirement strings' distribution names and their extras ('dask[distributed]>=1' -> dask, distributed)."""
    return {n.lower() for r in requirements for n in re.findall(r"[A-Za-z0-9_.-]+", r.split(">")[0].split("<")[0])}


def test_every_optional_import_is_declared_with_the_extra_that_installs_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = distributions(project["dependencies"])
    optional = project["optional-dependencies"]
    undeclared = {m: files for m, files in third_party_imports().items() if m not in required and m not in EXTRAS}
    assert not undeclared, f"declare these optional imports in errors.EXTRAS: {undeclared}"
    for module, extra in EXTRAS.items():
        assert extra in optional and DISTRIBUTION.get(module, module).lower() in distributions(optional[extra]), \
            (module, extra)
