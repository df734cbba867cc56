"""The command line, both forms, end to end: ranks, verbose lines in sd-scripts' format, precision defaults,
pickle inputs (plain state dicts read, code refused)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_resize.cli import main
from lora_resize.units import format_size

from helpers import (ALPHA, BASE_METADATA, CONV3_A, DOWN, LIN_A, Spec, best_rank_k, boundary_margin, dense_dw,
                      kohya_reference, layer_names, load_st, make_state_dict, raw_header, raw_product, rel_err,
                      standard_specs, write_lora, one_alpha, ZERO)

PCT = r"(\d+\.\d)%"
VERBOSE_RE = re.compile(  # sd-scripts' figures, or what a layer with no update is (sd-scripts: nan%)
    r"^(?P<name>.{75,}) \| (?:(?P<zero>zero layer \(no update\): kept as rank-1 zeros)|sum\(S\) retained: "
    + PCT.replace("(", "(?P<sum>", 1)
    + r", fro retained: " + PCT.replace("(", "(?P<fro>", 1)
    + r", max\(S\) ratio: (?P<ratio>\d+\.\d|inf))"
    + r"(?:, dynamic \| dim: (?P<dim>\d+), alpha: (?P<alpha>[-+0-9.e]+|nan|inf))?$")
AVERAGE_RE = re.compile(r"^Average Frobenius norm retention: (?P<mean>\d+\.\d\d)% \| std: (?P<std>\d+\.\d{3})$")

CONV_NAMES = {s.name for s in standard_specs() if s.kernel is not None}


def exact_fro_rank(S: torch.Tensor, param: float) -> int:
    """Smallest k with sqrt(sum_k S^2 / sum S^2) >= param (1 for a zero layer)."""
    if float(S[0]) == 0:
        return 1
    fro = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
    return int((fro < param - 1e-12).sum()) + 1


def stats(S: torch.Tensor, k: int) -> tuple[float, float, float]:
    """sum retained, fro retained, max ratio: sd-scripts' verbose statistics, here in float64."""
    tot = float(S.sum())
    if tot == 0:
        return math.nan, math.nan, math.nan
    return (float(S[:k].sum()) / tot, math.sqrt(float((S[:k] ** 2).sum() / (S ** 2).sum())),
            float(S[0] / S[k - 1]))


def alpha_str(sd_in, name: str, k: int) -> str:
    r = sd_in[name + DOWN].shape[0]
    a = sd_in.get(name + ALPHA)
    scale = a.float() / r if a is not None else torch.tensor(1.0)
    return str(float(scale * k))


def check_verbose(stdout: str, sd_in, out, dynamic: bool, alpha: float | None = None) -> None:
    """sd-scripts' verbose lines; `alpha`: the one alpha every layer has (None: sd-scripts' per-layer alphas)."""
    lines = stdout.splitlines()
    rows = [m for m in (VERBOSE_RE.match(x) for x in lines) if m]
    names = layer_names(sd_in)
    assert len(rows) == len(names), stdout
    assert sorted(m.group("name").rstrip() for m in rows) == names
    fros = []
    for m in rows:
        name = m.group("name").rstrip()
        assert m.group("name") == f"{name:75}"
        k = out[name + DOWN].shape[0]
        S = torch.linalg.svdvals(raw_product(sd_in, name))
        s_sum, s_fro, ratio = stats(S, k)
        assert bool(m.group("zero")) == math.isnan(s_fro), m.group(0)  # said exactly of the layers with no update
        for got, want, scale in ((m.group("sum"), s_sum, 100), (m.group("fro"), s_fro, 100),
                                 (m.group("ratio"), ratio, 1)):
            if not m.group("zero"):
                assert abs(float(got) - want * scale) <= 0.051 + 1e-6 * want * scale, (name, got, want)
        if not math.isnan(s_fro):
            fros.append(s_fro)
        if dynamic:
            assert m.group("dim") is not None, m.group(0)
            assert int(m.group("dim")) == k
            want_alpha = alpha_str(sd_in, name, k) if alpha is None else str(alpha)
            assert m.group("alpha") == want_alpha, name
        else:
            assert m.group("dim") is None
    avg = [AVERAGE_RE.match(x) for x in lines]
    avg = [a for a in avg if a]
    assert len(avg) == 1, stdout
    mean = sum(fros) / len(fros)
    std = math.sqrt(sum((f - mean) ** 2 for f in fros) / len(fros))
    assert abs(float(avg[0].group("mean")) - 100 * mean) <= 0.0051
    assert abs(float(avg[0].group("std")) - std) <= 0.00051


