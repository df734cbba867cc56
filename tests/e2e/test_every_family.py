"""What must hold for every key family and scale convention (helpers.family_files), checked on the files
themselves: after a full sweep, analyze predicts the exact bytes of every file resize writes; --target-size never
overshoots; merge records what resize records; --output-format is honoured (or refused) by analyze as by resize.

Regression tests for defects of the house before its redesign: a key family's `emit` wrote into a shared sink
that analyze's per-(layer, rank) cache then read back, so a diffusers file with `lora_adapter_metadata` got wrong
size predictions after the sweep and --target-size files over their target; merge's own metadata builder left
block rules and budgets out of its record; analyze ignored --output-format."""
from __future__ import annotations

import json

import pytest

import lora_resize
from lora_resize.cli import main
from lora_resize.ops.analyze import analyze

from helpers import BLOCKY, family_files, load_st, write_lora

FAMILIES = ["kohya", "lycoris", "peft", "diffusers_metadata", "diffusers_unprefixed", "ai_toolkit", "controllora",
            "xlabs"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return family_files(tmp_path_factory.mktemp("families"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_after_a_full_sweep_every_prediction_is_the_written_size(tmp_path, files, family):
    a = analyze(files[family])
    assert len(a.rows) > 25
    for i, row in enumerate(a.rows):  # the sweep is done first: every prediction after every other
        dst = tmp_path / f"{i}.safetensors"
        res = lora_resize.resize(files[family], dst, row.options)
        assert dst.stat().st_size == row.output_bytes, (family, row.label)
        assert [r.new_rank for r in res.layers] == [int(k) for k in row.ranks], (family, row.label)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_target_size_never_overshoots(tmp_path, files, family):
    a = analyze(files[family], sweep={"fixed": (1, 2, 4, 8)})
    lo, hi = min(r.output_bytes for r in a.rows), max(r.output_bytes for r in a.rows)
    for j in range(9):
        target = lo + 400 + (hi - lo) * j // 8 + j * 37  # odd sizes, between rank steps (a budget's metadata
        # is longer than a fixed rank's: the smallest budget file is a little above the rank-1 file)
        dst = tmp_path / f"{j}.safetensors"
        lora_resize.resize(files[family], dst, target_size=target)
        assert dst.stat().st_size <= target, (family, target, dst.stat().st_size)


def test_merge_records_what_resize_records(tmp_path, blocky_lora):
    rules = ("lora_te_*=drop", "*attn2*=cap:3")
    for budget in (dict(target_size=13_000), dict(target_fro=0.8), dict(method="sv_fro", param=0.8, rank=6)):
        r = lora_resize.resize(blocky_lora, tmp_path / "r.safetensors", block_rules=rules, **budget)
        m = lora_resize.merge([f"{blocky_lora}:0.5", f"{blocky_lora}:0.5"], tmp_path / "m.safetensors",
                              block_rules=rules, **budget)
        rec_r, rec_m = json.loads(r.metadata["lora_resize"]), json.loads(m.metadata["lora_resize"])
        assert set(rec_r) - {"source"} == set(rec_m) - {"operation", "merge_method", "sources"}, budget
        for key in set(rec_r) - {"source", "layers"}:
            assert rec_r[key] == rec_m[key], (budget, key)
        assert rec_m["block_rules"] == list(rules) and rec_m["layers"].keys() == rec_r["layers"].keys()
        if "target_size" not in budget:  # (the two files' metadata differ, so a size budget may differ by a rank)
            # a merge of a file with itself at half weight each is the file: the same new ranks
            assert [x.new_rank for x in m.layers] == [x.new_rank for x in r.layers], budget
        else:
            assert (tmp_path / "m.safetensors").stat().st_size <= budget["target_size"]


def test_analyze_honours_output_format(tmp_path, files, capsys):
    from lora_resize.testing import archs, loras
    shapes = archs.sd15(ch=(8, 16, 32, 32), ctx=12, te=(16, 2, 32))  # kohya names: make them diffusers names
    sd = loras.lora_state_dict([s for s in shapes if "attentions" in s.name or "_te_" in s.name][:24], "kohya",
                               rank=6, alpha=3.0, seed=2)
    diffusers = {}
    for k, v in sd.items():
        name, _, part = k.partition(".")
        comp, path = (("unet", name[len("lora_unet_"):]) if name.startswith("lora_unet_") else
                      ("text_encoder", name[len("lora_te_"):]))
        path = (path.replace("down_blocks_", "down_blocks.").replace("_attentions_", ".attentions.")
                .replace("_transformer_blocks_", ".transformer_blocks.").replace("_proj_", ".proj_")
                .replace("_attn", ".attn").replace("_to_", ".to_").replace("text_model_encoder_layers_",
                                                                            "text_model.encoder.layers.")
                .replace("_self_attn_", ".self_attn.").replace("_mlp_", ".mlp.").replace("_ff_net_", ".ff.net."))
        part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        diffusers[f"{comp}.{path}.{part}"] = v
    cfg = {"unet.r": 6, "unet.lora_alpha": 3, "text_encoder.r": 6, "text_encoder.lora_alpha": 6}
    src = write_lora(tmp_path / "sd15_diffusers.safetensors", {k: v for k, v in diffusers.items()
                                                              if not k.endswith(".alpha")},
                     {"lora_adapter_metadata": json.dumps(cfg)})
    a = analyze(src, sweep={"fixed": (2, 4), "sv_fro": (0.8,)}, output_format="kohya")
    assert a.format == "kohya"
    for i, row in enumerate(a.rows):
        dst = tmp_path / f"{i}.safetensors"
        lora_resize.resize(src, dst, row.options)
        assert row.options.output_format == "kohya" and "--output-format kohya" in row.args
        assert dst.stat().st_size == row.output_bytes
        sd, meta = load_st(dst)
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd) and "lora_adapter_metadata" not in meta
    # a conversion that is not defined (tensors with no name in the target layout) is refused by analyze as by
    # resize, with the reason
    for cmd in (["analyze", str(files["kohya"])], ["resize", str(files["kohya"]), "-o", str(tmp_path / "x.safetensors")]):
        capsys.readouterr()
        assert main([*cmd, "--output-format", "diffusers", "--rank", "2", "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lora-resize: error: ") and "no equivalent in the diffusers layout" in err


@pytest.mark.parametrize("argv, why", [
    (["analyze", "{src}", "-o", "x.safetensors"], "analyze writes no LoRA"),
    (["batch", "{dir}", "{out}", "--rank", "2", "-v"], "batch prints one line per file"),
    (["batch", "{dir}", "{out}", "--rank", "2", "-o", "x"], "batch writes into OUT_DIR"),
    (["merge", "{src}", "-o", "{out}/m.safetensors", "--rank", "2", "--report", "r.html"], "unknown option --report"),
    (["batch", "{dir}", "{out}", "--rank", "2", "--plot", "p.png"], "unknown option --plot"),
    (["demo", "--rank", "2"], "unknown option --rank"),
])
def test_flags_a_subcommand_cannot_honour_are_refused(tmp_path, blocky_lora, capsys, argv, why):
    argv = [a.format(src=blocky_lora, dir=blocky_lora.parent, out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-resize: error:") and why in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_one_megabyte_for_every_size_flag(tmp_path, blocky_lora, monkeypatch, capsys):
    seen = {}

    def fake_batch(in_dir, out_dir, opts, **kw):
        seen["max_memory"], seen["target_size"] = kw["max_memory"], opts.target_size
        raise lora_resize.OptionsError("stop here")
    monkeypatch.setattr("lora_resize.ops.batch.run_batch", fake_batch)
    assert main(["batch", str(blocky_lora.parent), str(tmp_path / "o"), "--target-size", "8MB",
                 "--max-memory", "8GB"]) == 2
    assert seen == {"max_memory": 8 * 10**9, "target_size": 8_000_000}
    assert main(["batch", str(blocky_lora.parent), str(tmp_path / "o"), "--target-size", "8MiB",
                 "--max-memory", "8GiB"]) == 2
    assert seen == {"max_memory": 8 * 2**30, "target_size": 8 * 2**20}
    assert len(BLOCKY) > 3
