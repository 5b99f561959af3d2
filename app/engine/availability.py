"""Which models failed to load recently: such a model is not retried on every request.

Shared by the engine (a request for a model that just failed is answered 503 at once, before
it is queued; /ready names the reason) and the workers (they record what happened).
"""

from __future__ import annotations

import threading
import time

from app.errors import ErrorKind, Unavailable


class LoadFailures:
    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        # (when, the error's message, whether it waits for weights): only facts, never the
        # exception, whose traceback holds the frames of the failed load and what it had loaded
        self._failures: dict[str, tuple[float, str, bool]] = {}
        self._lock = threading.Lock()

    def record(self, name: str, error: Unavailable) -> None:
        from app.engine.hub import WaitingForWeights

        with self._lock:
            self._failures[name] = (time.monotonic(), error.message, isinstance(error, WaitingForWeights))

    def clear(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)

    def check(self, name: str) -> None:
        """Raise the recorded error while the retry pause (setting LOAD_RETRY_S) lasts."""
        with self._lock:
            failure = self._failures.get(name)
        if failure is None:
            return
        when, message, _ = failure
        remaining = self.retry_s - (time.monotonic() - when)
        if remaining > 0:
            raise Unavailable(message, retry_after=remaining, kind=ErrorKind.MODEL_UNAVAILABLE)

    def waiting_for_weights(self, name: str) -> bool:
        """Whether the last failed load of `name` was for weights not here while the Hub
        cannot be reached or downloads are off (app.engine.hub.WaitingForWeights)."""
        with self._lock:
            failure = self._failures.get(name)
        return failure is not None and failure[2]

    def reason(self, name: str) -> str | None:
        """The message of the last failed load of `name`, if it has not loaded since."""
        with self._lock:
            failure = self._failures.get(name)
        return failure[1] if failure else None
