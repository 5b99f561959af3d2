"""Many keys, one box: no key can fill the queue for the others, evict their results or steer
their A1111 model. Each attack is replayed over HTTP against a live server with several keys.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from app.api.a1111 import state as a1111_state
from app.api.a1111.state import A1111State
from app.registry import load_registry
from tests.conftest import body, write_models_file

KEY_A, KEY_B, KEY_C = "quota-key-a", "quota-key-b", "quota-key-c"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_body(key: str, **fields) -> dict:
    return body(token=key, steps=2, **fields)


def finished_job(c: httpx.Client, key: str, **fields) -> str:
    """POST /jobs for `key` and wait until the job is done: its id."""
    answer = c.post("/jobs", json=job_body(key, **fields))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 60
    while (state := c.get(f"/jobs/{job_id}", headers=bearer(key)).json())["status"] != "done":
        assert state["status"] in ("queued", "running"), state
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job_id


# ---- 3. one key steers another's model ---------------------------------------------------------
TWO_MODELS = ("models:\n  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
              "  tiny-sd15: {source: builtin:tiny-sd15}\n")


def test_one_key_cannot_steer_another_keys_a1111_options(make_server) -> None:
    server = make_server(TWO_MODELS, api_keys=[KEY_A, KEY_B])
    txt2img = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1}
    with server.client() as c:
        chosen = c.post("/sdapi/v1/options", headers=bearer(KEY_A),
                        json={"sd_model_checkpoint": "tiny-sd15", "CLIP_stop_at_last_layers": 2,
                              "a_big_unknown_key": "x" * 100_000})
        assert chosen.status_code == 200, chosen.text
        mine = c.get("/sdapi/v1/options", headers=bearer(KEY_A)).json()
        assert mine["sd_model_checkpoint"] == "tiny-sd15" and len(mine["a_big_unknown_key"]) == 100_000

        theirs = c.get("/sdapi/v1/options", headers=bearer(KEY_B)).json()
        assert theirs["sd_model_checkpoint"] == "tiny-sdxl" and "a_big_unknown_key" not in theirs
        assert theirs["CLIP_stop_at_last_layers"] == 1
        ran = c.post("/sdapi/v1/txt2img", headers=bearer(KEY_B), json=txt2img)
        assert ran.status_code == 200 and '"sd_model_name": "tiny-sdxl"' in ran.json()["info"]
        own = c.post("/sdapi/v1/txt2img", headers=bearer(KEY_A), json=txt2img)
        assert own.status_code == 200 and '"sd_model_name": "tiny-sd15"' in own.json()["info"]

        # overrides kept after a request (restore_afterwards false) stay the caller's too
        kept = {**txt2img, "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
                "override_settings_restore_afterwards": False}
        assert c.post("/sdapi/v1/txt2img", headers=bearer(KEY_B), json=kept).status_code == 200
        assert c.get("/sdapi/v1/options", headers=bearer(KEY_B)).json()["sd_model_checkpoint"] == "tiny-sd15"
        c.post("/sdapi/v1/options", headers=bearer(KEY_A), json={"sd_model_checkpoint": "tiny-sdxl"})
        assert c.get("/sdapi/v1/options", headers=bearer(KEY_B)).json()["sd_model_checkpoint"] == "tiny-sd15"


def test_option_sets_of_anonymous_callers_are_bounded(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys of the keys file keep their options; anonymous addresses' sets are bounded, the
    least recently used going back to the defaults."""
    monkeypatch.setattr(a1111_state, "MAX_ANONYMOUS_OPTION_SETS", 2)
    registry = load_registry(write_models_file(tmp_path, TWO_MODELS))
    state = A1111State(registry, is_key=lambda client: client.startswith("key-"))
    for client in ("key-1", "anonymous-a", "anonymous-b"):
        state.update(client, {"sd_model_checkpoint": "tiny-sd15"})
    state.of("anonymous-a")  # used lately
    state.update("anonymous-c", {"CLIP_stop_at_last_layers": 3})
    views = {c: state.options(c)["sd_model_checkpoint"]
             for c in ("key-1", "anonymous-a", "anonymous-b", "anonymous-c", "key-2")}
    assert views == {"key-1": "tiny-sd15", "anonymous-a": "tiny-sd15", "anonymous-b": "tiny-sdxl",
                     "anonymous-c": "tiny-sdxl", "key-2": "tiny-sdxl"}
    assert state.options("anonymous-c")["CLIP_stop_at_last_layers"] == 3
