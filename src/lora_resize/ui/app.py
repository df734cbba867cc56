"""`lora-resize ui`: a local web page (Gradio) over the same library - upload a LoRA or pick one from a folder
(`--loras DIR`), see the analyze table and the size/fidelity curve (a click on a point or a row selects that setting
and shows its exact flags), run resize / merge / convert with a progress bar, download the result, read the HTML
report in the page. A result made from a picked file is also saved in that folder, under a new name.

Every job goes through the CLI's own flag parser (cli/flags.py: the same ResizeOptions), so a file made here is
the file `lora-resize resize IN -o OUT <the flags shown>` makes, byte for byte. Errors show as our one-line
message in the page's status box; nothing partial is offered for download."""
from __future__ import annotations

import atexit
import html
import ipaddress
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr

from ..core.merging import MERGE_METHODS, MERGE_PARAMS, merge_methods
from ..errors import LoraResizeError, OptionsError
from ..io.files import INPUT_SUFFIXES
from ..io.paths import free_name
from ..models import LAYOUTS
from ..ranks.rules import parse_rule
from ..results import MEASURES

CLICK_JS = ("element.addEventListener('click', (e) => { const p = e.target.closest('[data-row]'); "
            "if (p) { trigger('click', {row: p.getAttribute('data-row')}); } });")
COLUMNS = ["setting", "size", "bytes", *(f"Frobenius kept ({n})" for n, _ in MEASURES.values()), "worst layer", "flags"]

# Gradio's file boxes print a file's size in steps of 1024 labelled "MB" (32.5 MB shows as 31.0 MB); the page shows
# sizes one way only (units.format_size, in its status lines and table), so the boxes' link shows no size
PAGE_CSS = (".file-preview td.download a{visibility:hidden;white-space:nowrap} "
            ".file-preview td.download a::after{visibility:visible;content:'download \\21E3'}")



def _uploaded(upload) -> str:
    return upload if isinstance(upload, str) else upload.name


def _progress(progress: gr.Progress, desc: str):
    return lambda iterable, total: progress.tqdm(iterable, total=total, desc=desc)


# what the page sets itself or shows in the page: given in the flags box, these are refused, not silently dropped
PAGE_SETS = {"output": "-o/--output/--save_to (the page names the file)", "model": "--model (the input is the file "
             "chosen above)", "input": "another input", "sources": "another input (add it to the files instead)",
             "report": "--report (the report is in the page)", "plot": "--plot (the curve is in the page)"}


def merge_sets() -> dict[str, str]:
    """What the merge tab sets in its own boxes (the method list, one box per merge parameter): given in the flags
    box too, refused like PAGE_SETS."""
    return {"merge_method": "--merge-method (choose it in the merge method list)",
            **{p.name: f"{p.flag} (the merge tab's {p.name} box sets it)" for p in MERGE_PARAMS.values()}}


def _parse(command: str, own: list[str], flags: str, sets: dict[str, str] | None = None):
    """The CLI's parse of `lora-resize <command> <own> <flags>` (`own`: the input and output the page chose, and
    what its boxes set), with its one-line errors; -h, flags that would change what the page sets (PAGE_SETS, and
    `sets`), and a PEFT folder are refused."""
    page_sets = {**PAGE_SETS, **(sets or {})}
    from ..cli import build_parser
    parser = build_parser()
    try:
        args = parser.parse_args([command, *own, *_split(flags)])
        mine = parser.parse_args([command, *own])
    except SystemExit:  # -h/--help: argparse printed its help and exits
        raise LoraResizeError(f"the page shows no help: `lora-resize {command} --help` lists the flags") from None
    except OptionsError as e:  # a flag given twice: in the box, one of those the page sets (-o)
        if getattr(e, "dest", None) in page_sets:
            raise LoraResizeError(f"{page_sets[e.dest]} is not a flag for the page: drop it") from None
        raise
    for dest, what in page_sets.items():
        if getattr(args, dest, None) != getattr(mine, dest, None):
            raise LoraResizeError(f"{what} is not a flag for the page: drop it")
    if getattr(args, "output_format", None) == "peft":
        raise LoraResizeError("--output-format peft writes a folder, which the page cannot offer for download; "
                              f"run `lora-resize {command} ... --output-format peft`")
    return args


