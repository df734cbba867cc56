"""Every option that sets ranks (enumerated from ResizeOptions' field metadata, not listed here) is honoured by
every job that takes it, or refused in one line: on `convert`, a rank setting resizes in the same pass (the layers
it does not cover keep their full rank), never a full-rank file that still reports the setting's rule hits.
Judged on the written files: each module's rank from its tensors, and its update (diffusers: lora_B @ lora_A)
against dense float64 SVDs of the full-rank conversion."""
from __future__ import annotations

import math

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.errors import OptionsError
from lora_resize.options import ResizeOptions, rank_setting_fields
from lora_resize.testing import archs, loras

from helpers import load_st, write_lora

TO = "diffusers"
FULL_NAME = "transformer.blocks.0.ffn.net.2"


def updates(path) -> dict[str, torch.Tensor]:
    """Module name -> its update as a diffusers loader applies it (scale 1): lora_B @ lora_A, float64."""
    sd, _ = load_st(path)
    out = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            name = k[:-len(".lora_A.weight")]
            a, b = sd[k].double(), sd[name + ".lora_B.weight"].double()
            out[name] = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return out


def ranks_of(path) -> dict[str, int]:
    sd, _ = load_st(path)
    return {k[:-len(".lora_A.weight")]: v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}


@pytest.fixture
def wan(tmp_path):
    """A musubi Wan LoRA (linear layers and the conv3d patch embedding), its native base checkpoint, and the
    full-rank diffusers conversion: (src, base, full updates, full ranks, full bytes, which modules are convs)."""
    fn, tiny, _ = archs.NATIVE["wan"]
    shapes = fn(**tiny)
    src = write_lora(tmp_path / "in.safetensors", loras.lora_state_dict(shapes, "musubi", rank=6, alpha=3.0))
    g = torch.Generator().manual_seed(1)
    base = write_lora(tmp_path / "base.safetensors", {f"model.diffusion_model.{m.name}.weight":
                                                      torch.randn(m.out, m.inp, *m.kernel_dims, generator=g)
                                                      for m in shapes})
    full = lora_resize.convert(src, tmp_path / "full.safetensors", TO, precision="float")
    convs = {r.name for r in full.layers if r.kind.startswith("conv")}
    return src, base, updates(full.dst), ranks_of(full.dst), full.output_bytes, convs


def samples(base, full_bytes):
    """One value of every rank-setting field, and how the written ranks must follow from it: a function of
    (module name, its full rank, its full update) -> the rank, or None where the setting is a budget judged as a
    whole (`budget_check`)."""
    def svfro(name, k, dw):
        S = torch.linalg.svdvals(dw)[:k]
        frac = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
        return int((frac < 0.6 - 1e-9).sum()) + 1
    return {
        "rank": (dict(rank=2), lambda n, k, dw: min(2, k)),
        "conv_rank": (dict(conv_rank=2), "conv"),
        "method": (dict(method="sv_fro", param=0.6), svfro),
        "block_rules": (dict(block_rules=("*ffn*=2",)), lambda n, k, dw: min(2, k) if "ffn" in n else k),
        "target_size": (dict(target_size=int(full_bytes * 0.6)), None),
        "target_fro": (dict(target_fro=0.6), None),
        "target_error": (dict(target_error=0.01, base=str(base)), None),
        "ranks": (dict(ranks={FULL_NAME: 1}), lambda n, k, dw: 1 if n == FULL_NAME else k),
    }


def budget_check(setting: dict, got: dict, full: dict, nbytes: int, base) -> None:
    """The budget's own promise, on the written file."""
    if "target_size" in setting:
        assert nbytes <= setting["target_size"]
    elif "target_fro" in setting:
        kept = sum(float(got[n].norm()) ** 2 for n in full)
        assert math.sqrt(kept / sum(float(d.norm()) ** 2 for d in full.values())) >= 0.6 - 1e-6
    else:
        W, _ = load_st(base)
        norm2 = sum(float(w.double().norm()) ** 2 for w in W.values())
        lost = sum(float((full[n] - got[n]).norm()) ** 2 for n in full)
        assert math.sqrt(lost / norm2) <= setting["target_error"] * (1 + 1e-6)


