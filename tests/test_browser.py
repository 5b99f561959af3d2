"""The playground page in headless Chromium (Debian's package, driven by Playwright with
executable_path): key, prompt, generate, progress, image, cancel, a server error by its field.
Screenshots of each state go to test-artifacts/browser/ (git-ignored).

Without Chromium (or Playwright) the module is skipped with one line, except where
CRAFTSERVE_REQUIRE_BROWSER=1 (.ci/run sets it after installing Chromium): then it fails."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import API_KEY

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CRAFTSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None
MISSING = ("no Chromium (apt-get install chromium)" if not CHROMIUM
           else "no Playwright (pip install playwright)" if sync_playwright is None else "")
if MISSING:
    if os.environ.get("CRAFTSERVE_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"the browser test must run here but there is {MISSING}")
    pytest.skip(f"browser test skipped: {MISSING}", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def browser_page(make_server, browser):
    server = make_server(max_batch=1)
    page = browser.new_page(viewport={"width": 390, "height": 900})  # phone width
    page.goto(server.url + "/")
    yield page
    page.close()


def wait_until(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JavaScript expression until it is true. Playwright's wait_for_function evaluates
    its predicate with eval() inside the page, which the page's policy (no 'unsafe-eval')
    refuses; page.evaluate is not subject to it."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {timeout:g} s: {expression}"
        time.sleep(0.05)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_form(page, *, steps: int, size: int) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#steps", str(steps))
    page.fill("#seed", "1")


def test_the_page_end_to_end(browser_page):
    page = browser_page
    jobs_posted = []
    page.on("request", lambda r: r.url.endswith("/jobs") and jobs_posted.append(r))
    wait_until(page, "document.querySelector('#model').options.length > 0")
    assert page.locator("#model option").first.text_content() == "tiny-sdxl"
    assert page.get_attribute("a[href='/docs']", "href") == "/docs"

    # No key: nothing is sent, the page says why.
    fill_form(page, steps=6, size=64)
    assert page.input_value("#size") == "64x64"  # the preset follows width and height
    page.click("#go")
    assert page.text_content("#err-body") == "enter your API key first"
    assert jobs_posted == []
    shot(page, "1-no-key")

    page.fill("#key", API_KEY)
    page.keyboard.press("Enter")  # the key form submits from the keyboard
    assert page.text_content("#keystate") == "key saved"
    page.uncheck("#previews")
    page.click("#go")
    wait_until(page, "document.querySelector('#bar').value > 0")  # a progress event
    shot(page, "2-progress")
    page.wait_for_selector("#result:not([hidden])")
    wait_until(page, "document.querySelector('#result').naturalWidth > 0")
    size = page.evaluate("[document.querySelector('#result').naturalWidth,"
                         " document.querySelector('#result').naturalHeight]")
    assert size == [64, 64]
    assert "Seed: 1" in page.text_content("#info") and "Size: 64x64" in page.text_content("#info")
    assert page.text_content("#status") == "done"
    shot(page, "3-done")

    # A long job, cancelled while it runs.
    fill_form(page, steps=30, size=512)
    page.click("#go")
    wait_until(page, "document.querySelector('#status').textContent.startsWith('step')")
    page.click("#cancel")
    wait_until(page, "document.querySelector('#status').textContent === 'cancelled'")
    shot(page, "4-cancelled")

    # A bad value: the server's message next to the field it names.
    fill_form(page, steps=99, size=64)
    page.click("#go")
    wait_until(page, "document.querySelector('#err-steps').textContent.length > 0")
    assert page.text_content("#err-steps").startswith("This server doesn't have steps 99")
    shot(page, "5-bad-value")


def test_the_page_and_docs_work_under_their_content_security_policy(server, browser):
    """The page and /docs load everything they need from this server under its policy
    (scripts, styles, connections: 'self'), with no violation and no request elsewhere."""
    violations, elsewhere, errors = [], [], []
    page = browser.new_page()
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("request", lambda r: r.url.startswith(("data:", "blob:", server.url))
            or elsewhere.append(r.url))
    page.add_init_script("document.addEventListener('securitypolicyviolation', (e) =>"
                         " (window.__violations = window.__violations || []).push("
                         "e.violatedDirective + ' ' + e.blockedURI))")
    answer = page.goto(server.url + "/")
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    wait_until(page, "document.querySelector('#model').options.length > 0")
    drop_style = "getComputedStyle(document.querySelector('#drop')).borderStyle"
    assert page.evaluate(drop_style) == "dashed"  # app.css applies
    assert page.evaluate("typeof craftSnippets.curlCommand") == "function"
    violations += page.evaluate("window.__violations || []")

    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30000)  # Swagger UI rendered the operations
    assert page.locator(".opblock").count() > 20
    assert "craftserve" in page.text_content(".info .title")
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    violations += page.evaluate("window.__violations || []")
    page.close()
    assert violations == []
    assert elsewhere == []
    assert [e for e in errors if "Content Security Policy" in e] == []


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url_image(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_the_page_inpaints_a_painted_mask_on_a_wide_screen(make_server, browser):
    """A picture through the file input fills width and height; a mouse stroke on the canvas
    becomes the mask sent (white where painted); the job answers an image of the picture's size
    whose pixels far from the stroke are the picture's own, shown large beside the form."""
    server = make_server(max_batch=1)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    posted = []
    page.on("request", lambda r: r.url.endswith("/jobs") and r.method == "POST" and posted.append(r))
    page.goto(server.url + "/")
    wait_until(page, "document.querySelector('#model').options.length > 0")
    page.fill("#key", API_KEY)
    page.keyboard.press("Enter")

    # The size preset follows the width and height inputs, both ways.
    page.select_option("#size", "512x512")
    assert (page.input_value("#width"), page.input_value("#height")) == ("512", "512")
    page.fill("#width", "64")
    page.fill("#height", "64")
    assert page.input_value("#size") == "64x64"
    page.fill("#width", "72")
    assert page.input_value("#size") == ""  # custom

    rng = np.random.default_rng(7)
    source = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    page.set_input_files("#file", files=[{"name": "source.png", "mimeType": "image/png",
                                          "buffer": _png_bytes(source)}])
    page.wait_for_selector("#canvaswrap:not([hidden])")
    wait_until(page, "document.querySelector('#source').naturalWidth === 96")
    assert (page.input_value("#width"), page.input_value("#height")) == ("96", "64")
    assert page.input_value("#size") == ""

    # One stroke across the middle, with the mouse; then a clear, invert twice: the same mask.
    page.fill("#brush", "40")
    page.locator("#mask").scroll_into_view_if_needed()
    box = page.locator("#mask").bounding_box()
    assert box["width"] > 300  # the picture is shown large enough to paint on

    def to_screen(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * box["width"] / 96, box["y"] + y * box["height"] / 64

    page.mouse.move(*to_screen(5, 5))
    page.mouse.down()
    page.mouse.move(*to_screen(10, 5), steps=3)
    page.mouse.up()
    page.click("#clearmask")
    assert page.evaluate("maskPainted()") is False
    page.mouse.move(*to_screen(30, 32))
    page.mouse.down()
    page.mouse.move(*to_screen(66, 32), steps=8)
    page.mouse.up()
    page.click("#invertmask")
    page.click("#invertmask")
    page.fill("#strength", "1")
    assert page.text_content("#strengthval") == "1.00"
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "3")
    page.fill("#seed", "5")
    page.uncheck("#previews")
    shot(page, "6-mask-painted")
    page.click("#go")
    page.wait_for_selector("#result:not([hidden])", timeout=120000)
    wait_until(page, "document.querySelector('#result').naturalWidth > 0")
    shot(page, "7-inpainted")

    sent = json.loads(posted[-1].post_data)
    assert sent["strength"] == 1 and sent["inpaint_full_res"] is False and sent["mask_blur"] == 4
    assert np.array_equal(np.asarray(_data_url_image(sent["init_image"]).convert("RGB")),
                          np.asarray(source))
    mask = np.asarray(_data_url_image(sent["mask"]).convert("L"))
    assert mask.shape == (64, 96)
    # the stroke: 40 screen px wide, so about 40 * 96 / box width canvas px; its middle is white
    assert mask[32, 35:62].min() == 255
    assert mask[:5].max() == 0 and mask[:, :12].max() == 0 and mask[:, 86:].max() == 0
    rows, cols = np.nonzero(mask)
    assert rows.min() > 20 and rows.max() < 44  # the cleared first stroke left nothing

    size = page.evaluate("[document.querySelector('#result').naturalWidth,"
                         " document.querySelector('#result').naturalHeight]")
    assert size == [96, 64]
    assert page.locator("#result").bounding_box()["width"] > 300  # not shown 96 px wide
    form, output = page.locator("#gen").bounding_box(), page.locator("#output").bounding_box()
    assert output["x"] >= form["x"] + form["width"]  # beside the form, not under it
    job_id = page.get_attribute("#download", "download").removesuffix(".png")
    with server.client() as c:  # the page's blob: URL is its own; the same image by its job
        answer = c.get(f"/jobs/{job_id}/image", headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200
    result = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))
    # mask_blur 4: a 21-tap kernel reaches 10 pixels past the painted area
    near = np.zeros(mask.shape, dtype=bool)
    near[max(0, rows.min() - 11):rows.max() + 12, max(0, cols.min() - 11):cols.max() + 12] = True
    assert np.array_equal(result[~near], np.asarray(source)[~near])
    painted = mask == 255
    assert np.mean(np.any(result[painted] != np.asarray(source)[painted], axis=-1)) > 0.9
    page.close()


