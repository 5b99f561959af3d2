"""The playground page in headless Chromium (Debian's package, driven by Playwright with
executable_path): key, prompt, generate, progress, image, cancel, a server error by its field.
Screenshots of each state go to test-artifacts/browser/ (git-ignored).

Without Chromium (or Playwright) the module is skipped with one line, except where
CRAFTSERVE_REQUIRE_BROWSER=1 (.ci/run sets it after installing Chromium): then it fails."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

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
    assert page.evaluate("getComputedStyle(document.body).maxWidth") == "760px"  # app.css
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
