"""The job API (POST /jobs, GET /jobs/{id}, /events, /image, DELETE) over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from app.api.job_tracker import TrackedJob, publish
from app.auth import key_label
from tests.conftest import API_KEY, body
from tests.test_engine import HeldWorker, wait_for

OTHER_KEY = "other-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


@pytest.fixture(scope="module")
def jobs_server(make_server):
    return make_server(api_keys=[API_KEY, OTHER_KEY], job_max_subscribers=2, max_batch=1)


def read_events(client, job_id: str, headers: dict | None = None) -> list[tuple[int, str, dict]]:
    """Every event of the stream until the server closes it: (id, event, data)."""
    events, current = [], {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers={**AUTH, **(headers or {})}) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                name, _, value = line.partition(":")
                current[name] = value.strip()
            elif not line and "event" in current:
                events.append((int(current["id"]), current["event"], json.loads(current["data"])))
                current = {}
    return events


def test_a_job_from_queued_to_done(jobs_server):
    with jobs_server.client() as c:
        answer = c.post("/jobs", json=body(steps=3, width=72, height=64))
        assert answer.status_code == 202, answer.text
        made = answer.json()
        job_id = made["id"]
        base = jobs_server.url
        assert made == {"id": job_id, "status_url": f"{base}/jobs/{job_id}",
                        "events_url": f"{base}/jobs/{job_id}/events",
                        "image_url": f"{base}/jobs/{job_id}/image"}

        events = read_events(c, job_id)
        names = [name for _, name, _ in events]
        assert names[0] == "queued" and names[-1] == "done"
        assert names.count("started") == 1 and names.index("started") < names.index("progress")
        steps = [data["step"] for _, name, data in events if name == "progress"]
        assert steps == sorted(steps) and steps[-1] == 3
        assert all(data["steps"] == 3 for _, name, data in events if name == "progress")
        ids = [number for number, _, _ in events]
        assert ids == list(range(1, len(ids) + 1))
        done = events[-1][2]
        assert done["image_url"] == made["image_url"] and done["seed"] == 1234
        assert (done["width"], done["height"]) == (72, 64)

        state = c.get(f"/jobs/{job_id}", headers=AUTH).json()
        assert state == {"id": job_id, "status": "done", "queue_position": None, "step": 3,
                         "steps": 3, "eta_s": None, "seed": 1234, "error": None,
                         "image_url": made["image_url"]}
        image = c.get(f"/jobs/{job_id}/image", headers=AUTH)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        png = Image.open(io.BytesIO(image.content))
        assert png.size == (72, 64) and "Seed: 1234" in png.info["parameters"]

        # A late subscriber gets the whole story; Last-Event-ID resumes after it.
        assert [name for _, name, _ in read_events(c, job_id)] == names
        last = ids[-1]
        resumed = read_events(c, job_id, {"Last-Event-ID": str(last - 1)})
        assert [(n, name) for n, name, _ in resumed] == [(last, "done")]
        assert read_events(c, job_id, {"Last-Event-ID": str(last)}) == []

        # DELETE after done: 409 naming the state; nothing changes.
        gone = c.delete(f"/jobs/{job_id}", headers=AUTH)
        assert gone.status_code == 409
        assert gone.json()["error"]["message"] == gone.json()["detail"]
        assert "already done" in gone.json()["detail"]
        assert c.get(f"/jobs/{job_id}", headers=AUTH).json()["status"] == "done"

        # Another key's job and an unknown id: 404 on every route, the same words.
        for method, path in [("GET", ""), ("GET", "/events"), ("GET", "/image"), ("DELETE", "")]:
            for job, headers in [(job_id, OTHER), ("job-nope", AUTH)]:
                answer = c.request(method, f"/jobs/{job}{path}", headers=headers)
                assert answer.status_code == 404, (method, path, answer.text)
                assert answer.json()["detail"] == f"no job with id '{job}' for this API key"
        # No key at all: 403.
        assert c.get(f"/jobs/{job_id}").status_code == 403


def test_queue_position_counts_every_keys_waiting_jobs(jobs_server):
    """Behind a held worker, one key queues 3 jobs, then another key 1: the keys take turns,
    so the other key's job runs 2nd and the first key's last one 4th, in the engine's answer
    and in GET /jobs/{id}."""
    engine = jobs_server.app.state.engine
    held = HeldWorker(engine.workers[0])
    try:
        with jobs_server.client() as c:
            blocker = c.post("/jobs", json=body(seed=1)).json()["id"]
            wait_for(lambda: held.worker.running)
            mine = [c.post("/jobs", json=body(seed=s)).json()["id"] for s in (2, 3, 4)]
            theirs = c.post("/jobs", json=body(seed=5, token=OTHER_KEY)).json()["id"]
            assert all(re.fullmatch(r"job-[0-9a-f]{24}", i) for i in [blocker, *mine, theirs])
            waiting = engine.waiting(key_label(API_KEY))
            assert [job.id for job in waiting] == mine
            (other,) = engine.waiting(key_label(OTHER_KEY))
            assert [engine.queue_position(job) for job in [*waiting, other]] == [1, 3, 4, 2]

            def positions() -> list[int | None]:
                return [c.get(f"/jobs/{job_id}", headers=headers).json()["queue_position"]
                        for job_id, headers in [*((m, AUTH) for m in mine), (theirs, OTHER)]]

            wait_for(lambda: positions() == [1, 3, 4, 2], timeout=10)  # the watcher's tick
            assert c.get(f"/jobs/{blocker}", headers=AUTH).json()["queue_position"] is None
            held.release()
            for job_id, headers in [(blocker, {}), *((m, {}) for m in mine), (theirs, OTHER)]:
                assert read_events(c, job_id, headers)[-1][1] == "done"
    finally:
        held.restore()


def test_cancel_queued_and_running_jobs(jobs_server):
    with jobs_server.client() as c:
        long = c.post("/jobs", json=body(steps=30, width=512, height=512, seed=1)).json()["id"]
        queued = c.post("/jobs", json=body(steps=30, width=512, height=512, seed=2)).json()["id"]
        state = c.get(f"/jobs/{queued}", headers=AUTH).json()
        assert state["status"] == "queued"

        # The subscriber cap (2 in this server): a third subscriber is refused with 503.
        with c.stream("GET", f"/jobs/{long}/events", headers=AUTH) as one, \
                c.stream("GET", f"/jobs/{long}/events", headers=AUTH) as two:
            assert one.status_code == two.status_code == 200
            third = c.get(f"/jobs/{long}/events", headers=AUTH)
            assert third.status_code == 503 and third.headers["retry-after"]
            assert "CRAFTSERVE_JOB_MAX_SUBSCRIBERS" in third.json()["detail"]

        cancelled = c.delete(f"/jobs/{queued}", headers=AUTH)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = c.delete(f"/jobs/{queued}", headers=AUTH)  # DELETE twice: the same answer
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        assert [name for _, name, _ in read_events(c, queued)] == ["queued", "cancelled"]

        # The long job runs (it was first); cancel it while it runs.
        events = []
        with c.stream("GET", f"/jobs/{long}/events", headers=AUTH) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                if events and events[-1] == "progress" and "cancel" not in events:
                    events.append("cancel")
                    assert c.delete(f"/jobs/{long}", headers=AUTH).json()["status"] == "cancelled"
        assert events[-1] == "cancelled" and "started" in events
        assert c.get(f"/jobs/{long}", headers=AUTH).json()["status"] == "cancelled"
        image = c.get(f"/jobs/{long}/image", headers=AUTH)
        assert image.status_code == 409 and "is cancelled" in image.json()["detail"]
        # The worker stopped the job: the server serves the next one.
        after = c.post("/jobs", json=body(steps=2)).json()["id"]
        assert read_events(c, after)[-1][1] == "done"


def test_a_bad_body_is_answered_like_sd(jobs_server):
    with jobs_server.client() as c:
        answer = c.post("/jobs", json=body(model="nope"))
        assert answer.status_code == 422
        assert "doesn't have model 'nope'" in answer.json()["detail"]


def test_a_slow_subscriber_loses_progress_never_the_end():
    """publish() never waits: a full subscriber queue drops progress (and previews); a final
    event replaces the oldest queued one."""
    loop = asyncio.new_event_loop()
    try:
        tracked = TrackedJob(id="job-x", client="c", job=SimpleNamespace())  # type: ignore[arg-type]
        slow: asyncio.Queue = asyncio.Queue(maxsize=2)
        fast: asyncio.Queue = asyncio.Queue(maxsize=100)
        tracked.subscribers |= {slow, fast}
        publish(tracked, "started", {})
        for step in range(1, 11):
            publish(tracked, "progress", {"step": step})
        publish(tracked, "done", {})
        assert [slow.get_nowait()[0:2] for _ in range(slow.qsize())] == [(2, "progress"),
                                                                          (12, "done")]
        assert fast.qsize() == 12
        assert len(tracked.events) == 12
    finally:
        loop.close()


def test_previews_are_small_pngs_of_the_latents(jobs_server):
    """previews: true → `preview` events every CRAFTSERVE_PREVIEW_EVERY (5) steps, each a PNG
    of the latents: 1/8 of the image's size."""
    with jobs_server.client() as c:
        job_id = c.post("/jobs", json=body(steps=10, width=128, height=64, previews=True)).json()["id"]
        events = read_events(c, job_id)
        previews = [data for _, name, data in events if name == "preview"]
        assert previews and {p["step"] for p in previews} <= {5, 10}
        for data in previews:
            image = Image.open(io.BytesIO(base64.b64decode(data["png_base64"])))
            assert image.format == "PNG" and image.size == (16, 8) and image.mode == "RGB"
        assert events[-1][1] == "done"
        plain = c.post("/jobs", json=body(steps=10, width=128, height=64)).json()["id"]
        assert "preview" not in [name for _, name, _ in read_events(c, plain)]


