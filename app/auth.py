"""API keys: loading, constant-time checks, the token from the body or the header, and each
key's request rate limit.

A key entry (a line of the keys file, or an item of CRAFTSERVE_API_KEYS) is the key alone, or
the key, whitespace and its own rate limit: `KEY  10/60s`, `KEY  unlimited` (see
app.ratelimit for the format). Keys without one get the server-wide CRAFTSERVE_RATE_LIMIT.

The key may be written hashed, `sha256:<64 hex digits>` (what `craftserve hash-key` prints), so
the keys file is not itself a secret. Only SHA-256 digests are kept in memory: a token is
hashed and compared in constant time with every digest. API keys are long random strings, so
an unsalted fast hash is enough (as for GitHub's or Stripe's tokens); a password would need a
slow one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from app.errors import RateLimited, Unauthorized
from app.ratelimit import RateLimit, RateLimiter, parse_rate_limit

if TYPE_CHECKING:
    from app.metrics import Metrics

logger = logging.getLogger(__name__)


HOW_TO_SEND_A_KEY = (
    "send it as `Authorization: Bearer <key>`, as HTTP Basic with the key as the password (any "
    "user name), or as `token` in the JSON body")
ANONYMOUS = "anonymous-"  # the label prefix of a caller without a key (--allow-anonymous)
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


def key_digest(key: str) -> str:
    """The SHA-256 hex digest a key is kept and compared as; `sha256:<hex>` is already one."""
    hashed = _HASHED.match(key)
    return hashed[1].lower() if hashed else hashlib.sha256(key.encode()).hexdigest()


def hashed_entry(key: str) -> str:
    """The keys-file line for `key` that does not reveal it (`craftserve hash-key`)."""
    return "sha256:" + key_digest(key)


def key_label(key: str) -> str:
    """A stable, non-secret name for a key, for logs and fairness (never the key itself); the
    same for a key and its `sha256:` form."""
    return "key-" + key_digest(key)[:8]


@dataclass(frozen=True)
class KeyEntry:
    """One key of the keys file (or of CRAFTSERVE_API_KEYS) and what it may do."""

    key: str
    rate_limit: RateLimit | None = None
    has_limit: bool = False  # whether the entry sets its own rate limit (None: unlimited)
    admin: bool = False  # may reload the models file (POST /admin/reload, A1111's refresh routes)
    queue: int | None = None  # its own share of the queue (jobs waiting at once); None: the setting


_ENTRY_HELP = ("write the key, then optionally its rate limit (`10/60s`, `unlimited`), `admin`, "
               "`queue=N`, separated by spaces")


def parse_key_entry(entry: str) -> KeyEntry:
    """`KEY`, `KEY  10/60s`, `KEY  unlimited`, `KEY  admin`, `KEY  queue=4`, or several of them:
    `KEY  100/1h  admin  queue=16`. A ValueError never contains the key."""
    key, *options = entry.split()
    found = KeyEntry(key)
    for option in options:
        name, equals, value = option.partition("=")
        if option == "admin":
            found = replace(found, admin=True)
        elif equals and name == "queue":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"an API key entry (CRAFTSERVE_API_KEYS / CRAFTSERVE_API_KEYS_FILE) has "
                                 f"{option!r}: queue= takes a whole number of jobs, at least 1")
            found = replace(found, queue=int(value))
        else:
            try:
                found = replace(found, rate_limit=parse_rate_limit(option), has_limit=True)
            except ValueError as exc:
                raise ValueError(
                    f"an API key entry (CRAFTSERVE_API_KEYS / CRAFTSERVE_API_KEYS_FILE) has {option!r}: "
                    f"{_ENTRY_HELP}; {exc}"
                ) from None
    return found


class AuthFailures:
    """Failed key checks per client address in the last minute, and the keys each address
    used successfully of late.

    Past `per_minute` failures the address is answered 429 until its oldest failure is a
    minute old, for every token but one thing: a key that succeeded from that same address
    within `remember_s` (its digest is remembered) still passes. Any other token from the
    address is refused 429 *without being checked*, so the answer never tells a right key from
    a wrong one and guessing stays throttled. This way many users behind one proxy (one
    address) keep working while one of them, or an attacker there, hammers wrong keys; a
    direct attacker, from whose address no key ever succeeded, is throttled for everything.
    The one thing still unthrottled is guessing exactly a key that succeeded from the same
    address, which is as hard as the key is long (`craftserve hash-key --new`: 256 bits).

    Other addresses are never affected. Memory is bounded: at most `max_addresses` failing
    addresses (the least recently failing are forgotten) and `max_remembered` (address, key)
    pairs (the least recently used are forgotten); a key needs a valid use to be remembered."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, *, max_addresses: int = 65536, remember_s: float = 3600.0,
                 max_remembered: int = 65536) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self.remember_s = remember_s
        self.max_remembered = max_remembered
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._valid: OrderedDict[tuple[str, bytes], float] = OrderedDict()  # (address, digest) → last use

    def _recent(self, host: str, now: float) -> deque[float] | None:
        times = self._failures.get(host)
        if times is None:
            return None
        while times and times[0] <= now - self.WINDOW_S:
            times.popleft()
        if not times:
            del self._failures[host]
            return None
        return times

    def _known(self, host: str, digest: bytes | None, now: float) -> bool:
        if digest is None:
            return False
        seen = self._valid.get((host, digest))
        return seen is not None and seen > now - self.remember_s

    def check(self, host: str | None, digest: bytes | None = None) -> None:
        """Raise RateLimited when `host` is past its failed checks, unless `digest` (a token's
        SHA-256) is of a key that succeeded from `host` lately."""
        if not self.per_minute or host is None:
            return
        now = time.monotonic()
        with self._lock:
            times = self._recent(host, now)
            if times is None or len(times) < self.per_minute or self._known(host, digest, now):
                return
            wait = times[0] + self.WINDOW_S - now
        raise RateLimited(
            f"Too many failed API key attempts from this address: at most {self.per_minute} a "
            "minute (setting CRAFTSERVE_AUTH_FAILURES_PER_MINUTE); keys used successfully from "
            f"this address in the last {self.remember_s / 60:g} minutes still work. Retry in "
            f"{max(1, round(wait + 0.5))} seconds.",
            retry_after=wait,
        )

    def record(self, host: str | None) -> None:
        if not self.per_minute or host is None:
            return
        now = time.monotonic()
        with self._lock:
            times = self._recent(host, now) or deque()
            times.append(now)
            self._failures[host] = times
            self._failures.move_to_end(host)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def succeeded(self, host: str | None, digest: bytes) -> None:
        """Remember that the key of `digest` succeeded from `host`."""
        if not self.per_minute or host is None:
            return
        with self._lock:
            self._valid[(host, digest)] = time.monotonic()
            self._valid.move_to_end((host, digest))
            while len(self._valid) > self.max_remembered:
                self._valid.popitem(last=False)


