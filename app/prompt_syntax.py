"""A1111 prompt syntax, parsed: the torch-free half of the prompt module.

`parse_prompt` turns a prompt into `Piece`s (text and its attention weight, or a BREAK) by
the rules of AUTOMATIC1111's web UI (its "Original" emphasis; this is our own code):

- `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by
  w; nesting multiplies (`((x))` is 1.1 * 1.1). Round and square brackets keep separate stacks,
  as in A1111, and the factors apply in the order the brackets close.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; any other backslash is
  dropped (A1111 does the same).
- A `)` or `]` with nothing open is literal text; brackets still open at the end close there
  (all round ones first, then the square ones, as A1111).
- `BREAK` (upper case, a whole word) ends the current 75-token chunk; the spaces around it
  go with it. Unlike A1111 (where a BREAK inside brackets turns into the word "BREAK") it ends
  the chunk wherever it stands.
- Weights must be finite and within [-100, 100]: the `w` of `(x:w)` and every text's weight
  after nesting. `w` is A1111's number (`1.5`, `.5`, `-2`) or, so that it is refused rather
  than read as text, an exponent form or nan/inf. Anything else raises `PromptSyntaxError`
  naming the fragment.

Adjacent pieces of equal weight are merged. The encoder half (tokens, chunks, emphasis,
embeddings) is app.engine.prompts.

`least_chunks` is how many 75-token chunks a prompt encodes to at least, whatever CLIP
tokenizer encodes it, counted without one (the HTTP side refuses prompts over
CRAFTSERVE_MAX_PROMPT_CHUNKS with it before they are queued; the worker counts exactly).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["MAX_WEIGHT", "Piece", "PromptSyntaxError", "is_plain", "least_chunks", "parse_prompt"]

MAX_WEIGHT = 100.0
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical unit of the prompt, tried in this order.
_UNIT = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])?        # an escape (a lone backslash is dropped)
  | (?P<open>[(\[])
  | :(?P<weight>[+-]?(?:[\d.]+(?:[eE][+-]?\d+)?|(?i:nan|inf(?:inity)?)))\)   # ':w)'
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Piece:
    """A run of prompt text and its attention weight; `is_break` marks a BREAK (no text)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


class PromptSyntaxError(ValueError):
    """A prompt the syntax refuses: `fragment` is the part at fault, `rule` says why."""

    def __init__(self, fragment: str, rule: str) -> None:
        super().__init__(f"{fragment!r}: {rule}")
        self.fragment = fragment
        self.rule = rule


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _weight_rule() -> str:
    return (f"a weight must be a finite number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
            "(A1111 syntax: (text:1.2), (text), [text])")