def test_approx_cheap_is_the_linear_projection():
    """A latent that is 1 in one channel and 0 elsewhere maps to that channel's row of the
    matrix, scaled from [-1, 1] to [0, 255]."""
    import torch

    from app.engine.previews import SD15_LATENT_RGB, SDXL_LATENT_RGB, approx_cheap

    for sdxl, table in [(True, SDXL_LATENT_RGB), (False, SD15_LATENT_RGB)]:
        for channel in range(4):
            latents = torch.zeros(4, 2, 3)
            latents[channel] = 1.0
            rgb = approx_cheap(latents, sdxl)
            assert rgb.shape == (2, 3, 3) and rgb.dtype == torch.uint8
            expected = [int(max(0, min(255, (v + 1) * 127.5))) for v in table[channel]]
            assert rgb[1, 2].tolist() == expected


def test_the_page_is_served_without_a_key(jobs_server):
    """GET / is the playground: HTML that loads only its own script and links to /docs."""
    with jobs_server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'href="/docs"' in page.text and '<script src="/static/app.js">' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing external
        script = c.get("/static/app.js")
        assert script.status_code == 200 and "/jobs" in script.text


def test_cancelling_a_batched_job_leaves_its_companion_unharmed(make_server):
    """Two compatible jobs run as one batch (a blocker holds the worker while both queue);
    cancelling one while it runs leaves the other's bytes equal to the same request alone."""
    server = make_server(max_batch=2, batch_window_ms=1000)
    with server.client() as c:
        blocker = c.post("/jobs", json=body(steps=8, width=256, height=256, seed=9)).json()["id"]
        doomed = c.post("/jobs", json=body(steps=6, seed=1)).json()["id"]
        kept = c.post("/jobs", json=body(steps=6, seed=2)).json()["id"]
        with c.stream("GET", f"/jobs/{doomed}/events", headers=AUTH) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: progress"):
                    assert c.delete(f"/jobs/{doomed}", headers=AUTH).json()["status"] == "cancelled"
                if line.startswith("event: cancelled"):
                    break
        assert read_events(c, blocker)[-1][1] == "done"
        done = read_events(c, kept)[-1]
        assert done[1] == "done" and done[2]["batch_size"] == 2
        assert c.get(f"/jobs/{doomed}", headers=AUTH).json()["status"] == "cancelled"
        batched = c.get(f"/jobs/{kept}/image", headers=AUTH)
        alone = c.post("/sd", json=body(steps=6, seed=2))
        assert batched.status_code == alone.status_code == 200
        assert Image.open(io.BytesIO(batched.content)).tobytes() == \
            Image.open(io.BytesIO(alone.content)).tobytes()


