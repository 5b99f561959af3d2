"""A1111 prompts, encoded: the torch half of the prompt module (the parser is app.prompt_syntax).

What AUTOMATIC1111's web UI does with a prompt, for SDXL and SD 1.x pipelines (our own code,
written from its documented behaviour):

- The parsed pieces are tokenized without special tokens and laid out in chunks of 75 tokens,
  each encoded as BOS + 75 + EOS. A chunk that fills up while its last comma is at most 20
  tokens back moves the text after that comma to the next chunk (A1111's comma backtrack);
  BREAK closes the current chunk. A short chunk is filled with EOS; an encoder whose tokenizer
  pads with another token (the real SDXL OpenCLIP-G tokenizer: "!" = 0) gets that token after
  the first EOS, exactly as A1111 and diffusers do.
- A textual inversion embedding takes as many positions as it has vectors, in place of the
  tokens of its name (matched on tokens, longest name first); a chunk without room for all of
  them is closed first. Its vectors replace the token embeddings at those positions.
- Each chunk goes through the text encoder(s). SD 1.x: the last hidden state after the final
  layer norm, or with clip skip n > 1 the n-th hidden state from the end, then the final norm
  (A1111's CLIP_stop_at_last_layers). SDXL: the penultimate hidden state of both encoders, no
  final norm, concatenated on the feature axis, whatever the clip skip (A1111 does the same
  unless its `sdxl_clip_l_skip` option is on); the pooled embedding is encoder 2's of the
  first chunk.
- Emphasis ("Original"): each token's hidden state is multiplied by its weight, then the
  chunk is rescaled so its mean equals the mean before weighting.
- The chunks of a text are concatenated on the token axis; the prompt and the negative prompt
  are padded to the same number of chunks with the encoding of an empty chunk (A1111's empty
  chunk, the encoding of ""). An empty SDXL negative prompt stays zeros (left to the pipeline).

A plain prompt (no syntax, no embedding, clip skip 1, at most 75 tokens) encodes to the same
bits as the pipeline's own `encode_prompt`; the worker still lets the pipeline encode those,
and uses this module only for batches that need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.prompt_syntax import is_plain, parse_prompt

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
_PLACEHOLDER = 0  # the token id at an embedding's positions (replaced before the encoder)


EmbeddingRef = tuple[Path, str]  # (file, name) of an embedding


@dataclass
class Chunk:
    """Up to 75 content tokens of one text for one encoder, their weights, and the embeddings
    placed in it: (position among the content tokens, the embedding)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, EmbeddingRef]] = field(default_factory=list)