def strength_fields(text: str) -> dict:
    """The block strengths box: `--block-weights PRESET:W1,...` (or the bare `PRESET:W1,...`, as the ComfyUI input
    takes it) and scale rules `--rule 'PATTERN=scale:X'` (or the bare rule), as
    option fields (what every analysed setting, and so the flags it fills in, carries). Raises LoraResizeError (one
    line) for anything else in it."""
    words, fields = _split(text), {"block_rules": []}
    while words:
        if ":" in words[0] and not words[0].startswith("-"):  # a bare PRESET:W1,... as LBW users paste it
            words.insert(0, "--block-weights" if "=" not in words[0] else "--rule")
        flag, value = words.pop(0), words.pop(0) if words else None
        if flag == "--block-weights" and value is not None:
            fields["block_weights"] = value
        elif flag == "--rule" and value is not None and parse_rule(value).scales:
            fields["block_rules"].append(value)
        else:
            raise LoraResizeError(f"the block strengths box takes --block-weights PRESET:W1,... and --rule "
                                  f"'PATTERN=scale:X' only, not {flag!r}{f' {value!r}' if value else ''}")
    return {k: v for k, v in fields.items() if v}


def _split(flags: str) -> list[str]:
    try:
        return shlex.split(flags or "")
    except ValueError as e:
        raise LoraResizeError(f"cannot read the flags: {e}") from None