@pytest.mark.parametrize("field", [f.name for f in rank_setting_fields()])
def test_every_rank_setting_on_convert_is_honoured_or_refused(tmp_path, wan, field):
    src, base, full, full_ranks, full_bytes, convs = wan
    table = samples(base, full_bytes)
    assert set(table) == {f.name for f in rank_setting_fields()}, "a rank setting this test does not know"
    setting, rule = table[field]
    assert field in ResizeOptions(**setting).rank_settings
    dst = tmp_path / "out.safetensors"
    try:
        res = lora_resize.convert(src, dst, TO, precision="float", **setting)
    except OptionsError:
        assert not dst.exists()  # refused, in one line, with nothing written
        return
    got, ranks = updates(dst), ranks_of(dst)
    assert set(ranks) == set(full_ranks)
    assert {r.name: r.new_rank for r in res.layers} == ranks  # the summary states what was written
    if rule is None:
        budget_check(setting, got, full, res.output_bytes, base)
    else:
        for name, k in full_ranks.items():
            want = (min(2, k) if name in convs else k) if rule == "conv" else rule(name, k, full[name])
            assert ranks[name] == want, name
    assert ranks != full_ranks  # the setting did something
    meta = load_st(dst)[1]
    if field in ("rank", "conv_rank", "ranks"):  # fixed settings: the metadata states the ranks written
        lin, cv = ({k for n, k in ranks.items() if (n in convs) == c} for c in (False, True))
        assert meta["ss_network_dim"] == (str(min(lin)) if len(lin) == 1 and len(cv) <= 1 else "Dynamic")
        assert "None" not in meta.get("ss_training_comment", "")
    for name, k in ranks.items():  # each module the best rank-k approximation of its full update
        U, S, Vh = torch.linalg.svd(full[name], full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert float((got[name] - best).norm()) <= 1e-5 * max(float(full[name].norm()), 1e-12), name


def test_convert_cli_with_a_rule_writes_the_rule_s_ranks(tmp_path, wan, capsys):
    src, _, _, full_ranks, _, _ = wan
    dst = tmp_path / "cli.safetensors"
    assert main(["convert", str(src), "-o", str(dst), "--to", TO, "--rule", "*ffn*=2", "-q"]) == 0
    ranks = ranks_of(dst)
    assert {n: k for n, k in ranks.items() if "ffn" in n} == {n: 2 for n in full_ranks if "ffn" in n}
    assert {n: k for n, k in ranks.items() if "ffn" not in n} == {n: k for n, k in full_ranks.items() if "ffn" not in n}


def test_every_budget_and_rank_flag_is_a_rank_setting():
    """The registries' budgets are fields that set ranks, and so is every flag of the rank group that a chosen
    setting names (not the rank rule, which turns a setting into ranks, nor --base, which measures)."""
    from lora_resize.ranks.budgets import BUDGETS
    names = {f.name for f in rank_setting_fields()}
    assert set(BUDGETS) <= names
    assert {"rank", "conv_rank", "method", "block_rules", "ranks"} <= names
    assert ResizeOptions(rank=4, block_rules=("a*=drop",)).rank_settings == ("rank", "conv_rank")
    assert ResizeOptions(block_rules=("a*=3",)).rank_settings == ("block_rules",)  # a rank rule alone is a setting


@pytest.mark.parametrize("with_base, mixed", [(False, False), (True, False), (False, True)],
                         ids=["plain", "base", "bf16-with-float32-copied"])
def test_every_printed_row_runs_as_printed_and_writes_what_analyze_predicted(tmp_path, wan, capsys, with_base,
                                                                             mixed):
    """Each row's flags (the JSON's `args`, the text's chosen line), given to the real CLI as a shell would split
    them, write exactly the bytes and per-layer ranks analyze predicted: --base, budgets, caps and a rule with a
    quote in it included; the input's path has a space and a quote too. `mixed`: a bf16 LoRA holding a float32
    diff_b, which resize copies in float32 when no precision is given - so no row may add a --precision the user
    did not give (it would cast the copy), and the predictions must count the copy at its own dtype."""
    import shlex
    import shutil

    from lora_resize.ops.analyze import analyze

    src0, base, *_ = wan
    folder = tmp_path / "my lora's"
    folder.mkdir()
    src = folder / "in put.safetensors"
    if mixed:
        sd, _ = load_st(src0)
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        sd["lora_unet_patch_embedding.diff_b"] = torch.randn(16, generator=torch.Generator().manual_seed(2)) / 3
        write_lora(src, sd)
    else:
        shutil.copy(src0, src)
    shared = ["--rank", "5", "--rule", "*ffn[!']*=cap:3", "--target-size", "16000"]
    if with_base:
        shared += ["--base", str(base)]
    assert main(["analyze", str(src), "--json", "-q", *shared]) == 0
    import json
    printed = json.loads(capsys.readouterr().out)
    fields = dict(rank=5, block_rules=("*ffn[!']*=cap:3",), target_size=16000, base=str(base) if with_base else None)
    a = analyze(src, **fields)
    rows = a.rows + [a.chosen]
    assert [r["args"] for r in printed["settings"]] + [printed["chosen"]["args"]] == [r.args for r in rows]
    assert any(r.method == "target_size" for r in a.rows) and (not with_base or any("--base" in r.args for r in rows))
    assert not any("--precision" in r.args for r in rows)  # none was given
    for i, row in enumerate(rows):
        dst = tmp_path / f"row{i}.safetensors"
        assert main(["resize", str(src), "-o", str(dst), "-q", *shlex.split(row.args)]) == 0, row.args
        capsys.readouterr()
        sd, _ = load_st(dst)
        ranks = [sd[sp.name + ".lora_down.weight"].shape[0] for sp in a.layers]
        assert (dst.stat().st_size, ranks) == (row.output_bytes, [int(k) for k in row.ranks]), row.args
    # the text's chosen line, as printed
    assert main(["analyze", str(src), "-q", *shared]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("* chosen: "))
    words = shlex.split(line[len("* chosen: "):])
    assert words[:2] == ["lora-resize", "resize"] and words[2] == str(src)
    dst = tmp_path / "chosen.safetensors"
    assert main([w if w != "OUT.safetensors" else str(dst) for w in words[1:]] + ["-q"]) == 0
    assert dst.stat().st_size == a.chosen.output_bytes
    if mixed:  # the copied float32 tensor kept its dtype and bits
        assert torch.equal(load_st(dst)[0]["lora_unet_patch_embedding.diff_b"], sd["lora_unet_patch_embedding.diff_b"])
