"""The HTML report (one self-contained file: curves per method with the chosen setting, rank map by block, spectra,
settings table) and the PNG curve, from analyze and from resize."""
from __future__ import annotations

import re
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
    rows = [attrs for tag, attrs in doc.tags if tag == "tr" and attrs.get("id")]
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