class _Parser:
    """One parse: the pieces so far (text, weight) and the open brackets of each kind."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.texts: list[str | None] = []  # None: a BREAK
        self.weights: list[float] = []
        self.rounds: list[tuple[int, int]] = []  # (first piece, offset of the bracket)
        self.squares: list[tuple[int, int]] = []

    def add_text(self, text: str) -> None:
        parts = _BREAK.split(text)
        for number, part in enumerate(parts):
            if number:
                self.texts.append(None)
                self.weights.append(1.0)
            self.texts.append(part)
            self.weights.append(1.0)

    def scale(self, first: int, factor: float) -> None:
        for index in range(first, len(self.weights)):
            if self.texts[index] is not None:
                self.weights[index] *= factor

    def close_weighted(self, raw: str, end: int) -> None:
        first, start = self.rounds.pop()
        fragment = _shorten(self.prompt[start:end])
        try:
            weight = float(raw)
        except ValueError:
            raise PromptSyntaxError(fragment, f"{raw!r} is not a number; {_weight_rule()}") from None
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise PromptSyntaxError(fragment, f"weight {raw}: {_weight_rule()}")
        self.scale(first, weight)

    def run(self) -> list[Piece]:
        for unit in _UNIT.finditer(self.prompt):
            if unit.group(0).startswith("\\"):
                self.add_text(unit.group("escaped") or "")
            elif unit.group("open") == "(":
                self.rounds.append((len(self.texts), unit.start()))
            elif unit.group("open") == "[":
                self.squares.append((len(self.texts), unit.start()))
            elif unit.group("weight") is not None and self.rounds:
                self.close_weighted(unit.group("weight"), unit.end())
            elif unit.group("close") == ")" and self.rounds:
                self.scale(self.rounds.pop()[0], ROUND_FACTOR)
            elif unit.group("close") == "]" and self.squares:
                self.scale(self.squares.pop()[0], SQUARE_FACTOR)
            else:  # text, a lone ':', or a bracket closing nothing (literal)
                self.add_text(unit.group(0))
        for first, _ in self.rounds:
            self.scale(first, ROUND_FACTOR)
        for first, _ in self.squares:
            self.scale(first, SQUARE_FACTOR)
        return self.pieces()

    def pieces(self) -> list[Piece]:
        merged: list[Piece] = []
        for text, weight in zip(self.texts, self.weights, strict=True):
            if text is None:
                merged.append(Piece("", 1.0, is_break=True))
                continue
            if text and (not math.isfinite(weight) or abs(weight) > MAX_WEIGHT):
                raise PromptSyntaxError(
                    _shorten(text), f"its weight after nesting brackets is {weight:.4g}; "
                    f"{_weight_rule()}")
            last = merged[-1] if merged else None
            if last is not None and not last.is_break and last.weight == weight:
                merged[-1] = Piece(last.text + text, weight)
            else:
                merged.append(Piece(text, weight))
        return merged or [Piece("", 1.0)]


def parse_prompt(prompt: str) -> list[Piece]:
    """The prompt's pieces by A1111's rules (see the module docstring); raises
    PromptSyntaxError for a weight that is not a finite number within [-100, 100]."""
    return _Parser(prompt).run()


def is_plain(prompt: str, pieces: list[Piece]) -> bool:
    """True when the syntax changes nothing: one piece, the prompt itself, weight 1."""
    return len(pieces) == 1 and not pieces[0].is_break and pieces[0].weight == 1.0 \
        and pieces[0].text == prompt


CHUNK_TOKENS = 75  # content tokens a chunk holds (BOS and EOS around them make 77)
# The units CLIP's tokenizers split text into before BPE (its pattern, `[\p{L}]+`, `[\p{N}]`,
# `[^\s\p{L}\p{N}]+`, contractions apart): each becomes at least one token.
_PRE_TOKEN = re.compile(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+")


def _least_tokens(text: str) -> int:
    """A lower bound of the tokens any CLIP tokenizer makes of `text`: its pre-tokenizer units
    after the normalizations that can merge units (composition; dropping combining marks,
    which would otherwise split a run). Contractions and BPE only ever make more."""
    text = unicodedata.normalize("NFC", text)
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return sum(1 for _ in _PRE_TOKEN.finditer(text))


def least_chunks(prompt: str) -> int:
    """How many chunks the prompt encoder (app.engine.prompts) makes of `prompt` at least, with
    any CLIP tokenizer: each BREAK closes a chunk (empty ones too), a run of text between BREAKs
    takes a chunk for each 75 tokens begun, and a run after the last BREAK only if it has text.
    Exact for prompts of BREAKs and short text; the comma backtrack and embeddings only add.
    Raises PromptSyntaxError as parse_prompt does."""
    pieces = parse_prompt(prompt)
    chunks = 0
    tokens = 0
    breaks = 0
    for piece in pieces:
        if piece.is_break:
            chunks += max(1, math.ceil(tokens / CHUNK_TOKENS))
            tokens = 0
            breaks += 1
        else:
            tokens += _least_tokens(piece.text)
    last = math.ceil(tokens / CHUNK_TOKENS)
    return chunks + (last if last or breaks else 1)
