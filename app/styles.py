"""Prompt styles as AUTOMATIC1111's web UI keeps them: a `styles.csv` of name, prompt and
negative_prompt, applied to a request's prompts by name (A1111 v1.10's `modules/styles.py`
behaviour; this is our own code).

- The file: CSV with a header row; columns `name`, `prompt` (the old `text` is read as it),
  `negative_prompt` (optional); a row whose name starts with `#` is a comment; a later row
  of the same name replaces an earlier one; UTF-8 with or without a byte-order mark.
- Applying a style to a text (`merge_prompts`): a style text with `{prompt}` has every
  `{prompt}` replaced by the text; one without it is appended, `text, style` (each stripped,
  the empty ones left out). Styles apply in the order they are named, each to the result of
  the one before, the prompt with the styles' prompts and the negative prompt with their
  negative prompts.
- A name that is not in the file is refused (`NotServed`, 422, naming it). A1111 skips it
  silently; an unknown style here means a client's list is out of date, which it should hear.
- `extract_styles` undoes `apply_styles` the way A1111 reads an infotext back (png-info):
  the styles whose texts wrap or end the prompts, innermost last.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidParameter, NotServed

__all__ = ["PromptStyle", "StylesFileError", "apply_styles", "extract_styles", "merge_prompts",
           "read_styles"]

# The most styles one request may name: each is one pass over the prompt.
MAX_STYLES_PER_REQUEST = 32


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class StylesFileError(ValueError):
    """The styles file cannot be read; the message says why and how to fix it."""


def read_styles(path: Path) -> dict[str, PromptStyle]:
    """The styles of a styles.csv, by name, in the file's order (a repeated name keeps its
    first place and its last texts)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            columns = reader.fieldnames or []
            if "name" not in columns or not {"prompt", "text"} & set(columns):
                raise StylesFileError(
                    f"{path}: the first row must name the columns: name,prompt,negative_prompt "
                    f"(A1111's styles.csv); it has {', '.join(map(repr, columns)) or 'none'}")
            styles: dict[str, PromptStyle] = {}
            for row in reader:
                name = row.get("name")
                if not name or name.startswith("#"):
                    continue
                prompt = row["prompt"] if "prompt" in row else row.get("text")
                styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
            return styles
    except OSError as exc:
        raise StylesFileError(f"{path}: cannot be read ({exc.strerror or exc}); fix the path "
                              "or remove `styles_file:`") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise StylesFileError(f"{path}: is not a UTF-8 CSV file ({exc}); save it as A1111 "
                              "writes styles.csv") from None


def merge_prompts(style_text: str, text: str) -> str:
    """One style's text applied to a prompt, as A1111 does."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


def _named(names: Sequence[str], table: Mapping[str, PromptStyle]) -> list[PromptStyle]:
    if len(names) > MAX_STYLES_PER_REQUEST:
        raise InvalidParameter("styles", f"<{len(names)} styles>",
                               f"at most {MAX_STYLES_PER_REQUEST} styles a request")
    styles = []
    for name in names:
        style = table.get(name)
        if style is None:
            raise NotServed("styles", name, table)
        styles.append(style)
    return styles


def apply_styles(prompt: str, negative_prompt: str, names: Sequence[str] | None,
                 table: Mapping[str, PromptStyle]) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order, as A1111 applies a
    request's `styles`; NotServed (422) for a name the table does not have."""
    for style in _named(names or (), table):
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def _unwrap(style_text: str, text: str) -> tuple[bool, str]:
    """Whether `text` is `style_text` applied to something, and that something."""
    stripped, style = text.strip(), style_text.strip()
    if "{prompt}" in style:
        left, _, right = style.partition("{prompt}")
        if "{prompt}" in right:  # A1111 cannot undo a style with two placeholders either
            return False, text
        if stripped.startswith(left) and stripped.endswith(right) and len(stripped) >= len(left + right):
            return True, stripped[len(left):len(stripped) - len(right)]
    elif stripped.endswith(style):
        rest = stripped[:len(stripped) - len(style)]
        return True, rest.removesuffix(", ")
    return False, text


def extract_styles(prompt: str, negative_prompt: str, table: Mapping[str, PromptStyle]
                   ) -> tuple[list[str], str, str]:
    """(style names, prompt, negative prompt): the styles whose texts the prompts carry, taken
    off, in the order they were applied (A1111's `extract_styles_from_prompt`)."""
    found: list[str] = []
    left = [style for style in table.values() if style.prompt or style.negative_prompt]
    while True:
        for style in left:
            matched, inner = _unwrap(style.prompt, prompt)
            if not matched:
                continue
            matched, inner_negative = _unwrap(style.negative_prompt, negative_prompt)
            if matched:
                prompt, negative_prompt = inner, inner_negative
                found.append(style.name)
                left.remove(style)
                break
        else:
            return list(reversed(found)), prompt, negative_prompt