class Authenticator:
    """Accepts the configured keys. With none configured, a random key is made at start-up
    (shown once, like Jupyter's token) unless anonymous access was explicitly allowed.

    `authenticate` says who calls; `admit` then counts one request of that caller against its
    rate limit (a key's own, else `rate_limit`; anonymous callers, one label per address, and
    the generated key get `rate_limit`)."""

    def __init__(
        self,
        keys: list[str],
        *,
        allow_anonymous: bool = False,
        rate_limit: str | RateLimit | None = None,
        metrics: Metrics | None = None,
        auth_failures_per_minute: int = 0,
    ) -> None:
        self.allow_anonymous = allow_anonymous
        self.failures = AuthFailures(auth_failures_per_minute)
        self.generated_key: str | None = None
        entries = [parse_key_entry(k) for k in keys]
        if not entries and not allow_anonymous:
            self.generated_key = secrets.token_urlsafe(24)
            entries = [KeyEntry(self.generated_key, admin=True)]  # the operator's own key
        own_limits: dict[str, RateLimit | None] = {}
        self.entries: dict[str, KeyEntry] = {}  # label → entry (a later entry of a key wins)
        for entry in entries:
            label = key_label(entry.key)
            if entry.has_limit:
                own_limits[label] = entry.rate_limit
            self.entries[label] = replace(entry, key="")  # the key itself is not kept
        digests = dict.fromkeys(key_digest(e.key) for e in entries)
        self._keys = [(bytes.fromhex(d), "key-" + d[:8]) for d in digests]
        default = parse_rate_limit(rate_limit) if isinstance(rate_limit, str) else rate_limit
        refused = metrics.rate_limited.labels if metrics is not None else None
        self.rate_limits = RateLimiter(
            default, own_limits,
            on_refused=(lambda label: refused(label).inc()) if refused is not None else None,
        )

    def is_admin(self, client: str) -> bool:
        """Whether the caller's key has the `admin` role (anonymous callers never do)."""
        entry = self.entries.get(client)
        return entry is not None and entry.admin

    def queue_share(self, client: str) -> int | None:
        """The caller's own share of the queue from its key entry, if it sets one."""
        entry = self.entries.get(client)
        return entry.queue if entry is not None else None

    def admit(self, client: str) -> None:
        """Count one request of `client` (the label `authenticate` returned) against its rate
        limit; past it raise RateLimited (429, Retry-After, a message the VisionCraft wrapper
        reads as RateLimitExceeded). Call it once per generation request, after
        authenticating; not for discovery or status routes."""
        self.rate_limits.admit(client)

    def authenticate(self, token: str | None, client_host: str | None = None) -> str:
        """Return the client's label, or raise Unauthorized (RateLimited for an address past
        its failed attempts). The token comes from app.api.credentials, whatever the route."""
        digest = hashlib.sha256(token.encode()).digest() if token else None
        if not self.allow_anonymous:
            self.failures.check(client_host, digest)
        label = self._match(digest) if digest is not None else None
        if label is not None:
            if not self.allow_anonymous:
                self.failures.succeeded(client_host, digest)
            return label
        if self.allow_anonymous:
            return f"{ANONYMOUS}{client_host or 'unknown'}"
        self.failures.record(client_host)
        if not token:
            raise Unauthorized(f"Missing API key: {HOW_TO_SEND_A_KEY}")
        raise Unauthorized("Invalid API key")

    def _match(self, candidate: bytes) -> str | None:
        """The label of the key whose digest is `candidate`, compared in constant time."""
        found = None
        for key, label in self._keys:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(candidate, key):
                found = label
        return found