@dataclass
class _Slot:
    """One text encoder of the pipeline with its tokenizer; `key` names its tensor in an
    embedding file."""

    tokenizer: Any
    encoder: Any
    key: str
    pooled: bool  # SDXL's encoder 2: its projected pooled output is used

    @property
    def bos(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos if pad is None else pad

    @functools.cached_property
    def comma(self) -> int | None:
        return self.tokenizer.get_vocab().get(",</w>")  # (get_vocab copies the whole vocabulary)


@dataclass(frozen=True)
class Encoded:
    """A text's encoding: hidden states [1, 77 * chunks, width] and (SDXL) the pooled [1, w]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None

    @property
    def chunks(self) -> int:
        return self.hidden.shape[1] // (CHUNK_TOKENS + 2)


class PromptEncoder:
    """Encodes prompts for one pipeline of `family` ("sdxl" or "sd15"), the A1111 way."""

    def __init__(self, pipe: Any, family: str) -> None:
        self.family = family
        if family == "sdxl":
            # SDXL's refiner has no first encoder: its conditioning is encoder 2's alone
            first = ([_Slot(pipe.tokenizer, pipe.text_encoder, "clip_l", False)]
                     if getattr(pipe, "text_encoder", None) is not None else [])
            self.slots = [*first, _Slot(pipe.tokenizer_2, pipe.text_encoder_2, "clip_g", True)]
        else:
            self.slots = [_Slot(pipe.tokenizer, pipe.text_encoder, "emb_params", False)]
        self._files: dict[Path, dict[str, torch.Tensor]] = {}
        self._fit: dict[Path, bool] = {}
        self._named: dict[tuple, list[tuple[list[int], Path, str]]] = {}

    # ---- deciding --------------------------------------------------------------------
    def needs_encoding(self, text: str, clip_skip: int, embeddings: Sequence[tuple[str, Path]]) -> bool:
        """Whether `text` needs this module: the pipeline's own encoding would differ (syntax,
        an embedding, a clip skip it applies, more than 75 tokens)."""
        if self.family == "sd15" and clip_skip != 1:
            return True
        if not is_plain(text, parse_prompt(text)):
            return True
        for slot in self.slots:
            tokens = self._tokenize(slot, [text])[0]
            if len(tokens) > CHUNK_TOKENS:
                return True
            names = self._names(slot, embeddings) if embeddings else []
            if names and any(self._find_embedding(tokens, i, names) for i in range(len(tokens))):
                return True
        return False

    def chunk_count(self, text: str, embeddings: Sequence[tuple[str, Path]]) -> int:
        return max(len(self.chunks(slot, text, embeddings)) for slot in self.slots)

    # ---- chunks ----------------------------------------------------------------------
    def chunks(self, slot: _Slot, text: str, embeddings: Sequence[tuple[str, Path]] = ()) -> list[Chunk]:
        """The text's chunks for one encoder, by A1111's rules (module docstring)."""
        pieces = parse_prompt(text)
        texts = [p.text for p in pieces if not p.is_break]
        tokenized = iter(self._tokenize(slot, texts) if texts else [])
        names = self._names(slot, embeddings)
        builder = _ChunkBuilder(slot.comma)
        for piece in pieces:
            if piece.is_break:
                builder.close()
                continue
            tokens = next(tokenized)
            position = 0
            while position < len(tokens):
                builder.before_token(tokens[position])
                found = self._find_embedding(tokens, position, names) if names else None
                if found is None:
                    builder.add(tokens[position], piece.weight)
                    position += 1
                    continue
                name_length, vectors = found
                builder.add_embedding(vectors, piece.weight)
                position += name_length
        return builder.finish()

    def _tokenize(self, slot: _Slot, texts: list[str]) -> list[list[int]]:
        return slot.tokenizer(texts, add_special_tokens=False, truncation=False,
                              verbose=False)["input_ids"]

    def _names(self, slot: _Slot,
               embeddings: Sequence[tuple[str, Path]]) -> list[tuple[list[int], Path, str]]:
        """(token ids of the name, file, name) of each embedding that fits this model, longest
        name first (cached: a job asks several times)."""
        key = (slot.key, tuple(embeddings))
        found = self._named.get(key)
        if found is None:
            named = [(self._tokenize(slot, [name])[0], path, name) for name, path in embeddings
                     if self._fits(name, path)]
            found = sorted((n for n in named if n[0]), key=lambda n: -len(n[0]))
            if len(self._named) > 256:  # prompts name few distinct sets; keep it bounded
                self._named.clear()
            self._named[key] = found
        return found

    @staticmethod
    def _find_embedding(tokens: list[int], position: int,
                        names: list[tuple[list[int], Path, str]]) -> tuple[int, EmbeddingRef] | None:
        """(how many tokens its name takes, the embedding) of the embedding whose name starts at
        `position`, the longest first; None when none does."""
        for ids, path, name in names:
            if tokens[position:position + len(ids)] == ids:
                return len(ids), (path, name)
        return None

    # ---- encoding --------------------------------------------------------------------
    def encode(self, text: str, clip_skip: int = 1, embeddings: Sequence[tuple[str, Path]] = (),
               min_chunks: int = 1) -> Encoded:
        """The text's encoding, padded with empty chunks to at least `min_chunks` chunks."""
        per_slot = [self.chunks(slot, text, embeddings) for slot in self.slots]
        count = max(min_chunks, *(len(c) for c in per_slot))
        hidden_parts: list[list[torch.Tensor]] = []
        pooled = None
        for slot, chunks in zip(self.slots, per_slot, strict=True):
            chunks = chunks + [Chunk() for _ in range(count - len(chunks))]
            states = []
            for number, chunk in enumerate(chunks):
                state, chunk_pooled = self._encode_chunk(slot, chunk, clip_skip)
                states.append(state)
                if slot.pooled and number == 0:
                    pooled = chunk_pooled
            hidden_parts.append(states)
        per_chunk = [torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                     for parts in zip(*hidden_parts, strict=True)]
        return Encoded(torch.cat(per_chunk, dim=1), pooled)

    def _ids(self, slot: _Slot, chunk: Chunk) -> list[int]:
        filler = CHUNK_TOKENS - len(chunk.tokens)
        ids = [slot.bos, *chunk.tokens, *[slot.eos] * filler, slot.eos]
        if slot.pad != slot.eos:
            first_eos = ids.index(slot.eos)
            ids[first_eos + 1:] = [slot.pad] * (len(ids) - first_eos - 1)
        return ids

    def _encode_chunk(self, slot: _Slot, chunk: Chunk, clip_skip: int):  # noqa: ANN202
        encoder = slot.encoder
        device = encoder.device
        ids = torch.tensor([self._ids(slot, chunk)], dtype=torch.long, device=device)
        fixes = [(position, self._vectors(slot, source)) for position, source in chunk.fixes]
        with torch.no_grad(), _embeddings_at(encoder, fixes):
            if self.family == "sdxl":
                out = encoder(ids, output_hidden_states=True)
                state = out.hidden_states[-2]
                pooled = out[0] if slot.pooled else None
            elif clip_skip == 1:
                state, pooled = encoder(ids)[0], None
            else:
                out = encoder(ids, output_hidden_states=True)
                # Past the encoder's depth (only tiny test encoders are shallower than 12
                # layers): its first hidden state, the token embeddings.
                layer = min(clip_skip, len(out.hidden_states))
                state = _final_norm(encoder)(out.hidden_states[-layer])
                pooled = None
            weights = [1.0, *chunk.weights, *[1.0] * (CHUNK_TOKENS + 1 - len(chunk.weights))]
            if any(w != 1.0 for w in weights):
                state = _emphasis(state, weights)
        return state, pooled

    def _tensors(self, path: Path) -> dict[str, torch.Tensor]:
        tensors = self._files.get(path)
        if tensors is None:
            from safetensors.torch import load_file

            tensors = self._files[path] = load_file(str(path))
        return tensors

    def _fits(self, name: str, path: Path) -> bool:
        """Whether the file has [vectors, width] tensors for every encoder of this pipeline; a
        file made for another model (e.g. an SD 2.x `emb_params`) is not used: its name stays
        plain text, as with a file of the other family. Warned about once."""
        fits = self._fit.get(path)
        if fits is None:
            tensors = self._tensors(path)
            fits = all(
                (v := tensors.get(slot.key)) is not None and v.dim() == 2
                and v.shape[1] == slot.encoder.get_input_embeddings().weight.shape[1]
                for slot in self.slots)
            self._fit[path] = fits
            if not fits:
                logger.warning("embedding %r does not fit this model's text encoder(s) (%s); its "
                               "name stays plain text", name, ", ".join(
                                   f"{k} {list(v.shape)}" for k, v in tensors.items()))
        return fits

    def _vectors(self, slot: _Slot, source: EmbeddingRef) -> torch.Tensor:
        return self._tensors(source[0])[slot.key]


