"""The torch minimum pyproject.toml declares is true: no torch attribute the package (or the ComfyUI nodes) uses was
added in a later torch. The table holds the attributes added after 2.1 that such code is likely to reach for, with
the release that added each (from PyTorch's release notes); an `except torch.X` clause is evaluated only when an
exception passes by it, so a missing X would surface as an AttributeError in place of the real error."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADDED_IN = {
    "float8_e4m3fnuz": (2, 2), "float8_e5m2fnuz": (2, 2),
    "uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3),
    **{f"uint{i}": (2, 3) for i in range(1, 8)},
    "OutOfMemoryError": (2, 5),
    "accelerator": (2, 6),
    "float8_e8m0fnu": (2, 7),
    "float4_e2m1fn_x2": (2, 8),
}


def declared_minimum() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert m, "pyproject.toml declares no torch minimum"
    return int(m.group(1)), int(m.group(2))


def torch_attributes() -> dict[str, list[str]]:
    """Each `torch.<name>` the package and the nodes use -> where (file:line)."""
    found: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "comfyui_lora_resize").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.setdefault(node.attr, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_torch_attribute_is_newer_than_the_declared_minimum():
    minimum = declared_minimum()
    used = torch_attributes()
    assert "float16" in used  # the scan sees the package
    newer = {name: (ADDED_IN[name], where[0]) for name, where in used.items()
             if name in ADDED_IN and ADDED_IN[name] > minimum}
    assert not newer, f"pyproject.toml says torch>={minimum[0]}.{minimum[1]}, but these need newer: {newer}"


def test_the_readme_states_the_same_minimum():
    major, minor = declared_minimum()
    readme = (ROOT / "README.md").read_text()
    assert f"torch >= {major}.{minor}" in readme and f"torch {major}.{minor} or newer" in readme


def test_the_comfyui_nodes_check_the_same_minimum():
    """The node pack refuses an older torch in one line (ComfyUI's log) with pyproject's minimum."""
    text = (ROOT / "comfyui_lora_resize" / "__init__.py").read_text()
    m = re.search(r"TORCH_MINIMUM = \((\d+), (\d+)\)", text)
    assert m and (int(m.group(1)), int(m.group(2))) == declared_minimum()
    ns: dict = {}  # the constant and the parser, run alone (the module itself imports the nodes)
    exec(text[text.index("TORCH_MINIMUM ="):text.index('if importlib.util.find_spec("torch")')], ns)
    assert ns["_torch_release"]("2.4.1+cu121") == (2, 4) < declared_minimum() <= ns["_torch_release"]("2.13.0")
    assert ns["_torch_release"]("2.10.0a0+git") == (2, 10)
