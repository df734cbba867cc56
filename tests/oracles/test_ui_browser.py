"""The local web page (`lora-resize ui`) in a real browser: the page is started on 127.0.0.1, headless Chromium
uploads the demo's SD1.5 LoCon (at rank 16), runs analyze, picks a setting by clicking its point on the curve,
resizes, and downloads the result, which must equal the CLI's output for the flags the page showed, byte for byte;
a damaged file shows our one-line error in the page. Merge and convert run the same way, and a LoRA picked from the
page's folder (`--loras DIR`) is resized into that folder. Screenshots are saved in the test's tmp dir."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from lora_resize.cli import main
from lora_resize.testing.loras import write_sd15_locon

from helpers import chromium, sizes_disagreeing

pytestmark = [pytest.mark.browser, pytest.mark.thirdparty]

import gradio  # noqa: E402,F401 - a test dependency (pyproject: test extras)
TIMEOUT = 120


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    (folder / "style").mkdir()
    write_sd15_locon(folder / "style" / "picked.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=6)
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory, loras):
    from lora_resize.ui.app import build
    ui = build(tmp_path_factory.mktemp("ui-work"), loras).queue()
    ui.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield ui.local_url
    ui.close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    browser, chromedriver = chromium()
    o = webdriver.ChromeOptions()
    o.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        o.add_argument(a)
    d = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=o)
    yield d
    d.quit()


def wait_for(driver, css: str, check=lambda e: True, timeout: int = TIMEOUT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        els = [e for e in d.find_elements(By.CSS_SELECTOR, css) if check(e)]
        return els[0] if els else False
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(found)


def value_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def upload(driver, elem_id: str, *paths: Path) -> None:
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys("\n".join(map(str, paths)))


def download(driver, elem_id: str, dst: Path) -> Path:
    link = wait_for(driver, f"#{elem_id} a[href]", lambda e: ".safetensors" in (e.get_attribute("href") or ""))
    with urllib.request.urlopen(link.get_attribute("href"), timeout=60) as r:
        dst.write_bytes(r.read())
    return dst


def click(driver, css: str) -> None:
    el = wait_for(driver, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}));", el) \
        if el.tag_name in ("circle", "g") else el.click()


def test_analyze_pick_on_the_curve_resize_and_download(page, driver, tmp_path):
    src = write_sd15_locon(tmp_path / "demo_lora.safetensors", rank=16, alpha=8, conv_rank=8, conv_alpha=4, seed=3)
    driver.get(page)
    wait_for(driver, "#lora-file input[type=file]")
    upload(driver, "lora-file", src)
    wait_for(driver, "#lora-file", lambda e: "demo_lora" in e.text)
    click(driver, "#analyze-btn")
    wait_for(driver, "#curve circle.point")
    driver.save_screenshot(str(tmp_path / "ui-analyze.png"))
    # the recommendation and its reason above the table; the flags box starts at its flags
    from lora_resize import analyze
    a = analyze(src)
    rec = wait_for(driver, "#ui-recommended")
    assert a.recommended.label in rec.text and f"why: {a.recommended_reason}" in rec.text
    wait_for(driver, "#flags textarea, #flags input", lambda e: e.get_attribute("value") == a.recommended.args)
    # pick sv_fro 0.95 on the curve: its point carries its row; the page shows that row's exact flags
    rows = a.rows
    i = next(j for j, r in enumerate(rows) if r.label == "sv_fro 0.95")
    click(driver, f'#curve circle.point[data-row="row{i}"]')
    wait_for(driver, "#flags textarea, #flags input", lambda e: e.get_attribute("value") == rows[i].args)
    flags = value_of(driver, "flags")
    click(driver, "#resize-btn")
    got = download(driver, "result-file", tmp_path / "downloaded.safetensors")
    driver.save_screenshot(str(tmp_path / "ui-resized.png"))
    want = tmp_path / "cli.safetensors"
    assert main(["resize", str(src), "-o", str(want), *flags.split(), "-q"]) == 0
    assert got.read_bytes() == want.read_bytes()
    assert "demo_lora.safetensors -> demo_lora_resized.safetensors" in value_of(driver, "status")
    # every size the page shows for the two files is written one way (units.format_size), Gradio's file boxes
    # included (they print steps of 1024 as "MB" unless the page hides it)
    from selenium.webdriver.common.by import By
    shown = driver.find_element(By.TAG_NAME, "body").text + value_of(driver, "status")
    assert not sizes_disagreeing(shown, {"input": src.stat().st_size, "output": got.stat().st_size})


def test_a_damaged_file_shows_the_one_line_error(page, driver, tmp_path):
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    driver.get(page)
    wait_for(driver, "#lora-file input[type=file]")
    upload(driver, "lora-file", bad)
    wait_for(driver, "#lora-file", lambda e: "damaged" in e.text)
    click(driver, "#analyze-btn")
    status = wait_for(driver, "#status textarea", lambda e: (e.get_attribute("value") or "").startswith("error:"))
    text = status.get_attribute("value")
    assert "damaged.safetensors" in text and "\n" not in text.strip()
    driver.save_screenshot(str(tmp_path / "ui-error.png"))


def test_merge_and_convert_in_the_page(page, driver, tmp_path):
    from selenium.webdriver.common.by import By
    a = write_sd15_locon(tmp_path / "a.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=4)
    b = write_sd15_locon(tmp_path / "b.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=5)
    driver.get(page)
    wait_for(driver, "button[role=tab]")
    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Merge").click()
    upload(driver, "merge-files", a, b)
    wait_for(driver, "#merge-files", lambda e: e.text.count(".safetensors") == 2)  # the page splits name and suffix
    box = wait_for(driver, "#weights textarea, #weights input")
    box.send_keys("1 -0.5")
    click(driver, "#merge-btn")
    got = download(driver, "merge-file", tmp_path / "merged_dl.safetensors")
    want = tmp_path / "merged_cli.safetensors"
    assert main(["merge", f"{a}:1", f"{b}:-0.5", "-o", str(want), "--method", "sv_fro", "--param", "0.95",
                 "-q"]) == 0
    assert got.read_bytes() == want.read_bytes()
    # a merge method from the list: its density box shows (seed, which ties does not read, stays hidden)
    assert not driver.find_elements(By.CSS_SELECTOR, "#merge-density input")
    box = wait_for(driver, "#merge-method input")
    box.click()  # the list opens with every method
    wait_for(driver, "ul[role=listbox] li", lambda e: e.text.strip() == "ties").click()
    wait_for(driver, "#merge-method input", lambda e: e.get_attribute("value") == "ties")
    density = wait_for(driver, "#merge-density input")
    assert not driver.find_elements(By.CSS_SELECTOR, "#merge-seed input")
    density.send_keys("0.3")
    click(driver, "#merge-btn")
    status = wait_for(driver, "#merge-status textarea", lambda e: "--merge-method ties --density 0.3" in
                      (e.get_attribute("value") or ""))
    got = download(driver, "merge-file", tmp_path / "ties_dl.safetensors")
    want = tmp_path / "ties_cli.safetensors"
    assert main(["merge", f"{a}:1", f"{b}:-0.5", "-o", str(want), "--method", "sv_fro", "--param", "0.95",
                 "--merge-method", "ties", "--density", "0.3", "-q"]) == 0
    assert got.read_bytes() == want.read_bytes(), status.get_attribute("value")
    driver.save_screenshot(str(tmp_path / "ui-merge-method.png"))
    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Convert").click()
    upload(driver, "convert-file", a)
    wait_for(driver, "#convert-file", lambda e: ".safetensors" in e.text)
    click(driver, "#convert-btn")  # the default layout: comfy
    got = download(driver, "convert-result", tmp_path / "converted_dl.safetensors")
    want = tmp_path / "converted_cli.safetensors"
    assert main(["convert", str(a), "-o", str(want), "--to", "comfy", "-q"]) == 0
    assert got.read_bytes() == want.read_bytes()
    driver.save_screenshot(str(tmp_path / "ui-convert.png"))


def test_pick_from_the_folder_resize_and_find_it_beside(page, driver, loras, tmp_path):
    from selenium.webdriver.common.keys import Keys
    src = loras / "style" / "picked.safetensors"
    driver.get(page)
    box = wait_for(driver, "#lora-pick input")
    box.click()
    box.send_keys("picked")
    option = wait_for(driver, "ul[role=listbox] li", lambda e: "style/picked.safetensors" in e.text)
    option.click()
    wait_for(driver, "#lora-pick input", lambda e: e.get_attribute("value") == "style/picked.safetensors")
    box = wait_for(driver, "#flags textarea, #flags input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("--method sv_ratio --param 4 --rank 6")
    click(driver, "#resize-btn")
    got = download(driver, "result-file", tmp_path / "downloaded.safetensors")
    want = tmp_path / "cli.safetensors"
    assert main(["resize", str(src), "-o", str(want), "--method", "sv_ratio", "--param", "4", "--rank", "6",
                 "-q"]) == 0
    assert got.read_bytes() == want.read_bytes() == (loras / "style" / "picked_resized.safetensors").read_bytes()
    assert f"saved as {loras / 'style' / 'picked_resized.safetensors'}" in value_of(driver, "status")
    driver.save_screenshot(str(tmp_path / "ui-picked.png"))