class App:
    """The page's jobs. Inputs: an uploaded file, or a file picked from `loras` (a folder, searched recursively).
    Outputs go to `workdir` (a new folder per job, under the input's name), or, for a picked input, into `loras`
    beside it under a free name (`<stem>_resized.safetensors`, then `_2`, `_3`...: nothing is written over, also
    when jobs overlap). The file offered for download is always in `workdir` (a copy of one saved beside its input):
    the page serves its own outputs, never the folder. `workdir` None: a new temporary folder, which `close`
    removes."""

    def __init__(self, workdir: str | Path | None = None, loras: str | Path | None = None,
                 base: str | Path | None = None, base_config: str | Path | None = None):
        self.base = str(base) if base is not None else None  # the Preview tab's model (`lora-resize ui --base`)
        self.base_config = str(base_config) if base_config is not None else None
        self._own = workdir is None
        self.workdir = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="lora-resize-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loras = Path(loras).resolve() if loras is not None else None
        self._lock = threading.Lock()
        self._reserved: set[Path] = set()  # names chosen beside a picked file by jobs still running

    def close(self) -> None:
        """Remove the work folder if the page made it (the page's outputs and their copies)."""
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def choices(self) -> list[str]:
        """The LoRA files under `loras`, as paths relative to it (hidden folders skipped), sorted."""
        if self.loras is None or not self.loras.is_dir():
            return []
        return sorted(p.relative_to(self.loras).as_posix() for p in self.loras.rglob("*")
                      if p.suffix.lower() in INPUT_SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.loras).parts))

    def _picked(self, name: str) -> Path:
        if name not in self.choices():  # only what the list offers: nothing outside the folder, nothing hidden
            raise LoraResizeError(f"{name!r} is not a LoRA file in the folder")
        return self.loras / name

    def _source(self, upload, picked) -> tuple[str, Path | None]:
        """(the input's path, its folder if it was picked from `loras` and the folder is writable: where its result
        is saved; else None: the work folder)."""
        if upload is not None:
            return _uploaded(upload), None
        if picked:
            path = self._picked(picked)
            return str(path), path.parent if os.access(path.parent, os.W_OK) else None
        raise LoraResizeError("upload a LoRA file or pick one from the folder first" if self.loras is not None
                              else "upload a LoRA file first")

    def _out(self, name: str, beside: Path | None = None) -> Path:
        """Where a job writes `name`: a new folder of its own in the work folder, or `beside` under a free name,
        reserved until `_release` (two jobs at once never pick the same one)."""
        if beside is None:
            return Path(tempfile.mkdtemp(prefix="job", dir=self.workdir)) / name
        with self._lock:
            # a dangling link counts as taken: never written through
            name = free_name(name, lambda n: os.path.lexists(beside / n) or beside / n in self._reserved)
            self._reserved.add(beside / name)
        return beside / name

    def _release(self, dst: Path | None) -> None:
        with self._lock:
            self._reserved.discard(dst)

    def _done(self, result, command: list[str] | None = None) -> tuple[str, str]:
        """The status text (the summary, the `command` that makes the same file when given, where it was saved) and
        the file offered for download: the result, or a copy in the work folder of one saved beside its input
        (Gradio serves what a job returns; the LoRA folder is never exposed)."""
        from ..report.text import summary
        offered = Path(result.dst)
        if self.workdir.resolve() not in offered.resolve().parents:
            offered = self._out(offered.name)
            shutil.copyfile(result.dst, offered)
        said = f"\ncommand: {shlex.join(command)}" if command else ""
        return f"{summary(result)}{said}\nsaved as {result.dst}", str(offered)

    # -- analyze ------------------------------------------------------------------------------------------------
    def analyze(self, upload, picked, cap, strengths="", progress=gr.Progress()):
        from ..ops.analyze import analyze
        from ..report.html import CSS, curve_svg, html_report, recommendation_html
        from ..report.text import percent
        from ..units import format_size
        try:
            a = analyze(self._source(upload, picked)[0], rank=int(cap) if cap else None,
                        progress=_progress(progress, "analyzing"), **strength_fields(strengths))
        except LoraResizeError as e:
            return "", [], [], "", f"error: {e}", ""
        rows = [[r.label + (" (recommended)" if r is a.recommended else ""), format_size(r.output_bytes),
                 r.output_bytes, *(percent(getattr(r, key)) for key in MEASURES), r.worst_layer or "-", r.args]
                for r in a.rows]
        flags = {f"row{i}": r.args for i, r in enumerate(a.rows)}
        rec = a.recommended
        flags["chosen"] = rec.args if rec else ""  # the flags box starts at the recommended setting
        report = (f'<iframe title="report" style="width:100%;height:1000px;border:0" '
                  f'srcdoc="{html.escape(html_report(a))}"></iframe>')
        said = (f"recommended: {rec.label}, {format_size(rec.output_bytes)} ({a.recommended_reason})" if rec else
                f"recommended: none ({a.recommended_reason})")
        status = (f"{a.src.name}: {len(a.layers)} layers ({a.format}), {format_size(a.input_bytes)}; "
                  f"{len(a.rows)} settings; {said}; click a point or a row to pick another")
        curve = (f'<style>{CSS}</style>{recommendation_html(a, "ui-recommended")}'
                 f'<div class="lr-curve">{curve_svg(a, "fro_weighted", "ui-curve")}</div>')
        return curve, rows, flags, flags["chosen"], status, report

    # -- preview -------------------------------------------------------------------------------------------------
    def preview(self, upload, picked, prompt, seed, steps, settings, progress=gr.Progress()):
        """The Preview tab (with `base`): the pictures of each setting (one per line of `settings`, as resize flags
        read by the CLI's parser; none: the defaults) beside the size-vs-effect-error curve, a click on a point or a
        picture picking its setting; the grid PNG; the flags by row; the status line."""
        from ..cli.flags import options_from_flags
        from ..ops.effect import Probing
        from ..ops.preview import preview
        from ..report.grid import write_grid
        from ..report.html import CSS, effect_section, recommendation_html
        from ..results import DEFAULT_RENDER_STEPS, DEFAULT_SEED
        try:
            if self.base is None:
                raise LoraResizeError("start the page with --base MODEL to preview pictures")
            src = self._source(upload, picked)[0]
            options = [options_from_flags(line, f"settings line {n} ({line.strip()!r})")
                       for n, line in enumerate((settings or "").splitlines(), 1) if line.strip()]
            probing = Probing(base=self.base, config=self.base_config, seed=_count(seed, DEFAULT_SEED))
            p = preview(src, probing, options or None, prompt=(prompt or "").strip() or None,
                        steps=_count(steps, DEFAULT_RENDER_STEPS),
                        progress=_progress(progress, "decomposing"), picture_progress=_progress(progress, "pictures"))
            grid = write_grid(p.grid(), self._out(Path(src).stem + "_preview.png"))
        except LoraResizeError as e:
            return "", None, {}, gr.update(), f"error: {e}"
        a = p.analysis
        flags = {f"row{i}": r.args for i, r in enumerate(a.rows)}
        section = (f'<style>{CSS}</style>{recommendation_html(a, "ui-preview-recommended")}'
                   f"{effect_section(a, p)}")
        status = (f"{p.src.name}: {len(p.pictures)} pictures of {p.prompt!r} in {p.seconds:.1f} s; click a point or "
                  "a picture to pick its setting")
        return section, str(grid), flags, a.recommended.args if a.recommended else gr.update(), status

    @staticmethod
    def pick_point(flags_by_row: dict, evt: gr.EventData):
        return (flags_by_row or {}).get(getattr(evt, "row", None), gr.update())

    @staticmethod
    def pick_row(rows, evt: gr.SelectData):
        try:
            return rows.iloc[evt.index[0]]["flags"] if hasattr(rows, "iloc") else rows[evt.index[0]][-1]
        except (IndexError, KeyError, TypeError):
            return gr.update()

    # -- jobs ---------------------------------------------------------------------------------------------------
    def resize(self, upload, picked, flags, progress=gr.Progress()):
        from ..cli.flags import options_from
        from ..ops.resize import resize
        dst = None
        try:
            src, beside = self._source(upload, picked)
            dst = self._out(Path(src).stem + "_resized.safetensors", beside)
            args = _parse("resize", [src, "-o", str(dst)], flags)
            result = resize(src, dst, options_from(args), progress=_progress(progress, "resizing"))
            return self._done(result)
        except LoraResizeError as e:
            return f"error: {e}", None
        finally:
            self._release(dst)

    def merge(self, uploads, picked, weights, flags, merge_method="sum", density=None, seed=None,
              input_strengths="", progress=gr.Progress()):
        """The merge tab: the files (picked ones first) with their weights (one per file, or none: all 1), the merge
        method and its parameters' boxes (core.merging.MergeSettings.given: empty is the method's default, a box the
        method does not read is ignored; one argument per MERGE_PARAMS entry, in its order), the per-input strengths
        box (cli.merge.input_strength_flags: 'N:PRESET:W1,...' or 'N:PATTERN=scale:X' lines) and the flags box (rank
        options; a method or parameter there is refused: the boxes set them). All of it becomes one `lora-resize
        merge` command, run as the CLI runs it. Returns (the status: the summary, the command, where the file was
        saved; the file offered for download, or None)."""
        from ..cli.flags import options_from
        from ..cli.merge import input_strength_flags, merge_settings, merge_sources
        from ..core.merging import MergeSettings
        from ..ops.merge import merge
        dst = None
        try:
            paths = [str(self._picked(p)) for p in (picked or [])] + [_uploaded(u) for u in (uploads or [])]
            if len(paths) < 2:
                raise LoraResizeError("pick or upload two or more LoRA files to merge (picked ones come first)")
            ws = [w.strip() for w in (weights or "").replace(",", " ").split()] or ["1"] * len(paths)
            if len(ws) != len(paths):
                raise LoraResizeError(f"give one weight per file: {len(paths)} files, {len(ws)} weights")
            try:
                [float(w) for w in ws]  # checked here to name the box; the command carries them as typed
            except ValueError:
                raise LoraResizeError(f"weights must be numbers, got {weights!r}") from None
            boxes = dict(zip(MERGE_PARAMS, (density, seed)))  # the boxes, as the signature lists them
            method = MergeSettings.given(merge_method or "sum", {
                name: _count(v, None) if MERGE_PARAMS[name].type is int else v for name, v in boxes.items()})
            dst = self._out("merged.safetensors", self.loras if picked and not uploads else None)
            own = [f"{p}:{w}" for p, w in zip(paths, ws)] + ["-o", str(dst), *method.flags(),
                                                              *input_strength_flags(input_strengths)]
            args = _parse("merge", own, flags, merge_sets())
            result = merge(merge_sources(args), dst, options_from(args), progress=_progress(progress, "merging"),
                           merge_method=merge_settings(args))
            return self._done(result, ["lora-resize", "merge", *own, *_split(flags)])
        except LoraResizeError as e:
            return f"error: {e}", None
        finally:
            self._release(dst)

    def convert(self, upload, picked, layout, progress=gr.Progress()):
        from ..ops.convert import convert
        dst = None
        try:
            src, beside = self._source(upload, picked)
            dst = self._out(Path(src).stem + f"_{layout}.safetensors", beside)
            result = convert(src, dst, layout, progress=_progress(progress, "converting"))
            return self._done(result)
        except LoraResizeError as e:
            return f"error: {e}", None
        finally:
            self._release(dst)