def test_the_page_sends_a_controlnet_unit_and_gets_its_image(make_server, browser, tmp_path_factory):
    """The ControlNet pickers fill from /controlnet/model_list and module_list with the saved
    key; a control picture and a picked model send one unit through POST /jobs, and the image
    is diffusers' ControlNet pipeline's on the same tiny weights."""
    from tests.controlnet_files import save_folder, tiny_controlnet
    from tests.test_controlnet import arr, close, direct

    folder = tmp_path_factory.mktemp("page-controlnets")
    net = tiny_controlnet("sdxl")
    save_folder(net, folder / "cn-xl")
    server = make_server(f'models:\n  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}\n'
                         f'controlnet_dirs: ["{folder}"]\n', max_batch=1)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    posted = []
    page.on("request", lambda r: r.url.endswith("/jobs") and r.method == "POST" and posted.append(r))
    page.goto(server.url + "/")
    wait_until(page, "document.querySelector('#model').options.length > 0")
    assert page.locator("#cnmodel option").count() == 1  # no key yet: nothing asked
    page.fill("#key", API_KEY)
    page.keyboard.press("Enter")
    wait_until(page, "document.querySelector('#cnmodel').options.length > 1")
    wait_until(page, "document.querySelector('#cnmodule').options.length > 1")
    models = page.eval_on_selector_all("#cnmodel option", "os => os.map(o => o.value)")
    assert models[0] == "" and models[1].startswith("cn-xl [")
    modules = page.eval_on_selector_all("#cnmodule option", "os => os.map(o => o.value)")
    assert modules[0] == "none" and "canny" in modules and modules.count("none") == 1

    rng = np.random.default_rng(5)
    control = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    page.set_input_files("#controlfile", files=[{"name": "pose.png", "mimeType": "image/png",
                                                 "buffer": _png_bytes(control)}])
    page.wait_for_selector("#controlpreview:not([hidden])")
    page.select_option("#cnmodel", models[1])
    page.select_option("#cnmodule", "none")
    page.fill("#cnweight", "0.8")
    page.fill("#prompt", "a lighthouse")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "5")
    page.fill("#cfg_scale", "5")
    page.fill("#seed", "11")
    page.select_option("#sampler", "Euler")
    page.uncheck("#previews")
    shot(page, "8-controlnet")
    page.click("#go")
    page.wait_for_selector("#result:not([hidden])", timeout=120000)
    wait_until(page, "document.querySelector('#result').naturalWidth > 0")
    shot(page, "9-controlnet-done")

    sent = json.loads(posted[-1].post_data)
    (unit,) = sent["controlnet"]
    assert (unit["model"], unit["module"], unit["weight"]) == (models[1], "none", 0.8)
    assert (unit["guidance_start"], unit["guidance_end"]) == (0, 1)
    assert np.array_equal(np.asarray(_data_url_image(unit["image"]).convert("RGB")), np.asarray(control))
    job_id = page.get_attribute("#download", "download").removesuffix(".png")
    with server.client() as c:
        answer = c.get(f"/jobs/{job_id}/image", headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200
    got = arr(Image.open(io.BytesIO(answer.content)))
    close(got, direct("sdxl", net, image=control, controlnet_conditioning_scale=0.8))
    assert page.is_hidden("#py")  # the /sd snippet cannot carry a unit

    # No model picked: no unit is sent.
    page.select_option("#cnmodel", "")
    page.click("#go")
    wait_until(page, "document.querySelector('#status').textContent === 'done'"
                     " && document.querySelectorAll('#history img').length === 2")
    assert "controlnet" not in json.loads(posted[-1].post_data)
    page.close()
