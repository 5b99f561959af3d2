"""API keys: loading, constant-time checks, and the token from the body or the header."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from app.errors import Forbidden

logger = logging.getLogger(__name__)


def key_label(key: str) -> str:
    """A stable, non-secret name for a key, for logs and fairness (never the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class Authenticator:
    """Accepts the configured keys. With none configured, a random key is made at start-up
    (shown once, like Jupyter's token) unless anonymous access was explicitly allowed."""

    def __init__(self, keys: list[str], *, allow_anonymous: bool = False) -> None:
        self.allow_anonymous = allow_anonymous
        self.generated_key: str | None = None
        if not keys and not allow_anonymous:
            self.generated_key = secrets.token_urlsafe(24)
            keys = [self.generated_key]
        self._keys = [(k.encode(), key_label(k)) for k in dict.fromkeys(keys)]

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
