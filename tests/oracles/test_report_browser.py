"""The HTML report in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium)
opens the file, which must render without console errors and without fetching anything, with its charts, rank map,
spectra and table present and drawn; clicking a point picks that setting; a screenshot is saved in the test's
tmp dir. `.ci/run` installs chromium when it is missing; elsewhere a machine without it skips this test with the
reason, except under CI=true, where a missing browser fails it (helpers.chromium)."""
from __future__ import annotations

import pytest
import torch

from lora_resize.ops.analyze import analyze
from lora_resize.report.html import write_html

from helpers import BASE_METADATA, BLOCKY, chromium, make_state_dict, write_lora

pytestmark = pytest.mark.browser
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1800"]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_chromium(tmp_path, browser):
    sd = make_state_dict(BLOCKY, seed=99, dtype=torch.float16, passthrough=True)
    src = write_lora(tmp_path / "blocky.safetensors", sd, dict(BASE_METADATA))
    a = analyze(src, method="sv_fro", param=0.9, rank=8, block_rules=("lora_te_*=4",))
    report = write_html(a, tmp_path / "report.html")

    browser.get(report.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.execute_script("return document.body.getAttribute('data-ready')") == "1"  # our script ran

    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    # self-contained: the page loaded no resource besides itself
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    def box(selector):
        return browser.execute_script(
            "var e = document.querySelector(arguments[0]); if (!e) return null;"
            "var r = e.getBoundingClientRect(); return [r.width, r.height];", selector)

    for sel in ("#curve-svg-fro_weighted", "#rankmap", "#spectra", "#settings"):
        w, h = box(sel) or (0, 0)
        assert w > 200 and h > 100, (sel, w, h)
    drawn = browser.execute_script(
        "return {points: document.querySelectorAll('#curve-svg-fro_weighted circle.point').length,"
        " lines: document.querySelectorAll('#curve-svg-fro_weighted polyline').length,"
        " chosen: document.querySelectorAll('#curve-svg-fro_weighted g.chosen').length,"
        " recommended: document.querySelectorAll('#curve-svg-fro_weighted g.recommended').length,"
        " recommended_row: document.querySelectorAll('#settings tr.recommended').length,"
        " bars: document.querySelectorAll('#rankmap rect.layer').length,"
        " spectra: document.querySelectorAll('#spectra g.spectrum').length,"
        " rows: document.querySelectorAll('#settings tbody tr').length}")
    assert drawn == {"points": len(a.rows), "lines": 6, "chosen": 1, "recommended": 1, "recommended_row": 1,
                     "bars": len(a.layers), "spectra": 6, "rows": len(a.rows) + 1}
    # the recommendation and its reason are shown above the curves and the table
    rec = browser.find_element("id", "recommended")
    assert rec.is_displayed() and a.recommended.label in rec.text and f"why: {a.recommended_reason}" in rec.text
    assert browser.execute_script(
        "return document.getElementById('recommended').getBoundingClientRect().bottom"
        " < document.getElementById('settings').getBoundingClientRect().top")
    # 99%-ish settings stand apart: the curve spans most of the plot's height, not its top edge
    spread = browser.execute_script(
        "var ys = Array.from(document.querySelectorAll('#curve-svg-fro_weighted circle.point'))"
        ".map(function (c) { return c.getBoundingClientRect().top; });"
        "var f = document.querySelector('#curve-svg-fro_weighted rect.frame').getBoundingClientRect();"
        "return (Math.max.apply(null, ys) - Math.min.apply(null, ys)) / f.height;")
    assert spread > 0.6, spread
    assert browser.execute_script(
        "return getComputedStyle(document.getElementById('curve-fro_global')).display") == "none"

    # the fidelity tabs switch curves; clicking a point picks its row and its resize flags
    browser.execute_script("document.querySelectorAll('.tabs button')[1].click()")
    assert browser.execute_script(
        "return getComputedStyle(document.getElementById('curve-fro_global')).display") != "none"
    browser.execute_script("document.querySelectorAll('.tabs button')[0].click()")
    point = browser.execute_script("return document.querySelector('#curve-svg-fro_weighted circle.point')")
    row_id = point.get_attribute("data-row")
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", point)
    assert "hl" in browser.find_element("id", row_id).get_attribute("class")
    flags = browser.find_element("id", "cmd-flags").text
    assert flags == a.rows[int(row_id[3:])].args

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
