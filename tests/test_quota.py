"""Many keys, one box: no key can fill the queue for the others, evict their results or steer
their A1111 model. Each attack is replayed over HTTP against a live server with several keys.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from app.api.a1111 import state as a1111_state
from app.api.a1111.state import A1111State
from app.api.job_tracker import JobTracker, TrackedJob
from app.auth import key_label
from app.config import Settings
from app.imaging import ImageStore
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
    settings = Settings()
    assert (settings.max_queue_per_key, settings.image_store_mb_per_key,
            settings.max_tracked_jobs_per_key) == (16, 64, 2500)
    assert Settings(max_queue=2, image_store_mb=1, max_tracked_jobs=3).max_queue_per_key == 1
    for share, whole in (("max_queue_per_key", "max_queue"), ("image_store_mb_per_key", "image_store_mb"),
                         ("max_tracked_jobs_per_key", "max_tracked_jobs")):
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


# ---- 2. one key evicts another's results -------------------------------------------------------
def test_one_key_cannot_evict_another_keys_jobs_or_images(make_server) -> None:
    """Tracked jobs are bounded per key (2) and in all (8), images per key and in all: key A's
    flood of jobs and images makes A forget its own oldest, never B's job or image URLs."""
    server = make_server(api_keys=[KEY_A, KEY_B], max_tracked_jobs=8, max_tracked_jobs_per_key=2)
    store: ImageStore = server.app.state.images
    settings = server.app.state.settings
    assert (store.max_bytes, store.max_bytes_per_key) == (settings.image_store_mb * 2**20,
                                                          settings.image_store_mb_per_key * 2**20)
    with server.client() as c:
        b_job = finished_job(c, KEY_B, seed=1)
        b_urls = c.post("/generate", json=job_body(KEY_B, seed=2, image_count=2)).json()["images"]
        b_openai = c.post("/v1/images/generations", headers=bearer(KEY_B), json={
            "model": "tiny-sdxl", "prompt": "a", "size": "64x64", "steps": 2, "response_format": "url"})
        b_file = b_openai.json()["data"][0]["url"]
        size = len(c.get(b_urls[0]).content)
        # budgets in images of this size: 3 per key, 8 in all (B holds 4 from before)
        store.max_bytes_per_key, store.max_bytes = int(size * 3.5), int(size * 8.5)
        a_jobs = [finished_job(c, KEY_A, seed=10 + i) for i in range(12)]
        a_urls = [c.post("/generate", json=job_body(KEY_A, seed=30 + i)).json()["images"][0]
                  for i in range(6)]

        assert c.get(f"/jobs/{b_job}", headers=bearer(KEY_B)).json()["status"] == "done"
        png(c.get(f"/jobs/{b_job}/image", headers=bearer(KEY_B)))
        for url in [*b_urls, b_file]:
            assert c.get(url).status_code == 200, url
        # A lost its own oldest, and only those
        gone = c.get(f"/jobs/{a_jobs[0]}", headers=bearer(KEY_A))
        assert gone.status_code == 404 and "CRAFTSERVE_MAX_TRACKED_JOBS_PER_KEY" in gone.json()["detail"]
        assert [c.get(f"/jobs/{j}", headers=bearer(KEY_A)).status_code for j in a_jobs[-2:]] == [200, 200]
        assert [c.get(url).status_code for url in a_urls] == [404] * 3 + [200] * 3
        assert store.bytes_of(key_label(KEY_A)) <= store.max_bytes_per_key


def test_past_the_whole_the_key_holding_the_most_loses(make_server) -> None:
    """Keys each within their own budget fill the whole: the key with the most finished jobs
    (and images) forgets its oldest; a key under its fair share loses nothing."""
    server = make_server(api_keys=[KEY_A, KEY_B, KEY_C], max_tracked_jobs=5, max_tracked_jobs_per_key=4)
    store: ImageStore = server.app.state.images
    with server.client() as c:
        b_job = finished_job(c, KEY_B, seed=1)
        b_image = c.get(f"/jobs/{b_job}/image", headers=bearer(KEY_B))
        store.max_bytes = int(len(b_image.content) * 5.5)  # room for 5 images in all
        a_jobs = [finished_job(c, KEY_A, seed=10 + i) for i in range(4)]
        c_jobs = [finished_job(c, KEY_C, seed=20 + i) for i in range(2)]
        statuses = {name: [c.get(f"/jobs/{j}", headers=bearer(key)).status_code for j in jobs]
                    for name, key, jobs in (("a", KEY_A, a_jobs), ("b", KEY_B, [b_job]),
                                            ("c", KEY_C, c_jobs))}
        assert statuses == {"a": [404, 404, 200, 200], "b": [200], "c": [200, 200]}
        assert c.get(f"/jobs/{b_job}/image", headers=bearer(KEY_B)).content == b_image.content
        assert c.get(f"/jobs/{c_jobs[0]}/image", headers=bearer(KEY_C)).status_code == 200


def test_a_tracker_never_forgets_a_job_of_a_key_under_its_fair_share() -> None:
    """Past the whole, another key's queued and running jobs (bounded by the queue, not the
    tracker) never make a key under its fair share forget a finished job."""
    tracker = JobTracker(Settings(max_tracked_jobs=4, max_tracked_jobs_per_key=4))

    def track(job_id: str, client: str, finished: bool) -> None:
        tracked = TrackedJob(id=job_id, client=client, job=SimpleNamespace())  # type: ignore[arg-type]
        tracked.finished_at = time.monotonic() if finished else None
        tracker.add(tracked)

    track("b1", "B", True)
    track("b2", "B", True)
    for i in range(4):
        track(f"a{i}", "A", i == 0)  # A's first finished, then three still queued
    assert list(tracker.jobs) == ["b1", "b2", "a1", "a2", "a3"]  # A (3 > 4/2) lost a0, B (2) nothing
    track("a4", "A", False)
    assert list(tracker.jobs) == ["b1", "b2", "a1", "a2", "a3", "a4"]  # nothing fair left to forget
    assert tracker.expired == {"a0": "A"}


def test_an_image_store_never_drops_a_key_under_its_fair_share() -> None:
    store = ImageStore(100, 40)
    a = [store.put(b"a" * 10, owner="A") for _ in range(6)]
    b = store.put(b"b" * 10, owner="B")
    assert [store.get(k) is not None for k in a] == [False, False, True, True, True, True]
    for owner in "CDEFG":
        for _ in range(2):
            store.put(b"c" * 10, owner=owner)
    # past the whole, the biggest paid: A first, then the others above 100/7 bytes; B never
    assert store._bytes <= 100 and store.get(b) is not None
    assert [store.bytes_of(owner) for owner in "ABCDEFG"] == [10, 10, 10, 10, 20, 20, 20]
    huge = store.put_many([b"h" * 80, b"h" * 80], owner="B")  # bigger than the store: all kept
    assert all(store.get(k) is not None for k in huge) and store.get(b) is None  # B's own budget
    # the others each keep at least their fair share; the bound is passed by B's answer only
    assert [store.bytes_of(owner) for owner in "ACDEFG"] == [10] * 6
    assert store._bytes == 160 + 60


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
