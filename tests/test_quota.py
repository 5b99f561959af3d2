"""Many keys, one box: no key can fill the queue for the others, evict their results or steer
their A1111 model. Each attack is replayed over HTTP against a live server with several keys.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.api.a1111 import state as a1111_state
from app.api.a1111.state import A1111State
from app.auth import key_label
from app.config import Settings
from app.registry import load_registry
from tests.conftest import body, png, write_models_file
from tests.test_engine import HeldWorker, wait_for

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


# ---- 1. one key fills the queue for everyone ---------------------------------------------------
def test_settings_give_each_key_a_quarter_of_each_whole_and_refuse_more_than_the_whole() -> None:
    assert Settings().max_queue_per_key == 16
    assert Settings(max_queue=2, image_store_mb=1, max_tracked_jobs=3).max_queue_per_key == 1
    for share, whole in (("max_queue_per_key", "max_queue"),):
        with pytest.raises(ValueError, match=f"CRAFTSERVE_{share.upper()} .* CRAFTSERVE_{whole.upper()}"):
            Settings(**{whole: 4, share: 5})


def test_one_key_cannot_fill_the_queue_for_everyone(make_server) -> None:
    """Key A floods POST /jobs behind a held worker: past its share (a quarter of MAX_QUEUE=8,
    2 waiting) it is answered 429 with Retry-After in every dialect, while key B still gets in."""
    server = make_server(api_keys=[KEY_A, KEY_B], max_queue=8, max_batch=1)
    held = HeldWorker(server.app.state.engine.workers[0])
    try:
        with server.client() as c, ThreadPoolExecutor(2) as pool:
            answers = [c.post("/jobs", json=job_body(KEY_A, seed=1))]
            wait_for(lambda: held.worker.running)  # A's first job runs: it takes no room in the queue
            while answers[-1].status_code == 202 and len(answers) < 10:
                answers.append(c.post("/jobs", json=job_body(KEY_A, seed=len(answers) + 1)))
            assert [a.status_code for a in answers] == [202, 202, 202, 429]
            refused = answers[-1]
            assert int(refused.headers["retry-after"]) >= 1
            detail = refused.json()["detail"]
            assert refused.json()["error"]["message"] == detail
            assert "CRAFTSERVE_MAX_QUEUE_PER_KEY" in detail and "share of the queue is 2" in detail
            assert "users can" not in detail  # the VisionCraft wrapper would misread it as a rate limit

            # every dialect refuses A the same way, in its own shape
            sd = c.post("/sd", json=job_body(KEY_A))
            assert sd.status_code == 429 and int(sd.headers["retry-after"]) >= 1
            assert "CRAFTSERVE_MAX_QUEUE_PER_KEY" in sd.json()["error"]["message"]
            a1111 = c.post("/sdapi/v1/txt2img", headers=bearer(KEY_A),
                           json={"prompt": "a", "steps": 2, "width": 64, "height": 64})
            assert a1111.status_code == 429 and int(a1111.headers["retry-after"]) >= 1
            assert a1111.json()["error"] == "KeyQueueFull"
            assert "CRAFTSERVE_MAX_QUEUE_PER_KEY" in a1111.json()["detail"]
            openai = c.post("/v1/images/generations", headers=bearer(KEY_A),
                            json={"model": "tiny-sdxl", "prompt": "a", "size": "64x64", "steps": 2})
            assert openai.status_code == 429 and int(openai.headers["retry-after"]) >= 1
            error = openai.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "key_queue_full")
            assert "x-should-retry" not in openai.headers
            assert len(server.app.state.engine.queue) == 2  # none of the refused got in

            # B still finds room: a tracked job, and a request that waits for its image
            other = c.post("/jobs", json=job_body(KEY_B, seed=7))
            assert other.status_code == 202, other.text
            waiting_sd = pool.submit(c.post, "/sd", json=job_body(KEY_B, seed=8))
            wait_for(lambda: len(server.app.state.engine.queue) == 4)
            held.release()
            png(waiting_sd.result())
            for job_id in [a.json()["id"] for a in answers[:-1]] + [other.json()["id"]]:
                key = KEY_B if job_id == other.json()["id"] else KEY_A
                wait_for(lambda j=job_id, k=key: c.get(f"/jobs/{j}", headers=bearer(k)).json()["status"]
                         == "done")
            # the share frees as A's jobs start: A is served again
            assert c.post("/jobs", json=job_body(KEY_A, seed=20)).status_code == 202
    finally:
        held.restore()


def test_a_keys_own_share_and_the_anonymous_share(make_server) -> None:
    """`queue=N` in a key's entry is its own share; anonymous callers (one label per address)
    get the setting's; a request bigger than the whole share goes in when nothing waits."""
    keyed = make_server(api_keys=[f"{KEY_A}  queue=1", KEY_B], max_queue=8, max_queue_per_key=3,
                        max_batch=1)
    anonymous = make_server(api_keys=[], allow_anonymous=True, max_queue=8, max_queue_per_key=1,
                            max_batch=1)
    for server, key, share in ((keyed, KEY_A, 1), (keyed, KEY_B, 3), (anonymous, "", 1)):
        held = HeldWorker(server.app.state.engine.workers[0])
        try:
            with server.client() as c:
                answers = [c.post("/jobs", json=job_body(key))]
                wait_for(lambda h=held: h.worker.running)
                answers += [c.post("/jobs", json=job_body(key)) for _ in range(share + 1)]
                assert [a.status_code for a in answers] == [202] * (share + 1) + [429], key
                assert f"share of the queue is {share} jobs" in answers[-1].json()["detail"]
                held.release()
                label = key_label(key) if key else "anonymous-127.0.0.1"
                wait_for(lambda s=server, label=label: not s.app.state.engine.jobs_of(label))
        finally:
            held.restore()
    with anonymous.client() as c:  # 3 images, share 1: nothing of this caller waits, so it goes in
        many = c.post("/generate", json=body(token="", steps=2, image_count=3))
        assert many.status_code == 200 and len(many.json()["images"]) == 3


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
