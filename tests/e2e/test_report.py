"""The HTML report (one self-contained file: curves per method with the chosen setting, rank map by block, spectra,
settings table) and the PNG curve, from analyze and from resize."""
from __future__ import annotations

import re

import pytest
from html import escape
from html.parser import HTMLParser


from lora_resize.ops.analyze import analyze
from lora_resize.cli import main
from lora_resize.report.html import html_report
from lora_resize.report.png import write_png

from helpers import BLOCKY


class Collect(HTMLParser):
    """Tags with their attributes, and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(text: str) -> Collect:
    c = Collect()
    c.feed(text)
    return c


def test_report_is_self_contained_and_complete(blocky_lora):
    a = analyze(blocky_lora, method="sv_ratio", param=4, rank=8)
    text = html_report(a)
    doc = parse(text)
    # nothing to fetch: no external scripts, styles, images, fonts or links
    assert not re.search(r"https?://|//cdn|@import|url\(", text)
    assert all("src" not in attrs and attrs.get("rel") != "stylesheet" for _, attrs in doc.tags)
    ids = {attrs.get("id") for _, attrs in doc.tags}
    assert {"curve-svg-fro_weighted", "curve-svg-fro_global", "curve-svg-fro_min", "rankmap", "spectra",
            "settings", "chosen"} <= ids
    methods = {attrs["data-method"] for tag, attrs in doc.tags if tag == "g" and "data-method" in attrs}
    assert methods == {"sv_ratio", "sv_fro", "sv_cumulative", "fixed", "target_fro", "target_size"}
    rows = [attrs for tag, attrs in doc.tags if tag == "tr" and attrs.get("id") and "data-method" in attrs]
    assert len(rows) == len(a.rows) + 1
    assert sum(1 for tag, attrs in doc.tags if tag == "circle" and attrs.get("class") == "point") == 3 * len(a.rows)
    blocks = [attrs["data-block"] for tag, attrs in doc.tags if tag == "g" and "data-block" in attrs]
    assert blocks == ["text encoder", "down 0", "mid", "up 1", "up 2"]
    bars = [attrs for tag, attrs in doc.tags if tag == "rect" and attrs.get("class") == "layer"]
    assert len(bars) == len(BLOCKY)
    spectra = [attrs for tag, attrs in doc.tags if tag == "g" and attrs.get("class") == "spectrum"]
    assert len(spectra) == 6
    assert "chosen: sv_ratio 4, cap 8" in text


def test_cli_analyze_report_and_plot(tmp_path, blocky_lora, capsys):
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    assert main(["analyze", str(blocky_lora), "--report", str(html), "--plot", str(png), "-q",
                 "--target-size", "12KB"]) == 0
    out = capsys.readouterr().out
    assert f"report written to {html}" in out and f"plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "chosen: <b>target_size 12.0 KB</b>" in html.read_text()


def test_resize_writes_the_report_from_its_own_spectra(tmp_path, blocky_lora, capsys):
    html, out = tmp_path / "r.html", tmp_path / "o.safetensors"
    assert main(["resize", str(blocky_lora), "-o", str(out), "--method", "sv_fro", "--param", "0.9",
                 "--report", str(html), "-q"]) == 0
    text = html.read_text()
    assert "(this resize)" in text
    assert f"({out.stat().st_size:,} bytes)" in text  # the report's chosen row is the written file's size
    assert "predicted" not in text


def test_report_paths_are_checked(tmp_path, blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "--report", str(tmp_path / "r.txt"), "-q"]) == 2
    assert "should end in .html" in capsys.readouterr().err
    assert main(["analyze", str(blocky_lora), "--plot", str(tmp_path / "nope" / "r.png"), "-q"]) == 2
    assert "folder does not exist" in capsys.readouterr().err


def test_png_without_a_chosen_setting(tmp_path, blocky_lora):
    a = analyze(blocky_lora, sweep={"fixed": (1, 2, 4), "sv_fro": (0.5, 0.9)})
    assert a.chosen is None
    p = write_png(a, tmp_path / "c.png")
    assert p.stat().st_size > 10_000
    assert "default pick" not in html_report(a)


def _row(method, size, f):
    import numpy as np
    from lora_resize.results import SettingRow
    return SettingRow(f"{method} {f}", method, f, f"--x {f}", size, size, f, f, f, f, "layer", ranks=np.array([1]))


def _cy(svg_text: str) -> dict[str, float]:
    """Each point's vertical position by its row id."""
    return {attrs["data-row"]: float(attrs["cy"]) for tag, attrs in parse(svg_text).tags
            if tag == "circle" and attrs.get("class") == "point"}


