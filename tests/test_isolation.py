"""Many keys, one box: one key's request can neither fail another key's job in its batch nor cost
far more than its size.

Each test replays an attack over HTTP against a live server with two keys, A (`API_KEY`) and B
(`OTHER_KEY`), and shows it no longer works: the attacker's request is refused or fails on its
own, quickly, in its dialect's shape; the other key's jobs batched with it get their images,
byte for byte those of the same requests run alone (`solo`, a server that never batches).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from app.api.rules import MAX_NAME_LENGTH
from tests.conftest import API_KEY, LiveServer, body, png
from tests.test_engine import HeldWorker, wait_for

OTHER_KEY = "other-key-456"
A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}
JSON = {"Content-Type": "application/json"}
LONE = "x \ud800 y"  # a lone surrogate: valid JSON as the escape \ud800, not valid Unicode
A1111 = {"prompt": "a lighthouse at dusk", "steps": 4, "width": 64, "height": 64, "seed": 5}
OPENAI = {"prompt": "a lighthouse at dusk", "model": "tiny-sdxl", "size": "64x64", "steps": 4, "seed": 5}
SMALL = 2048  # bytes an error answer stays under, whatever the request quoted


@pytest.fixture(scope="module")
def server(make_server) -> LiveServer:
    return make_server(api_keys=[API_KEY, OTHER_KEY], max_batch=4, batch_window_ms=200)


@pytest.fixture(scope="module")
def solo(make_server) -> LiveServer:
    return make_server(api_keys=[API_KEY, OTHER_KEY], max_batch=1)


def raw(value: object) -> bytes:
    """JSON text for `value`, lone surrogates written as \\u escapes (httpx's json= cannot)."""
    return json.dumps(value).encode("ascii")


def held(server: LiveServer, requests: list[tuple[str, dict, dict]], queued: int
         ) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Post each (path, headers, body) while the worker is held on a first job. Exactly
    `queued` of them go to the queue (they batch once the worker is released); the others must
    be answered while it is still held, so they never reached it. (answered at once, queued)."""
    worker = HeldWorker(server.app.state.engine.workers[0])
    queue = server.app.state.engine.queue
    try:
        with server.client() as c, ThreadPoolExecutor(len(requests) + 1) as pool:
            blocker = pool.submit(c.post, "/sd", json=body(seed=1))
            wait_for(lambda: worker.worker.running)
            futures: list[Future] = [pool.submit(c.post, path, headers={**JSON, **headers}, content=raw(b))
                                     for path, headers, b in requests]
            wait_for(lambda: len(queue) == queued and sum(not f.done() for f in futures) == queued)
            at_once = [f.result() for f in futures if f.done()]
            waiting = [f for f in futures if not f.done()]
            worker.release()
            png(blocker.result())
            return at_once, [f.result() for f in waiting]
    finally:
        worker.restore()


def solo_image(solo: LiveServer, fields: dict) -> bytes:
    with solo.client() as c:
        answer = c.post("/sd", json=fields)
    png(answer)
    assert answer.headers["x-batch-size"] == "1"
    return answer.content


def message(answer: httpx.Response) -> str:
    """The error message of any dialect's shape."""
    data = answer.json()
    if answer.request.url.path.startswith("/v1/"):
        return data["error"]["message"]
    return data["detail"]


# ---- 1a. text that is not Unicode is refused before it is queued, in every dialect ----------
NOT_UNICODE = [
    ("/sd", body(prompt=LONE), "prompt"),
    ("/sd", body(negative_prompt=LONE), "negative_prompt"),
    ("/sd", body(model=LONE), "model"),
    ("/sd", body(loras={LONE: 0.5}), f"loras.{LONE.encode('utf-8', 'backslashreplace').decode()}"),
    ("/generate-xl", body(prompt=LONE, image_count=2), "prompt"),
    ("/jobs", body(prompt=LONE), "prompt"),
    ("/sdapi/v1/txt2img", {**A1111, "prompt": LONE}, "prompt"),
    ("/sdapi/v1/txt2img", {**A1111, "override_settings": {"sd_vae": LONE}}, "override_settings.sd_vae"),
    ("/sdapi/v1/txt2img", {**A1111, "styles": ["ok", LONE]}, "styles.1"),
    ("/sdapi/v1/options", {"some_option": {"kept": [1, LONE]}}, "some_option.kept.1"),
    ("/v1/images/generations", {**OPENAI, "prompt": LONE}, "prompt"),
    ("/v1/images/generations", {**OPENAI, "user": LONE}, "user"),  # a field ignored otherwise
    ("/v1/images/generations", {**OPENAI, "model": LONE}, "model"),
]


@pytest.mark.parametrize(("path", "fields", "field"), NOT_UNICODE)
def test_text_that_is_not_unicode_is_422_naming_its_path_in_every_dialect(
        server: LiveServer, path: str, fields: dict, field: str) -> None:
    with server.client() as c:
        answer = c.post(path, headers={**JSON, **A}, content=raw(fields))
    assert answer.status_code == (400 if path.startswith("/v1/") else 422), answer.text
    assert len(answer.content) < SMALL
    text = message(answer)
    assert text.startswith(f"This server doesn't have {field} "), text
    assert "lone surrogate (\\ud800)" in text
    if path.startswith("/v1/"):
        assert answer.json()["error"]["param"] == field
    elif path.startswith("/sdapi/"):
        assert answer.json()["error"] == "InvalidParameter"
    else:
        assert answer.json()["error"]["message"] == text


def test_a_surrogate_in_raw_utf8_bytes_is_refused_too(server: LiveServer) -> None:
    # The JSON parser decodes bytes with surrogatepass: ED A0 80 is the same lone surrogate.
    content = raw(body(prompt="x PLACE")).replace(b"PLACE", b"\xed\xa0\x80")
    with server.client() as c:
        answer = c.post("/sd", headers=JSON, content=content)
    assert answer.status_code == 422, answer.text
    assert message(answer).startswith("This server doesn't have prompt ")


def test_a_surrogate_pair_is_text_like_any_other(server: LiveServer) -> None:
    with server.client() as c:
        png(c.post("/sd", headers=JSON, content=raw(body(prompt="a lighthouse \U0001F30A"))))


def test_a_prompt_that_is_not_unicode_cannot_fail_another_keys_job(server: LiveServer,
                                                                   solo: LiveServer) -> None:
    """The attack: key A's prompt with a lone surrogate was batched with key B's request and
    the tokenizer failed the whole batch (B got 500). Now A's requests are answered 422 at
    once, on every route, while the worker is still busy; B's job runs as if alone."""
    theirs = body(token=OTHER_KEY, seed=21, prompt="a harbour at night")
    attacks = [("/sd", A, body(prompt=LONE, seed=22)), ("/jobs", A, body(prompt=LONE, seed=23)),
               ("/sdapi/v1/txt2img", A, {**A1111, "prompt": LONE}),
               ("/v1/images/generations", A, {**OPENAI, "prompt": LONE})]
    at_once, (answer,) = held(server, [("/sd", B, theirs), *attacks], queued=1)
    assert sorted(a.status_code for a in at_once) == [400, 422, 422, 422]
    assert answer.content == solo_image(solo, theirs)


# ---- 1b. a job that fails inside a batch fails alone ----------------------------------------
MARKER = "marker-of-the-failing-job"


class Boom(RuntimeError):
    pass


@pytest.fixture()
def failing_marker(server: LiveServer):
    """The pipeline raises for any call whose prompts include MARKER; the calls' sizes."""
    pipe = server.app.state.engine.workers[0].models["tiny-sdxl"].pipe
    original = type(pipe).__call__
    calls: list[int] = []

    def fragile(self, *args, **kwargs):
        prompts = kwargs.get("prompt") or []
        calls.append(len(prompts))
        if any(MARKER in p for p in prompts):
            raise Boom("injected fault for one job's prompt")
        return original(self, *args, **kwargs)

    type(pipe).__call__ = fragile
    yield calls
    type(pipe).__call__ = original


def test_a_job_that_fails_in_a_batch_fails_alone(server: LiveServer, solo: LiveServer,
                                                 failing_marker: list[int]) -> None:
    """Key A's job makes the pipeline raise; it is batched with three ordinary jobs, two of
    them key B's. The batch is run again in halves: the three get the images they get alone,
    only A's failing job gets the 500, naming its own job id."""
    fields = [body(token=OTHER_KEY, seed=31, prompt="a harbour at night"),
              body(token=OTHER_KEY, seed=33, prompt="a quiet street"),
              body(seed=34, prompt="a field of wheat")]
    bad = body(seed=32, prompt=f"a lighthouse {MARKER}")
    with server.client() as c:
        # The offender goes through the job API, which says its id: its error must name it.
        worker = HeldWorker(server.app.state.engine.workers[0])
        try:
            with ThreadPoolExecutor(4) as pool:
                blocker = pool.submit(c.post, "/sd", json=body(seed=1))
                wait_for(lambda: worker.worker.running)
                futures = [pool.submit(c.post, "/sd", json=fields[0])]
                created = c.post("/jobs", json=bad)
                assert created.status_code == 202, created.text
                futures += [pool.submit(c.post, "/sd", json=f) for f in fields[1:]]
                wait_for(lambda: len(server.app.state.engine.queue) == 4)
                worker.release()
                png(blocker.result())
                answers = [f.result() for f in futures]
        finally:
            worker.restore()
        job_id = created.json()["id"]
        wait_for(lambda: c.get(f"/jobs/{job_id}", headers=A).json()["status"] == "failed")
        state = c.get(f"/jobs/{job_id}", headers=A).json()
    # the batch of 4, then halves of 2, the failing half as two jobs of 1
    assert failing_marker[0] == 1 and sorted(failing_marker[1:]) == [1, 1, 2, 2, 4]
    for fields_, answer in zip(fields, answers, strict=True):
        assert answer.content == solo_image(solo, fields_)
    assert f"internal error while generating (job {job_id})" in json.dumps(state["error"])
    assert "injected" not in json.dumps(state["error"])
    ids = {a.headers["x-job-id"] for a in answers}
    assert job_id not in ids and len(ids) == 3


def test_the_job_at_fault_is_found_on_every_route(server: LiveServer, solo: LiveServer,
                                                  failing_marker: list[int]) -> None:
    theirs = body(token=OTHER_KEY, seed=41, prompt="a harbour at night")
    bad = [("/sd", A, body(seed=42, prompt=MARKER)),
           ("/sdapi/v1/txt2img", A, {**A1111, "prompt": MARKER, "seed": 43}),
           ("/v1/images/generations", A, {**OPENAI, "prompt": MARKER, "seed": 44})]
    _, answers = held(server, [("/sd", B, theirs), *bad], queued=4)
    assert answers[0].content == solo_image(solo, theirs)
    for answer in answers[1:]:
        assert answer.status_code == 500, answer.text
        assert re.search(r"internal error while generating \(job job-[0-9a-f]{24}\)", message(answer))
    assert answers[0].headers["x-job-id"] not in " ".join(message(a) for a in answers[1:])


def test_an_error_of_the_whole_batch_is_not_rerun(server: LiveServer) -> None:
    """Memory exhausted after the worker's own retries, a model that cannot be served: every
    job of the batch would get it alone too, so they all get it at once, with no rerun."""
    from app.errors import ErrorKind, Unavailable

    pipe = server.app.state.engine.workers[0].models["tiny-sdxl"].pipe
    original = type(pipe).__call__
    calls: list[int] = []

    def unavailable(self, *args, **kwargs):
        calls.append(len(kwargs.get("prompt") or []))
        if calls[1:]:  # the blocker runs
            raise Unavailable("injected: the model cannot be served", kind=ErrorKind.MODEL_UNAVAILABLE)
        return original(self, *args, **kwargs)

    type(pipe).__call__ = unavailable
    try:
        _, answers = held(server, [("/sd", B, body(token=OTHER_KEY, seed=s)) for s in (71, 72, 73)],
                          queued=3)
    finally:
        type(pipe).__call__ = original
    assert [a.status_code for a in answers] == [503] * 3
    assert calls == [1, 3]


# ---- 2a. a long name costs a short answer ---------------------------------------------------
HUGE = "n" * 2_000_000  # a 2 MB name; the body stays under CRAFTSERVE_MAX_BODY_BYTES (2 MiB)
LONG = "n" * 1_900  # a name as long as a prompt may carry in an A1111 <lora:...> tag

LONG_NAMES = [
    ("/sd", body(model=HUGE)),
    ("/sd", body(sampler=HUGE)),
    ("/sd", body(scheduler=HUGE)),
    ("/sd", body(loras={HUGE: 0.5})),
    ("/sd", body(loras={LONG: 0.5})),
    ("/generate-xl", body(sampler=HUGE)),
    ("/jobs", body(model=HUGE)),
    ("/sdapi/v1/txt2img", {**A1111, "sampler_name": HUGE}),
    ("/sdapi/v1/txt2img", {**A1111, "sampler_index": HUGE}),
    ("/sdapi/v1/txt2img", {**A1111, "scheduler": HUGE}),
    ("/sdapi/v1/txt2img", {**A1111, "override_settings": {"sd_model_checkpoint": HUGE}}),
    ("/sdapi/v1/txt2img", {**A1111, "override_settings": {"sd_vae": HUGE}}),
    ("/sdapi/v1/txt2img", {**A1111, "prompt": f"a cat <lora:{LONG}:0.5>"}),
    ("/sdapi/v1/txt2img", {**A1111, "prompt": f"a cat <lora:{LONG}>"}),
    ("/sdapi/v1/txt2img", {**A1111, "prompt": HUGE}),
    ("/sdapi/v1/options", {"sd_model_checkpoint": HUGE}),
    ("/sdapi/v1/options", {"sd_vae": HUGE}),
    ("/v1/images/generations", {**OPENAI, "model": HUGE}),
    ("/v1/images/generations", {**OPENAI, "sampler": HUGE}),
    ("/v1/images/generations", {**OPENAI, "scheduler": HUGE}),
    ("/v1/images/generations", {**OPENAI, "loras": {HUGE: 0.5}}),
    ("/v1/images/generations", {**OPENAI, "n": [HUGE]}),  # not a name: quoted short too
]


@pytest.mark.parametrize(("path", "fields"), LONG_NAMES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(k for k, x in v.items() if len(str(x)) > MAX_NAME_LENGTH))
def test_a_long_name_is_a_short_4xx_in_every_dialect(server: LiveServer, path: str, fields: dict) -> None:
    with server.client() as c:
        answer = c.post(path, headers={**JSON, **A}, content=raw(fields))
    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert len(answer.content) < SMALL, answer.text[:300]
    assert "n" * 100 not in answer.text  # at most a short prefix of any value is quoted


def test_long_names_do_not_slow_another_key(server: LiveServer) -> None:
    """The attack: four clients of key A sent 2 MB names, each answered with a 3.8 MB error
    built on the event loop, and /health slowed 70x. Now each answer is short, and key B's
    requests are served meanwhile."""
    fields = raw(body(sampler=HUGE))
    with server.client() as c, ThreadPoolExecutor(5) as pool:
        started = time.monotonic()
        attacks = [pool.submit(c.post, "/sd", headers=JSON, content=fields) for _ in range(8)]
        health = [c.get("/health").status_code for _ in range(5)]
        png(c.post("/sd", json=body(token=OTHER_KEY, seed=3)))
        answers = [f.result() for f in attacks]
        elapsed = time.monotonic() - started
    assert health == [200] * 5
    assert all(a.status_code == 422 and len(a.content) < SMALL for a in answers)
    assert elapsed < 30, elapsed


def test_an_unknown_name_lists_few_names() -> None:
    # NotServed lists at most 20 of the served names, and says how many more.
    from app.errors import NotServed

    error = NotServed("lora", "n" * 5000, [f"lora-{i:03d}" for i in range(500)])
    assert len(error.message) < 600 and "and 480 more" in error.message
    assert "n" * 100 not in error.message


# ---- 2b. BREAKs cost at most CRAFTSERVE_MAX_PROMPT_CHUNKS chunks ----------------------------
# 334 chunks in 1999 characters (CRAFTSERVE_MAX_PROMPT_LENGTH is 2000): made a 64x64 job 35x
# slower than a plain one
BREAKS = "BREAK " * 333 + "x"


@pytest.mark.parametrize(("path", "fields", "field"), [
    ("/sd", body(prompt=BREAKS), "prompt"),
    ("/sd", body(negative_prompt=BREAKS), "negative_prompt"),
    ("/jobs", body(prompt=BREAKS), "prompt"),
    ("/sdapi/v1/txt2img", {**A1111, "prompt": BREAKS}, "prompt"),
    ("/sdapi/v1/txt2img", {**A1111, "negative_prompt": BREAKS}, "negative_prompt"),
    ("/v1/images/generations", {**OPENAI, "prompt": BREAKS}, "prompt"),
    ("/v1/images/generations", {**OPENAI, "negative_prompt": BREAKS}, "negative_prompt"),
])
def test_a_prompt_of_many_breaks_is_a_fast_422_in_every_dialect(server: LiveServer, path: str,
                                                                 fields: dict, field: str) -> None:
    with server.client() as c:
        started = time.monotonic()
        answer = c.post(path, headers=A, json=fields)
        elapsed = time.monotonic() - started
    assert answer.status_code == (400 if path.startswith("/v1/") else 422), answer.text
    text = message(answer)
    assert text.startswith(f"This server doesn't have {field} '<at least 334 chunks>'"), text
    assert "at most 8 are accepted (setting CRAFTSERVE_MAX_PROMPT_CHUNKS)" in text
    assert elapsed < 5, elapsed


def test_many_breaks_are_refused_before_the_queue_and_cost_another_key_nothing(
        server: LiveServer, solo: LiveServer) -> None:
    theirs = body(token=OTHER_KEY, seed=51, prompt="a harbour BREAK at night BREAK oil painting")
    attacks = [("/sd", A, body(prompt=BREAKS)), ("/jobs", A, body(negative_prompt=BREAKS)),
               ("/sdapi/v1/txt2img", A, {**A1111, "prompt": BREAKS}),
               ("/v1/images/generations", A, {**OPENAI, "prompt": BREAKS})]
    at_once, (answer,) = held(server, [("/sd", B, theirs), *attacks], queued=1)
    assert sorted(a.status_code for a in at_once) == [400, 422, 422, 422]
    # a few BREAKs still work, and give the bytes they give alone
    assert answer.content == solo_image(solo, theirs)


def test_a_few_breaks_work_in_every_dialect(server: LiveServer) -> None:
    few = "a lighthouse BREAK at dusk BREAK " * 3 + "oil painting"  # 7 chunks
    with server.client() as c:
        png(c.post("/sd", json=body(prompt=few, negative_prompt="fog BREAK blur")))
        assert c.post("/sdapi/v1/txt2img", headers=A, json={**A1111, "prompt": few}).status_code == 200
        assert c.post("/v1/images/generations", headers=A,
                      json={**OPENAI, "prompt": few, "response_format": "b64_json"}).status_code == 200


def test_the_count_before_queueing_never_exceeds_the_encoders(server: LiveServer) -> None:
    """least_chunks (no tokenizer) is a lower bound of what the prompt encoder counts, with the
    tiny model's byte-level tokenizer and with the real CLIP vocabulary the bundled files hold,
    for random prompts of words, punctuation, digits, BREAKs and non-ASCII text."""
    import random

    from transformers import CLIPTokenizer

    from app.engine.prompts import PromptEncoder, _Slot
    from app.prompt_syntax import least_chunks

    tiny = server.app.state.engine.workers[0].models["tiny-sdxl"].prompts
    folder = "app/configs/clip-tokenizer"
    real = PromptEncoder.__new__(PromptEncoder)
    real.family, real._named = "sd15", {}
    real.slots = [_Slot(CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt"), None, "clip_l", False)]
    pieces = [*"abc xyz ,.;:!?_-'()[]0123456789", "BREAK", " BREAK ", "é", "e\u0301", "x\u0301", "日本",
              "\U0001F30A", "\t", "ß", "²", "Ⅻ", "'s", "don't", "ﬁ", "İ", "\u200b", "lighthouse", ", "]
    rng = random.Random(3)
    exact = 0
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 500)))
        least = least_chunks(text)
        counts = [encoder.chunk_count(text, ()) for encoder in (tiny, real)]
        assert least <= min(counts), (text, least, counts)
        exact += least == counts[1]
    assert least_chunks(BREAKS) == 334 == real.chunk_count(BREAKS, ()) == tiny.chunk_count(BREAKS, ())
    assert exact > 100  # and it is often the real tokenizer's count


def test_chunks_the_tokenizer_makes_are_counted_exactly_by_the_worker(
        server: LiveServer, solo: LiveServer) -> None:
    """A prompt that is one long word is one chunk to a count without the tokenizer, and many
    to the model's: the worker refuses it before encoding anything, and the job of key B
    batched with it runs."""
    word = "qwertyuiopasdfghjklzxcvbnm" * 30  # 780 characters: a token each for the tiny model
    theirs = body(token=OTHER_KEY, seed=61, prompt="a harbour at night")
    _, (answer, refused) = held(server, [("/sd", B, theirs), ("/sd", A, body(prompt=word))], queued=2)
    assert refused.status_code == 422, refused.text
    assert re.match(r"This server doesn't have prompt '<\d+ chunks>': prompt encodes to \d+ chunks",
                    message(refused)), message(refused)
    assert answer.content == solo_image(solo, theirs)
