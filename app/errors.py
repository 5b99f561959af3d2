"""Every error the server answers on purpose, each with exactly one HTTP status.

Code anywhere in the package raises these; the edge (app.main, app.api.errors) renders each
in the shape of the dialect the request came in (VisionCraft `{"detail", "error": {"message"}}`,
A1111, OpenAI). Anything else that escapes is a bug: logged with its traceback and answered
as a plain 500 without internals.

The messages follow the VisionCraft client convention: an unknown name is reported as
"This server doesn't have <field> '<value>'", which the published Python wrapper parses.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import sys
from collections.abc import Iterable
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


class ErrorKind(StrEnum):
    """Every kind of error the server answers: the label of craftserve_errors_total, the
    `kind` of a job's failed event, and what dialects map onto their own codes. Code tests
    kinds against these members, never against bare strings."""

    ERROR = "error"
    # the request
    INVALID_PARAMETER = "invalid_parameter"
    NOT_SERVED = "not_served"
    INVALID_LORA = "invalid_lora"
    MODEL_NOT_FOUND = "model_not_found"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"
    URL_TOO_LONG = "url_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a state-changing request a web form can send
    CROSS_SITE = "cross_site"  # a state-changing request a browser sent from another site
    HOST_NOT_ALLOWED = "host_not_allowed"  # a Host header outside CRAFTSERVE_ALLOWED_HOSTS
    NOT_FOUND = "not_found"  # no such route
    HTTP = "http"  # another HTTP error of the framework (405, ...)
    # the caller
    FORBIDDEN = "forbidden"
    NOT_ADMIN = "not_admin"  # a valid key without the `admin` role on an operator route
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    KEY_QUEUE_FULL = "key_queue_full"  # the key has its whole share of the queue waiting
    # jobs
    JOB_NOT_FOUND = "job_not_found"
    JOB_CONFLICT = "job_conflict"
    SUBSCRIBERS = "subscribers"
    INTERRUPTED = "interrupted"  # stopped by the caller (A1111 interrupt/skip) or all its clients left
    CANCELLED = "cancelled"  # taken back before or while running (DELETE /jobs, a client gone)
    DISCONNECTED = "disconnected"
    # the server
    UNAVAILABLE = "unavailable"
    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    SHUTDOWN = "shutdown"
    MODEL_UNAVAILABLE = "model_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    REPLICA_LOST = "replica_lost"
    REFRESH_FAILED = "refresh_failed"
    NOT_SUPPORTED = "not_supported"  # a route this way of running cannot serve (e.g. under Ray)
    INTERNAL = "internal"

    @property
    def stopped(self) -> bool:
        """A job stopped on purpose (by its caller or because its clients left), not failed."""
        return self in (ErrorKind.INTERRUPTED, ErrorKind.CANCELLED)


class CraftError(Exception):
    """Base of the deliberate errors. `status` is the HTTP status it maps to."""

    status: int = 500
    kind: ErrorKind = ErrorKind.ERROR  # the label of craftserve_errors_total

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, kind: ErrorKind | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if kind:
            self.kind = ErrorKind(kind)  # a bare string of no kind fails here, not in the worker


SHOWN_CHARS = 60  # a value quoted in a message is cut to this many characters
LISTED_NAMES = 20  # an unknown name's answer lists at most this many of the served ones


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A value for a message, cut short: a client may send a megabyte anywhere."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


_SHORT_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = SHOWN_CHARS


def quoted(value: object) -> str:
    """`repr(value)` for a message, at most a few times SHOWN_CHARS characters and made in
    time bounded the same way, whatever the value (a string cut by `shown` already is quoted
    whole). repr escapes what is not printable, lone surrogates included, so the message can
    always be encoded."""
    if isinstance(value, str):
        return repr(value if len(value) <= 2 * SHOWN_CHARS else shown(value))
    return _SHORT_REPR.repr(value)


class InvalidParameter(CraftError):
    """A request field has a value the server refuses (422). The message reads
    "This server doesn't have <field> <value>: <rule>", the phrase the VisionCraft wrapper
    parses to name the parameter (`InvalidParam.param`). The value is quoted short (`quoted`)."""

    status = 422
    kind = ErrorKind.INVALID_PARAMETER

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"This server doesn't have {field} {quoted(value)}: {rule}")
        self.field = field
        self.value = value


class TooManyPromptChunks(InvalidParameter):
    """A prompt (or negative prompt) that encodes to more chunks of 75 tokens than the setting
    CRAFTSERVE_MAX_PROMPT_CHUNKS allows (422): every chunk is one more pass of the text
    encoders and 77 more tokens every denoising step attends to. `at_least`: the count is a
    lower bound (counted before the model's tokenizer is at hand)."""

    def __init__(self, field: str, count: int, limit: int, *, at_least: bool = False) -> None:
        counted = f"at least {count}" if at_least else str(count)
        super().__init__(field, f"<{counted} chunks>",
                         f"{field} encodes to {counted} chunks of 75 tokens (each BREAK starts a new "
                         f"one); at most {limit} are accepted (setting CRAFTSERVE_MAX_PROMPT_CHUNKS)")
        self.count = count


class NotServed(CraftError):
    """A name (model, sampler, LoRA, ...) that this server does not serve (422). The message
    quotes the name short, suggests close served names and lists at most LISTED_NAMES."""

    status = 422
    kind = ErrorKind.NOT_SERVED

    def __init__(self, field: str, value: str, available: Iterable[str]) -> None:
        names = sorted(available)
        # a name longer than any served one is compared by its start: difflib's cost grows with it
        probe = value[: 4 * SHOWN_CHARS]
        exact_case = [n for n in names if n.lower() == probe.lower()]
        close = list(dict.fromkeys(exact_case + difflib.get_close_matches(probe, names, n=3, cutoff=0.5)))
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(names[:LISTED_NAMES]) if names else "none"
        if len(names) > LISTED_NAMES:
            listing += f" and {len(names) - LISTED_NAMES} more"
        super().__init__(
            f"This server doesn't have {field} {quoted(value)}.{hint} Available: {listing}"
        )
        self.field = field
        self.value = value
        self.suggestions = close


class Forbidden(CraftError):
    """Missing or wrong API key (403)."""

    status = 403
    kind = ErrorKind.FORBIDDEN


class NotAdmin(Forbidden):
    """A valid key without the `admin` role on a route that changes the server (403)."""

    kind = ErrorKind.NOT_ADMIN


class Unauthorized(CraftError):
    """Missing or wrong credentials in dialects whose clients expect 401 (A1111, OpenAI); the
    dialect sets the challenge header (e.g. `WWW-Authenticate: Basic`)."""

    status = 401
    kind = ErrorKind.UNAUTHORIZED


def retry_after_seconds(seconds: float) -> int:
    """A wait as the whole seconds of a Retry-After header: rounded up (never early), >= 1."""
    return max(1, math.ceil(seconds - 1e-9))


class RateLimited(CraftError):
    """A key past its request rate limit (429, with Retry-After)."""

    status = 429
    kind = ErrorKind.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float) -> None:
        seconds = retry_after_seconds(retry_after)
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class KeyQueueFull(RateLimited):
    """A key with its whole share of the queue waiting (429, with Retry-After): its own jobs
    are in the way, so retrying once one of them started succeeds; other keys still find room."""

    kind = ErrorKind.KEY_QUEUE_FULL


