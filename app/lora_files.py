"""LoRA files on disk: the safetensors header and the model family a LoRA was made for.

Torch-free (no torch, diffusers, peft, nor safetensors' torch framework, at import or when
called): the registry reads every LoRA file at start-up with it, before any model is loaded.
It reads only a file's header, never its tensor data.

A safetensors file is an 8-byte little-endian length N, N bytes of JSON mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows
the header) plus an optional "__metadata__" {str: str}, then the tensor data. `read_header`
checks all of that, so a truncated or foreign file is named as such.

`check_lora_file` refuses what is not a plain LoRA. Which model a LoRA fits is not guessed
from the file: app.engine.lora_fit matches its layers against each model's architecture.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.errors import LoraError

__all__ = [
    "SafetensorsHeader",
    "check_lora_file",
    "read_header",
]

# safetensors refuses headers above 100 MB; a LoRA's is a few hundred KB at most.
_MAX_HEADER_BYTES = 100_000_000

# Bits per element of the safetensors dtypes (sub-byte float formats included). A dtype not
# listed is let through unchecked: the loader, which knows it or not, has the last word.
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

_LORA_SUFFIX = re.compile(
    r"(?:\.|_)(?:lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(?:down|up))"
    r"(?:\.[^.]+)?\.weight$"
)
_NAMED_ADAPTER = re.compile(r"\.lora_(?:A|B|down|up)\.[^.]+\.weight$")
_LYCORIS_MARKERS = ("hada_w", "lokr_w", "lora_mid", ".oft_", ".ia3", "lokr_t")


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says: tensor names (sorted), their shapes and dtypes, and the
    free-form string metadata."""

    keys: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str]


# --------------------------------------------------------------------------- header


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Malformed(Exception):
    """The bytes are not a valid safetensors file; the message says what is wrong."""


def _parse(raw: bytes, data_size: int) -> SafetensorsHeader:
    """Validate the header JSON against the data that follows it (`data_size` bytes)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Malformed("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _Malformed("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Malformed("its __metadata__ is not a mapping of strings")

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        where = f"tensor {_clip(repr(name), 60)}"
        if not isinstance(info, dict):
            raise _Malformed(f"{where} has no dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or not dtype:
            raise _Malformed(f"{where} has no dtype")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _Malformed(f"{where} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _Malformed(f"{where} has invalid data_offsets")
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None:
            size_bits = math.prod(shape) * bits
            if size_bits % 8 or offsets[1] - offsets[0] != size_bits // 8:
                raise _Malformed(f"{where}: its data_offsets do not match its shape and dtype")
        shapes[name] = tuple(shape)
        dtypes[name] = dtype
        spans.append((offsets[0], offsets[1], where))

    # The tensors' data must tile the data section: no gaps, no overlaps, nothing past its end.
    end = 0
    for begin, stop, where in sorted(spans):
        if begin != end:
            raise _Malformed(f"{where}: its data_offsets overlap or leave a gap")
        end = stop
    if end > data_size:
        raise _Malformed(
            f"truncated: the header describes {end} bytes of tensor data, the file holds {data_size}"
        )
    if end < data_size:
        raise _Malformed(f"{data_size - end} bytes after the tensor data that no tensor describes")
    return SafetensorsHeader(
        keys=tuple(sorted(shapes)),
        shapes=shapes,
        dtypes=dtypes,
        metadata=dict(metadata),
    )


def _read_raw(path: Path) -> tuple[bytes, int]:
    """The header bytes and the size of the data after them; raises OSError or _Malformed."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _Malformed(f"{len(prefix)} bytes long, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise _Malformed(f"its header length ({length} bytes) is not plausible")
        if 8 + length > info.st_size:
            raise _Malformed(
                f"truncated: its header length is {length} bytes, the file holds {info.st_size - 8}"
            )
        raw = f.read(length)
        if len(raw) < length:  # the file shrank while being read
            raise _Malformed("truncated while being read")
        return raw, info.st_size - 8 - length


def read_header(path: Path | str, *, name: str | None = None) -> SafetensorsHeader:
    """The validated header of a safetensors file. Raises LoraError (named `name`, default the
    file stem) for a missing, unreadable, truncated or non-safetensors file; the message
    never contains the server's path."""
    path = Path(path)
    label = name or path.stem
    try:
        raw, data_size = _read_raw(path)
        return _parse(raw, data_size)
    except FileNotFoundError:
        raise LoraError(label, "the LoRA file is missing on the server") from None
    except IsADirectoryError:
        raise LoraError(label, "the LoRA path is a directory, not a .safetensors file") from None
    except OSError as exc:
        raise LoraError(label, f"the LoRA file cannot be read ({exc.strerror or 'I/O error'})") from None
    except _Malformed as exc:
        reason = f"the file is not a readable safetensors file ({_clip(str(exc), 120)})"
        raise LoraError(label, reason) from None


# --------------------------------------------------------------------------- format


def _check_format(header: SafetensorsHeader, name: str) -> None:
    """Raise LoraError unless the file is a plain LoRA (kohya/A1111 or diffusers/PEFT names).

    Which model it fits is not read from the file: app.engine.lora_fit matches its layers
    against each model's architecture."""
    keys = header.keys
    lycoris = sorted({m.strip("._") for k in keys for m in _LYCORIS_MARKERS if m in k})
    if lycoris:
        raise LoraError(
            name,
            "unsupported format: LyCORIS adapter layers "
            f"({', '.join(lycoris)}); only plain LoRA files (kohya/A1111 or diffusers/PEFT) load",
        )
    lora_keys = [k for k in keys if _LORA_SUFFIX.search(k)]
    if not lora_keys:
        raise LoraError(name, "not a LoRA: the file holds no LoRA weights")
    if any(_NAMED_ADAPTER.search(k) for k in lora_keys):
        raise LoraError(
            name,
            "unsupported format: its keys carry a PEFT adapter name (lora_A.<name>.weight); "
            "save it without the adapter name",
        )


def check_lora_file(path: Path | str, *, name: str | None = None) -> SafetensorsHeader:
    """The header of a LoRA file, read and checked. Raises LoraError (named `name`, default
    the file stem) for an unreadable file, a file without LoRA weights and an unsupported
    format (LyCORIS, adapter-named PEFT keys)."""
    path = Path(path)
    label = name or path.stem
    header = read_header(path, name=label)
    _check_format(header, label)
    return header
