"""API keys: body token or Bearer header, constant-time check, generated key, anonymous; and
per-key rate limits (token buckets checked against their closed forms, then over HTTP)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import ValidationError

from app.api.credentials import header_key
from app.auth import Authenticator, KeyEntry, key_label, parse_key_entry
from app.config import Settings
from app.errors import RateLimited, Unauthorized, retry_after_seconds
from app.ratelimit import RateLimit, RateLimiter, TokenBucket, parse_rate_limit
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
    assert header_key("Bearer abc") == "abc"
    assert header_key("Bearer   ") is None


# ---- rate limits ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10/60s", RateLimit(10, 60)), ("10/60", RateLimit(10, 60)), ("100/1h", RateLimit(100, 3600)),
     ("5/2m", RateLimit(5, 120)), ("1/s", RateLimit(1, 1)), (" 3 / 7 S ", RateLimit(3, 7)),
     ("3/5min", RateLimit(3, 300)), ("unlimited", None), ("Unlimited", None)],
)
def test_rate_limit_format(text: str, expected: RateLimit | None) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["10", "10/", "ten/60s", "10/60d", "0/60s", "10/0s", "10/1.5s",
                                  "-1/60s", ""])
def test_bad_rate_limits_are_refused_with_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="REQUESTS/PERIOD|at least 1"):
        parse_rate_limit(text)


def test_rate_limit_message_is_what_the_wrapper_parses() -> None:
    assert RateLimit(10, 60).describe() == "users can make 10 requests per 60 seconds"
    assert RateLimit(1, 3600).describe() == "users can make 1 request per 3600 seconds"
    assert re.findall(r"(?<=per\s)\d+\s\w+", RateLimit(100, 3600).describe()) == ["3600 seconds"]


@pytest.mark.parametrize(("capacity", "period"), [(1, 1), (3, 1), (10, 60), (7, 3), (5, 3600)])
def test_token_bucket_closed_forms(capacity: int, period: int) -> None:
    limit = RateLimit(capacity, period)
    r = capacity / period  # refill, tokens a second
    bucket = TokenBucket(limit, now=0.0)
    assert [bucket.take(0.0) for _ in range(capacity)] == [0.0] * capacity  # a full burst
    assert bucket.take(0.0) == 1 / r  # the (c+1)th: one token's refill time
    assert bucket.take(0.0) == 1 / r  # a refusal takes nothing
    t = 0.4 / r
    assert bucket.take(t) == pytest.approx(0.6 / r)  # waits only for the rest of the token
    assert bucket.take(1 / r) == 0.0  # exactly one token after 1/r
    assert bucket.take(1 / r) == pytest.approx(1 / r)
    # k/r later: k tokens, whatever k <= c
    k = max(1, capacity - 1)
    now = 1 / r + k / r
    assert [bucket.take(now) for _ in range(k)] == [0.0] * k
    assert bucket.take(now) > 0
    # an idle key never holds more than the capacity
    later = now + 1000 * period
    assert [bucket.take(later) for _ in range(capacity)] == [0.0] * capacity
    assert bucket.take(later) == pytest.approx(1 / r)


def test_steady_rate_is_admitted_forever() -> None:
    # One request every 1/r seconds for a long time: never refused (no float drift).
    limit = RateLimit(10, 60)
    bucket = TokenBucket(limit, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    for i in range(1, 5000):
        assert bucket.take(i * 6.0) == 0.0


def test_limiter_keeps_each_label_apart_and_counts_refusals() -> None:
    clock, refused = FakeClock(), []
    limiter = RateLimiter(RateLimit(2, 10), {"key-own": RateLimit(1, 60), "key-free": None},
                          clock=clock, on_refused=refused.append)
    for label in ("key-a", "key-b"):
        limiter.admit(label)
        limiter.admit(label)
    with pytest.raises(RateLimited) as err:
        limiter.admit("key-a")
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "5"}
    assert "users can make 2 requests per 10 seconds" in err.value.message
    limiter.admit("key-own")
    with pytest.raises(RateLimited) as err:
        limiter.admit("key-own")
    assert err.value.headers == {"Retry-After": "60"}
    for _ in range(100):
        limiter.admit("key-free")  # its own "unlimited" beats the default
    assert refused == ["key-a", "key-own"]
    clock.now = 5.0
    limiter.admit("key-a")  # one token back after period / requests
    limiter.admit("key-b")
    with pytest.raises(RateLimited):
        limiter.admit("key-b")


def test_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(RateLimit(1000, 3600))
    admitted = []

    def hammer() -> None:
        for _ in range(300):
            try:
                limiter.admit("key-shared")
                admitted.append(1)
            except RateLimited:
                pass

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(hammer)
    assert len(admitted) == 1000  # exactly the capacity: no token handed out twice or lost


def test_retry_after_rounds_up_never_early() -> None:
    assert [retry_after_seconds(s) for s in (0.0, 0.2, 1.0, 1.0000001, 5.5, 6.001)] == [1, 1, 1, 2, 6, 7]


def test_key_entries_carry_optional_limits() -> None:
    assert parse_key_entry("plain-key") == KeyEntry("plain-key")
    assert parse_key_entry("  k1   10/60s ") == KeyEntry("k1", RateLimit(10, 60), True)
    assert parse_key_entry("k2\t100/1h") == KeyEntry("k2", RateLimit(100, 3600), True)
    assert parse_key_entry("k3 unlimited") == KeyEntry("k3", None, True)
    assert parse_key_entry("k4  admin queue=3 5/60s") == KeyEntry("k4", RateLimit(5, 60), True, True, 3)
    for bad in ("k5 queue=0", "k5 queue=x", "k5 role=admin"):
        with pytest.raises(ValueError) as err:
            parse_key_entry(bad)
        assert "k5" not in str(err.value)
    with pytest.raises(ValueError) as err:
        parse_key_entry("s3cret-key 10/fortnight")
    assert "10/fortnight" in str(err.value) and "s3cret" not in str(err.value)
    auth = Authenticator(["k1 2/60s", "k2", "k3 unlimited"], rate_limit="1/60s")
    limits = auth.rate_limits
    assert limits.limit_for(auth.authenticate("k1")) == RateLimit(2, 60)
    assert limits.limit_for(auth.authenticate("k2")) == RateLimit(1, 60)
    assert limits.limit_for(auth.authenticate("k3")) is None
    assert auth.authenticate("k1") == key_label("k1")  # the limit is not part of the key
    with pytest.raises(Unauthorized):
        auth.authenticate("k1 2/60s")


def test_setting_is_checked_at_start_up(tmp_path) -> None:
    assert Settings(rate_limit="10/60s").rate_limit == "10/60s"
    with pytest.raises(ValidationError, match="REQUESTS/PERIOD"):
        Settings(rate_limit="10 per minute")


def test_rate_limit_per_key_over_http(make_server, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# limited and free keys\nlimited-key  2/3600s\nfree-key\n", encoding="utf-8")
    server = make_server(TINY_MODELS, api_keys=[], api_keys_file=keys)
    with server.client() as c:
        for _ in range(3):  # discovery is not counted
            assert c.get("/sd/models-sdxl").status_code == 200
        # every request of a generation route counts, valid or not: the key is checked and
        # counted before the body (app.api.credentials)
        assert c.post("/sd", json=body(token="limited-key", steps=999)).status_code == 422
        assert c.post("/generate-xl", json=body(token="limited-key")).status_code == 200
        refused = c.post("/generate", json=body(token="limited-key"))
        assert refused.status_code == 429, refused.text
        # a token comes back every 3600 s / 2 requests, counted from the first request
        assert 1700 < int(refused.headers["retry-after"]) <= 1800
        message = refused.json()["detail"]
        assert refused.json()["error"] == {"message": message}
        assert "users can make 2 requests per 3600 seconds" in message
        assert "limited-key" not in refused.text
        # the other key is unaffected, flooded or not
        for _ in range(3):
            png(c.post("/sd", json=body(token="free-key")))
        assert c.post("/sd", json=body(token="limited-key")).status_code == 429
        metrics = c.get("/metrics").text
    label = key_label("limited-key")
    assert f'craftserve_rate_limited_total{{key="{label}"}} 2.0' in metrics
    assert "limited-key" not in metrics and key_label("free-key") not in metrics


def test_server_wide_default_limit(make_server) -> None:
    server = make_server(TINY_MODELS, api_keys=["one-key", "two-key"], rate_limit="1/60s")
    with server.client() as c:
        png(c.post("/sd", json=body(token="one-key")))
        assert c.post("/sd", json=body(token="one-key")).status_code == 429
        png(c.post("/sd", json=body(token="two-key")))
        refused = c.post("/sd", json=body(token="two-key"))
        assert refused.status_code == 429 and 30 < int(refused.headers["retry-after"]) <= 60
        assert "users can make 1 request per 60 seconds" in refused.json()["detail"]
        # a bad key is refused as such, and costs no one's tokens
        assert c.post("/sd", json=body(token="nope")).status_code == 403