def method_params(method: str) -> list:
    """The merge parameters' boxes for `method`, in MERGE_PARAMS order: shown where the method reads it."""
    reads = MERGE_METHODS[method].params if method in MERGE_METHODS else ()
    return [gr.update(visible=p in reads) for p in MERGE_PARAMS]


def _input(app: App, label: str, prefix: str, multiple: bool = False):
    """An upload box and, with a folder, a list to pick from; choosing one clears the other."""
    upload = gr.File(label=label, file_count="multiple" if multiple else "single", file_types=list(INPUT_SUFFIXES),
                     elem_id=f"{prefix}-file" if not multiple else f"{prefix}-files")
    picked = gr.Dropdown(app.choices(), value=[] if multiple else None, multiselect=multiple,
                         label=f"or pick from {app.loras}", visible=app.loras is not None, elem_id=f"{prefix}-pick")
    if not multiple:
        picked.input(lambda v: None if v else gr.update(), [picked], [upload], api_visibility="private")
        upload.upload(lambda: None, [], [picked], api_visibility="private")
    return upload, picked


def build(workdir: str | Path | None = None, loras: str | Path | None = None, app: App | None = None) -> gr.Blocks:
    """The page (not launched) over `app` (default: App(workdir, loras)); `loras`: a folder whose LoRAs the page
    lists to pick from. With `app.base` a Preview tab renders each setting's picture (ops.preview); a click there
    picks the setting into the Resize tab's flags."""
    app = app or App(workdir, loras)
    with gr.Blocks(title="lora-resize", delete_cache=(3600, 86400)) as page:
        gr.Markdown("# lora-resize\nMake LoRA files smaller, exactly: analyze, pick a setting, resize; or merge "
                    "and convert.")
        gr.HTML(f"<style>{PAGE_CSS}</style>", elem_id="page-style", js_on_load=None)
        with gr.Tab("Resize"):
            lora, picked = _input(app, "LoRA file", "lora")
            with gr.Row():
                cap = gr.Number(label="rank cap (0: none)", value=0, precision=0, minimum=0, maximum=16384,
                                elem_id="cap")
                analyze_btn = gr.Button("Analyze", elem_id="analyze-btn")
            strengths = gr.Textbox(label="block strengths, baked in (Analyze carries them into every setting's flags)",
                                   placeholder="e.g. --block-weights SD15:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1 "
                                               "--rule '*attn2*=scale:0.5'", elem_id="strengths")
            curve = gr.HTML(elem_id="curve", js_on_load=CLICK_JS)
            table = gr.Dataframe(headers=COLUMNS, elem_id="settings", interactive=False, wrap=True)
            flags = gr.Textbox(label="resize flags: Analyze fills in the recommended setting; click a point or a row "
                                     "to pick another, or type them",
                               placeholder="e.g. --method sv_fro --param 0.9 --rank 128", elem_id="flags")
            resize_btn = gr.Button("Resize", variant="primary", elem_id="resize-btn")
            status = gr.Textbox(label="status", interactive=False, elem_id="status", lines=3)
            result = gr.File(label="resized LoRA", elem_id="result-file", interactive=False)
            with gr.Accordion("HTML report", open=False):
                report = gr.HTML(elem_id="report")
            by_row = gr.State({})
            analyze_btn.click(app.analyze, [lora, picked, cap, strengths], [curve, table, by_row, flags, status,
                                                                             report])
            curve.click(app.pick_point, [by_row], [flags], api_visibility="private")
            table.select(app.pick_row, [table], [flags], api_visibility="private")
            resize_btn.click(app.resize, [lora, picked, flags], [status, result])
        if app.base is not None:
            from ..ops.preview import DEFAULT_SETTINGS
            with gr.Tab("Preview"):
                gr.Markdown(f"Pictures of one prompt and seed with the base model `{app.base}`: the base alone, the "
                            "original LoRA, then each setting; labels give the file size, the effect error and the "
                            "SSIM to the original-LoRA image (scikit-image, 1 = identical).")
                plora, ppicked = _input(app, "LoRA file", "preview")
                with gr.Row():
                    prompt = gr.Textbox(label="prompt", value="a photo of a cat", elem_id="preview-prompt")
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0, elem_id="preview-seed")
                    steps = gr.Number(label="steps", value=20, precision=0, minimum=1, maximum=200,
                                      elem_id="preview-steps")
                settings = gr.Textbox(label="settings, one per line (resize flags)", lines=5,
                                      elem_id="preview-settings",
                                      value="\n".join(f"--method {m} --param {v}" for m, v in DEFAULT_SETTINGS))
                preview_btn = gr.Button("Preview", variant="primary", elem_id="preview-btn")
                pstatus = gr.Textbox(label="status", interactive=False, elem_id="preview-status")
                pictures = gr.HTML(elem_id="preview-pictures", js_on_load=CLICK_JS)
                grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="preview-grid")
                pby_row = gr.State({})
                preview_btn.click(app.preview, [plora, ppicked, prompt, seed, steps, settings],
                                  [pictures, grid, pby_row, flags, pstatus])
                pictures.click(app.pick_point, [pby_row], [flags], api_visibility="private")
        with gr.Tab("Merge"):
            files, mpicked = _input(app, "LoRA files", "merge", multiple=True)
            weights = gr.Textbox(label="weights, one per file in order - picked files first, then uploads (negative "
                                       "subtracts, 0 leaves a file out; empty: all 1), e.g. 1 0.5 -0.25",
                                 value="", elem_id="weights")
            with gr.Row():
                mmethod = gr.Dropdown(merge_methods(), value="sum", label="merge method", elem_id="merge-method",
                                      info="; ".join(f"{m.name}: {m.help}" for m in MERGE_METHODS.values()))
                mparams = [gr.Number(label=f"{p.name} (empty: the method's default)", value=None, info=p.help,
                                     precision=0 if p.type is int else None, minimum=0, visible=False,
                                     elem_id=f"merge-{p.name}") for p in MERGE_PARAMS.values()]
            mmethod.change(method_params, [mmethod], mparams, api_visibility="private")
            mstrengths = gr.Textbox(label="per-input block strengths, one per line: N:PRESET:W1,... or "
                                          "N:PATTERN=scale:X (N: the file's place in the order above)",
                                    placeholder="e.g. 2:SDXL:OUTALL\n1:*attn2*=scale:0.5", lines=2,
                                    elem_id="merge-strengths")
            mflags = gr.Textbox(label="flags (rank options)", value="--method sv_fro --param 0.95",
                                elem_id="merge-flags")
            merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
            mstatus = gr.Textbox(label="status", interactive=False, elem_id="merge-status", lines=3)
            mresult = gr.File(label="merged LoRA", elem_id="merge-file", interactive=False)
            merge_btn.click(app.merge, [files, mpicked, weights, mflags, mmethod, *mparams, mstrengths],
                            [mstatus, mresult])
        with gr.Tab("Convert"):
            cfile, cpicked = _input(app, "LoRA file", "convert")
            layout = gr.Dropdown([x for x in LAYOUTS if x != "peft"], value="comfy", label="to layout",
                                 elem_id="layout")
            convert_btn = gr.Button("Convert", variant="primary", elem_id="convert-btn")
            cstatus = gr.Textbox(label="status", interactive=False, elem_id="convert-status", lines=3)
            cresult = gr.File(label="converted LoRA", elem_id="convert-result", interactive=False)
            convert_btn.click(app.convert, [cfile, cpicked, layout], [cstatus, cresult])
        if app.loras is not None:  # the lists as the folder is now, each time the page opens
            page.load(lambda: [gr.update(choices=app.choices())] * 3, [], [picked, mpicked, cpicked],
                      api_visibility="private")
    return page