class InternalError(CraftError):
    """A bug: the details are in the log under the job id, never in the answer (500)."""

    status = 500
    kind = ErrorKind.INTERNAL


class Unavailable(CraftError):
    """The server cannot do this now; the client should retry later (503)."""

    status = 503
    kind = ErrorKind.UNAVAILABLE

    def __init__(self, message: str, *, retry_after: float = 5.0, kind: ErrorKind | None = None) -> None:
        seconds = max(1, int(round(retry_after)))
        super().__init__(message, headers={"Retry-After": str(seconds)}, kind=kind)
        self.retry_after = seconds


class LoraError(CraftError):
    """A requested LoRA cannot be used (422): unreadable, not a LoRA, made for another model,
    or it does not fit the model's layers. The message reads "lora '<name>': <reason>"."""

    status = 422
    kind = ErrorKind.INVALID_LORA
    field = "loras"  # the request field at fault, for the dialects' error shapes

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"lora '{name}': {reason}")
        self.name = name
        self.reason = reason


class UpscalerError(InvalidParameter):
    """A model upscaler that cannot be used (422): its file is unreadable, a pickle that a
    weights-only load refuses, not an architecture spandrel knows, or not a super-resolution
    model. The message names the upscaler and its file (the file name, never the server's
    folder): "This server doesn't have upscaler '<name>': <reason>"."""

    def __init__(self, name: str, reason: str, *, field: str = "upscaler") -> None:
        super().__init__(field, name, reason)
        self.name = name
        self.reason = reason


class Interrupted(CraftError):
    """The caller's POST /sdapi/v1/interrupt (or skip) stopped this request's jobs (409)."""

    status = 409
    kind = ErrorKind.INTERRUPTED

    def __init__(self) -> None:
        super().__init__("interrupted: POST /sdapi/v1/interrupt (or skip) with this API key stopped "
                         "this request before its images were done")


class RefreshFailed(CraftError):
    """The models file cannot be read again (500: the server's configuration, not the request)."""

    status = 500
    kind = ErrorKind.REFRESH_FAILED


class NotSupported(CraftError):
    """What the request asks cannot be done by this server as it runs (501): e.g. releasing a
    model's device memory from the Ray ingress, whose replicas manage their own models."""

    status = 501
    kind = ErrorKind.NOT_SUPPORTED


class ModelNotFound(CraftError):
    """The requested model is not served and no alias maps it (404, OpenAI's model_not_found)."""

    status = 404
    kind = ErrorKind.MODEL_NOT_FOUND
    field = "model"


class TooLarge(CraftError):
    """A request over an edge limit before its body is read: URL (414), headers (431)."""

    def __init__(self, status: int, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class RequestRefused(CraftError):
    """A request refused at the edge for what it is, before any route runs: a Host outside
    the allowed list (400), a browser's cross-site request (403), a content type a web form can
    send (415)."""

    def __init__(self, status: int, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class PayloadTooLarge(CraftError):
    """A request body over the route's cap (413), refused before it is parsed."""

    status = 413
    kind = ErrorKind.BODY_TOO_LARGE
    field = "body"

    def __init__(self, size: int, cap: int, *, streamed: bool = False,
                 setting: str = "CRAFTSERVE_MAX_BODY_BYTES") -> None:
        what = f"passed {cap} bytes while being sent" if streamed else f"is {size} bytes"
        super().__init__(f"the request body {what}; at most {cap} bytes are accepted on this route "
                         f"(setting {setting})")


class RequestTimeout(CraftError):
    """The request body did not arrive in time (408)."""

    status = 408
    kind = ErrorKind.BODY_TIMEOUT


class JobNotFound(CraftError):
    """No job with this id for this key: unknown, another key's, or expired (404). The
    message says which of unknown-or-expired applies, never that another key owns it."""

    status = 404
    kind = ErrorKind.JOB_NOT_FOUND
    field = "id"


class JobConflict(CraftError):
    """The job is not in a state that allows this (409): its image before it is done,
    cancelling a job that already finished."""

    status = 409
    kind = ErrorKind.JOB_CONFLICT
    field = "id"
