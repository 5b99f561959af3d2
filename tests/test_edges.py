"""One credential path for every route (app.api.credentials), state built with the app, and
A1111's chosen checkpoint after a reload that removes it."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest

from app.api.credentials import Unreadable, header_key
from tests.conftest import API_KEY, body, png
from tests.test_engine import HeldWorker, wait_for

APP = Path(__file__).resolve().parent.parent / "app"
BEARER = {"Authorization": f"Bearer {API_KEY}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"anyone:{API_KEY}".encode()).decode()}


def test_header_schemes() -> None:
    assert header_key(None) is None and header_key("  ") is None
    assert header_key(f"Bearer {API_KEY}") == API_KEY
    assert header_key("bearer   ") is None
    assert header_key(BASIC["Authorization"]) == API_KEY
    no_colon = "Basic " + base64.b64encode(API_KEY.encode()).decode()
    assert header_key(no_colon) == API_KEY  # a credential without a colon is the key
    user_only = "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()
    assert header_key(user_only) == API_KEY  # an empty password: the user name is the key
    assert isinstance(header_key("Basic not*base64"), Unreadable)
    assert isinstance(header_key("Digest abc"), Unreadable)


PUBLIC = re.compile(r"^/(health|ready|metrics|internal/ping|docs.*|openapi\.json|redoc|$|static.*|images/.*|"
                    r"v1/images/files/.*|sd/.*|image/(models|loras|samplers).*|models.*|samplers.*|"
                    r"schedulers-xl|loras.*|img2img/(schedulers|refiners))")


def test_every_route_that_needs_a_key_reads_it_one_way(server) -> None:
    """Every route outside the public list (discovery, health, stored images by their random
    key, the page) depends on `caller` (its OpenAPI operation names caller's two schemes); no
    code but app.api.credentials asks the Authenticator who calls."""
    doc = httpx.get(server.url + "/openapi.json").json()
    checked = []
    for path, operations in doc["paths"].items():
        if PUBLIC.match(path):
            continue
        for operation in operations.values():
            schemes = {name for item in operation.get("security", []) for name in item}
            assert schemes == {"craftserve_bearer", "craftserve_basic"}, (path, schemes)
        checked.append(path)
    assert {"/sd", "/jobs", "/jobs/{job_id}", "/admin/reload", "/sdapi/v1/txt2img",
            "/v1/images/generations", "/v1/models"} <= set(checked)
    # one extractor per scheme, one place that asks the Authenticator, one client address
    sources = {path: path.read_text(encoding="utf-8") for path in APP.rglob("*.py")}
    for needle in (".authenticate(", "request.client.host", "== \"bearer\"", "== \"basic\""):
        users = [str(p.relative_to(APP)) for p, text in sources.items() if needle in text]
        assert users == ["api/credentials.py"], (needle, users)
    assert not [p for p, text in sources.items() if "query_params" in text and "token" in text]


def test_each_way_of_sending_the_key_works_on_every_dialect(server) -> None:
    with server.client() as c:
        for headers in (BEARER, BASIC):
            png(c.post("/sd", json={k: v for k, v in body().items() if k != "token"}, headers=headers))
            assert c.get("/sdapi/v1/options", headers=headers).status_code == 200
            assert c.get("/v1/models", headers=headers).status_code == 200
        job = c.post("/jobs", json=body(steps=2)).json()["id"]  # the body token
        for headers in (BEARER, BASIC):
            assert c.get(f"/jobs/{job}", headers=headers).status_code == 200
        # a wrong key: each dialect's own answer, no challenge where its clients expect none
        wrong = {"Authorization": "Bearer nope"}
        assert c.get(f"/jobs/{job}", headers=wrong).status_code == 403
        a1111 = c.get("/sdapi/v1/options", headers=wrong)
        assert a1111.status_code == 401 and a1111.headers["www-authenticate"] == "Basic"
        openai = c.get("/v1/models", headers=wrong)
        assert openai.status_code == 401 and openai.headers["www-authenticate"] == "Bearer"
        vc = c.post("/sd", json=body(token="nope"))
        assert vc.status_code == 403 and "www-authenticate" not in vc.headers
        # a header that carries no key at all is named as such
        digest = c.get(f"/jobs/{job}", headers={"Authorization": "Digest abc"})
        assert digest.status_code == 403 and "neither" in digest.json()["detail"]


def test_a_key_in_the_url_is_not_read(server) -> None:
    with server.client() as c:
        job = c.post("/jobs", json=body(steps=2)).json()["id"]
        for path in (f"/jobs/{job}", f"/jobs/{job}/events", f"/jobs/{job}/image"):
            answer = c.get(path, params={"token": API_KEY})
            assert answer.status_code == 403, (path, answer.text)
            assert "Missing API key" in answer.json()["detail"]


def test_state_is_built_with_the_app(make_server) -> None:
    """Job ids a client is given are unguessable; A1111's options and the job tracker exist
    before the first request (a second app has its own)."""
    one, two = make_server(), make_server()
    for server in (one, two):
        assert server.app.state.a1111 is not None and server.app.state.jobs is not None
    assert one.app.state.a1111 is not two.app.state.a1111
    assert one.app.state.jobs is not two.app.state.jobs


def test_progress_forgets_a_job_the_job_api_cancelled(make_server) -> None:
    server = make_server()
    held = HeldWorker(server.app.state.engine.workers[0])
    try:
        with server.client() as c:
            job = c.post("/jobs", json=body(steps=4)).json()["id"]
            wait_for(lambda: held.worker.running)  # running, held before its first step
            busy = c.get("/sdapi/v1/progress", headers=BEARER).json()
            assert busy["state"]["job"] == job and busy["state"]["job_count"] == 1
            assert c.delete(f"/jobs/{job}", headers=BEARER).json()["status"] == "cancelled"
            # the worker has not let go of it yet; for its client the job is over
            assert held.worker.running
            idle = c.get("/sdapi/v1/progress", headers=BEARER).json()
            assert idle["state"]["job_count"] == 0 and idle["progress"] == 0
            held.release()
            wait_for(lambda: not held.worker.running)
    finally:
        held.restore()


@pytest.fixture()
def two_models(make_server, tmp_path: Path):
    models = tmp_path / "models.yaml"
    first = "models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
    models.write_text(first + "  tiny-sd15: {source: builtin:tiny-sd15}\n", encoding="utf-8")
    server = make_server(models.read_text(encoding="utf-8"), api_keys=[f"{API_KEY}  admin"])
    return server, server.app.state.settings.models, first


def test_a1111_checkpoint_removed_by_a_reload_is_a_clear_422(two_models) -> None:
    server, models_file, first = two_models
    txt2img = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1}
    with server.client() as c:
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"},
                      headers=BEARER).status_code == 200
        ran = c.post("/sdapi/v1/txt2img", json=txt2img, headers=BEARER)
        assert ran.status_code == 200 and '"sd_model_name": "tiny-sd15"' in ran.json()["info"]

        Path(models_file).write_text(first, encoding="utf-8")
        assert c.post("/admin/reload", headers=BEARER).json()["removed"] == ["tiny-sd15"]
        for answer in (c.post("/sdapi/v1/txt2img", json=txt2img, headers=BEARER),
                       c.get("/sdapi/v1/embeddings", headers=BEARER)):
            assert answer.status_code == 422, answer.text
            detail = answer.json()["detail"]
            assert "tiny-sd15" in detail and "reload" in detail and "tiny-sdxl" in detail
        assert c.get("/sdapi/v1/options", headers=BEARER).json()["sd_model_checkpoint"] == "tiny-sd15"
        # an override names a served model: it runs; choosing one again mends the options
        override = {**txt2img, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
        assert c.post("/sdapi/v1/txt2img", json=override, headers=BEARER).status_code == 200
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"},
                      headers=BEARER).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json=txt2img, headers=BEARER).status_code == 200


def test_the_default_checkpoint_follows_the_models_file(two_models) -> None:
    """Until a client chooses one, A1111's checkpoint is the first model of models.yaml as it
    is now."""
    server, models_file, _ = two_models
    with server.client() as c:
        assert c.get("/sdapi/v1/options", headers=BEARER).json()["sd_model_checkpoint"] == "tiny-sdxl"
        Path(models_file).write_text("models:\n  tiny-sd15: {source: builtin:tiny-sd15}\n"
                                     "  tiny-sdxl: {source: builtin:tiny-sdxl}\n", encoding="utf-8")
        c.post("/admin/reload", headers=BEARER)
        assert c.get("/sdapi/v1/options", headers=BEARER).json()["sd_model_checkpoint"] == "tiny-sd15"
        assert httpx.codes.is_success(c.get("/sdapi/v1/embeddings", headers=BEARER).status_code)


def test_each_limit_is_defined_once() -> None:
    """A limit (MAX_*, MIN_*, DEFAULT_CFG, the name and shown lengths) is assigned in one module
    of app/, and the checks every dialect shares are written once (app.api.rules)."""
    import ast

    where: dict[str, list[str]] = {}
    functions: dict[str, list[str]] = {}
    for path in APP.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                names = [t.id for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                         if isinstance(t, ast.Name)]
                for name in names:
                    if re.fullmatch(r"(MAX|MIN)_[A-Z_]+|DEFAULT_CFG|SHOWN_CHARS", name):
                        where.setdefault(name, []).append(str(path.relative_to(APP)))
            if isinstance(node, ast.FunctionDef) and re.fullmatch(r"_?(shown|check_\w+|in_range)", node.name):
                functions.setdefault(node.name.lstrip("_"), []).append(str(path.relative_to(APP)))
    assert {"MAX_SEED", "MIN_SIDE", "MAX_NAME_LENGTH", "DEFAULT_CFG", "MAX_CFG"} <= set(where)
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
    assert {name: paths for name, paths in functions.items() if len(paths) > 1} == {}
    assert functions["shown"] == ["errors.py"] and functions["check_range"] == ["api/rules.py"]
