"""The command line's surface: every subcommand describes itself; an unknown option says which subcommand's help to
read and the closest known option; sd-scripts' spellings work wherever they mean the same; and a missing optional
dependency is refused before any work, with the extra to install, leaving nothing written."""
from __future__ import annotations

import importlib
import json
import re
import sys

import pytest

from lora_resize import cli
from lora_resize.cli import COMMANDS, build_parser, main
from lora_resize.options import option_fields
from lora_resize.testing.loras import write_sd15_locon
from lora_resize.units import GB, KB, MB, MiB, format_size, parse_size

from helpers import sizes_disagreeing


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------
# Descriptions


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_its_description_line_in_both_helps(name, capsys):
    line = importlib.import_module(cli.MODULES[name]).HELP
    assert line and "\n" not in line
    with pytest.raises(SystemExit):
        main(["-h"])
    top = " ".join(capsys.readouterr().out.split())  # argparse wraps the listing
    assert f"{name} {line}" in top
    with pytest.raises(SystemExit):
        main([name, "-h"])
    own = capsys.readouterr().out
    after_usage = own.split("\n\n", 1)[1]
    first_paragraph = " ".join(after_usage.split("\n\n", 1)[0].split())
    assert first_paragraph.lower() == f"{line}.".lower(), own


# ----------------------------------------------------------------------------------------------------------------
# Unknown options


@pytest.mark.parametrize("argv, want", [
    (["analyze", "{src}", "--rnak", "8"], "analyze: unknown option --rnak (did you mean --rank?); "
                                          "see lora-resize analyze -h"),
    (["resize", "{src}", "-o", "{out}", "--mehtod=sv_fro"], "resize: unknown option --mehtod (did you mean "
                                                            "--method?); see lora-resize resize -h"),
    (["merge", "{src}", "-o", "{out}", "--rank", "2", "--dynamic_parm", "0.5"],
     "merge: unknown option --dynamic_parm (did you mean --dynamic_param?); see lora-resize merge -h"),
    (["batch", "{dir}", "{out}", "--wrokers", "2"], "batch: unknown option --wrokers (did you mean --workers?); "
                                                    "see lora-resize batch -h"),
    (["convert", "{src}", "-o", "{out}", "--to", "comfy", "--xyzzy"], "convert: unknown option --xyzzy; "
                                                                      "see lora-resize convert -h"),
    (["--model", "{src}", "--save_to", "{out}", "--new_rnak", "4"],  # the sd-scripts form
     "unknown option --new_rnak (did you mean --new_rank?); see lora-resize -h"),
    (["resize", "{src}", "{src}", "-o", "{out}"], "resize: unrecognized argument {src}; see lora-resize resize -h"),
])
def test_an_unknown_option_points_to_its_subcommands_help(tmp_path, blocky_lora, capsys, argv, want):
    fill = dict(src=blocky_lora, dir=blocky_lora.parent, out=tmp_path / "out.safetensors")
    code, out, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and err == f"lora-resize: error: {want.format(**fill)}\n", err
    assert "Traceback" not in err and not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# sd-scripts spellings


def sd_scripts_spellings() -> dict[str, str]:
    """Each option's sd-scripts spelling -> its modern one, from the options' own flags (options.py)."""
    out = {}
    for f in option_fields():
        flags = f.metadata["flags"]
        out.update({s: flags[0] for s in flags[1:] if "_" in s})
    return out


VALUES = {"--rank": "8", "--conv-rank": "4", "--method": "sv_fro", "--param": "0.9", "--precision": "fp16",
          "--device": "cpu"}


@pytest.mark.parametrize("command, own", [("resize", ["IN"]), ("analyze", ["IN"]), ("merge", ["IN:1", "-o", "O"]),
                                          ("batch", ["DIR", "OUT"]), ("convert", ["IN", "-o", "O", "--to", "comfy"])])
