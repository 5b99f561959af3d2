"""Every limit of a request field, and every check of one, written once.

The dialects (VisionCraft, A1111, OpenAI, the job API) translate their bodies onto these:
their own defaults and field names differ, the rules do not. Server-wide limits that an
operator sets (prompt length, A1111 sizes and steps, images a request) come from the settings
and every message names the setting. Names and values are quoted at most `SHOWN_CHARS`
characters long (`shown`, in app.errors with the errors that quote them): a client may send a
megabyte anywhere.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import BeforeValidator

from app.config import Settings
from app.errors import InvalidParameter, TooManyPromptChunks, shown
from app.prompt_syntax import PromptSyntaxError, least_chunks, parse_prompt

MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED; -1 or absent: random
MAX_LORA_WEIGHT = 10.0  # a LoRA weight lies within ±MAX_LORA_WEIGHT
MAX_CLIP_SKIP = 12  # A1111's CLIP_stop_at_last_layers, 1..MAX_CLIP_SKIP
MIN_SIDE = 64  # pixels, width and height, in every dialect
MIN_CFG, MAX_CFG = 1.0, 30.0  # cfg_scale, in every dialect
DEFAULT_CFG = 7.0  # cfg_scale where a body is silent (VisionCraft, A1111 and OpenAI agree)
MAX_NAME_LENGTH = 200  # model, sampler, scheduler, LoRA, VAE names: longer ones are refused unread
def _setting(name: str | None) -> str:
    return f" (setting CRAFTSERVE_{name})" if name else ""


def check_range(field: str, value: float, low: float, high: float, *, setting: str | None = None,
                note: str = "") -> None:
    """422 unless low <= value <= high; `setting` names the setting that sets a bound."""
    if not low <= value <= high:
        raise InvalidParameter(field, value, f"{field} must be between {low:g} and {high:g}"
                               f"{_setting(setting)}{note}")


def check_side(field: str, value: int, settings: Settings) -> None:
    """A width or height of the A1111 and OpenAI dialects (VisionCraft's own is narrower)."""
    check_range(field, value, MIN_SIDE, settings.a1111_max_size, setting="A1111_MAX_SIZE")


def check_steps(field: str, value: int, settings: Settings) -> None:
    """Steps of the A1111 and OpenAI dialects (VisionCraft's own are fewer)."""
    check_range(field, value, 1, settings.a1111_max_steps, setting="A1111_MAX_STEPS")


def check_name(field: str, value: Any) -> str:
    """A name field (model, sampler, LoRA, ...): a string short enough to look up and echo."""
    if not isinstance(value, str):
        raise InvalidParameter(field, value, f"{field} must be a string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidParameter(field, shown(value), f"{field} is a name of at most {MAX_NAME_LENGTH} "
                               "characters")
    return value


def check_prompt_length(field: str, text: str, settings: Settings) -> None:
    """A prompt or negative prompt at most CRAFTSERVE_MAX_PROMPT_LENGTH characters long;
    checked before anything in it is read (or echoed)."""
    if len(text) > settings.max_prompt_length:
        raise InvalidParameter(field, f"<{len(text)} characters>",
                               f"at most {settings.max_prompt_length} characters"
                               f"{_setting('MAX_PROMPT_LENGTH')}")


def check_prompt_syntax(field: str, text: str) -> None:
    """422 for a prompt whose A1111 syntax is refused (a weight that is not a finite number
    within [-100, 100]), naming the fragment."""
    try:
        parse_prompt(text)
    except PromptSyntaxError as exc:
        raise InvalidParameter(field, exc.fragment, exc.rule) from None


def check_prompt_chunks(field: str, text: str, settings: Settings) -> None:
    """422 for a prompt that surely encodes to more than CRAFTSERVE_MAX_PROMPT_CHUNKS chunks of
    75 tokens (each BREAK starts one), before it is queued: `least_chunks`, a count that needs
    no tokenizer and never exceeds the encoder's. The worker counts exactly with the model's
    tokenizer before encoding anything (app.engine.worker) and refuses the rest the same way."""
    count = least_chunks(text)
    if count > settings.max_prompt_chunks:
        raise TooManyPromptChunks(field, count, settings.max_prompt_chunks, at_least=True)


def check_clip_skip(field: str, value: object) -> int:
    """A clip skip as A1111's CLIP_stop_at_last_layers: a whole number 1..12 (422 otherwise)."""
    whole = isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value == int(value)
    if not whole or not 1 <= value <= MAX_CLIP_SKIP:  # type: ignore[operator]
        raise InvalidParameter(field, value, f"{field} must be a whole number from 1 to "
                               f"{MAX_CLIP_SKIP} (1: the text encoder's last layer)")
    return int(value)  # type: ignore[arg-type]


def check_lora_weight(field: str, name: str, weight: Any) -> float:
    """A LoRA weight: a finite number within ±MAX_LORA_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
            or abs(weight) > MAX_LORA_WEIGHT:
        raise InvalidParameter(field, weight, f"the weight of LoRA {shown(name)!r} is a finite number "
                               f"from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
    return float(weight)


# ---- the same rules as pydantic types, for the request models ---------------------------------
def _no_bool(value: Any) -> Any:
    # JSON true/false would otherwise pass as 1/0 for numeric fields.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _lora_weights(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping LoRA names to weights, e.g. {\"my-lora\": 0.8}")
    for name, weight in value.items():
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"LoRA name {shown(name)!r} is longer than {MAX_NAME_LENGTH} characters")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight of LoRA {shown(name)!r} must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weight of LoRA {shown(name)!r} must be a finite number, got {weight!r}")
        if abs(weight) > MAX_LORA_WEIGHT:
            raise ValueError(f"weight of LoRA {shown(name)!r} is {weight!r}; it must lie within "
                             f"-{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool)]
Loras = Annotated[dict[str, float], BeforeValidator(_lora_weights)]


# ---- text that is not Unicode -------------------------------------------------------------------
def _lone_surrogate(text: str) -> int:
    """The index of the first lone surrogate in `text` (JSON decodes a `\\ud800` escape without
    its pair to one), or -1."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as bad:
        return bad.start
    return -1


_Where = tuple  # (the parent's _Where or None, key or index): a path, built only when needed


def _path(where: _Where | None) -> str:
    parts: list[str] = []
    while where is not None:
        where, part = where
        parts.append(shown(str(part).encode("utf-8", "backslashreplace").decode("utf-8"), 40))
    return ".".join(reversed(parts)) or "body"


def _surrogate_rule(text: str, at: int, what: str = "text") -> str:
    return (f"{what} must be valid Unicode; character {at} is a lone surrogate "
            f"(\\u{ord(text[at]):04x}), a \\u escape of half a UTF-16 pair; send the pair or the "
            "character itself")


def check_unicode(data: Any) -> None:
    """422 for text anywhere in a parsed JSON body, object keys included, that is not valid
    Unicode: a lone surrogate (a `\\ud800` escape without its pair). No encoder takes such text:
    the tokenizer fails, and so would every answer that quotes it. The message names the path
    of one of them (`prompt`, `override_settings.sd_vae`, `loras.<name>`, `styles.0`, the
    name escaped and cut short) and quotes a few characters around it, escaped. A body without
    such text costs about what parsing it did (its JSON text made again at C speed encodes);
    one with it, a walk of the parsed body in Python, iterative (a body may nest as deep as the
    JSON parser goes), a few times that."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return
    except (UnicodeEncodeError, RecursionError, ValueError):
        pass  # find it
    if isinstance(data, str):
        _check_text(None, data)
    stack: list[tuple[_Where | None, Any]] = [(None, data)]
    while stack:  # containers only; their strings are checked as they are met
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii():
                    _check_text((where, key), key, "an object key")
                if isinstance(item, str):
                    if not item.isascii():
                        _check_text((where, key), item)
                elif isinstance(item, dict | list):
                    stack.append(((where, key), item))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    if not item.isascii():
                        _check_text((where, index), item)
                elif isinstance(item, dict | list):
                    stack.append(((where, index), item))


def _check_text(where: _Where | None, text: str, what: str = "text") -> None:
    at = _lone_surrogate(text)
    if at >= 0:
        raise InvalidParameter(_path(where), text[max(0, at - 20):at + 20], _surrogate_rule(text, at, what))
