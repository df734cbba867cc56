"""`lora-resize ui`: a local web page (Gradio) over the same library - pick or upload a LoRA, see the analyze table
and the size/fidelity curve (a click on a point or a row selects that setting and shows its exact flags), run
resize / merge / convert with a progress bar, download the result, read the HTML report in the page.

Every job goes through the CLI's own flag parser (cli/flags.py: the same ResizeOptions), so a file made here is
the file `lora-resize resize IN -o OUT <the flags shown>` makes, byte for byte. Errors show as our one-line
message in the page's status box; nothing partial is offered for download."""
from __future__ import annotations

import html
import shlex
import tempfile
from pathlib import Path

import gradio as gr

from ..errors import LoraResizeError
from ..models import LAYOUTS

CLICK_JS = ("element.addEventListener('click', (e) => { const p = e.target.closest('[data-row]'); "
            "if (p) { trigger('click', {row: p.getAttribute('data-row')}); } });")
COLUMNS = ["setting", "size", "bytes", "Frobenius kept (w-mean)", "global", "worst layer", "flags"]


def _path(upload) -> str:
    if upload is None:
        raise LoraResizeError("upload a LoRA file first")
    return upload if isinstance(upload, str) else upload.name


def _progress(progress: gr.Progress, desc: str):
    return lambda iterable, total: progress.tqdm(iterable, total=total, desc=desc)


def _parse(command: str, argv: list[str]):
    """The CLI's parse of `lora-resize <command> <argv>`, with its one-line errors."""
    from ..cli import build_parser
    return build_parser().parse_args([command, *argv])


def _split(flags: str) -> list[str]:
    try:
        return shlex.split(flags or "")
    except ValueError as e:
        raise LoraResizeError(f"cannot read the flags: {e}") from None


