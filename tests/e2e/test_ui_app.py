"""The web page's jobs (ui/app.py's App) without a browser: LoRAs picked from a folder (`lora-resize ui --loras DIR`)
are listed recursively, their results are saved beside them under a free name - the CLI's file byte for byte, no
file written over, the input unchanged - and a name outside the folder, or no input at all, is a one-line error
that writes nothing. (The browser test drives the same jobs through the page.)"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import load_st, scaled_sum
from lora_resize.cli import main
from lora_resize.testing.loras import write_sd15_locon

pytest.importorskip("gradio", reason="the [ui] extra")  # a test dependency: make test installs it
from lora_resize.ui.app import App  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    write_sd15_locon(loras / "sub" / "a.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=1)
    write_sd15_locon(loras / "b.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=2)
    (loras / ".trash").mkdir()
    (loras / ".trash" / "old.safetensors").write_bytes(b"x")
    (loras / "readme.txt").write_text("not a LoRA")
    return loras


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def saved(status: str, offered: str, work: Path) -> Path:
    """The file a job saved (its status' last line), checked against the one offered for download: a copy in the
    work folder (the page never serves the LoRA folder)."""
    path = Path(status.rsplit("saved as ", 1)[1])
    assert work.resolve() in Path(offered).resolve().parents and Path(offered).read_bytes() == path.read_bytes()
    return path


def test_the_folder_is_listed_and_results_are_saved_beside_the_picked_file(folder, tmp_path):
    work = tmp_path / "work"
    app = App(work, folder)
    assert app.choices() == ["b.safetensors", "sub/a.safetensors"]
    before = files(folder)
    path = saved(*app.resize(None, "sub/a.safetensors", "--method sv_fro --param 0.9 --rank 6"), work)
    assert path == folder / "sub" / "a_resized.safetensors"
    want = tmp_path / "cli.safetensors"
    assert main(["resize", str(folder / "sub" / "a.safetensors"), "-o", str(want), "--method", "sv_fro", "--param",
                 "0.9", "--rank", "6", "-q"]) == 0
    assert path.read_bytes() == want.read_bytes()
    # again: a new name, the first result kept
    again = saved(*app.resize(None, "sub/a.safetensors", "--rank 4"), work)
    assert again == folder / "sub" / "a_resized_2.safetensors"
    assert path.read_bytes() == want.read_bytes()
    converted = saved(*app.convert(None, "b.safetensors", "diffusers"), work)
    assert main(["convert", str(folder / "b.safetensors"), "-o", str(want), "--to", "diffusers", "-q"]) == 0
    assert converted == folder / "b_diffusers.safetensors" and converted.read_bytes() == want.read_bytes()
    merged = saved(*app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 -0.5", "--rank 8"), work)
    assert main(["merge", f"{folder / 'b.safetensors'}:1", f"{folder / 'sub' / 'a.safetensors'}:-0.5", "-o",
                 str(want), "--rank", "8", "-q"]) == 0
    assert merged == folder / "merged.safetensors" and merged.read_bytes() == want.read_bytes()
    after = files(folder)
    assert {k: after[k] for k in before} == before  # inputs untouched
    assert app.analyze(None, "b.safetensors", 0)[4].startswith("b.safetensors: 350 layers")


def test_an_upload_goes_to_the_work_folder_and_bad_picks_are_one_line_errors(folder, tmp_path):
    app = App(tmp_path / "work", folder)
    before = files(folder)
    _, path = app.convert(str(folder / "b.safetensors"), None, "comfy")  # an upload (Gradio hands a path)
    assert Path(path).parent.parent == tmp_path / "work"
    for picked in ("../loras/b.safetensors/..", "../../etc/passwd", ".trash/../../x.safetensors", "readme.txt",
                   ".trash/old.safetensors", "missing.safetensors"):
        status, out = app.resize(None, picked, "--rank 4")
        assert status.startswith("error: ") and "not a LoRA file in the folder" in status and out is None, picked
    assert app.resize(None, None, "--rank 4") == ("error: upload a LoRA file or pick one from the folder first",
                                                  None)
    status, _ = app.merge(None, ["b.safetensors"], "", "")
    assert status.startswith("error: pick or upload two or more")
    status, _ = app.resize(None, "b.safetensors", "--method nope")
    assert status.startswith("error: ") and "\n" not in status
    assert files(folder) == before
    assert App(tmp_path / "work2").resize(None, None, "")[0] == "error: upload a LoRA file first"


def test_flags_the_page_sets_itself_help_and_peft_are_refused_in_one_line(folder, tmp_path):
    """-h would make argparse exit inside the web server; -o, --model, --report, --plot or another input would be
    dropped without a word; a PEFT folder cannot be downloaded. Each is one line, and nothing is written."""
    app = App(tmp_path / "work", folder)
    before = files(folder)
    for flags, why in (("--rank 4 -h", "the page shows no help"), ("--help", "the page shows no help"),
                       ("--rank 4 -o x.safetensors", "-o/--output/--save_to"), ("--rank 4 --save_to x", "-o/--output"),
                       ("--rank 4 --model b.safetensors", "--model"), ("--rank 4 --rep r.html", "--report"),
                       ("--rank 4 --plot p.png", "--plot"), ("--rank 4 other.safetensors", "unrecognized"),
                       ("--rank 4 --output-format peft", "--output-format peft writes a folder")):
        status, out = app.resize(None, "b.safetensors", flags)
        assert status.startswith("error: ") and why in status and "\n" not in status and out is None, (flags, status)
    for flags, why in (("--rank 4 -h", "the page shows no help"), ("--rank 4 --report r.html", "--report"),
                       ("--rank 4 -o m.safetensors", "-o/--output")):
        status, out = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 1", flags)
        assert status.startswith("error: ") and why in status and out is None, (flags, status)
    status, _ = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 nan", "--rank 4")
    assert status == "error: a.safetensors: weight nan is not a finite number"
    assert files(folder) == before and not list((tmp_path / "work").rglob("*.safetensors"))


def test_a_dangling_link_is_skipped_and_a_read_only_folder_falls_back_to_the_work_folder(folder, tmp_path,
                                                                                          monkeypatch):
    app = App(tmp_path / "work", folder)
    (folder / "b_resized.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    path = saved(*app.resize(None, "b.safetensors", "--rank 4"), tmp_path / "work")
    assert path == folder / "b_resized_2.safetensors" and not (tmp_path / "nowhere.safetensors").exists()
    import lora_resize.ui.app as ui_app
    monkeypatch.setattr(ui_app.os, "access", lambda p, mode: Path(p) != folder / "sub")  # sub/ is read-only
    status, path = app.resize(None, "sub/a.safetensors", "--rank 4")
    assert Path(path).parent.parent == tmp_path / "work" and status.endswith(f"saved as {path}")
    assert sorted(p.name for p in (folder / "sub").iterdir()) == ["a.safetensors"]


def test_overlapping_jobs_never_share_a_name_or_a_folder(folder, tmp_path):
    # two jobs at once on one picked file (two browser tabs): two results beside it, each the CLI's file; two
    # uploads at once: two job folders
    work = tmp_path / "work"
    app = App(work, folder)
    results: list[tuple[str, str | None]] = []
    start = threading.Barrier(4)

    def job(kind):
        start.wait()
        if kind == "picked":
            results.append(app.resize(None, "b.safetensors", "--rank 4"))
        else:
            results.append(app.convert(str(folder / "b.safetensors"), None, "comfy"))
    threads = [threading.Thread(target=job, args=(k,)) for k in ("picked", "picked", "upload", "upload")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out is not None for _, out in results), results
    beside = sorted(saved(st, out, work) for st, out in results if "b_resized" in st)
    assert beside == [folder / "b_resized.safetensors", folder / "b_resized_2.safetensors"]
    want = tmp_path / "cli.safetensors"
    assert main(["resize", str(folder / "b.safetensors"), "-o", str(want), "--rank", "4", "-q"]) == 0
    assert all(p.read_bytes() == want.read_bytes() for p in beside)
    uploads = [Path(out) for st, out in results if "b_comfy" in out]
    assert len(uploads) == 2 and uploads[0].parent != uploads[1].parent


def test_torch_threads_of_overlapping_jobs_come_back(folder, tmp_path):
    # each job sets torch's (process-wide) thread count while it runs; overlapping jobs must leave it as it was
    import torch
    app = App(tmp_path / "work", folder)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = [threading.Thread(target=app.resize, args=(None, "b.safetensors", "--rank 4")) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_work_folder_the_page_made_is_removed_on_close(folder, tmp_path):
    app = App(None, folder)
    status, out = app.resize(None, "b.safetensors", "--rank 4")
    assert app.workdir.is_dir() and app.workdir in Path(out).parents
    app.close()
    assert not app.workdir.exists()
    given = tmp_path / "given"
    App(given, folder).close()  # a folder it was given is the caller's
    assert given.is_dir()


# The served page runs in a child process: a launched Gradio server leaves its event loop to the garbage collector,
# whose warning would land in other tests' warning checks. The child serves on 127.0.0.1 only and prints what it saw.
SERVED = r"""
import json, sys, tempfile, urllib.error, urllib.request
from pathlib import Path
from gradio.utils import get_upload_folder
from lora_resize.ui import app as ui_app

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

folder, case = Path(sys.argv[1]), sys.argv[2]
out = {}
if case == "files":
    url = ui_app.serve("127.0.0.1", None, block=False, loras=folder).local_url.rstrip("/")
    out["lora folder"] = {p.relative_to(folder).as_posix(): get(f"{url}/gradio_api/file={p}")
                          for p in sorted(folder.rglob("*")) if p.is_file()}
    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=get_upload_folder()) as up:  # where Gradio keeps what is uploaded
        (Path(up) / "x.txt").write_text("uploaded")
        out["upload"] = get(f"{url}/gradio_api/file={Path(up) / 'x.txt'}")
