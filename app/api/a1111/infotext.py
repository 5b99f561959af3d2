"""A1111's infotext read back (POST /sdapi/v1/png-info): the `parameters` text of an image,
its other metadata (`items`), and the text parsed into fields (`parameters`), as A1111 v1.10's
`read_info_from_image` and `parse_generation_parameters` do with their default options
(our own code, written from what they answer).

The infotext is three parts: the prompt (any lines), `Negative prompt: ...` (any lines), and a
last line of `Key: value` pairs separated by commas (a value with a comma, colon or newline is
a JSON string). The last line counts as such only with at least 3 pairs. A size `WxH` becomes
`Key-1` and `Key-2`. Values stay strings, as in A1111; the defaults A1111 fills in for what the
text does not say are added with A1111's values and types. Styles (models.yaml
`styles_file:`) whose texts the prompts carry are taken off and named in `Styles array`
(A1111's "Apply if any"; with a hires prompt, only when it carries the same styles). Left
out: A1111's conversions of infotexts older than v1.6 (first-pass sizes, version flags).

Where the text is read from: a PNG's `parameters` text chunk (ours and A1111's), else the
EXIF UserComment of a JPEG or WebP (where both write it), else a GIF's comment. Chunks are read
as Pillow's `open` reads them, before the pixel data (where A1111 and craftserve write them);
the pixels are never decoded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image

from app.prompt_syntax import PromptSyntaxError, parse_prompt
from app.styles import PromptStyle, extract_styles

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Metadata A1111 leaves out of `items` (binary or layout details, not generation info).
IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
    "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
    "photoshop",
})
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286

# What A1111 fills in when the text does not say it (its values, its types).
_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", 0), ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""), ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"), ("Masked content", "original"),
    ("Inpaint area", "Whole picture"), ("Masked area padding", 32),
    ("RNG", "GPU"), ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0), ("Schedule min sigma", 0), ("Schedule rho", 0),
    ("VAE Encoder", "Full"), ("VAE Decoder", "Full"), ("FP8 weight", "Disable"),
)


def _user_comment(raw: bytes) -> str:
    """An EXIF UserComment as text: its 8-byte character-code prefix says how it is written."""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        little = body[:2] == b"\xff\xfe" or (len(body) > 1 and body[1:2] == b"\x00" and body[:1] != b"\x00")
        return body.decode("utf-16-le" if little else "utf-16-be", errors="ignore")
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="ignore").rstrip("\x00")
    return raw.decode("utf-8", errors="ignore")


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="ignore")
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, tuple | list):
        return [_json_safe(v) for v in value]
    return str(value)


def read_info_from_image(image: Image.Image) -> tuple[str | None, dict[str, Any]]:
    """(the infotext or None, the image's other metadata) as A1111's `read_info_from_image`."""
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        try:
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        except Exception:  # noqa: BLE001 - broken EXIF: no comment, as A1111
            comment = None
        if isinstance(comment, bytes):
            comment = _user_comment(comment)
        if comment:
            geninfo = comment
    elif "comment" in items:
        comment = items["comment"]
        geninfo = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else comment
    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)
    if isinstance(geninfo, bytes):
        geninfo = geninfo.decode("utf-8", errors="ignore")
    return (geninfo if isinstance(geninfo, str) else None), {
        str(k): _json_safe(v) for k, v in items.items()}


def unquote(text: str) -> str:
    if not (len(text) >= 2 and text[0] == '"' and text[-1] == '"'):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _uses_emphasis(*texts: str) -> bool:
    for text in texts:
        try:
            pieces = parse_prompt(text)
        except PromptSyntaxError:
            continue
        if any(not p.is_break and p.weight != 1.0 for p in pieces):
            return True
    return False


def parse_generation_parameters(text: str, styles: Mapping[str, PromptStyle]) -> dict[str, Any]:
    """An infotext as A1111's fields (see the module docstring)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if negative else prompt_lines).append(line)
    prompt, negative_prompt = "\n".join(prompt_lines), "\n".join(negative_lines)

    res: dict[str, Any] = {}
    for key, value in _PARAM.findall(last):
        value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value

    found, bare_prompt, bare_negative = extract_styles(prompt, negative_prompt, styles)
    same_hires_styles = True
    if "Hires prompt" in res or "Hires negative prompt" in res:
        hires_found, hires_prompt, hires_negative = extract_styles(
            res.get("Hires prompt", prompt), res.get("Hires negative prompt", negative_prompt), styles)
        same_hires_styles = hires_found == found
        if same_hires_styles:
            res["Hires prompt"] = "" if hires_prompt == bare_prompt else hires_prompt
            res["Hires negative prompt"] = "" if hires_negative == bare_negative else hires_negative
    if same_hires_styles:
        prompt, negative_prompt = bare_prompt, bare_negative
        if found:
            res["Styles array"] = found
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    if "Hypernet" in res:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    for key, value in _DEFAULTS:
        res.setdefault(key, value)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    if "Emphasis" not in res and _uses_emphasis(prompt, negative_prompt):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    return res
