"""The web page (/ and /ui) and the API docs (/docs) in a real headless Chromium, against a real
`bentoml serve`: upload a JPEG and see the labels, toggle the attention map, upload a text file
and see the error; and nothing is ever fetched from anywhere but the service.

Needs Debian's chromium (`apt-get install -y chromium`; `.ci/run` installs it) and the
`playwright` package, which drives that binary: no browser download.
Run alone: `.venv/bin/pytest tests/test_ui_browser.py -q` (VIT_UI_SCREENSHOT=docs/ui.png also
saves the page's screenshot there).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

expect = pytest.importorskip("playwright.sync_api", reason="the dev extra: pip install -e '.[dev]'").expect


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium: apt-get install -y chromium (.ci/run does)")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def url(tiny_model_server) -> str:
    return tiny_model_server[0]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    """A fresh page that records every URL it requests."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    yield page
    context.close()


def assert_only_local(requested: list[str], url: str) -> None:
    outside = [u for u in requested if not u.startswith((url + "/", "blob:", "data:")) and u != url]
    assert requested and not outside, outside


def _jpeg(path: Path) -> Path:
    from training.demo_data import draw_image

    draw_image("triangle", np.random.default_rng(7)).save(path, quality=90)
    return path


def test_page_classifies_explains_and_reports_errors(page, url, tmp_path: Path) -> None:
    jpeg, text = _jpeg(tmp_path / "triangle.jpg"), tmp_path / "notes.txt"
    text.write_text("this is not an image")
    expected = httpx.post(f"{url}/classify", files={"image": jpeg.read_bytes()}).json()["predictions"]

    page.goto(url + "/")
    # expect() waits without evaluating a string in the page: the page's CSP forbids eval
    expect(page.locator("#model")).to_contain_text("4 classes", timeout=60_000)
    assert "vit-classifier" in page.text_content("#model")
    assert page.text_content("#classes") == "Classes: circle, square, triangle, star"

    page.set_input_files("#file", str(jpeg))
    page.wait_for_selector("#labels li >> nth=3")
    labels = page.locator("#labels .label").all_text_contents()
    assert labels == [p["label"] for p in expected]
    assert page.is_visible("#preview") and not page.is_visible("#overlay")

    page.wait_for_selector("#toggle:enabled")
    page.check("#toggle")
    page.wait_for_selector("#overlay", state="visible")
    size = page.evaluate("[document.getElementById('overlay').naturalWidth, document.getElementById('overlay').naturalHeight]")
    assert size[0] > 0 and size[1] > 0 and not page.is_visible("#preview")
    shot = Path(os.environ.get("VIT_UI_SCREENSHOT") or tmp_path / "ui.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000
    page.uncheck("#toggle")
    assert page.is_visible("#preview") and not page.is_visible("#overlay")

    page.set_input_files("#file", str(text))
    page.wait_for_selector("#error", state="visible")
    assert "notes.txt: not a recognised image format" in page.text_content("#error")
    assert page.locator("#labels li").count() == 0
    assert page.is_visible("body")
    assert_only_local(page.requested, url)
    assert any(u.endswith("/explain") for u in page.requested) and any(u.endswith("/classify") for u in page.requested)


def test_ui_path_serves_the_same_page(page, url) -> None:
    page.goto(url + "/ui")
    expect(page.locator("#model")).to_contain_text("classes", timeout=60_000)
    assert page.title() == "vit-service"
    assert_only_local(page.requested, url)


def test_api_docs_are_local_and_ours(page, url) -> None:
    page.goto(url + "/docs")
    page.wait_for_selector(".information-container .title")
    title = page.text_content(".information-container .title")
    assert "vit-service" in title and "0.1.0" in title
    page.wait_for_selector("text=/explain")
    assert "Google" not in page.content()
    assert_only_local(page.requested, url)


@pytest.mark.slow  # a second server with keys and a browser (~55 s); API keys over HTTP stay fast in test_auth.py
def test_page_asks_for_the_api_key_once(browser, keyed_model_server, tmp_path: Path) -> None:
    """With API keys on (conftest.keyed_model_server), the page's first call gets a 401: it asks for
    the key, refuses a wrong one, keeps the right one in this tab's sessionStorage and sends it
    from then on, also after a reload."""
    from conftest import API_KEYS

    url, _ = keyed_model_server
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(url + "/")
        page.wait_for_selector("#keyform", state="visible")
        assert "needs an API key" in page.text_content("#keymsg")
        page.fill("#key", "not-the-key")
        page.click("#keyform button")
        page.locator("#keymsg", has_text="refused").wait_for()
        assert page.is_visible("#keyform") and "wrong API key" in page.text_content("#keymsg")
        page.fill("#key", API_KEYS[0])
        page.click("#keyform button")
        page.locator("#model", has_text="4 classes").wait_for(timeout=30_000)
        assert not page.is_visible("#keyform")
        assert page.evaluate("sessionStorage.getItem('vit-api-key')") == API_KEYS[0]

        page.set_input_files("#file", str(_jpeg(tmp_path / "triangle.jpg")))
        page.wait_for_selector("#labels li >> nth=3")
        page.wait_for_selector("#toggle:enabled")  # /explain answered too, with the key

        page.reload()  # same tab: the key is still there, no second prompt
        page.locator("#model", has_text="4 classes").wait_for(timeout=30_000)
        assert not page.is_visible("#keyform")
    finally:
        context.close()
    assert_only_local(requested, url)


def _picture(path: Path, shape: str, seed: int) -> bytes:
    from training.demo_data import draw_image

    draw_image(shape, np.random.default_rng(seed)).save(path, quality=90)
    return path.read_bytes()


# Hands the page a File made from the given bytes, as a drop on #drop or a paste on the document
# (what the browser does for a dragged file or Ctrl+V of a copied image).
_DROP = """([bytes, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/jpeg" }));
  const drop = document.getElementById("drop");
  drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
  const over = drop.classList.contains("over");
  drop.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  return [over, drop.classList.contains("over")];
}"""
_PASTE = """([bytes, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/jpeg" }));
  document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
}"""


# A fingerprint of the overlay as the page shows it (drawn to a canvas), to compare with the
# server's own /explain PNG for a method: a weighted sum of every RGBA byte.
_OVERLAY_FINGERPRINT = """() => {
  const img = document.getElementById("overlay");
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 0; i < d.length; i++) s += d[i] * ((i % 7) + 1);
  return [c.width, c.height, s];
}"""


def _served_overlay(url: str, data: bytes, method: str) -> list[int]:
    from PIL import Image

    r = httpx.post(f"{url}/explain", files={"image": ("x.jpg", data, "image/jpeg")},
                   data={"format": "png", "method": method}, timeout=60)
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(r.content)) as img:
        rgba = np.asarray(img.convert("RGBA"), np.int64)
    weights = (np.arange(rgba.size) % 7) + 1
    return [rgba.shape[1], rgba.shape[0], int((rgba.reshape(-1) * weights).sum())]