def header_dtypes(path: Path) -> set[str]:
    _, h = raw_header(path.read_bytes())
    return {v["dtype"] for k, v in h.items() if k != "__metadata__"}


def test_modern_form(tmp_path, standard_lora, standard_sd, capsys):
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(standard_lora), "-o", str(dst), "--rank", "4", "--conv-rank", "2", "--method", "sv_fro",
               "--param", "0.9", "--precision", "fp16", "--device", "cpu", "-v"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert dst.exists()
    out, meta = load_st(dst)
    assert header_dtypes(dst) == {"F16", "I64"}
    for name in layer_names(standard_sd):
        S = torch.linalg.svdvals(dense_dw(standard_sd, name))
        k = min(exact_fro_rank(S, 0.9), 2 if name in CONV_NAMES else 4)
        assert out[name + DOWN].shape[0] == k, name
        assert rel_err(dense_dw(out, name), best_rank_k(dense_dw(standard_sd, name), k)) < 2e-3
    check_verbose(cap.out, standard_sd, out, dynamic=True, alpha=one_alpha(standard_sd, 4))
    assert any(line.startswith(f"{standard_lora.name} -> {dst.name}:") for line in cap.out.splitlines()), cap.out
    assert meta["ss_network_dim"] == "Dynamic"


SD_SCRIPTS_ARGS = ["--save_precision", "fp16", "--save_to", "{dst}", "--model", "{src}", "--new_rank", "8",
                   "--new_conv_rank", "4", "--device", "cpu", "--dynamic_method", "sv_fro", "--dynamic_param", "0.75",
                   "--verbose"]


def _sd_args(src, dst, extra=()):
    return [a.format(src=src, dst=dst) for a in SD_SCRIPTS_ARGS] + list(extra)


def test_sd_scripts_form(tmp_path, standard_lora, standard_sd, capsys):
    dst = tmp_path / "out.safetensors"
    rc = main(_sd_args(standard_lora, dst))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out, meta = load_st(dst)
    assert header_dtypes(dst) == {"F16", "I64"}
    for name in layer_names(standard_sd):
        S = torch.linalg.svdvals(dense_dw(standard_sd, name))
        k = min(exact_fro_rank(S, 0.75), 4 if name in CONV_NAMES else 8)
        assert out[name + DOWN].shape[0] == k, name
    check_verbose(cap.out, standard_sd, out, dynamic=True, alpha=one_alpha(standard_sd, 8))
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.75 from 16; ")


def test_sd_scripts_form_kohya_rule(tmp_path, standard_lora, standard_sd, capsys):
    dst = tmp_path / "out.safetensors"
    rc = main(_sd_args(standard_lora, dst, ["--rank-rule", "kohya"]))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out, _ = load_st(dst)
    differs = 0
    for name in layer_names(standard_sd):
        S32 = torch.linalg.svdvals(raw_product(standard_sd, name).float())  # sd-scripts: float32 SVD of up @ down
        assert float(S32[0]) <= 1e-6 or boundary_margin(S32, "sv_fro", 0.75) > 1e-4, f"test data near a tie: {name}"
        cap_rank = 4 if name in CONV_NAMES else 8
        k = kohya_reference(S32, "sv_fro", 0.75, cap_rank)
        assert out[name + DOWN].shape[0] == k, name
        differs += k != min(exact_fro_rank(S32.double(), 0.75), cap_rank)
    assert differs >= 1, "kohya and exact ranks coincide on this data: the test would not tell them apart"
    check_verbose(cap.out, standard_sd, out, dynamic=True)


@pytest.mark.parametrize("method, param", [("sv_fro", 1.5), ("sv_fro", -0.1), ("sv_ratio", 0.5),
                                           ("sv_cumulative", 0.0), ("sv_cumulative", 2.0)])
