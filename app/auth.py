"""API keys: loading, constant-time checks, the token from the body or the header, and each
key's request rate limit.

A key entry (a line of the keys file, or an item of CRAFTSERVE_API_KEYS) is the key alone, or
the key, whitespace and its own rate limit: `KEY  10/60s`, `KEY  unlimited` (see
app.ratelimit for the format). Keys without one get the server-wide CRAFTSERVE_RATE_LIMIT.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from app.errors import Forbidden
from app.ratelimit import RateLimit, RateLimiter, parse_rate_limit

if TYPE_CHECKING:
    from app.metrics import Metrics

logger = logging.getLogger(__name__)


def key_label(key: str) -> str:
    """A stable, non-secret name for a key, for logs and fairness (never the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_entry(entry: str) -> tuple[str, RateLimit | None, bool]:
    """`KEY` → (KEY, None, False); `KEY  10/60s` → (KEY, RateLimit(10, 60), True);
    `KEY  unlimited` → (KEY, None, True). The third item: whether the entry sets a limit.
    A ValueError never contains the key."""
    parts = entry.strip().rsplit(None, 1)
    if len(parts) < 2:
        return entry.strip(), None, False
    key, limit = parts[0].strip(), parts[1]
    try:
        return key, parse_rate_limit(limit), True
    except ValueError as exc:
        raise ValueError(
            f"an API key entry (CRAFTSERVE_API_KEYS / CRAFTSERVE_API_KEYS_FILE) ends in {limit!r}: "
            f"write the key alone, or the key, spaces and its rate limit; {exc}"
        ) from None


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
    ) -> None:
        self.allow_anonymous = allow_anonymous
        self.generated_key: str | None = None
        entries = [parse_key_entry(k) for k in keys]
        if not entries and not allow_anonymous:
            self.generated_key = secrets.token_urlsafe(24)
            entries = [(self.generated_key, None, False)]
        own_limits: dict[str, RateLimit | None] = {}
        for key, limit, has_limit in entries:
            if has_limit:
                own_limits[key_label(key)] = limit  # a later entry of the same key wins
        self._keys = [(k.encode(), key_label(k)) for k in dict.fromkeys(k for k, _, _ in entries)]
        default = parse_rate_limit(rate_limit) if isinstance(rate_limit, str) else rate_limit
        refused = metrics.rate_limited.labels if metrics is not None else None
        self.rate_limits = RateLimiter(
            default, own_limits,
            on_refused=(lambda label: refused(label).inc()) if refused is not None else None,
        )

    def admit(self, client: str) -> None:
        """Count one request of `client` (the label `authenticate` returned) against its rate
        limit; past it raise RateLimited (429, Retry-After, a message the VisionCraft wrapper
        reads as RateLimitExceeded). Call it once per generation request, after
        authenticating; not for discovery or status routes."""
        self.rate_limits.admit(client)

    def authenticate(self, token: str | None, client_host: str | None = None) -> str:
        """Return the client's label, or raise Forbidden."""
        label = self._match(token) if token else None
        if label is not None:
            return label
        if self.allow_anonymous:
            return f"anonymous-{client_host or 'unknown'}"
        if not token:
            raise Forbidden(
                "Missing API key: send it as `token` in the JSON body or as "
                "`Authorization: Bearer <key>`"
            )
        raise Forbidden("Invalid API key")

    def _match(self, token: str) -> str | None:
        candidate = token.encode()
        found = None
        for key, label in self._keys:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(candidate, key):
                found = label
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