def test_sd_scripts_spellings_parse_as_the_modern_ones(command, own):
    spellings = sd_scripts_spellings()
    assert set(spellings) >= {"--new_rank", "--new_conv_rank", "--dynamic_method", "--dynamic_param",
                              "--save_precision"}
    p = build_parser()
    for old, new in spellings.items():
        assert p.parse_args([command, *own, old, VALUES[new]]) == p.parse_args([command, *own, new, VALUES[new]])
    # input, output and -v where the subcommand has them (batch: folders, one line per file)
    if command in ("resize", "analyze", "convert"):
        rest = own[1:]
        assert p.parse_args([command, "--model", "IN", *rest]).model == "IN"
    if command in ("resize", "merge", "convert"):
        swapped = [("--save_to" if a == "-o" else a) for a in (own if "-o" in own else [*own, "-o", "O"])]
        assert p.parse_args([command, *swapped]).output == "O"
    if command != "batch":
        assert p.parse_args([command, *own, "--verbose"]).verbose


def test_analyze_takes_its_input_with_model_and_sd_scripts_flags(blocky_lora, capsys):
    code, out, err = run(["analyze", "--model", str(blocky_lora), "--new_rank", "8", "--dynamic_method", "sv_fro",
                          "--dynamic_param", "0.9", "--save_precision", "fp16", "--device", "cpu", "--verbose", "-q"],
                         capsys)
    assert code == 0, err
    want = run(["analyze", str(blocky_lora), "--rank", "8", "--method", "sv_fro", "--param", "0.9", "--precision",
                "fp16", "--device", "cpu", "-v", "-q"], capsys)[1]
    strip = lambda text: [ln for ln in text.splitlines() if "decomposed in" not in ln]  # noqa: E731 - timings
    assert strip(out) == strip(want)
    code, _, err = run(["analyze", str(blocky_lora), "--model", str(blocky_lora.with_name("other.safetensors"))],
                       capsys)
    assert code == 2 and "give the input once" in err


# ----------------------------------------------------------------------------------------------------------------
# Optional dependencies


@pytest.mark.parametrize("argv, module, extra", [
    (["resize", "{src}", "-o", "{out}/new.safetensors", "--rank", "2", "--plot", "{out}/p.png"], "matplotlib", "plot"),
    (["resize", "{src}", "-o", "{out}/new.safetensors", "--rank", "2", "--report", "{out}/r.html", "--plot",
      "{out}/p.png"], "matplotlib", "plot"),
    (["--model", "{src}", "--save_to", "{out}/new.safetensors", "--plot", "{out}/p.png"], "matplotlib", "plot"),
    (["analyze", "{src}", "--report", "{out}/r.html", "--plot", "{out}/p.png"], "matplotlib", "plot"),
    (["ui", "--port", "1"], "gradio", "ui"),
    (["batch", "{dir}", "{out}/b", "--rank", "2", "--dask", "tcp://127.0.0.1:1"], "distributed", "dask"),
    (["batch", "{dir}", "memory://lora-resize-test/out", "--rank", "2"], "fsspec", "dask"),
    (["batch", "file://{dir}", "{out}/b", "--rank", "2"], "fsspec", "dask"),
])
def test_a_missing_optional_dependency_is_refused_before_any_work(tmp_path, blocky_lora, capsys, monkeypatch, argv,
                                                                  module, extra):
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in blocky_lora.parent.iterdir())
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code, stdout, err = run([a.format(src=blocky_lora, dir=blocky_lora.parent, out=out) for a in argv], capsys)
    assert code == 2
    assert err.startswith("lora-resize: error:") and err.count("\n") == 1, err
    assert f"pip install 'lora-resize[{extra}]'" in err and module in err
    assert list(out.iterdir()) == [] and sorted(p.name for p in blocky_lora.parent.iterdir()) == before
    assert stdout == ""