def test_drag_paste_and_method_switch(page, url, tmp_path: Path) -> None:
    dropped, pasted = _picture(tmp_path / "a.jpg", "triangle", 3), _picture(tmp_path / "b.jpg", "circle", 4)
    expected = {name: [p["label"] for p in httpx.post(f"{url}/classify", files={"image": data}).json()["predictions"]]
                for name, data in (("dropped.jpg", dropped), ("pasted.jpg", pasted))}
    overlays = {(name, m): _served_overlay(url, data, m) for name, data in (("dropped", dropped), ("pasted", pasted))
                for m in ("rollout", "grad")}
    assert overlays[("dropped", "rollout")] != overlays[("dropped", "grad")]  # the methods' maps differ
    page.goto(url + "/")
    expect(page.locator("#model")).to_contain_text("4 classes", timeout=60_000)

    # Drag and drop: the zone lights up while a file is over it, and the dropped file is classified.
    assert page.evaluate(_DROP, [list(dropped), "dropped.jpg"]) == [True, False]
    expect(page.locator("#status")).to_have_text("Top 4 for dropped.jpg", timeout=60_000)
    assert page.locator("#labels .label").all_text_contents() == expected["dropped.jpg"]
    page.wait_for_selector("#toggle:enabled")  # its attention map (rollout, the default) arrived
    page.check("#toggle")
    assert page.evaluate(_OVERLAY_FINGERPRINT) == overlays[("dropped", "rollout")]

    # Method switch: choosing the gradient method explains the same image again with it.
    rollout_src = page.get_attribute("#overlay", "src")
    page.select_option("#method", "grad")
    expect(page.locator("#overlay")).not_to_have_attribute("src", rollout_src, timeout=60_000)
    page.wait_for_selector("#toggle:enabled")
    assert page.is_visible("#overlay")
    assert page.evaluate(_OVERLAY_FINGERPRINT) == overlays[("dropped", "grad")]

    # Paste: a file on the clipboard is classified, and explained with the method chosen.
    page.evaluate(_PASTE, [list(pasted), "pasted.jpg"])
    expect(page.locator("#status")).to_have_text("Top 4 for pasted.jpg", timeout=60_000)
    assert page.locator("#labels .label").all_text_contents() == expected["pasted.jpg"]
    page.wait_for_selector("#toggle:enabled")
    assert page.evaluate(_OVERLAY_FINGERPRINT) == overlays[("pasted", "grad")]
    assert_only_local(page.requested, url)