def test_sd_scripts_lines_with_any_param_give_sd_scripts_ranks(tmp_path, standard_lora, standard_sd, capsys,
                                                               method, param):
    """sd-scripts' formulas take any --dynamic_param; the sd-scripts form accepts the same line (with a note) and,
    under its rank rule, gives the ranks sd-scripts gives for that very parameter."""
    dst = tmp_path / "out.safetensors"
    rc = main(["--model", str(standard_lora), "--save_to", str(dst), "--new_rank", "64", "--dynamic_method", method,
               "--dynamic_param", str(param), "--rank-rule", "kohya", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"--dynamic_param {param:g} for {method}" in cap.out
    out, _ = load_st(dst)
    for name in layer_names(standard_sd):
        S32 = torch.linalg.svdvals(raw_product(standard_sd, name).float())
        assert out[name + DOWN].shape[0] == kohya_reference(S32, method, param, 64), name


def test_sd_scripts_param_without_method_is_a_fixed_rank_resize(tmp_path, standard_lora, standard_sd, capsys):
    dst = tmp_path / "out.safetensors"
    assert main(["--model", str(standard_lora), "--save_to", str(dst), "--new_rank", "6", "--dynamic_param", "32",
                 "--save_precision", "float", "--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "--dynamic_param 32 is ignored without --dynamic_method" in text
    if not torch.cuda.is_available():
        assert "CUDA is not available here; computed on the CPU" in text
    out, meta = load_st(dst)
    spec = {s.name: s for s in standard_specs()}
    for name in layer_names(standard_sd):
        s = spec[name]
        assert out[name + DOWN].shape[0] == (1 if s.zero else min(6, s.out, s.flat_in, s.rank)), name
    assert meta["ss_network_dim"] == "6"


def test_sd_scripts_fixed_rank_default(tmp_path, standard_lora, standard_sd, capsys):
    # sd-scripts' --new_rank defaults to 4; fixed mode prints no dynamic part
    dst = tmp_path / "out.safetensors"
    rc = main(["--model", str(standard_lora), "--save_to", str(dst), "--verbose", "--save_precision", "float"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out, meta = load_st(dst)
    spec = {s.name: s for s in standard_specs()}
    for name in layer_names(standard_sd):
        s = spec[name]
        want = 1 if s.zero else min(4, s.out, s.flat_in, s.rank)
        assert out[name + DOWN].shape[0] == want, name
    check_verbose(cap.out, standard_sd, out, dynamic=False)
    assert meta["ss_network_dim"] == "4"
    assert header_dtypes(dst) == {"F32", "I64"}


@pytest.mark.parametrize("in_dtype,flag,want", [
    (torch.float16, None, "F16"), (torch.bfloat16, None, "BF16"), (torch.float32, None, "F32"),
    (torch.float16, "float", "F32"), (torch.float32, "fp16", "F16"), (torch.float16, "bf16", "BF16"),
])
def test_precision(tmp_path, capsys, in_dtype, flag, want):
    sd = make_state_dict([Spec(LIN_A, 40, 30, 8, alpha=4.0), Spec(CONV3_A, 16, 4, 8, kernel=3, alpha=2.0)],
                         seed=2, dtype=in_dtype)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    dst = tmp_path / "out.safetensors"
    argv = ["resize", str(src), "-o", str(dst), "--rank", "4", "--device", "cpu"]
    if flag:
        argv += ["--precision", flag]
    assert main(argv) == 0, capsys.readouterr().err
    assert header_dtypes(dst) == {want}


def test_existing_output_replaced(tmp_path, standard_lora, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_text("an old file")
    assert main(["resize", str(standard_lora), "-o", str(dst), "--rank", "2"]) == 0, capsys.readouterr().err
    out, meta = load_st(dst)
    assert out[LIN_A + DOWN].shape[0] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lora-resize-")]


def test_pt_input(tmp_path, standard_sd, capsys):
    src = tmp_path / "in.pt"
    torch.save(standard_sd, src)
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "3", "--precision", "float"])
    assert rc == 0, capsys.readouterr().err
    out, _ = load_st(dst)
    assert rel_err(dense_dw(out, LIN_A), best_rank_k(dense_dw(standard_sd, LIN_A), 3)) < 1e-5
    assert torch.equal(out["some.other.index"], standard_sd["some.other.index"])


class Payload:
    """Unpickling this runs open(marker, 'w'): a stand-in for arbitrary code in a malicious .pt file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pt(path: Path, marker: Path, sd) -> Path:
    obj = dict(sd)
    obj["_payload"] = Payload(marker)
    torch.save(obj, path)
    return path


def test_pt_pickle_payload_refused(tmp_path, standard_sd, capsys):
    # control: the payload is real (an unsafe load does create its marker)
    control_marker = tmp_path / "control_marker"
    control = _malicious_pt(tmp_path / "control.pt", control_marker, standard_sd)
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "pwned_marker"
    src = _malicious_pt(tmp_path / "evil.pt", marker, standard_sd)
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lora-resize: error:") and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    assert not dst.exists()


def _script() -> list[str]:
    exe = Path(sys.executable).parent / "lora-resize"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_resize.cli"]


@pytest.mark.slow
def test_console_script_subprocess(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    proc = subprocess.run(_script() + _sd_args(standard_lora, dst), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LORA_RESIZE_DEBUG=""))
    assert proc.returncode == 0, proc.stderr
    out, _ = load_st(dst)
    check_verbose(proc.stdout, standard_sd, out, dynamic=True, alpha=one_alpha(standard_sd, 8))


@pytest.mark.slow
def test_module_subprocess_error_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_resize.cli", "resize", str(tmp_path / "missing.safetensors"),
                           "-o", str(tmp_path / "o.safetensors"), "--rank", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lora-resize: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_json_output(tmp_path, standard_lora, capsys):
    import json
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(standard_lora), "-o", str(dst), "--rank", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    out, _ = load_st(dst)
    assert {r["name"]: r["new_rank"] for r in data["layers"]} == {n: out[n + DOWN].shape[0]
                                                                  for n in layer_names(out)}


# ----------------------------------------------------------------------------------------------------------------
# The summary names what it did unambiguously


def test_summary_shows_the_output_path_when_its_name_is_the_inputs(tmp_path, standard_lora, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "od").mkdir()
    (tmp_path / "k.safetensors").write_bytes(standard_lora.read_bytes())
    for out in ("od", "od/", str(tmp_path / "od" / "k.safetensors")):
        assert main(["resize", "k.safetensors", "-o", out, "--rank", "3", "-q"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"k.safetensors -> {os.path.join('od', 'k.safetensors')}: "), first
    # names that differ stay short
    assert main(["resize", "k.safetensors", "-o", "od/small.safetensors", "--rank", "3", "-q"]) == 0
    assert capsys.readouterr().out.startswith("k.safetensors -> small.safetensors: ")


def test_merge_summary_names_its_inputs_and_their_total(tmp_path, standard_lora, capsys):
    other = tmp_path / "other.safetensors"
    other.write_bytes(standard_lora.read_bytes())
    dst = tmp_path / "m.safetensors"
    assert main(["merge", f"{standard_lora}:0.8", f"{other}:-0.5", "-o", str(dst), "--rank", "3", "-q"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    total = format_size(standard_lora.stat().st_size + other.stat().st_size)
    assert first.startswith(f"{standard_lora.name}:0.8 + other.safetensors:-0.5 -> m.safetensors: {total} "
                            "(2 inputs) -> "), first


def test_verbose_says_zero_layer_instead_of_nan(tmp_path, capsys):
    sd = make_state_dict([Spec(LIN_A, out=24, inp=20, rank=8, alpha=4.0),
                          Spec(ZERO, out=16, inp=12, rank=4, alpha=2.0, zero=True),
                          Spec(CONV3_A, out=8, inp=6, rank=4, alpha=0.0, kernel=3)], seed=5)
    src = write_lora(tmp_path / "z.safetensors", sd)
    for extra in ([], ["--method", "sv_fro", "--param", "0.9"]):
        assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "4", "-v", "-q",
                     *extra]) == 0
        out = capsys.readouterr().out
        assert "nan" not in out.lower(), out
        lines = {line.split()[0]: line for line in out.splitlines() if " | " in line}
        assert "zero layer" in lines[ZERO] and "zero layer" in lines[CONV3_A], out  # alpha 0: no update either
        assert re.search(r"fro retained: \d+\.\d%", lines[LIN_A]), out