def test_what_needs_no_optional_dependency_runs_without_them(tmp_path_factory, blocky_lora, capsys, monkeypatch):
    for module in ("matplotlib", "gradio", "distributed", "fsspec"):
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path_factory.mktemp("out")
    code, _, err = run(["resize", str(blocky_lora), "-o", str(out / "r.safetensors"), "--rank", "2", "--report",
                        str(out / "r.html"), "-q"], capsys)
    assert code == 0 and (out / "r.html").exists(), err  # the HTML report is inline SVG: no extra
    code, _, err = run(["batch", str(blocky_lora.parent), str(out / "b"), "--rank", "2", "-q"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------------------
# One fidelity vocabulary


FIGURE = r"(\d+\.\d+%|n/a)"


def table_figures(table: str) -> tuple[dict[str, str], str]:
    """The chosen row's fidelity figures by column name, and its worst layer, from `lora-resize analyze`."""
    head = next(line for line in table.splitlines() if line.lstrip().startswith("setting"))
    names = head.split("params", 1)[1].split("worst layer")[0].split()
    row = next(line for line in table.splitlines() if line.startswith("* ") and "%" in line)
    figures = re.findall(rf"\s{FIGURE}(?=\s)", row)
    return dict(zip(names, figures, strict=True)), row.split()[-1]


def summary_figures(summary: str) -> tuple[dict[str, str], str]:
    line = next(line for line in summary.splitlines() if "Frobenius retained:" in line)
    return dict(re.findall(rf"([\w-]+) {FIGURE}", line)), line.rsplit("(", 1)[1].rstrip(")")


@pytest.mark.parametrize("setting", [["--method", "sv_fro", "--param", "0.9"], ["--method", "fixed", "--rank", "4"], ["--target-size", "30KB"],
                                     ["--method", "sv_ratio", "--param", "3", "--rank", "8"]])
def test_analyze_and_resize_show_the_same_fidelity_for_one_setting(tmp_path, blocky_lora, capsys, setting):
    code, table, err = run(["analyze", str(blocky_lora), *setting, "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "out.safetensors"
    code, summary, err = run(["resize", str(blocky_lora), "-o", str(out), *setting, "-q", "--report",
                              str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    figures, worst = table_figures(table)
    assert set(figures) == {"w-mean", "mean", "global", "min"}
    assert summary_figures(summary) == (figures, worst)
    # the same names and figures in the HTML report's chosen line, and the same numbers in both JSONs
    assert ", ".join(f"{k} {v}" for k, v in figures.items()) in (tmp_path / "r.html").read_text()
    a = json.loads(run(["analyze", str(blocky_lora), *setting, "-q", "--json"], capsys)[1])["chosen"]
    r = json.loads(run(["resize", str(blocky_lora), "-o", str(out), *setting, "-q", "--json"], capsys)[1])
    for key in ("fro_weighted", "fro_mean", "fro_global", "fro_min"):
        assert r[key] == pytest.approx(a[key], rel=1e-9), key
    assert r["worst_layer"] == a["worst_layer"] == worst
    assert r["mean_fro_retained"] == r["fro_mean"]  # sd-scripts' average, as before


# ----------------------------------------------------------------------------------------------------------------
# One size convention

def test_format_size_is_si_and_rounds_into_the_next_unit():
    assert (KB, MB, GB, MiB) == (10 ** 3, 10 ** 6, 10 ** 9, 2 ** 20)
    assert [format_size(n) for n in (0, 999, 1000, 32_500_000, 999_949, 999_950, 999_950_000, 2 * 10 ** 12)] == \
        ["0 B", "999 B", "1.0 KB", "32.5 MB", "999.9 KB", "1.0 MB", "1.0 GB", "2.0 TB"]
    for n in (1, 999, 1000, 5 * 10 ** 5, 999_950, 31 * MiB, 10 ** 9 - 1):  # what it prints reads back as about n
        assert parse_size(format_size(n)) == pytest.approx(n, rel=0.06, abs=1)


def test_every_printout_of_one_file_shows_its_size_one_way(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    src = write_sd15_locon(tmp_path / "in" / "a.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4, seed=3)
    out = tmp_path / "out.safetensors"
    texts = {}
    texts["resize"] = run(["resize", str(src), "-o", str(out), "--rank", "4", "-q", "--report",
                           str(tmp_path / "r.html")], capsys)[1]
    files = {"input": src.stat().st_size, "output": out.stat().st_size}
    texts["html"] = (tmp_path / "r.html").read_text()
    texts["analyze"] = run(["analyze", str(src), "--rank", "4", "-q"], capsys)[1]
    texts["batch"] = run(["batch", str(src.parent), str(tmp_path / "b"), "--rank", "4", "-q"], capsys)[1]
    assert all(format_size(files["input"]) in t for t in texts.values()), texts
    assert all(format_size(files["output"]) in texts[k] for k in ("resize", "html", "analyze", "batch"))
    try:
        from lora_resize.ui.app import App
    except ImportError:  # the page's part needs the [ui] extra
        App = None
    if App is not None:
        app = App(tmp_path / "work")
        _, rows, _, _, status, report = app.analyze(str(src), None, 4)
        texts["page analyze"] = status + "\n" + "\n".join(" ".join(map(str, r)) for r in rows) + report
        texts["page resize"] = app.resize(str(src), None, "--rank 4")[0]
    for name, text in texts.items():
        assert not sizes_disagreeing(text, files), (name, sizes_disagreeing(text, files))


# ----------------------------------------------------------------------------------------------------------------
# --json: stdout holds the JSON alone


@pytest.mark.parametrize("argv", [
    ["resize", "{src}", "-o", "{out}", "--rank", "4"],
    ["resize", "{src}", "-o", "{out}", "--method", "sv_fro", "--param", "0.9"],
    ["merge", "{src}:0.5", "{src}:0.25", "-o", "{out}", "--rank", "4"],
    ["convert", "{src}", "-o", "{out}", "--to", "comfy", "--rank", "4"],
    ["analyze", "{src}", "--rank", "4"],
    ["--model", "{src}", "--save_to", "{out}", "--new_rank", "4"],  # the sd-scripts form
])
def test_json_with_verbose_prints_only_the_json_on_stdout(tmp_path, blocky_lora, capsys, argv):
    fill = dict(src=blocky_lora, out=tmp_path / "out.safetensors")
    code, out, err = run([a.format(**fill) for a in argv] + ["--json", "-v", "-q"], capsys)
    assert code == 0, err
    json.loads(out)  # the whole of stdout is one JSON document
    assert ("per layer" if argv[0] == "analyze" else "fro retained:") in err  # the -v lines still come, on stderr


# ----------------------------------------------------------------------------------------------------------------
# A mistyped subcommand


@pytest.mark.parametrize("argv, guess", [
    (["resiz", "{src}", "-o", "{out}", "--rank", "4"], "resize"),
    (["resiz"], "resize"),
    (["rezise", "-h"], "resize"),
    (["mrege", "{src}:1", "-o", "{out}"], "merge"),
    (["analyse", "{src}"], "analyze"),
    (["conver", "{src}", "-o", "{out}", "--to", "comfy"], "convert"),
    (["Batch", "{dir}", "{out}"], "batch"),
])
def test_a_mistyped_subcommand_names_the_closest_one(tmp_path, blocky_lora, capsys, argv, guess):
    fill = dict(src=blocky_lora, dir=blocky_lora.parent, out=tmp_path / "out.safetensors")
    code, out, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and out == ""
    assert err == (f"lora-resize: error: unknown command {argv[0]} (did you mean {guess}?); "
                   "see lora-resize -h\n"), err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["resiz", "merg"])
def test_an_input_named_like_a_mistyped_subcommand_is_still_an_input(tmp_path, blocky_lora, capsys, monkeypatch,
                                                                      name):
    """Without a subcommand the first word is the sd-scripts form's input: an existing file is never a typo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(blocky_lora.read_bytes())
    code, out, err = run([name, "-o", "out.safetensors", "--rank", "4", "-q"], capsys)
    assert "unknown command" not in err
    assert code == 0, err
    assert (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("word", ["missing.safetensors", "resize.safetensors", "dir/resiz", "s3://bucket/resiz"])
def test_a_missing_input_is_not_taken_for_a_command(tmp_path, capsys, monkeypatch, word):
    monkeypatch.chdir(tmp_path)
    code, out, err = run([word, "-o", "out.safetensors", "--rank", "4"], capsys)
    assert code == 2 and "unknown command" not in err, err


# ----------------------------------------------------------------------------------------------------------------
# An option given twice


@pytest.mark.parametrize("argv, first, second", [
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--rank", "8"], "--rank 4", "--rank 8"),
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--new_rank", "8"], "--rank 4", "--new_rank 8"),
    (["resize", "{src}", "-o", "{out}", "-o", "{out}2", "--rank", "4"], "-o {out}", "-o {out}2"),
    (["merge", "{src}:1", "-o", "{out}", "--method", "sv_fro", "--param", "0.9", "--param", "0.5"],
     "--param 0.9", "--param 0.5"),
    (["analyze", "{src}", "--precision", "fp16", "--save_precision", "bf16"], "--precision fp16",
     "--save_precision bf16"),
    (["batch", "{dir}", "{out}", "--rank", "4", "--workers", "2", "--workers", "3"], "--workers 2", "--workers 3"),
    (["convert", "{src}", "-o", "{out}", "--to", "comfy", "--to", "diffusers"], "--to comfy", "--to diffusers"),
    (["--model", "{src}", "--save_to", "{out}", "--new_rank", "4", "--new_rank", "8"], "--new_rank 4",
     "--new_rank 8"),
])
def test_an_option_given_twice_with_different_values_is_refused(tmp_path, blocky_lora, capsys, argv, first, second):
    fill = dict(src=blocky_lora, dir=blocky_lora.parent, out=tmp_path / "out.safetensors")
    code, out, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    flag = first.split()[0]
    assert f"{flag} given twice with different values ({first}, {second}); give it once".format(**fill) in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_an_option_given_twice_with_the_same_value_is_harmless(tmp_path, blocky_lora, capsys):
    out = tmp_path / "out.safetensors"
    code, _, err = run(["resize", str(blocky_lora), "-o", str(out), "--rank", "4", "--new_rank", "4", "-q"], capsys)
    assert code == 0 and out.exists(), err
    rules = build_parser().parse_args(["resize", "IN", "--rule", "unet=4", "--rule", "te=2"]).block_rules
    assert len(rules) == 2  # options meant to repeat still repeat


@pytest.mark.parametrize("size", ["1KB", "1", "100MB", "399MiB"])
def test_a_memory_budget_too_small_for_one_worker_is_refused(tmp_path, blocky_lora, capsys, size):
    code, out, err = run(["batch", str(blocky_lora.parent), str(tmp_path / "b"), "--rank", "4", "--max-memory", size],
                         capsys)
    assert code == 2 and out == "", err
    assert f"--max-memory {size} is too small" in err and "at least 419.4 MB" in err, err
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------------------
# Hints for a bad option: the setting meant, never a look-alike


@pytest.mark.parametrize("argv, want", [
    # another subcommand's flag for a setting this one has under another name (convert's --to: --output-format)
    (["batch", "{dir}", "{out}", "--rank", "4", "--to", "kohya"],
     "batch: unknown option --to (did you mean --output-format? --to means --output-format on convert)"),
    (["analyze", "{src}", "--to", "comfy"],
     "analyze: unknown option --to (did you mean --output-format? --to means --output-format on convert)"),
    # another subcommand's flag with no counterpart here: say whose it is, no look-alike (--force is not --rule)
    (["convert", "{src}", "-o", "{out}", "--to", "comfy", "--force"],
     "convert: unknown option --force (an option of lora-resize batch)"),
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--workers", "2"],
     "resize: unknown option --workers (an option of lora-resize batch)"),
    # the unknown option first, even where it stands for a missing required one
    (["convert", "{src}", "-o", "{out}", "--too", "kohya"], "convert: unknown option --too (did you mean --to?)"),
    (["convert", "{src}", "--to", "kohya", "--outptu", "{out}"],
     "convert: unknown option --outptu (did you mean --output?)"),
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--xyzzy", "--frce"], "resize: unknown option --xyzzy;"),
])
def test_a_bad_option_gets_the_hint_that_fits(tmp_path, blocky_lora, capsys, argv, want):
    err, _ = refused(argv, tmp_path, blocky_lora, capsys)
    assert err.startswith(f"lora-resize: error: {want}"), err
    assert "did you mean --method" not in err and "did you mean --rule" not in err


def refused(argv: list[str], tmp_path, lora, capsys) -> tuple[str, dict]:
    """Run `argv` (its {src}, {dir}, {out} filled in): exit 2, one line on stderr, nothing on stdout, no output
    file. Returns (stderr, the fill)."""
    fill = dict(src=lora, dir=lora.parent, out=tmp_path / "out.safetensors")
    code, out, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert not (tmp_path / "out.safetensors").exists()
    return err, fill


@pytest.mark.parametrize("argv, want", [
    (["merge", "--model", "{src}", "-o", "{out}", "--rank", "2"], "--model: merge takes its inputs as FILE[:WEIGHT]"),
    (["batch", "{dir}", "{out}", "--model", "{src}", "--rank", "2"], "--model: batch reads every LoRA under IN_DIR"),
    (["merge", "{src}:abc", "-o", "{out}", "--rank", "2"], "bad weight abc in {src}:abc: write FILE:WEIGHT with a "
                                                           "number"),
    (["merge", "{src}:1", "{src}:", "-o", "{out}", "--rank", "2"], "bad weight  in {src}:"),
    (["resize", "{src}", "-o", "{out}", "--param", "0.9"], "--param needs a dynamic method: add --method"),
    (["--model", "{src}", "--save_to", "{out}", "--dynamic_param", "0.9", "--new_rank", "4", "--rank", "4",
      "--param", "0.8"], "given twice"),
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--device", "cuda:x"],
     "device must be auto, cpu, cuda or cuda:N (a GPU's index), got 'cuda:x'"),
    (["resize", "{src}", "-o", "{out}", "--rank", "4", "--device", "cuda:"], "got 'cuda:'"),
])
def test_a_bad_value_is_named_as_given(tmp_path, blocky_lora, capsys, argv, want):
    err, fill = refused(argv, tmp_path, blocky_lora, capsys)
    assert want.format(**fill) in err, err


def test_a_gpu_index_is_named_when_cuda_is_absent(tmp_path, blocky_lora, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["resize", str(blocky_lora), "-o", str(tmp_path / "o.safetensors"), "--rank", "4",
                        "--device", "cuda:1"], capsys)
    assert code == 2 and "--device cuda:1 was asked for but CUDA is not available" in err, err


def test_a_merge_input_whose_name_has_a_colon_is_still_an_input(tmp_path, blocky_lora, capsys):
    named = tmp_path / "a:b.safetensors"
    named.write_bytes(blocky_lora.read_bytes())
    out = tmp_path / "out.safetensors"
    code, _, err = run(["merge", str(named), f"{named}:0.5", "-o", str(out), "--rank", "2", "-q"], capsys)
    assert code == 0 and out.exists(), err


# ----------------------------------------------------------------------------------------------------------------
# File names never drive the terminal


def test_batch_escapes_control_characters_in_file_names(tmp_path, blocky_lora, capsys):
    src = tmp_path / "in"
    src.mkdir()
    names = ["new\nline.safetensors", "red\x1b[31m.safetensors", "tab\there.safetensors"]
    for name in names:
        (src / name).write_bytes(blocky_lora.read_bytes())
    (src / "bad\rname.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a broken file: an error row
    code, out, err = run(["batch", str(src), str(tmp_path / "out"), "--rank", "2", "-q"], capsys)
    assert code == 2, err  # the broken file failed
    lines = out.splitlines()
    assert len(lines) == len(names) + 2, out  # one line per file and the total: no name split a line
    assert all(c.isprintable() for line in lines for c in line), out
    for shown in ("new\\nline", "red\\x1b[31m", "tab\\there", "bad\\rname"):
        assert sum(shown in line for line in lines) == 1, (shown, out)


@pytest.mark.parametrize("line", ["--method sv_ratio --param 32", "--new_rank 8 --dynamic_method sv_fro "
                                  "--dynamic_param 0.9 --save_precision bf16", "--target-size 50MB --rank 64",
                                  "--rank 16 --conv-rank 4 --rule 'lora_te_*=drop' --output-format comfy",
                                  "--rank 4 --device cpu --threads 2"])
def test_options_from_flags_reads_a_setting_as_resize_does(line):
    """lora_resize.options_from_flags (the ComfyUI sweep's setting lines): the options `lora-resize resize IN -o OUT
    LINE` runs with, and a line the CLI refuses is refused with its one-line error."""
    import shlex

    import lora_resize
    from lora_resize.cli.flags import options_from
    want = options_from(build_parser().parse_args(["resize", "IN", "-o", "OUT", *shlex.split(line)]))
    assert lora_resize.options_from_flags(line) == want


@pytest.mark.parametrize("line, why", [("--method sv_ratio", "needs a parameter"), ("--rnak 4", "did you mean --rank"),
                                       ("IN --rank 4", "unrecognized argument IN"), ("-o x --rank 4", "unknown option -o"),
                                       ("-h", "unknown option -h"), ("--rank 'x", "cannot read the flags"),
                                       ("--rank 4 --rank 8", "given twice"), ("", "give a rank")])
def test_options_from_flags_refuses_what_is_not_one_setting(line, why):
    import lora_resize
    with pytest.raises(lora_resize.OptionsError, match=why) as e:
        lora_resize.options_from_flags(line)
    assert "\n" not in str(e.value)
