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

import lora_resize
from helpers import load_st, make_state_dict, scaled_sum, standard_specs, write_lora
from lora_resize.cli import main
from lora_resize.testing.loras import write_sd15_locon

REPO = Path(__file__).resolve().parents[2]
TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "MODEL", "CLIP", "LATENT", "CONDITIONING", "LORA_STACK"}


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
    raises InterruptProcessingException at update number `pkg.cancel_at`, comfy.sd.load_lora_for_models recording
    what it is handed in `pkg.applied`, comfy.utils.load_torch_file reading safetensors), run inside
    torch.inference_mode."""
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
    utils.load_torch_file = lambda path, safe_load=False: load_st(path)[0]  # ComfyUI's reads safetensors so
    sd = types.ModuleType("comfy.sd")
    applied = []

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):  # comfy/sd.py's signature
        applied.append(dict(model=model, clip=clip, lora=lora, strength_model=strength_model,
                            strength_clip=strength_clip))
        return ("patched", model, len(applied) - 1), ("patched", clip, len(applied) - 1)  # clones, as ComfyUI's
    sd.load_lora_for_models = load_lora_for_models
    comfy.utils, comfy.sd = utils, sd
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.sd", sd)
    monkeypatch.syspath_prepend(str(REPO))
    for name in [m for m in sys.modules if m.startswith("comfyui_lora_resize")]:
        monkeypatch.delitem(sys.modules, name)
    pkg = importlib.import_module("comfyui_lora_resize")
    pkg.bars, pkg.applied = bars, applied
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
                    if kind == "INT" and name in ("seed", "noise_seed"):  # else the frontend adds 'randomize'
                        assert "control_after_generate" in opts, (key, name)
                names.append(name)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(t in TYPES for t in cls.RETURN_TYPES), key
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), key
        assert isinstance(cls.CATEGORY, str) and isinstance(cls.OUTPUT_NODE, bool), key
        params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters.values())[1:]
        named = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
        if any(p.kind is p.VAR_KEYWORD for p in params):  # Merge: the merge parameters, whichever are declared
            assert set(named) <= set(names) and set(names) - set(named) == set(lora_resize.MERGE_PARAMS), key
        else:
            assert sorted(named) == sorted(names), key  # ComfyUI calls FUNCTION with the inputs as keywords
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


def test_the_rank_widget_defaults_to_no_cap_as_the_analyze_node_recommends(nodes, loras, tmp_path):
    """The Analyze node's recommendation (rank_cap 0: no cap) is what the Resize node writes with its default rank
    widget: before, the rank widget defaulted to 64 (min 1), silently capping a recommended method."""
    spec = nodes.NODE_CLASS_MAPPINGS["LoraResize"].INPUT_TYPES()["required"]["rank"][1]
    assert spec["default"] == 0 and spec["min"] == 0
    node = nodes.NODE_CLASS_MAPPINGS["LoraResize"]()
    name, _ = node.resize("a.safetensors", method="sv_fro", param=0.9, rank=spec["default"], conv_rank=0,
                          rank_rule="exact", target_size="", precision="same", output_layout="same",
                          output_name="a_nocap")
    cli = tmp_path / "a_nocap.safetensors"
    assert main(["resize", str(loras / "a.safetensors"), "-o", str(cli), "--method", "sv_fro", "--param", "0.9",
                 "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    with pytest.raises(RuntimeError, match="needs a rank"):
        node.resize("a.safetensors", method="fixed", param=0.0, rank=0, conv_rank=0, rank_rule="exact",
                    target_size="", precision="same", output_layout="same", output_name="a_fixed0")


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
    for bad in ("../x", "x\x00y", "x\ny", "a" * 300, ".hidden", "a:b", "NUL", "x?", "con.safetensors"):
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


def same_bits(got: dict, want: dict) -> bool:
    """The same keys, and each tensor the same dtype, shape and bytes."""
    return set(got) == set(want) and all(
        got[k].dtype == t.dtype and got[k].shape == t.shape
        and torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) for k, t in want.items())


def cli_resize(src: Path, dst: Path, flags: list[str]) -> dict:
    """The tensors `lora-resize resize SRC -o DST FLAGS` writes (read back with safetensors)."""
    assert main(["resize", str(src), "-o", str(dst), *flags, "-q"]) == 0
    return load_st(dst)[0]


RANK_ARGS = dict(method="sv_fro", param=0.9, rank=12, conv_rank=0, rank_rule="exact", target_size="", precision="same")


def test_apply_node_hands_comfyui_the_tensors_the_cli_writes(nodes, loras, tmp_path):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeApply"]()
    for i, (args, flags) in enumerate([
            (RANK_ARGS, ["--method", "sv_fro", "--param", "0.9", "--rank", "12"]),
            ({**RANK_ARGS, "method": "fixed", "rank": 4, "precision": "bf16"}, ["--rank", "4", "--precision", "bf16"]),
            ({**RANK_ARGS, "method": "fixed", "rank": 16, "conv_rank": 4, "target_size": "4MB"},
             ["--target-size", "4MB", "--rank", "16", "--conv-rank", "4"])]):
        model, clip, label = node.apply("model", "clip", "a.safetensors", strength_model=0.8, strength_clip=-0.5, **args)
        call = nodes.applied[-1]
        assert (model, clip) == (("patched", "model", i), ("patched", "clip", i))  # what ComfyUI's loader returned
        assert (call["model"], call["clip"], call["strength_model"], call["strength_clip"]) == ("model", "clip", 0.8, -0.5)
        dst = tmp_path / f"cli{i}.safetensors"
        assert same_bits(call["lora"], cli_resize(loras / "a.safetensors", dst, flags)), flags
        assert label.endswith(f" - {lora_resize.format_size(dst.stat().st_size)}"), label  # the file it would be
    assert label.startswith("target_size 4.0 MB, cap 16/4 - ")
    assert nodes.NODE_CLASS_MAPPINGS["LoraResizeApply"]().apply(
        "m", "c", "a.safetensors", strength_model=1.0, strength_clip=1.0, **RANK_ARGS)[2].startswith("sv_fro 0.9, cap 12 - ")


def test_apply_node_caches_per_file_and_setting(nodes, loras):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeApply"]()
    node.apply("m", "c", "a.safetensors", strength_model=1.0, strength_clip=1.0, **RANK_ARGS)
    bars = len(nodes.bars)
    node.apply("m", "c", "a.safetensors", strength_model=0.5, strength_clip=1.0, **RANK_ARGS)  # re-queued
    assert len(nodes.bars) == bars and nodes.applied[-1]["lora"] is nodes.applied[-2]["lora"]  # not resized again
    node.apply("m", "c", "a.safetensors", strength_model=1.0, strength_clip=1.0, **{**RANK_ARGS, "rank": 8})
    assert len(nodes.bars) == bars + 1  # another setting
    a = loras / "a.safetensors"
    st = a.stat()
    try:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file edited: read again
        node.apply("m", "c", "a.safetensors", strength_model=1.0, strength_clip=1.0, **RANK_ARGS)
        assert len(nodes.bars) == bars + 2
    finally:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RuntimeError, match="--param") as e:  # a bad setting: the one-line error, nothing applied
        node.apply("m", "c", "a.safetensors", strength_model=1.0, strength_clip=1.0, **{**RANK_ARGS, "param": 5.0})
    assert "\n" not in str(e.value) and len(nodes.applied) == 4


def test_sweep_gives_one_model_clip_and_label_per_setting_in_order(nodes, loras, tmp_path):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeSweep"]()
    assert node.OUTPUT_IS_LIST == (True, True, True)
    lines = ["--method sv_ratio --param 8", "--new_rank 8 --dynamic_method sv_fro --dynamic_param 0.9",
             "--rank 4 --precision bf16 --output-format comfy"]
    text = f"original\n\n# the model without the LoRA\nbase\n" + "\n".join(lines) + "\n"
    models, clips, labels = node.sweep("model", "clip", "a.safetensors", text, strength_model=1.0, strength_clip=0.7)
    assert len(models) == len(clips) == len(labels) == 5
    assert models[1] == "model" and clips[1] == "clip" and labels[1] == "base (no LoRA)"  # base: unpatched
    assert [m[2] for m in models[:1] + models[2:]] == [0, 1, 2, 3]  # the others patched, in the order given
    assert [c["strength_clip"] for c in nodes.applied] == [0.7] * 4
    a = loras / "a.safetensors"
    assert same_bits(nodes.applied[0]["lora"], load_st(a)[0])  # the original: the file's tensors as Load LoRA reads
    assert labels[0] == f"original - {lora_resize.format_size(a.stat().st_size)}"
    for i, line in enumerate(lines):
        dst = tmp_path / f"s{i}.safetensors"
        assert same_bits(nodes.applied[i + 1]["lora"], cli_resize(a, dst, line.split())), line
        assert labels[i + 2].endswith(f" - {lora_resize.format_size(dst.stat().st_size)}")
    assert labels[2].startswith("sv_ratio 8 - ") and labels[3].startswith("sv_fro 0.9, cap 8 - ")
    assert labels[4].startswith("rank 4, bf16, comfy layout - ")  # ResizeOptions.label, as preview's cells
    default = nodes.NODE_CLASS_MAPPINGS["LoraResizeSweep"].INPUT_TYPES()["required"]["settings"][1]["default"]
    assert [s if isinstance(s, str) else s.flags() for s in nodes.nodes._sweep_settings(default)] == [
        "base", "original", *(f"--method sv_ratio --param {r}" for r in (128, 32, 8, 4, 2))]  # the blog's


def test_sweep_refuses_a_bad_line_before_any_work(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeSweep"]()
    for text, why in [("base\n--method sv_ratio", "settings line 2 .*--param"),
                      ("--rank 4\n\n--rnak 4", "settings line 3 .*did you mean --rank"),
                      ("--rank 4 -o out.safetensors", "settings line 1 .*unknown option -o"),
                      ("--rank 4 --output-format peft", "settings line 1 .*peft is not a layout ComfyUI applies"),
                      ("--rank 4 'open", "settings line 1 .*cannot read the flags"),
                      ("-h", "settings line 1 .*unknown option -h"),
                      ("\n# nothing\n", "no settings")]:
        with pytest.raises(ValueError, match=why) as e:
            node.sweep("m", "c", "a.safetensors", text, strength_model=1.0, strength_clip=1.0)
        assert "\n" not in str(e.value), text
    assert nodes.bars == [] and nodes.applied == []


def test_tile_makes_one_labelled_cell_per_image(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeTile"]()
    assert node.INPUT_IS_LIST is True
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(1, 64, 96, 3, generator=g), torch.rand(2, 64, 96, 3, generator=g),
               torch.rand(1, 48, 80, 3, generator=g)]  # a batch of two, and a smaller picture
    labels = ["base (no LoRA)", "sv_ratio 8 - 14.2 MB", "original - 1.2 GB"]  # one per batch
    (grid,) = node.tile(batches, labels, [0])  # ComfyUI hands every input as a list
    assert grid.dtype == torch.float32 and grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[3] == 3
    frames = [f for b in batches for f in b]
    cols, rows, w, h = 2, 2, 96, 64
    gap = grid.shape[2] - cols * w  # white between the cells
    strip = (grid.shape[1] + gap) // rows - h - gap
    assert 0 <= gap < 20 and grid.shape[1] == rows * (h + strip + gap) - gap and strip > 10
    cells = []
    for i, frame in enumerate(frames):
        x, y = (i % cols) * (w + gap), (i // cols) * (h + strip + gap)
        fh, fw = frame.shape[:2]
        ox, oy = (w - fw) // 2, (h - fh) // 2
        got = grid[0, y + oy:y + oy + fh, x + ox:x + ox + fw]
        assert torch.equal(got, (frame * 255).round() / 255), i  # the picture, as 8-bit pixels
        text = grid[0, y + h:y + h + strip, x:x + w]
        assert float(text.min()) < 0.3 and float(text.max()) == 1.0, i  # dark letters on white
        cells.append(text)
    assert torch.equal(cells[1], cells[2]) and not torch.equal(cells[0], cells[1])  # a batch's frames share its label
    assert not torch.equal(cells[0], cells[3])
    (grid,) = node.tile(batches, ["a", "b", "c", "d"], [4])  # a label per image, one row
    assert grid.shape[2] == 4 * (w + gap) - gap and h + 10 < grid.shape[1] < 2 * h
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        node.tile(batches, ["a", "b"], [0])
    # grey (1-channel) images tile as grey RGB (PIL refused them); a very long label is cut, not a tall strip
    grey = [torch.rand(1, 32, 32, 1, generator=g), torch.rand(1, 32, 32, 1, generator=g)]
    (grid,) = node.tile(grey, ["a", "word " * 200], [0])
    assert grid.shape[3] == 3 and torch.equal(grid[0, :32, :32, 0], grid[0, :32, :32, 2])
    assert grid.shape[1] < 32 + 12 * 40


def test_writing_nodes_pick_a_free_name_when_none_is_given(nodes, loras):
    args = dict(RANK_ARGS, output_layout="same")
    resize = nodes.NODE_CLASS_MAPPINGS["LoraResize"]()
    assert resize.INPUT_TYPES()["required"]["output_name"][1]["default"] == ""
    first, _ = resize.resize("a.safetensors", output_name="", **args)
    assert first == "a_resized.safetensors"
    kept = (loras / first).read_bytes()
    assert resize.resize("a.safetensors", output_name="  ", **args)[0] == "a_resized_2.safetensors"  # re-queued
    other = loras.parent / "loras2"
    other.mkdir(exist_ok=True)
    (other / "a_resized_3.safetensors").symlink_to(other / "gone")  # taken in another loras folder, even dangling
    try:
        assert resize.resize("a.safetensors", output_name="", **args)[0] == "a_resized_4.safetensors"
    finally:
        (other / "a_resized_3.safetensors").unlink()
    assert (loras / first).read_bytes() == kept  # never written over
    assert resize.resize("style/c.safetensors", output_name="", **args)[0] == "c_resized.safetensors"
    merged, _ = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]().merge(
        "a.safetensors", 1.0, "b.safetensors", 1.0, output_name="", **RANK_ARGS)
    converted, _ = nodes.NODE_CLASS_MAPPINGS["LoraResizeConvert"]().convert("a.safetensors", "comfy", "")
    assert (merged, converted) == ("a_merged.safetensors", "a_comfy.safetensors")
    with pytest.raises(FileExistsError):  # a name given is that name, or refused
        resize.resize("a.safetensors", output_name="a_resized", **args)


# ComfyUI's core nodes of the example workflow (its nodes.py): socket inputs (name, type), output types, widgets
# (KSampler's seed gets the frontend's control_after_generate value beside it)
CORE = {"CheckpointLoaderSimple": ([], ["MODEL", "CLIP", "VAE"], 1),
        "CLIPTextEncode": ([("clip", "CLIP")], ["CONDITIONING"], 1),
        "EmptyLatentImage": ([], ["LATENT"], 3),
        "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("latent_image", "LATENT")], ["LATENT"], 7),
        "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"], 0),
        "SaveImage": ([("images", "IMAGE")], [], 1)}
SOCKETS = {"MODEL", "CLIP", "IMAGE", "LATENT", "CONDITIONING", "VAE", "LORA_STACK"}  # types a connection gives, not a widget


def signature(cls) -> tuple[list, list, list]:
    """A node class's socket inputs (name, type), output types and widget names, in ComfyUI's order."""
    sockets, widgets = [], []
    for name, decl in {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}.items():
        opts = decl[1] if len(decl) > 1 else {}
        if isinstance(decl[0], str) and (decl[0] in SOCKETS or opts.get("forceInput")):
            sockets.append((name, decl[0]))
        else:
            widgets.append(name)
    return sockets, list(cls.RETURN_TYPES), widgets


def test_the_example_workflow_is_consistent(nodes):
    """example_workflows/compare_settings.json, in ComfyUI's workflow format, where ComfyUI lists a node pack's
    templates (its app/custom_node_manager.py globs custom_nodes/*/example_workflows/*.json): every node type exists
    (ours in NODE_CLASS_MAPPINGS, ComfyUI's core ones by name), its sockets and widget values fit the node, every
    input is connected and every link joins an output to an input of the same type, as both ends record it."""
    import json
    wf = json.loads((REPO / "example_workflows" / "compare_settings.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert len(by_id) == len(wf["nodes"]) and wf["last_node_id"] == max(by_id)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    kinds = [n["type"] for n in wf["nodes"]]
    for kind in ("CheckpointLoaderSimple", "LoraResizeSweep", "CLIPTextEncode", "KSampler", "VAEDecode",
                 "LoraResizeTile", "SaveImage"):
        assert kind in kinds, kind
    for n in wf["nodes"]:
        if n["type"] in nodes.NODE_CLASS_MAPPINGS:
            cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
            sockets, outputs, widgets = signature(cls)
            assert len(n["widgets_values"]) == len(widgets), n["type"]
            given = dict(zip(widgets, n["widgets_values"]))
            if n["type"] == "LoraResizeSweep":
                assert len(nodes.nodes._sweep_settings(given["settings"])) == 7  # lines the node reads
        else:
            sockets, outputs, n_widgets = CORE[n["type"]]
            assert len(n["widgets_values"]) == n_widgets, n["type"]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == sockets, n["type"]
        assert [o["type"] for o in n["outputs"]] == outputs, n["type"]
        assert all(i["link"] is not None for i in n["inputs"]), n["type"]  # every input connected
    ids = set()
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        ids.add(link_id)
        out, inp = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == kind and link_id in out["links"] and inp["link"] == link_id, link_id
    assert len(ids) == len(wf["links"])
    assert {i["link"] for n in wf["nodes"] for i in n["inputs"]} == ids  # no link recorded on one end only
    assert {x for n in wf["nodes"] for o in n["outputs"] for x in o["links"] or ()} == ids


CLONE_IMPORT = r"""
import importlib.util, os, sys, types
clone = sys.argv[1]
# lora-resize not installed: no entry of the path (an editable install's, PYTHONPATH's) provides it
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "lora_resize", "__init__.py"))
               or os.path.isdir(os.path.join(p, "torch"))]
fp = types.ModuleType("folder_paths")
fp.get_filename_list = lambda kind: ["a.safetensors"]
sys.modules["folder_paths"] = fp
# as ComfyUI's nodes.py load_custom_node imports custom_nodes/<folder>: the folder's __init__.py as a package
spec = importlib.util.spec_from_file_location("lora-resize", os.path.join(clone, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules["lora-resize"] = module
spec.loader.exec_module(module)
import lora_resize
print(" ".join(sorted(module.NODE_CLASS_MAPPINGS)))
print(lora_resize.__file__)
"""


def test_a_clone_in_custom_nodes_loads_without_installing_lora_resize(nodes, tmp_path):
    """ComfyUI-Manager (or `git clone`) puts the whole repository in custom_nodes/<name>/ and ComfyUI imports its
    root __init__.py: the nodes register, with the clone's own src/ as the library, lora-resize not installed."""
    import shutil
    clone = tmp_path / "ComfyUI" / "custom_nodes" / "lora-resize"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", clone / "src", ignore=ignore)
    shutil.copytree(REPO / "comfyui_lora_resize", clone / "comfyui_lora_resize", ignore=ignore)
    shutil.copy(REPO / "__init__.py", clone / "__init__.py")
    p = subprocess.run([sys.executable, "-c", CLONE_IMPORT, str(clone)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 0, p.stderr
    names, where = p.stdout.splitlines()[-2:]
    assert set(names.split()) == set(nodes.NODE_CLASS_MAPPINGS)
    assert Path(where).resolve().is_relative_to(clone / "src")  # the clone's library, not an installed one


def test_requirements_are_the_core_dependencies_without_torch():
    """ComfyUI-Manager runs `pip install <line>` for each line of the root requirements.txt in ComfyUI's Python:
    every dependency of the package but torch (ComfyUI's own must not be replaced), matplotlib for Analyze's curve,
    one requirement per line (no comments: older Manager versions hand every line to pip)."""
    import tomllib
    from packaging.requirements import Requirement
    lines = (REPO / "requirements.txt").read_text().splitlines()
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name: str(Requirement(r)) for r in wanted["dependencies"]}
    plot = [str(Requirement(r)) for r in wanted["optional-dependencies"]["plot"]]
    assert all(line.strip() and "#" not in line for line in lines)
    assert sorted(str(Requirement(line)) for line in lines) == sorted([*(v for k, v in core.items() if k != "torch"),
                                                                       *plot])


def test_block_weights_input_reaches_the_options(nodes, loras, tmp_path):
    """The Resize and Apply nodes' optional `block_weights` (empty: none) is --block-weights: the same file, the
    same tensors as the CLI; a bad one is the node's one-line error."""
    weights = "SD15:1,0,0.5,0.5,-1,1,1,2,1,1,1,1,0.25,1,1,1,1"
    for cls in ("LoraResize", "LoraResizeApply"):
        spec = nodes.NODE_CLASS_MAPPINGS[cls].INPUT_TYPES()["optional"]["block_weights"]
        assert spec[0] == "STRING" and spec[1]["default"] == ""
    cli = tmp_path / "bw.safetensors"
    assert main(["resize", str(loras / "a.safetensors"), "-o", str(cli), "--method", "sv_fro", "--param", "0.9",
                 "--rank", "12", "--block-weights", weights, "-q"]) == 0
    name, _ = nodes.NODE_CLASS_MAPPINGS["LoraResize"]().resize("a.safetensors", output_layout="same", output_name="a_bw",
                                                               block_weights=f" {weights} ", **RANK_ARGS)
    assert (loras / name).read_bytes() == cli.read_bytes()
    nodes.NODE_CLASS_MAPPINGS["LoraResizeApply"]().apply("m", "c", "a.safetensors", strength_model=1.0,
                                                         strength_clip=1.0, block_weights=weights, **RANK_ARGS)
    assert same_bits(nodes.applied[-1]["lora"], load_st(cli)[0])
    plain = nodes.NODE_CLASS_MAPPINGS["LoraResize"]().resize("a.safetensors", output_layout="same", output_name="a_plain",
                                                             block_weights="", **RANK_ARGS)[0]
    assert (loras / plain).read_bytes() != cli.read_bytes()
    with pytest.raises(RuntimeError, match="lora-resize: --block-weights SDXL is for SDXL LoRAs"):
        nodes.NODE_CLASS_MAPPINGS["LoraResize"]().resize("a.safetensors", output_layout="same", output_name="a_x",
                                                         block_weights="SDXL:ALL", **RANK_ARGS)


def test_average_node_writes_what_the_cli_writes(nodes, loras, tmp_path):
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeAverage"]()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LoraResizeAverage"] == "Average LoRA checkpoints"
    name, summary = node.average("b.safetensors\n a.safetensors\n", weighting="ema", beta=0.8, sigma_rel=0.1,
                                 steps="200,100", method="sv_fro", param=0.95, rank=16, conv_rank=0,
                                 rank_rule="exact", target_size="", precision="same", output_name="")
    assert name == "b_averaged.safetensors"
    cli = tmp_path / "avg.safetensors"
    assert main(["average", str(loras / "b.safetensors"), str(loras / "a.safetensors"), "-o", str(cli),
                 "--weighting", "ema", "--beta", "0.8", "--steps", "200,100", "--method", "sv_fro", "--param",
                 "0.95", "--rank", "16", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    assert "a.safetensors (step 100) x 0.8, b.safetensors (step 200) x 0.2" in summary
    with pytest.raises(RuntimeError) as e:  # names without numbers, no steps: an ordered weighting refuses
        node.average("a.safetensors\nb.safetensors", weighting="linear", beta=0.8, sigma_rel=0.1, steps="",
                     method="sv_fro", param=0.95, rank=16, conv_rank=0, rank_rule="exact", target_size="",
                     precision="same", output_name="")
    assert "--steps 100,200" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in loras.glob("*_averaged*")) == ["b_averaged.safetensors"]
def merge_widgets(nodes) -> list[str]:
    return signature(nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"])[2]


# The Merge node's widgets before the merge method (as a saved workflow's widgets_values holds them, in order)
SAVED_MERGE_WIDGETS = ["lora_a", "weight_a", "lora_b", "weight_b", "method", "param", "rank", "conv_rank",
                       "rank_rule", "target_size", "precision", "output_name", "more"]


def test_a_merge_saved_before_the_merge_method_loads_and_makes_the_same_file(nodes, loras, tmp_path):
    """ComfyUI fills a node's widgets from a saved workflow's widgets_values in order and leaves the rest at their
    defaults: the new inputs come after the old ones, and their defaults make the weighted sum, the CLI's file."""
    widgets = merge_widgets(nodes)
    assert widgets[:len(SAVED_MERGE_WIDGETS)] == SAVED_MERGE_WIDGETS
    saved = ["a.safetensors", 1.0, "b.safetensors", -0.5, "sv_fro", 0.95, 16, 0, "exact", "", "same", "old", ""]
    spec = {**nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["required"],
            **nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["optional"]}
    values = {**{w: spec[w][1]["default"] for w in widgets[len(saved):]}, **dict(zip(widgets, saved))}
    assert values["merge_method"] == "sum"
    name, _ = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]().merge(**values)
    cli = tmp_path / "old.safetensors"
    assert main(["merge", f"{loras / 'a.safetensors'}:1", f"{loras / 'b.safetensors'}:-0.5", "-o", str(cli),
                 "--method", "sv_fro", "--param", "0.95", "--rank", "16", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()


def test_the_merge_node_offers_every_registered_method_and_passes_what_it_reads(nodes, loras, tmp_path):
    """A method registered after the nodes were written is in the merge_method list, with its parameters, and the
    node writes the CLI's file for it: density 0 is the method's default, a parameter it does not read is
    ignored; the list loses it when it is removed."""
    from lora_resize.core.merging import MERGE_METHODS, MergeMethod, register
    optional = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["optional"]
    assert optional["merge_method"][0] == lora_resize.merge_methods()
    assert optional["merge_method"][1]["default"] == "sum"
    assert set(lora_resize.MERGE_PARAMS) <= set(optional)
    assert optional["density"][0] == "FLOAT" and optional["density"][1]["default"] == 0.0
    assert "0: the method's default" in optional["density"][1]["tooltip"]
    assert optional["seed"][0] == "INT" and optional["seed"][1]["control_after_generate"] is False
    register(MergeMethod("scaled_test", "the sum times density", scaled_sum, params=("density",),
                         defaults={"density": 0.5}))
    try:
        optional = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["optional"]
        assert "scaled_test" in optional["merge_method"][0]
        assert "scaled_test" in optional["density"][1]["tooltip"]
        assert "scaled_test" not in optional["seed"][1]["tooltip"]
        node = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]()
        args = dict(method="fixed", param=0.0, rank=24, conv_rank=0, rank_rule="exact", target_size="",
                    precision="same")
        srcs = [f"{loras / 'a.safetensors'}:1", f"{loras / 'b.safetensors'}:-0.5"]
        for density, seed, flags in ((0.25, 7, ["--density", "0.25"]), (0.0, 0, [])):  # 0: the default, 0.5
            name, _ = node.merge("a.safetensors", 1.0, "b.safetensors", -0.5, output_name=f"s{seed}",
                                 merge_method="scaled_test", density=density, seed=seed, **args)
            cli = tmp_path / f"s{seed}.safetensors"
            assert main(["merge", *srcs, "-o", str(cli), "--rank", "24", "--merge-method", "scaled_test", *flags,
                         "-q"]) == 0
            assert (loras / name).read_bytes() == cli.read_bytes(), density  # seed ignored: the CLI refuses it
            d = density or 0.5  # judged by the plain sum of the scaled weights
            summed = tmp_path / f"sum{seed}.safetensors"
            assert main(["merge", f"{loras / 'a.safetensors'}:{d}", f"{loras / 'b.safetensors'}:{-0.5 * d}", "-o",
                         str(summed), "--rank", "24", "-q"]) == 0
            assert same_bits(load_st(loras / name)[0], load_st(summed)[0]), density
        # sum reads neither parameter: both ignored, the plain sum's file
        name, _ = node.merge("a.safetensors", 1.0, "b.safetensors", -0.5, output_name="plain", merge_method="sum",
                             density=0.3, seed=5, **args)
        cli = tmp_path / "plain.safetensors"
        assert main(["merge", *srcs, "-o", str(cli), "--rank", "24", "-q"]) == 0
        assert (loras / name).read_bytes() == cli.read_bytes()
        for bad, why in (({"merge_method": "nope"}, "lora-resize: merge method must be one of"),
                         ({"merge_method": "scaled_test", "density": 1.5}, "lora-resize: --density must be")):
            with pytest.raises(RuntimeError, match=why) as e:
                node.merge("a.safetensors", 1.0, "b.safetensors", 1.0, output_name="bad", **args, **bad)
            assert "\n" not in str(e.value)
        assert not (loras / "bad.safetensors").exists()
    finally:
        del MERGE_METHODS["scaled_test"]
    optional = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["optional"]
    assert "scaled_test" not in optional["merge_method"][0]


def test_the_merge_node_takes_twelve_loras_from_lines_and_a_lora_stack(nodes, loras, tmp_path):
    """Ten and more inputs, each with its weight: lora_a, lora_b, `more` lines and a LORA_STACK (a stacker node's
    [(name, model strength, clip strength)], 'None' slots skipped) - the CLI's file for the same inputs in that
    order. A stack entry whose clip strength differs is a one-line error, nothing written; IS_CHANGED follows the
    stack's files."""
    names = [f"tiny{i:02d}.safetensors" for i in range(12)]
    for i, n in enumerate(names):
        write_lora(loras / n, make_state_dict(standard_specs(), seed=100 + i))
    weights = [1.0, -0.5, 0.25, 2.0, 0.75, -1.0, 0.5, 1.5, -0.25, 0.125, 1.0, 0.3]
    more = "\n".join(f"{n}:{w}" for n, w in zip(names[2:7], weights[2:7]))
    stack = [(n, w, w) for n, w in zip(names[7:], weights[7:])]
    stack.insert(2, ("None", 1.0, 1.0))
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]()
    name, summary = node.merge(names[0], weights[0], names[1], weights[1], method="sv_fro", param=0.99, rank=0,
                               conv_rank=0, rank_rule="exact", target_size="", precision="same", output_name="twelve",
                               more=more, lora_stack=stack)
    cli = tmp_path / "twelve.safetensors"
    assert main(["merge", *(f"{loras / n}:{w}" for n, w in zip(names, weights)), "-o", str(cli), "--method", "sv_fro",
                 "--param", "0.99", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    stamp = node.IS_CHANGED(lora_a=names[0], lora_b=names[1], more=more, lora_stack=stack)
    assert all(n in stamp for n in names)
    before = sorted(p.name for p in loras.iterdir())
    for bad, why in (([(names[7], 1.0, 0.5)], "clip strength 0.5 differs from model strength 1.0"),
                     (["tiny07.safetensors"], "is not \\(lora_name, strength_model, strength_clip\\)")):
        with pytest.raises(ValueError, match=why) as e:
            node.merge(names[0], 1.0, names[1], 1.0, method="fixed", param=0.0, rank=4, conv_rank=0,
                       rank_rule="exact", target_size="", precision="same", output_name="nope", lora_stack=bad)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in loras.iterdir()) == before


def test_the_merge_node_s_per_input_strengths_and_a_seeded_method_make_the_cli_s_file(nodes, loras, tmp_path):
    """input_strengths lines (N:PRESET:W1,... and N:PATTERN=scale:X) are the CLI's --input-block-weights and
    --input-rule, N counting lora_a, lora_b, the more lines, then the stack; dare's density and seed reach the
    method: the CLI's file for the same flags, byte for byte. A bad line is a one-line error, nothing written."""
    optional = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"].INPUT_TYPES()["optional"]
    assert optional["input_strengths"][0] == "STRING" and optional["input_strengths"][1]["default"] == ""
    widgets = merge_widgets(nodes)
    assert widgets[len(SAVED_MERGE_WIDGETS):] == ["merge_method", "input_strengths", *lora_resize.MERGE_PARAMS]
    node = nodes.NODE_CLASS_MAPPINGS["LoraResizeMerge"]()
    args = dict(method="fixed", param=0.0, rank=12, conv_rank=0, rank_rule="exact", target_size="", precision="same")
    srcs = [f"{loras / 'a.safetensors'}:1", f"{loras / 'b.safetensors'}:-0.5", f"{loras / 'style/c.safetensors'}:0.5"]
    lines = "2:SD15:OUTALL\n\n# the first one's cross-attention at half\n1:*attn2*=scale:0.5\n3:*attn2*=drop"
    name, _ = node.merge("a.safetensors", 1.0, "b.safetensors", -0.5, output_name="strong", input_strengths=lines,
                         lora_stack=[("style/c.safetensors", 0.5, 0.5)], merge_method="dare", density=0.3, seed=7,
                         **args)
    cli = tmp_path / "strong.safetensors"
    assert main(["merge", *srcs, "-o", str(cli), "--rank", "12", "--input-block-weights", "2:SD15:OUTALL",
                 "--input-rule", "1:*attn2*=scale:0.5", "--input-rule", "3:*attn2*=drop", "--merge-method", "dare",
                 "--density", "0.3", "--seed", "7", "-q"]) == 0
    assert (loras / name).read_bytes() == cli.read_bytes()
    plain = tmp_path / "plain.safetensors"
    assert main(["merge", *srcs, "-o", str(plain), "--rank", "12", "--merge-method", "dare", "--density", "0.3",
                 "--seed", "7", "-q"]) == 0
    assert (loras / name).read_bytes() != plain.read_bytes()  # the strengths changed the merge
    before = sorted(p.name for p in loras.iterdir())
    for bad, why in (("3:SD15:OUTALL", "there is no input 3"), ("SD15:OUTALL", "write N:PRESET"),
                     ("1:SD15:OUTALL\n1:SD15:INALL", "input 1 has 2 block weights presets"),
                     ("1:SDXL:ALL", "--block-weights SDXL is for SDXL LoRAs")):
        with pytest.raises(RuntimeError, match=why) as e:
            node.merge("a.safetensors", 1.0, "b.safetensors", 1.0, output_name="nope", input_strengths=bad, **args)
        assert str(e.value).startswith("lora-resize: ") and "\n" not in str(e.value), bad
    assert sorted(p.name for p in loras.iterdir()) == before