elif case == "auth":
    url = ui_app.serve("127.0.0.1", None, block=False, loras=folder, auth=("me", "a-long-passphrase")
                       ).local_url.rstrip("/")
    out["config"] = get(f"{url}/config")
    out["file"] = get(f"{url}/gradio_api/file={folder / 'readme.txt'}")
else:  # an address other machines reach (only loopback may be bound in tests: the check is made to say so)
    ui_app.is_loopback = lambda host: False
    ui_app.serve("127.0.0.1", None, block=False, loras=folder, auth=("me", "pw") if case == "reachable+auth" else None)
print(json.dumps(out))
"""


def served(folder: Path, case: str) -> tuple[dict, str]:
    """(what the child saw, its stderr)."""
    p = subprocess.run([sys.executable, "-c", SERVED, str(folder), case], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_the_page_serves_no_file_of_the_lora_folder(folder):
    (folder / ".env").write_text("SECRET=1")
    seen, _ = served(folder, "files")
    assert seen["lora folder"] and set(seen["lora folder"].values()) == {403}, seen
    assert seen["upload"] == 200  # the route itself works


def test_a_password_guards_the_page_and_serving_beyond_loopback_warns(folder):
    seen, err = served(folder, "auth")
    assert seen == {"config": 401, "file": 401} and "warning" not in err
    _, err = served(folder, "reachable")
    lines = [x for x in err.splitlines() if "warning" in x]
    assert len(lines) == 1 and "no password" in lines[0] and "--auth" in lines[0], err
    _, err = served(folder, "reachable+auth")
    assert "warning" not in err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("192.0.2.7", False), ("::", False)])
def test_loopback_is_told_from_reachable_addresses(host, loopback):
    from lora_resize.ui.app import is_loopback
    assert is_loopback(host) is loopback


def test_analyze_shows_the_recommendation_and_starts_the_flags_there(folder, tmp_path):
    """The page names the recommended setting above the table with its reason, marks its row, and its flags box
    starts at it (before: the cap made a 'chosen' row, the largest file, or an unexplained sv_fro 0.9)."""
    from lora_resize import analyze
    app = App(tmp_path / "work", folder)
    curve, rows, by_row, flags, status, _ = app.analyze(None, "b.safetensors", 8)
    a = analyze(folder / "b.safetensors", rank=8)
    assert a.chosen is None and flags == a.recommended.args == by_row["chosen"]
    assert 'id="ui-recommended"' in curve and curve.index("ui-recommended") < curve.index("ui-curve")
    assert f"recommended: {a.recommended.label}" in status and a.recommended_reason in status
    marked = [r for r in rows if r[0].endswith(" (recommended)")]
    assert len(marked) == 1 and marked[0][-1] == a.recommended.args


def test_block_strengths_box_carries_into_every_setting_and_the_file(folder, tmp_path):
    """The block strengths box (--block-weights and scale rules) reaches analyze: every row's flags carry them, and
    the file Resize writes from the flags box is the CLI's with them; anything else in the box is refused in one
    line."""
    app = App(tmp_path / "work", folder)
    box = "--block-weights SD15:OUTALL --rule '*attn1*=scale:-0.5'"
    _, rows, by_row, flags, status, _ = app.analyze(None, "b.safetensors", 8, box)
    assert rows and all("--rule '*attn1*=scale:-0.5'" in r[-1] and "--block-weights SD15:OUTALL" in r[-1]
                        for r in rows), status
    status, offered = app.resize(None, "b.safetensors", flags)
    cli = tmp_path / "cli.safetensors"
    assert main(["resize", str(folder / "b.safetensors"), "-o", str(cli), *shlex.split(flags), "-q"]) == 0
    assert Path(offered).read_bytes() == cli.read_bytes()
    for bad in ("--rank 4", "--rule '*=8'", "--block-weights"):
        assert app.analyze(None, "b.safetensors", 8, bad)[4].startswith("error: the block strengths box takes")
    assert app.analyze(None, "b.safetensors", 8, "--block-weights SDXL:ALL")[4].startswith(
        "error: --block-weights SDXL is for SDXL LoRAs")


def test_the_block_strengths_box_takes_the_bare_forms_users_paste():
    """'SDXL:OUTALL' (as LoRA Block Weight users write it, and as the ComfyUI input takes it) and a bare scale rule
    are read like their flag forms; anything else is still refused in one line."""
    from lora_resize.errors import LoraResizeError
    from lora_resize.ui.app import strength_fields
    assert strength_fields("SDXL:OUTALL '*attn2*=scale:0.5'") == strength_fields(
        "--block-weights SDXL:OUTALL --rule '*attn2*=scale:0.5'") == {
            "block_weights": "SDXL:OUTALL", "block_rules": ["*attn2*=scale:0.5"]}
    with pytest.raises(LoraResizeError):
        strength_fields("--rank 4")
    with pytest.raises(LoraResizeError):
        strength_fields("'*attn2*=cap:4'")


@pytest.fixture
def scaled_method():
    """A merge method registered for one test (the page must offer it with no change of its own), removed after."""
    from lora_resize.core.merging import MERGE_METHODS, MergeMethod, register
    register(MergeMethod("scaled_test", "the sum times density", scaled_sum, params=("density",),
                         defaults={"density": 0.5}))
    yield "scaled_test"
    del MERGE_METHODS["scaled_test"]


def component(page, elem_id: str):
    (found,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return found


def test_the_merge_tab_offers_every_registered_method_and_shows_the_parameters_it_reads(scaled_method, tmp_path):
    import inspect

    from lora_resize import MERGE_PARAMS, merge_methods
    from lora_resize.ui.app import App, build, method_params
    app = App(tmp_path / "work")
    page = build(app=app)
    choices = [c[1] if isinstance(c, tuple) else c for c in component(page, "merge-method").choices]
    assert choices == merge_methods() and "scaled_test" in choices
    assert [component(page, f"merge-{p}").visible for p in MERGE_PARAMS] == [False] * len(MERGE_PARAMS)  # sum
    assert [u["visible"] for u in method_params("scaled_test")] == [p == "density" for p in MERGE_PARAMS]
    assert [u["visible"] for u in method_params("sum")] == [False] * len(MERGE_PARAMS)
    # the job takes one box per parameter, in MERGE_PARAMS' order, after the method (the page wires them so)
    params = list(inspect.signature(App.merge).parameters)
    at = params.index("merge_method") + 1
    assert params[at:at + len(MERGE_PARAMS)] == list(MERGE_PARAMS)
    app.close()


def test_the_merge_tab_writes_the_method_s_file_and_shows_its_command(folder, tmp_path, scaled_method):
    """The method and its density reach the merge (the CLI's file for the command the status shows, judged by the
    plain sum at the scaled weights); an empty box is the method's default; a box the method does not read is
    ignored; a method or parameter in the flags box is refused in one line (before, the page dropped a
    --merge-method or --density there without a word and wrote the plain sum)."""
    app = App(tmp_path / "work", folder)
    a, b = folder / "sub" / "a.safetensors", folder / "b.safetensors"
    for density, want in ((0.25, 0.25), (None, 0.5)):
        status, offered = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 -0.5", "--rank 12",
                                    "scaled_test", density, 3)
        command = status.split("\ncommand: ", 1)[1].split("\n")[0]
        words = shlex.split(command)
        assert words[:2] == ["lora-resize", "merge"] and "--merge-method scaled_test" in command
        assert ("--density 0.25" in command) == (density is not None) and "--seed" not in command  # seed: unread
        cli = tmp_path / f"cli{want}.safetensors"
        words[words.index("-o") + 1] = str(cli)
        assert main([*words[1:], "-q"]) == 0
        assert Path(offered).read_bytes() == cli.read_bytes()
        judge = tmp_path / f"judge{want}.safetensors"
        assert main(["merge", f"{b}:{want}", f"{a}:{-0.5 * want}", "-o", str(judge), "--rank", "12", "-q"]) == 0
        assert load_st(Path(offered))[0].keys() == load_st(judge)[0].keys()
        assert all(torch.equal(t, load_st(judge)[0][k]) for k, t in load_st(Path(offered))[0].items())
    status, offered = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 -0.5", "--rank 12", "sum", 0.3, 5)
    plain = tmp_path / "plain.safetensors"
    assert main(["merge", f"{b}:1", f"{a}:-0.5", "-o", str(plain), "--rank", "12", "-q"]) == 0
    assert Path(offered).read_bytes() == plain.read_bytes() and "--merge-method" not in status
    before = files(folder)
    for method, flags, why in (("sum", "--rank 4 --merge-method scaled_test", "--merge-method (choose it in the"),
                               ("scaled_test", "--rank 4 --merge-method sum", "--merge-method (choose it in the"),
                               ("sum", "--rank 4 --density 0.5", "--density (the merge tab's density box"),
                               ("scaled_test", "--rank 4 --density 0.5", "--density (the merge tab's density box"),
                               ("nope", "--rank 4", "merge method must be one of"),
                               ("scaled_test", "--rank 4", "--density must be a number in (0, 1]")):
        status, out = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 1", flags, method,
                                1.5 if why.startswith("--density must") else None, None)
        assert status.startswith("error: ") and why in status and "\n" not in status and out is None, (flags, status)
    assert files(folder) == before


def test_the_merge_tab_merges_twelve_files_with_their_weights(folder, tmp_path):
    from helpers import make_state_dict, standard_specs, write_lora
    names = [f"many/t{i:02d}.safetensors" for i in range(12)]
    (folder / "many").mkdir()
    for i, n in enumerate(names):
        write_lora(folder / n, make_state_dict(standard_specs(), seed=200 + i))
    weights = [1, -0.5, 0.25, 2, 0.75, -1, 0.5, 1.5, -0.25, 0.125, 1, 0.3]
    app = App(tmp_path / "work", folder)
    status, offered = app.merge(None, names, ", ".join(map(str, weights)), "--method sv_fro --param 0.99")
    cli = tmp_path / "cli.safetensors"
    assert main(["merge", *(f"{folder / n}:{w}" for n, w in zip(names, weights)), "-o", str(cli), "--method",
                 "sv_fro", "--param", "0.99", "-q"]) == 0
    assert Path(offered).read_bytes() == cli.read_bytes(), status
    status, _ = app.merge(None, names, "1 2 3", "")
    assert status == "error: give one weight per file: 12 files, 3 weights"


def test_the_merge_tab_s_per_input_strengths_and_a_seeded_method_are_the_command_s(folder, tmp_path):
    """The per-input strengths box (N:PRESET:W1,... and N:PATTERN=scale:X lines, N in the files' order) and dare's
    density and seed become the command's --input-block-weights, --input-rule, --merge-method, --density and
    --seed: the CLI's file for it. Before, the page built its inputs itself, so --input-rule in the flags box was
    parsed and dropped; now the flags box's per-input flags reach the merge too."""
    app = App(tmp_path / "work", folder)
    a, b = folder / "sub" / "a.safetensors", folder / "b.safetensors"
    for method, density, seed, box, flags, want in (
            ("dare", 0.4, 11, "1:*attn1*=scale:1.5\n# half the second's cross-attention\n2:*attn2*=scale:0.5",
             "--rank 8 --input-rule '2:*attn1*=scale:2'",
             ["--merge-method", "dare", "--density", "0.4", "--seed", "11", "--input-rule", "1:*attn1*=scale:1.5",
              "--input-rule", "2:*attn2*=scale:0.5", "--input-rule", "2:*attn1*=scale:2"]),
            ("sum", None, None, "1:SD15:OUTALL", "--rank 8", ["--input-block-weights", "1:SD15:OUTALL"])):
        status, offered = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 -0.5", flags, method, density,
                                    seed, box)
        command = status.split("\ncommand: ", 1)[1].split("\n")[0]
        assert all(shlex.join(want[i:i + 2]) in command for i in range(0, len(want), 2)), (want, command)
        cli = tmp_path / f"cli_{method}.safetensors"
        assert main(["merge", f"{b}:1", f"{a}:-0.5", "-o", str(cli), "--rank", "8", *want, "-q"]) == 0
        assert Path(offered).read_bytes() == cli.read_bytes()
        plain = tmp_path / f"plain_{method}.safetensors"
        assert main(["merge", f"{b}:1", f"{a}:-0.5", "-o", str(plain), "--rank", "8", *want[:6 if density else 0],
                     "-q"]) == 0
        assert Path(offered).read_bytes() != plain.read_bytes()  # the strengths changed the merge
    before = files(folder)
    for box, why in (("3:SD15:OUTALL", "there is no input 3"), ("SD15:OUTALL", "write N:PRESET")):
        status, out = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "", "--rank 4", "sum", None, None, box)
        assert status.startswith("error: ") and why in status and "\n" not in status and out is None, status
    assert files(folder) == before