class App:
    """The page's jobs; outputs go to `workdir` (one folder per job, under the input's name)."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _out(self, name: str) -> Path:
        self._n += 1
        folder = self.workdir / f"job{self._n}"
        folder.mkdir()
        return folder / name

    # -- analyze ------------------------------------------------------------------------------------------------
    def analyze(self, upload, cap, progress=gr.Progress()):
        from ..ops.analyze import analyze
        from ..report.html import CSS, curve_svg, html_report
        from ..units import format_size
        try:
            a = analyze(_path(upload), rank=int(cap) if cap else None, progress=_progress(progress, "analyzing"))
        except LoraResizeError as e:
            return "", [], [], "", f"error: {e}", ""
        rows = [[r.label, format_size(r.output_bytes), r.output_bytes, f"{r.fro_weighted:.2%}", f"{r.fro_global:.2%}",
                 r.worst_layer or "-", r.args] for r in a.rows]
        flags = {f"row{i}": r.args for i, r in enumerate(a.rows)}
        flags["chosen"] = a.pick.args
        report = (f'<iframe title="report" style="width:100%;height:1000px;border:0" '
                  f'srcdoc="{html.escape(html_report(a))}"></iframe>')
        status = (f"{a.src.name}: {len(a.layers)} layers ({a.format}), {format_size(a.input_bytes)}; "
                  f"{len(a.rows)} settings; click a point or a row to pick one")
        curve = f'<style>{CSS}</style><div class="lr-curve">{curve_svg(a, "fro_weighted", "ui-curve", a.pick)}</div>'
        return curve, rows, flags, a.pick.args, status, report

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
    def resize(self, upload, flags, progress=gr.Progress()):
        from ..cli.flags import options_from
        from ..ops.resize import resize
        from ..report.text import summary
        try:
            src = _path(upload)
            dst = self._out(Path(src).stem + "_resized.safetensors")
            args = _parse("resize", [src, "-o", str(dst), *_split(flags)])
            result = resize(src, dst, options_from(args), progress=_progress(progress, "resizing"))
        except LoraResizeError as e:
            return f"error: {e}", None
        return summary(result), str(result.dst)

    def merge(self, uploads, weights, flags, progress=gr.Progress()):
        from ..cli.flags import options_from
        from ..ops.merge import Source, merge
        from ..report.text import summary
        try:
            paths = [_path(u) for u in (uploads or [])]
            if len(paths) < 2:
                raise LoraResizeError("upload two or more LoRA files to merge")
            ws = [w.strip() for w in (weights or "").replace(",", " ").split()] or ["1"] * len(paths)
            if len(ws) != len(paths):
                raise LoraResizeError(f"give one weight per file: {len(paths)} files, {len(ws)} weights")
            try:
                sources = [Source(Path(p), float(w)) for p, w in zip(paths, ws)]
            except ValueError:
                raise LoraResizeError(f"weights must be numbers, got {weights!r}") from None
            dst = self._out("merged.safetensors")
            args = _parse("merge", [f"{p}:{w}" for p, w in zip(paths, ws)] + ["-o", str(dst), *_split(flags)])
            result = merge(sources, dst, options_from(args), progress=_progress(progress, "merging"))
        except LoraResizeError as e:
            return f"error: {e}", None
        return summary(result), str(result.dst)

    def convert(self, upload, layout, progress=gr.Progress()):
        from ..ops.convert import convert
        from ..report.text import summary
        try:
            src = _path(upload)
            dst = self._out(Path(src).stem + f"_{layout}.safetensors")
            result = convert(src, dst, layout, progress=_progress(progress, "converting"))
        except LoraResizeError as e:
            return f"error: {e}", None
        return summary(result), str(result.dst)


def build(workdir: str | Path | None = None) -> gr.Blocks:
    """The page (not launched)."""
    app = App(workdir or tempfile.mkdtemp(prefix="lora-resize-ui-"))
    types = [".safetensors", ".pt", ".pth", ".ckpt"]
    with gr.Blocks(title="lora-resize") as page:
        gr.Markdown("# lora-resize\nMake LoRA files smaller, exactly: analyze, pick a setting, resize; or merge "
                    "and convert.")
        with gr.Tab("Resize"):
            lora = gr.File(label="LoRA file", file_types=types, elem_id="lora-file")
            with gr.Row():
                cap = gr.Number(label="rank cap (0: none)", value=0, precision=0, elem_id="cap")
                analyze_btn = gr.Button("Analyze", elem_id="analyze-btn")
            curve = gr.HTML(elem_id="curve", js_on_load=CLICK_JS)
            table = gr.Dataframe(headers=COLUMNS, elem_id="settings", interactive=False, wrap=True)
            flags = gr.Textbox(label="resize flags: click a point or a row to pick a setting, or type them",
                               value="--method sv_fro --param 0.9", elem_id="flags")
            resize_btn = gr.Button("Resize", variant="primary", elem_id="resize-btn")
            status = gr.Textbox(label="status", interactive=False, elem_id="status", lines=3)
            result = gr.File(label="resized LoRA", elem_id="result-file", interactive=False)
            with gr.Accordion("HTML report", open=False):
                report = gr.HTML(elem_id="report")
            by_row = gr.State({})
            analyze_btn.click(app.analyze, [lora, cap], [curve, table, by_row, flags, status, report])
            curve.click(app.pick_point, [by_row], [flags])
            table.select(app.pick_row, [table], [flags])
            resize_btn.click(app.resize, [lora, flags], [status, result])
        with gr.Tab("Merge"):
            files = gr.File(label="LoRA files", file_count="multiple", file_types=types, elem_id="merge-files")
            weights = gr.Textbox(label="weights, one per file (negative subtracts)", value="", elem_id="weights")
            mflags = gr.Textbox(label="flags", value="--method sv_fro --param 0.95", elem_id="merge-flags")
            merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
            mstatus = gr.Textbox(label="status", interactive=False, elem_id="merge-status", lines=3)
            mresult = gr.File(label="merged LoRA", elem_id="merge-file", interactive=False)
            merge_btn.click(app.merge, [files, weights, mflags], [mstatus, mresult])
        with gr.Tab("Convert"):
            cfile = gr.File(label="LoRA file", file_types=types, elem_id="convert-file")
            layout = gr.Dropdown([x for x in LAYOUTS if x != "peft"], value="comfy", label="to layout",
                                 elem_id="layout")
            convert_btn = gr.Button("Convert", variant="primary", elem_id="convert-btn")
            cstatus = gr.Textbox(label="status", interactive=False, elem_id="convert-status", lines=3)
            cresult = gr.File(label="converted LoRA", elem_id="convert-result", interactive=False)
            convert_btn.click(app.convert, [cfile, layout], [cstatus, cresult])
    return page


def serve(host: str = "127.0.0.1", port: int | None = None, open_browser: bool = False, block: bool = True):
    """Start the page on `host`:`port` (None: the first free port from 7860); returns the launched Blocks."""
    page = build()
    page.queue().launch(server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=True,
                        quiet=True)
    if block:
        print(f"lora-resize ui: serving {page.local_url} (Ctrl+C to stop)", flush=True)
        page.block_thread()
    return page