AUTH_ENV = "LORA_RESIZE_UI_AUTH"  # USER:PASS, read when --auth is not given (a flag shows in the process list)


def _count(value, default):
    """A number box's value for a whole-number option: `default` for an empty box, a float with no fraction as an
    int (the box may send 20.0); anything else as it came, for the option's own check to refuse in one line."""
    if value is None:
        return default
    return int(value) if isinstance(value, float) and value.is_integer() else value


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.0/8, ::1): only then is the page
    out of reach of the network."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def serve(host: str = "127.0.0.1", port: int | None = None, open_browser: bool = False, block: bool = True,
          loras: str | Path | None = None, auth: tuple[str, str] | None = None, base: str | None = None,
          base_config: str | None = None):
    """Start the page on `host`:`port` (None: the first free port from 7860); returns the launched Blocks. The page
    serves the files its jobs return (in its work folder, removed when it stops) and what is uploaded to it; never
    the `loras` folder itself (files are picked by name from the list). `auth` (user, password): the page asks for
    them (Gradio's login). A `host` beyond loopback without `auth` is served with a warning on stderr: anyone who
    can reach it can use the page. Raises OSError when the address cannot be served on."""
    app = App(None, loras, base, base_config)
    atexit.register(app.close)
    if not is_loopback(host) and auth is None:
        print(f"lora-resize ui: warning: {host} is reachable from other machines and the page has no password: "
              f"anyone who can reach it can upload, run jobs and download results; give --auth USER:PASS (or set "
              f"{AUTH_ENV}), or serve on 127.0.0.1", file=sys.stderr, flush=True)
    try:
        page = build(app=app)
        page.queue().launch(server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=True,
                            quiet=True, auth=auth)
    except BaseException:
        app.close()
        raise
    if block:
        print(f"lora-resize ui: serving {page.local_url} (Ctrl+C to stop)", flush=True)
        try:
            page.block_thread()
        finally:
            page.close(verbose=False)
            app.close()
    return page