def test_an_expired_job_says_so(make_server):
    """Past CRAFTSERVE_JOB_TTL_S a finished job answers 404 naming the expiry and the setting,
    on every route; to another key it is still just unknown."""
    server = make_server(api_keys=[API_KEY, OTHER_KEY], job_ttl_s=0.001)
    with server.client() as c:
        c.post("/jobs", json=body(steps=8, width=256, height=256))  # holds the worker meanwhile
        job_id = c.post("/jobs", json=body(steps=2)).json()["id"]
        assert read_events(c, job_id)[-1][1] == "done"  # subscribed while it waits
        for method, path in [("GET", ""), ("GET", "/image"), ("GET", "/events"), ("DELETE", "")]:
            answer = c.request(method, f"/jobs/{job_id}{path}", headers=AUTH)
            assert answer.status_code == 404
            assert answer.json()["detail"] == (
                f"job '{job_id}' expired: finished jobs and their images are kept 0.001 s "
                "(setting CRAFTSERVE_JOB_TTL_S), and a key's newest 2500 finished jobs at most "
                "(setting CRAFTSERVE_MAX_TRACKED_JOBS_PER_KEY)")
        other = c.get(f"/jobs/{job_id}", headers=OTHER)
        assert other.json()["detail"] == f"no job with id '{job_id}' for this API key"