class _ChunkBuilder:
    """A1111's chunking of a text's tokens (see the module docstring)."""

    def __init__(self, comma: int | None) -> None:
        self.comma = comma
        self.done: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        self.done.append(self.current)
        self.current = Chunk()
        self.last_comma = -1

    def before_token(self, token: int) -> None:
        """Make room for the next token: the comma backtrack, then a new chunk if full."""
        current = self.current
        if token == self.comma:
            self.last_comma = len(current.tokens)
        elif (len(current.tokens) == CHUNK_TOKENS and self.last_comma != -1
              and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK):
            cut = self.last_comma + 1
            moved = Chunk(current.tokens[cut:], current.weights[cut:],
                          [(p - cut, v) for p, v in current.fixes if p >= cut])
            del current.tokens[cut:], current.weights[cut:]
            current.fixes[:] = [(p, v) for p, v in current.fixes if p < cut]
            self.close()
            self.current = moved
        if len(self.current.tokens) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float) -> None:
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def add_embedding(self, source: EmbeddingRef, weight: float) -> None:
        count = _vector_count(source[0])
        if len(self.current.tokens) + count > CHUNK_TOKENS:
            self.close()
        self.current.fixes.append((len(self.current.tokens), source))
        self.current.tokens.extend([_PLACEHOLDER] * count)
        self.current.weights.extend([weight] * count)

    def finish(self) -> list[Chunk]:
        if self.current.tokens or not self.done:
            self.close()
        return self.done


_VECTOR_COUNTS: dict[Path, int] = {}


def _vector_count(path: Path) -> int:
    """How many positions an embedding file's vectors take (from its header; cached)."""
    count = _VECTOR_COUNTS.get(path)
    if count is None:
        from app.lora_files import read_header

        shapes = read_header(path).shapes
        shape = shapes.get("emb_params") or shapes.get("clip_l") or (1,)
        count = _VECTOR_COUNTS[path] = int(shape[0])
    return count


def _final_norm(encoder: Any) -> Any:
    """The text encoder's final layer norm (transformers 5 flattens CLIPTextModel; older ones
    keep it under `text_model`)."""
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm


def _emphasis(state: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's state by its weight, then restore the
    chunk's mean."""
    values = state.float()
    before = values.mean()
    values = values * torch.tensor(weights, dtype=torch.float32, device=state.device).reshape(1, -1, 1)
    values = values * (before / values.mean())
    return values.to(state.dtype)


@contextmanager
def _embeddings_at(encoder: Any, fixes: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While encoding one chunk, put each embedding's vectors at its content positions (after
    BOS) in place of the token embeddings of the placeholders."""
    if not fixes:
        yield
        return

    def replace(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, vectors in fixes:
            start = 1 + position
            output[:, start:start + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