def test_fidelities_near_100_percent_stand_apart_on_the_curve():
    """The blog's settings all keep 99.4-99.8%: on a linear axis from 50% to 100% they lay within three pixels
    of each other on the top edge. The curves draw the part lost (1 - F) on a log scale: 99.4% and 99.8% are
    half a decade apart, the order of the measure is kept (more retained is higher), and the ticks read as F."""
    from types import SimpleNamespace
    from lora_resize.report.html import curve_svg
    fs = [0.5, 0.9, 0.99, 0.994, 0.998, 1.0]
    rows = [_row("sv_ratio", 1000 * (n + 1), f) for n, f in enumerate(fs)]
    a = SimpleNamespace(rows=rows, recommended=rows[3], chosen=None)
    for metric in ("fro_weighted", "fro_global", "fro_min"):
        text = curve_svg(a, metric, "c")
        cy = _cy(text)
        ys = [cy[f"row{n}"] for n in range(len(fs))]
        assert ys == sorted(ys, reverse=True)  # more retained, higher on the page
        frame = next(attrs for tag, attrs in parse(text).tags if tag == "rect" and attrs.get("class") == "frame")
        height = float(frame["height"])
        assert ys[3] - ys[4] > 0.1 * height, (ys, height)  # 99.4% and 99.8% apart
        assert ys[4] - ys[5] > 0.05 * height  # and 99.8% and 100% too
        assert ">99%<" in text and ">90%<" in text  # ticks labelled as the fidelity
        rec = next(attrs for tag, attrs in parse(text).tags if tag == "g" and attrs.get("class") == "recommended")
        assert rec["data-row"] == "row3"
        ring = [attrs for tag, attrs in parse(text).tags if tag == "circle" and attrs.get("r") == "9"]
        assert float(ring[0]["cy"]) == pytest.approx(ys[3], abs=0.1)


def test_each_panel_says_what_its_measure_is(blocky_lora, tmp_path):
    """The budgets maximise the global measure and cut weak layers, so the w-mean panel ranks them below the
    policies and the global panel above: each panel's title says which question it answers."""
    a = analyze(blocky_lora, rank=8)
    text = html_report(a)
    titles = {attrs["id"]: attrs["aria-label"] for tag, attrs in parse(text).tags
              if tag == "svg" and attrs.get("id", "").startswith("curve-svg-")}
    assert "what --target-size and --target-fro maximise" in titles["curve-svg-fro_global"]
    assert "budgets rank lower here, they cut weak layers" in titles["curve-svg-fro_weighted"]
    assert "the worst layer" in titles["curve-svg-fro_min"]


def test_the_report_shows_the_recommendation_above_the_table(blocky_lora):
    a = analyze(blocky_lora, rank=12)
    assert a.chosen is None
    text = html_report(a)
    doc = parse(text)
    assert text.index('id="recommended"') < text.index('id="settings"')
    assert f"why: {escape(a.recommended_reason)}" in text
    assert a.recommended_reason.startswith("weight-space rule: the smallest file")
    assert 'id="chosen"' not in text and 'class="chosen"' not in text  # the cap is no chosen setting
    marked = [attrs for tag, attrs in doc.tags if tag == "tr" and attrs.get("class") == "recommended"]
    assert [m["id"] for m in marked] == [f"row{a.rows.index(a.recommended)}"]
    flags = re.search(r'<code id="cmd-flags">([^<]*)</code>', text).group(1)
    assert flags == escape(a.recommended.args)  # the command offered is the recommended one
    # the recommended setting at each precision, from the same decomposition
    prec = [attrs["id"] for tag, attrs in doc.tags if tag == "tr" and attrs.get("id", "").startswith("precision-")]
    assert prec == ["precision-fp16", "precision-bf16", "precision-float"]
    assert text.index('id="precisions"') < text.index('id="settings"')
    for r in a.at_precisions()[0]:
        assert f"{r.output_bytes:,}" in text and f"{r.rounding_error:.2e}" in text
