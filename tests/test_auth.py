"""API keys: body token or Bearer header, constant-time check, generated key, anonymous."""

from __future__ import annotations

import httpx

from app.auth import Authenticator, bearer_token, key_label
from tests.conftest import API_KEY, TINY_MODELS, body, png


def test_missing_token_is_403(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(token=...))
    assert answer.status_code == 403
    assert "Missing API key" in answer.json()["detail"]


def test_wrong_token_is_403(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(token="not-the-key"))
    assert answer.status_code == 403
    assert answer.json() == {"detail": "Invalid API key", "error": {"message": "Invalid API key"}}
    assert "not-the-key" not in answer.text


def test_bearer_header_is_accepted(client: httpx.Client) -> None:
    answer = client.post("/sd", json=body(token=...),
                         headers={"Authorization": f"Bearer {API_KEY}"})
    png(answer)
    wrong = client.post("/sd", json=body(token=...), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_keys_file_and_env_style_list(make_server, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalpha-key\n\nbeta-key\n", encoding="utf-8")
    server = make_server(TINY_MODELS, api_keys=["env-key"], api_keys_file=keys)
    with server.client() as c:
        for key in ("env-key", "alpha-key", "beta-key"):
            png(c.post("/sd", json=body(token=key)))
        assert c.post("/sd", json=body(token="# team keys")).status_code == 403


def test_no_key_configured_makes_one_random_key(make_server) -> None:
    server = make_server(TINY_MODELS, api_keys=[])
    generated = server.app.state.auth.generated_key
    assert generated and len(generated) >= 24
    with server.client() as c:
        assert c.post("/sd", json=body(token=...)).status_code == 403
        assert c.post("/sd", json=body(token=API_KEY)).status_code == 403
        png(c.post("/sd", json=body(token=generated)))


def test_allow_anonymous_is_the_explicit_opt_in(make_server) -> None:
    server = make_server(TINY_MODELS, api_keys=[], allow_anonymous=True)
    assert server.app.state.auth.generated_key is None
    with server.client() as c:
        png(c.post("/sd", json=body(token=...)))


def test_labels_never_contain_the_key() -> None:
    auth = Authenticator(["s3cret-key"])
    label = auth.authenticate("s3cret-key")
    assert label == key_label("s3cret-key") and "s3cret" not in label
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer   ") is None
