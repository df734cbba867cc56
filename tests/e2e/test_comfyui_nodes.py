"""The ComfyUI nodes (comfyui_lora_resize/), without ComfyUI installed: stub `folder_paths` and `comfy.utils`
modules stand in for ComfyUI's (as its execution.py runs a node: inputs as keywords, inside torch.inference_mode, a
ProgressBar whose update raises when the user presses Cancel); every node's declared inputs follow ComfyUI's
conventions, and each node run on the demo's SD1.5 LoCon (at rank 16) writes exactly the file the CLI writes for the
same settings, byte for byte. Analyze previews its curve on the node; IS_CHANGED follows the input files; a Cancel
leaves nothing behind."""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_resize.cli import main
from lora_resize.testing.loras import write_sd15_locon

REPO = Path(__file__).resolve().parents[2]
TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "MODEL", "CLIP", "LATENT", "CONDITIONING"}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_sd15_locon(folder / "a.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4, seed=1)
    write_sd15_locon(folder / "b.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4, seed=2)
    (folder / "style").mkdir()  # ComfyUI lists subfolders' files as "style/c.safetensors"
    write_sd15_locon(folder / "style" / "c.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=3)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return folder


class InterruptProcessingException(Exception):
    """comfy.model_management's: raised from the progress hook when the user presses Cancel."""


@pytest.fixture
def nodes(loras, tmp_path, monkeypatch):
    """The node package, imported with stub ComfyUI modules (folder_paths on `loras`, a recording ProgressBar that
    raises InterruptProcessingException at update number `pkg.cancel_at`), run inside torch.inference_mode."""
    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda kind: (sorted(p.relative_to(loras).as_posix() for p in loras.rglob("*.safetensors"))
                                         if kind == "loras" else [])
    fp.get_full_path = lambda kind, name: str(loras / name) if (loras / name).is_file() else None
    fp.get_folder_paths = lambda kind: [str(loras), str(loras.parent / "loras2")]  # ComfyUI may have several
    fp.get_temp_directory = lambda: str(tmp_path / "comfy-temp")
    comfy, utils = types.ModuleType("comfy"), types.ModuleType("comfy.utils")
    bars = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0
            bars.append(self)

        def update(self, n):
            self.current += n
            if sum(b.current for b in bars) == getattr(pkg, "cancel_at", None):
                raise InterruptProcessingException("cancelled")
    utils.ProgressBar = ProgressBar
    comfy.utils = utils
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.syspath_prepend(str(REPO))
    for name in [m for m in sys.modules if m.startswith("comfyui_lora_resize")]:
        monkeypatch.delitem(sys.modules, name)
    pkg = importlib.import_module("comfyui_lora_resize")
    pkg.bars = bars
    with torch.inference_mode():  # as ComfyUI's execution.py runs every node
        yield pkg
    for p in loras.glob("*.safetensors"):
        if p.name not in ("a.safetensors", "b.safetensors", "broken.safetensors"):
            p.unlink()
    for p in loras.rglob("*.safetensors"):
        if p.name not in ("a.safetensors", "b.safetensors", "broken.safetensors", "c.safetensors"):
            p.unlink()


def test_the_nodes_follow_comfyuis_conventions(nodes):
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for key, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"], key
        names = []
        for group in spec.values():
            for name, decl in group.items():
                assert isinstance(decl, tuple) and 1 <= len(decl) <= 2, (key, name)
                kind = decl[0]
                opts = decl[1] if len(decl) == 2 else {}
                assert isinstance(opts, dict), (key, name)
                if isinstance(kind, (list, tuple)):  # a combo: the default is one of its values
                    assert kind and ("default" not in opts or opts["default"] in kind), (key, name)
                else:
                    assert kind in TYPES, (key, name, kind)
                    if "default" in opts and "min" in opts:
                        assert opts["min"] <= opts["default"] <= opts.get("max", float("inf")), (key, name)
                    if kind == "FLOAT":  # ComfyUI's frontend rounds a FLOAT widget to its step's decimals
                        assert opts["step"] <= 0.01 and abs(opts["default"] / opts["step"] % 1) < 1e-9, (key, name)
                names.append(name)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(t in TYPES for t in cls.RETURN_TYPES), key
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), key
        assert isinstance(cls.CATEGORY, str) and isinstance(cls.OUTPUT_NODE, bool), key
        params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]
        assert sorted(params) == sorted(names), key  # ComfyUI calls FUNCTION with the inputs as keywords
    resize = nodes.NODE_CLASS_MAPPINGS["LoraResize"].INPUT_TYPES()["required"]
    assert "a.safetensors" in resize["lora_name"][0]
    assert resize["param"][1]["step"] <= 0.001  # sv_fro 0.995, sv_cumulative 0.999 can be typed


def test_resize_node_writes_what_the_cli_writes(nodes, loras, tmp_path):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResize"]()
    name, summary = node.resize("a.safetensors", method="sv_fro", param=0.9, rank=12, conv_rank=0,
                                rank_rule="exact", target_size="", precision="same", output_layout="same",
                                output_name="a_small")
    assert name == "a_small.safetensors" and "a.safetensors -> a_small.safetensors" in summary
    assert nodes.bars and nodes.bars[-1].current == nodes.bars[-1].total == 350
    cli = tmp_path / "a_small.safetensors"
    assert main(["resize", str(loras / "a.safetensors"), "-o", str(cli), "--method", "sv_fro", "--param", "0.9",
                 "--rank", "12", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    # a target size and another layout, likewise
    name, _ = node.resize("a.safetensors", method="fixed", param=0.0, rank=16, conv_rank=4, rank_rule="exact",
                          target_size="4MB", precision="bf16", output_layout="diffusers", output_name="a_4mb")
    cli = tmp_path / "a_4mb.safetensors"
    assert main(["resize", str(loras / "a.safetensors"), "-o", str(cli), "--target-size", "4MB", "--rank", "16",
                 "--conv-rank", "4", "--precision", "bf16", "--output-format", "diffusers", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()


def test_analyze_node_gives_the_curve_as_an_image_and_the_table(nodes, loras, tmp_path, capsys):
    out = nodes.NODE_CLASS_MAPPINGS["LoraResizeAnalyze"]().analyze("a.safetensors", rank_cap=16, rank_rule="exact",
                                                                   precision="same")
    image, table = out["result"]
    # the preview on the node: PreviewImage's form, a PNG in ComfyUI's temp folder holding the IMAGE's pixels
    (shown,) = out["ui"]["images"]
    assert shown["type"] == "temp" and shown["subfolder"] == ""
    import numpy as np
    from PIL import Image
    png = np.asarray(Image.open(tmp_path / "comfy-temp" / shown["filename"]).convert("RGB"), dtype=np.float32)
    assert np.array_equal(png / 255.0, image[0].numpy())
    assert isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 1
    assert image.shape[1] > 200 and image.shape[2] > 300 and float(image.std()) > 0.01  # a picture, not a blank
    capsys.readouterr()
    assert main(["analyze", str(loras / "a.safetensors"), "--rank", "16", "-q"]) == 0
    cli = capsys.readouterr().out.splitlines()
    assert table.splitlines()[1:] == cli[1:]  # the same rows (the first line holds the timings)
    assert sum(line.startswith("> recommended: ") for line in cli) == 1 and "* chosen" not in table  # a cap: no chosen


def test_merge_and_convert_nodes_write_what_the_cli_writes(nodes, loras, tmp_path):
    name, _ = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]().merge(
        "a.safetensors", 1.0, "b.safetensors", -0.5, method="sv_fro", param=0.95, rank=16, conv_rank=0,
        rank_rule="exact", target_size="", precision="same", output_name="ab.safetensors", more="a.safetensors:0.25")
    cli = tmp_path / "ab.safetensors"
    assert main(["merge", f"{loras / 'a.safetensors'}:1", f"{loras / 'b.safetensors'}:-0.5",
                 f"{loras / 'a.safetensors'}:0.25", "-o", str(cli), "--method", "sv_fro", "--param", "0.95",
                 "--rank", "16", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    name, summary = nodes.NODE_CLASS_MAPPINGS["LoraResizeConvert"]().convert("a.safetensors", "diffusers", "a_d")
    cli = tmp_path / "a_d.safetensors"
    assert main(["convert", str(loras / "a.safetensors"), "-o", str(cli), "--to", "diffusers", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes() and "converted from kohya to diffusers" in summary


def test_node_errors_are_one_line_and_leave_nothing(nodes, loras):
    before = sorted(p.name for p in loras.iterdir())
    node = nodes.NODE_CLASS_MAPPINGS["LoraResize"]()
    args = dict(method="sv_fro", param=0.9, rank=8, conv_rank=0, rank_rule="exact", target_size="",
                precision="same", output_layout="same")
    with pytest.raises(RuntimeError) as e:
        node.resize("broken.safetensors", output_name="x", **args)
    assert str(e.value).startswith("lora-resize: ") and "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="--param"):
        node.resize("a.safetensors", output_name="x", **{**args, "param": 5.0})  # sv_fro needs (0, 1]
    with pytest.raises(FileExistsError):
        node.resize("a.safetensors", output_name="b.safetensors", **args)  # never over an existing file
    (loras.parent / "loras2").mkdir(exist_ok=True)
    (loras.parent / "loras2" / "other.safetensors").write_bytes((loras / "a.safetensors").read_bytes())
    with pytest.raises(FileExistsError, match="already exists in a loras folder"):  # it would hide the other one
        node.resize("a.safetensors", output_name="other", **args)
    for bad in ("../x", "x\x00y", "x\ny", "a" * 300, ".hidden", "  ", "a:b", "NUL", "x?", "con.safetensors"):
        with pytest.raises(ValueError) as e:
            node.resize("a.safetensors", output_name=bad, **args)
        assert "\n" not in str(e.value) and "output name" in str(e.value), bad
    assert sorted(p.name for p in loras.iterdir()) == before
    name, _ = node.resize("a.safetensors", output_name="Upper.SAFETENSORS", **args)
    assert name == "Upper.SAFETENSORS" and (loras / name).is_file()  # ComfyUI lists suffixes in any case
    (loras / name).unlink()
    name, _ = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]().merge(
        "a.safetensors", 1.0, "b.safetensors", 1.0, output_name="m", more=" style/c.safetensors : -0.5 \n",
        **{k: v for k, v in args.items() if k != "output_layout"})
    assert (loras / name).is_file()


def test_a_lora_in_a_subfolder_and_a_cancel_that_leaves_nothing(nodes, loras):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResize"]()
    args = dict(method="sv_fro", param=0.995, rank=8, conv_rank=0, rank_rule="exact", target_size="",
                precision="same", output_layout="same")
    assert "style/c.safetensors" in node.INPUT_TYPES()["required"]["lora_name"][0]
    name, summary = node.resize("style/c.safetensors", output_name="c_small", **args)
    assert (loras / name).is_file() and "sv_fro 0.995" in summary
    before = sorted(p.relative_to(loras).as_posix() for p in loras.rglob("*"))
    merge_args = {k: v for k, v in args.items() if k != "output_layout"}
    nodes.cancel_at = 100  # Cancel pressed while the 100th layer is done
    for key, call in (("LoraResize", lambda n: n.resize("a.safetensors", output_name="x", **args)),
                      ("LoraResizeConvert", lambda n: n.convert("a.safetensors", "comfy", "y")),
                      ("LoraResizeMerge", lambda n: n.merge("a.safetensors", 1.0, "b.safetensors", 1.0,
                                                            output_name="z", **merge_args))):
        nodes.bars.clear()
        with pytest.raises(InterruptProcessingException):  # ComfyUI's own: it reports "interrupted", not an error
            call(nodes.NODE_CLASS_MAPPINGS[key]())
        assert sorted(p.relative_to(loras).as_posix() for p in loras.rglob("*")) == before, key  # no partial


def test_is_changed_follows_the_input_files(nodes, loras):
    resize, merge = nodes.NODE_CLASS_MAPPINGS["LoraResize"], nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]
    a = loras / "a.safetensors"
    first = resize.IS_CHANGED(lora_name="a.safetensors", rank=8)
    assert resize.IS_CHANGED(lora_name="a.safetensors", rank=4) == first  # settings are ComfyUI's own cache key
    m = merge.IS_CHANGED(lora_a="a.safetensors", lora_b="b.safetensors", more="style/c.safetensors:0.5")
    st = a.stat()
    try:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file edited
        assert resize.IS_CHANGED(lora_name="a.safetensors", rank=8) != first
        assert merge.IS_CHANGED(lora_a="a.safetensors", lora_b="b.safetensors", more="style/c.safetensors:0.5") != m
    finally:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resize.IS_CHANGED(lora_name="a.safetensors", rank=8) == first


def test_without_lora_resize_installed_the_import_says_how_to_install_it():
    """ComfyUI logs a custom node's import error: it must say what to run (here: a Python without site-packages)."""
    p = subprocess.run([sys.executable, "-S", "-c", "import comfyui_lora_resize"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 1 and "ImportError: lora-resize is not installed in ComfyUI's Python" in p.stderr, p.stderr
    assert "-m pip install" in p.stderr
