"""Every bad input through the CLI: exit status 2, one line on stderr starting 'lora-resize: error:', no output
file and no temporary file left behind, the input untouched."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save as st_save

from lora_resize.cli import main

from helpers import (ALPHA, BASE_METADATA, DOWN, LIN_A, UP, Spec, file_sha, make_state_dict, write_lora)

BAD = "lora_unet_mid_block_attentions_0_proj_in"


def _good_sd(seed: int = 0):
    return make_state_dict([Spec(LIN_A, 24, 20, 8, alpha=4.0), Spec(BAD, 16, 12, 4, kernel=1, alpha=2.0)],
                           seed=seed)


def _write(indir: Path, sd, name="in.safetensors", metadata=None) -> Path:
    return write_lora(indir / name, sd, dict(BASE_METADATA) if metadata is None else metadata)


def _valid_bytes(indir: Path) -> bytes:
    return _write(indir, _good_sd(), "valid.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Input builders: each returns the input path (written under `indir`).


def missing(indir):
    return indir / "does_not_exist.safetensors"


def directory(indir):
    d = indir / "a_folder.safetensors"
    d.mkdir()
    return d


def random_bytes(indir):
    p = indir / "noise.safetensors"
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                dtype=torch.uint8).numpy().tobytes())
    return p


def text_file(indir):
    p = indir / "readme.safetensors"
    p.write_text("This is not a LoRA.\nJust some text that someone renamed.\n" * 20)
    return p


def empty_file(indir):
    p = indir / "empty.safetensors"
    p.write_bytes(b"")
    return p


def truncated_in_data(indir):
    buf = _valid_bytes(indir)
    n = int.from_bytes(buf[:8], "little")
    p = indir / "cut_data.safetensors"
    p.write_bytes(buf[: 8 + n + (len(buf) - 8 - n) // 2])
    return p


def truncated_in_header(indir):
    buf = _valid_bytes(indir)
    n = int.from_bytes(buf[:8], "little")
    p = indir / "cut_header.safetensors"
    p.write_bytes(buf[: 8 + n // 2])
    return p


def corrupt_header_json(indir):
    buf = bytearray(_valid_bytes(indir))
    n = int.from_bytes(buf[:8], "little")
    head = bytes(buf[8:8 + n])
    i = head.index(b'"dtype"')
    head = head[:i] + b"{{{{" + head[i + 4:]  # same length, broken JSON
    p = indir / "bad_json.safetensors"
    p.write_bytes(bytes(buf[:8]) + head + bytes(buf[8 + n:]))
    return p


def header_length_too_large(indir):
    buf = _valid_bytes(indir)
    p = indir / "big_len.safetensors"
    p.write_bytes((len(buf) * 3).to_bytes(8, "little") + buf[8:])
    return p


def header_length_huge(indir):
    buf = _valid_bytes(indir)
    p = indir / "huge_len.safetensors"
    p.write_bytes((2 ** 62).to_bytes(8, "little") + buf[8:])
    return p


def offsets_past_end(indir):
    # a header that claims more data than the file holds (the header itself parses)
    sd = _good_sd()
    buf = st_save(sd, dict(BASE_METADATA))
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    header[LIN_A + DOWN]["data_offsets"][1] += 4096
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = indir / "offsets.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + buf[8 + n:])
    return p


def down_without_up(indir):
    sd = _good_sd()
    del sd[BAD + UP]
    return _write(indir, sd)


def up_without_down(indir):
    sd = _good_sd()
    del sd[BAD + DOWN]
    return _write(indir, sd)


def rank_mismatch(indir):
    sd = _good_sd()
    sd[LIN_A + UP] = torch.randn(24, 6)  # down has rank 8
    return _write(indir, sd)


def conv_up_3x3(indir):
    sd = _good_sd()
    sd[BAD + UP] = torch.randn(16, 4, 3, 3)
    return _write(indir, sd)


def conv_down_4d_up_2d(indir):
    sd = _good_sd()
    sd[BAD + UP] = sd[BAD + UP].reshape(16, 4)
    return _write(indir, sd)


def alpha_not_scalar(indir):
    sd = _good_sd()
    sd[LIN_A + ALPHA] = torch.tensor([4.0, 4.0])
    return _write(indir, sd)


def nan_in_layer(indir):
    sd = _good_sd()
    sd[BAD + UP][3, 1] = float("nan")
    return _write(indir, sd)


def inf_in_layer(indir):
    sd = _good_sd()
    sd[BAD + DOWN][2, 5] = float("inf")
    return _write(indir, sd)


def no_lora_layers(indir):
    sd = {"model.diffusion_model.input_blocks.0.weight": torch.randn(8, 4), "some.bias": torch.randn(8)}
    return _write(indir, sd)


def no_tensors(indir):
    return _write(indir, {"x": torch.zeros(0)}, metadata={"ss_training_comment": "empty"})


def pt_not_a_pickle(indir):
    p = indir / "noise.pt"
    p.write_bytes(b"PK\x03\x04 definitely not a torch zip archive" * 10)
    return p


def pt_not_a_dict(indir):
    p = indir / "list.pt"
    torch.save([torch.randn(3, 3), torch.randn(3)], p)
    return p


def pt_without_lora(indir):
    p = indir / "plain.pt"
    torch.save({"weight": torch.randn(4, 4)}, p)
    return p


def _valid(indir):
    return _write(indir, _good_sd())


# (input builder, extra argv (None: default '--rank 4'), output path (relative to the output folder, or a callable
#  of (indir, outdir, src)), substring the message must contain)
Case = tuple[Callable[[Path], Path], list[str] | None, object, str | None]

CASES: dict[str, Case] = {
    "missing_file": (missing, None, "out.safetensors", "does_not_exist"),
    "directory_input": (directory, None, "out.safetensors", "a_folder"),
    "random_bytes": (random_bytes, None, "out.safetensors", None),
    "text_file": (text_file, None, "out.safetensors", None),
    "empty_file": (empty_file, None, "out.safetensors", None),
    "truncated_in_data": (truncated_in_data, None, "out.safetensors", None),
    "truncated_in_header": (truncated_in_header, None, "out.safetensors", None),
    "corrupt_header_json": (corrupt_header_json, None, "out.safetensors", None),
    "header_length_too_large": (header_length_too_large, None, "out.safetensors", None),
    "header_length_huge": (header_length_huge, None, "out.safetensors", None),
    "offsets_past_end": (offsets_past_end, None, "out.safetensors", None),
    "down_without_up": (down_without_up, None, "out.safetensors", BAD),
    "up_without_down": (up_without_down, None, "out.safetensors", BAD),
    "rank_mismatch": (rank_mismatch, None, "out.safetensors", LIN_A),
    "conv_up_3x3": (conv_up_3x3, None, "out.safetensors", BAD),
    "conv_down_4d_up_2d": (conv_down_4d_up_2d, None, "out.safetensors", BAD),
    "alpha_not_scalar": (alpha_not_scalar, None, "out.safetensors", LIN_A),
    "nan_in_layer": (nan_in_layer, None, "out.safetensors", BAD),
    "inf_in_layer": (inf_in_layer, None, "out.safetensors", BAD),
    "no_lora_layers": (no_lora_layers, None, "out.safetensors", None),
    "no_tensors": (no_tensors, None, "out.safetensors", None),
    "pt_not_a_pickle": (pt_not_a_pickle, None, "out.safetensors", None),
    "pt_not_a_dict": (pt_not_a_dict, None, "out.safetensors", None),
    "pt_without_lora": (pt_without_lora, None, "out.safetensors", None),
    "method_without_param": (_valid, ["--rank", "4", "--method", "sv_fro"], "out.safetensors", None),
    "sv_ratio_below_one": (_valid, ["--method", "sv_ratio", "--param", "0.5"], "out.safetensors", None),
    "sv_fro_above_one": (_valid, ["--method", "sv_fro", "--param", "1.5"], "out.safetensors", None),
    "sv_cumulative_zero": (_valid, ["--method", "sv_cumulative", "--param", "0"], "out.safetensors", None),
    "sv_fro_negative": (_valid, ["--method", "sv_fro", "--param", "-0.1"], "out.safetensors", None),
    "param_without_method": (_valid, ["--rank", "4", "--param", "0.5"], "out.safetensors", None),
    "param_not_a_number": (_valid, ["--method", "sv_fro", "--param", "lots"], "out.safetensors", None),
    "unknown_method": (_valid, ["--method", "sv_magic", "--param", "0.5"], "out.safetensors", None),
    "rank_zero": (_valid, ["--rank", "0"], "out.safetensors", None),
    "rank_negative": (_valid, ["--rank", "-3"], "out.safetensors", None),
    "conv_rank_zero": (_valid, ["--rank", "4", "--conv-rank", "0"], "out.safetensors", None),
    "rank_not_integer": (_valid, ["--rank", "4.5"], "out.safetensors", None),
    "no_rank_no_method": (_valid, [], "out.safetensors", None),
    "unknown_precision": (_valid, ["--rank", "4", "--precision", "fp8"], "out.safetensors", None),
    "unknown_device": (_valid, ["--rank", "4", "--device", "tpu"], "out.safetensors", None),
    "unknown_flag": (_valid, ["--rank", "4", "--frobnicate"], "out.safetensors", None),
    "output_is_input": (_valid, None, lambda i, o, s: s, None),
    "output_is_input_other_spelling": (_valid, None, lambda i, o, s: s.parent / ".." / s.parent.name / s.name, None),
    "output_is_hard_link_to_input": (_valid, None, lambda i, o, s: os.link(s, o / "link.safetensors") or
                                     o / "link.safetensors", None),
    "output_is_directory": (_valid, None, lambda i, o, s: (o / "folder.safetensors").mkdir() or
                            o / "folder.safetensors", None),
    "output_folder_missing": (_valid, None, lambda i, o, s: o / "no_such_dir" / "out.safetensors", None),
    "output_bad_suffix": (_valid, None, "out.txt", None),
}


SD_SCRIPTS_ACCEPTS = {  # case -> what the note says
    "no_rank_no_method": "--new_rank defaults to 4",
    "sv_ratio_below_one": "--dynamic_param 0.5 for sv_ratio must be >= 1",
    "sv_fro_above_one": "--dynamic_param 1.5 for sv_fro must be in (0, 1]",
    "sv_cumulative_zero": "--dynamic_param 0 for sv_cumulative must be in (0, 1]",
    "sv_fro_negative": "--dynamic_param -0.1 for sv_fro must be in (0, 1]",
    "param_without_method": "--dynamic_param 0.5 is ignored without --dynamic_method",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["modern", "sd_scripts"])
def test_bad_input(tmp_path, capsys, case, form):
    build, extra, out_spec, must_mention = CASES[case]
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    src = build(indir)
    dst = out_spec(indir, outdir, src) if callable(out_spec) else outdir / out_spec
    before = file_sha(src) if src.is_file() else None
    out_before = sorted(p.name for p in outdir.iterdir())
    in_before = sorted(p.name for p in indir.iterdir())
    dst_was_dir = dst.is_dir()

    opts = ["--rank", "4"] if extra is None else extra
    if form == "modern":
        argv = ["resize", str(src), "-o", str(dst)] + opts
    else:
        sd_opts = [{"--rank": "--new_rank", "--conv-rank": "--new_conv_rank", "--method": "--dynamic_method",
                    "--param": "--dynamic_param", "--precision": "--save_precision"}.get(a, a) for a in opts]
        if "--new_rank" not in sd_opts and "--dynamic_method" not in sd_opts and case != "no_rank_no_method":
            sd_opts += ["--new_rank", "4"]
        argv = ["--model", str(src), "--save_to", str(dst), "--device", "cpu"] + sd_opts
    if form == "sd_scripts" and case in SD_SCRIPTS_ACCEPTS:
        # sd-scripts accepts these lines (its --new_rank defaults to 4; a --dynamic_param alone is ignored; its
        # formulas take any parameter), so the sd-scripts form must succeed too, saying what it made of them
        assert main(argv) == 0, capsys.readouterr().err
        assert SD_SCRIPTS_ACCEPTS[case] in capsys.readouterr().out
        return
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.err)
    err = cap.err
    assert err.startswith("lora-resize: error:"), err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    if must_mention:
        assert must_mention in err, err
    # nothing written: no output, no temporary file, the input untouched
    if dst_was_dir:
        assert dst.is_dir() and not any(dst.iterdir())
    elif not (dst.exists() and os.path.samefile(dst, src)):
        assert not dst.exists()
    assert sorted(p.name for p in outdir.iterdir()) == out_before
    assert sorted(p.name for p in indir.iterdir()) == in_before
    for folder in (indir, outdir, dst.parent if dst.parent.exists() else outdir):
        assert not [p for p in folder.iterdir() if p.name.startswith(".lora-resize-")]
    if before is not None:
        assert file_sha(src) == before


def test_unreadable_file(tmp_path, capsys):
    src = _write(tmp_path, _good_sd())
    before = file_sha(src)
    dst = tmp_path / "out.safetensors"
    os.chmod(src, 0)
    try:
        try:
            with open(src, "rb"):
                readable = True
        except PermissionError:
            readable = False
        if readable:
            pytest.skip("running as root: chmod 000 does not stop reading, so there is no unreadable file to test")
        rc = main(["resize", str(src), "-o", str(dst), "--rank", "4"])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.startswith("lora-resize: error:") and err.count("\n") == 1, err
        assert not dst.exists()
    finally:
        os.chmod(src, 0o644)
    assert file_sha(src) == before


def test_error_leaves_existing_output_alone(tmp_path, capsys):
    # a failed run must not destroy what is already at the destination
    sd = _good_sd()
    sd[BAD + UP][0, 0] = float("nan")
    src = _write(tmp_path, sd, name="nan.safetensors")
    dst = tmp_path / "keep.safetensors"
    dst.write_bytes(b"precious")
    assert main(["resize", str(src), "-o", str(dst), "--rank", "4"]) == 2
    assert dst.read_bytes() == b"precious"
    assert capsys.readouterr().err.startswith("lora-resize: error:")


def test_result_not_representable_in_fp16(tmp_path, capsys):
    # values fine in float32 whose rank-k factors overflow fp16: refused, nothing written
    sd = _good_sd()
    sd[LIN_A + UP] = sd[LIN_A + UP] * 1e6
    sd[LIN_A + DOWN] = sd[LIN_A + DOWN] * 1e6
    src = _write(tmp_path, sd)
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "4", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.count("\n") == 1 and LIN_A in err, err
    assert not dst.exists()
