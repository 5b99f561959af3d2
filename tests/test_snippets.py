"""The page's "Copy as curl" and "Copy as Python" (app/static/snippets.js), run for real.

A prompt with a quote once produced a curl command that ran another command when pasted, and
the Python copy held `"sampler": undefined`. Here the page's own JavaScript (under node, or
Chromium when node is missing) writes the snippets for hostile prompts; the curl command runs
in `bash -c` with a stub `curl` that records its argv, and the Python snippet runs with a stub
`requests`: each must send exactly the body the page sent, and run nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SNIPPETS = Path(__file__).resolve().parents[1] / "app" / "static" / "snippets.js"
NODE = shutil.which("node")
ORIGIN = "http://127.0.0.1:8000"

HOSTILE = [
    "it's a 'quoted' prompt",
    "$(touch PWNED-subst) and ${HOME} and $HOME",
    "`touch PWNED-backtick`",
    "'; touch PWNED-break; echo '",
    "line one\nline two\r\n\tend\\n \\' \\\\",
    'double "quotes" and \\" escapes',
    "unicode: ünïcødé 🎨 \u2028 \u0000 \u001b[31m",
    "'\"'\"'$(touch PWNED-mixed)'\"",
]


def _render(cases: list[dict]) -> list[dict]:
    """Each case's {curl, python} as the page's JavaScript writes them. A case's `undefined`
    lists fields set to undefined, as the page's form sets an empty sampler."""
    program = (
        "const s = require(process.argv[1]);"
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const out = cases.map((c) => { const b = c.body;"
        "  for (const k of c.undefined || []) b[k] = undefined;"
        "  return {curl: s.curlCommand(c.origin, b), python: s.pythonSnippet(c.origin, b)}; });"
        "process.stdout.write(JSON.stringify(out));"
    )
    if NODE:
        done = subprocess.run([NODE, "-e", program, str(SNIPPETS)], input=json.dumps(cases),
                              capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)
    return _render_in_chromium(cases)


def _render_in_chromium(cases: list[dict]) -> list[dict]:  # pragma: no cover - node is usual
    chromium = os.environ.get("CRAFTSERVE_CHROMIUM") or shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not chromium or sync_playwright is None:
        pytest.skip("neither node nor Chromium with Playwright to run the page's JavaScript")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox"])
        page = browser.new_page()
        page.add_script_tag(content=SNIPPETS.read_text(encoding="utf-8"))
        out = page.evaluate(
            """(cases) => cases.map((c) => { const b = c.body;
                 for (const k of c.undefined || []) b[k] = undefined;
                 return {curl: craftSnippets.curlCommand(c.origin, b),
                         python: craftSnippets.pythonSnippet(c.origin, b)}; })""", cases)
        browser.close()
    return out


def _body(prompt: str, negative: str = "") -> dict:
    return {"model": "tiny-sdxl", "prompt": prompt, "negative_prompt": negative, "steps": 4,
            "width": 64, "height": 64, "cfg_scale": 7.5, "seed": -1, "previews": True,
            "loras": {"it's-a-lora": 0.5}}


@pytest.fixture()
def sandbox(tmp_path: Path) -> dict:
    """A folder to run in, a `curl` stub that writes its argv as JSON, a `requests` stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.environ['ARGV_FILE'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    curl.chmod(curl.stat().st_mode | stat.S_IEXEC)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "requests.py").write_text(
        "import json, os\n"
        "class _Answer:\n"
        "    content = b'PNG'\n"
        "    def raise_for_status(self):\n"
        "        pass\n"
        "def post(url, json=None, **kwargs):\n"
        "    import json as j\n"
        "    open(os.environ['CALLS_FILE'], 'a').write(j.dumps({'url': url, 'json': json}) + '\\n')\n"
        "    return _Answer()\n")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               ARGV_FILE=str(tmp_path / "argv.jsonl"), CALLS_FILE=str(tmp_path / "calls.jsonl"),
               PYTHONPATH=str(stubs))
    return {"env": env, "work": work, "argv": tmp_path / "argv.jsonl",
            "calls": tmp_path / "calls.jsonl"}


def _no_side_effects(work: Path) -> None:
    assert sorted(p.name for p in work.iterdir() if p.name != "image.png") == []


def test_copy_as_curl_survives_any_prompt_and_runs_nothing_else(sandbox) -> None:
    cases = [{"origin": ORIGIN, "body": _body(p, HOSTILE[(i + 3) % len(HOSTILE)]),
              "undefined": ["sampler"]} for i, p in enumerate(HOSTILE)]
    rendered = _render(cases)
    for case, snippet in zip(cases, rendered, strict=True):
        command = snippet["curl"]
        sandbox["argv"].unlink(missing_ok=True)
        done = subprocess.run(["bash", "-c", command], cwd=sandbox["work"], env=sandbox["env"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (command, done.stderr)
        calls = sandbox["argv"].read_text().splitlines()
        assert len(calls) == 1, (command, calls)  # curl ran once, nothing else ran
        argv = json.loads(calls[0])
        assert argv[:4] == ["-X", "POST", f"{ORIGIN}/jobs", "-H"]
        assert "Authorization: Bearer YOUR_KEY" in argv and "Content-Type: application/json" in argv
        sent = json.loads(argv[argv.index("--data-binary") + 1])
        assert sent == case["body"]  # every field as the page sent it (the undefined one left out)
        assert sent["prompt"] == case["body"]["prompt"]
        _no_side_effects(sandbox["work"])
    # the same in a POSIX sh, where the page's users may paste too
    if shutil.which("dash"):
        done = subprocess.run(["dash", "-c", rendered[3]["curl"]], cwd=sandbox["work"],
                              env=sandbox["env"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        _no_side_effects(sandbox["work"])


def test_copy_as_python_is_valid_python_with_the_same_body(sandbox) -> None:
    cases = [{"origin": ORIGIN, "body": _body(p), "undefined": ["sampler"]} for p in HOSTILE]
    cases.append({"origin": ORIGIN, "body": {**_body("flags"), "sampler": "Euler a", "hires": None,
                                             "tiling": False, "nested": [1, True, None, {"a": [False]}]}})
    for case, snippet in zip(cases, _render(cases), strict=True):
        code = snippet["python"]
        assert "undefined" not in code and "null" not in code.replace('"null"', "")
        sandbox["calls"].unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-c", code], cwd=sandbox["work"], env=sandbox["env"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (code, done.stderr)
        (call,) = [json.loads(line) for line in sandbox["calls"].read_text().splitlines()]
        expected = {"token": "YOUR_KEY", **{k: v for k, v in case["body"].items() if k != "previews"}}
        assert call == {"url": f"{ORIGIN}/sd", "json": expected}
        assert (sandbox["work"] / "image.png").read_bytes() == b"PNG"
        (sandbox["work"] / "image.png").unlink()
        _no_side_effects(sandbox["work"])
