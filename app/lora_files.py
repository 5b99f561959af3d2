"""LoRA files on disk: the safetensors header and the model family a LoRA was made for.

Torch-free (no torch, diffusers, peft, nor safetensors' torch framework, at import or when
called): the registry reads every LoRA file at start-up with it, before any model is loaded.
It reads only a file's header, never its tensor data.

A safetensors file is an 8-byte little-endian length N, N bytes of JSON mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows
the header) plus an optional "__metadata__" {str: str}, then the tensor data. `read_header`
checks all of that, so a truncated or foreign file is named as such.

`detect_lora_family` tells SDXL from SD 1.x LoRAs from layer names, shapes and metadata.
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

from app.errors import LoraError, LoraFamilyUnknown
from app.families import FAMILY_LABELS, Family

__all__ = [
    "SafetensorsHeader",
    "detect_lora_family",
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

# Width of the cross-attention keys/values (= the text conditioning width) per family.
# 2048 / 768 / 1024 are the real SDXL / SD 1.x / SD 2.x UNets; 64 and 32 are the tiny test
# pipelines of app.engine.tiny (SDXL: two 32-wide text encoders concatenated; SD 1.x: one).
_CROSS_ATTENTION_WIDTH: dict[int, str] = {
    2048: "sdxl",
    768: "sd15",
    1024: "sd2",
    64: "sdxl",
    32: "sd15",
}

_LORA_SUFFIX = re.compile(
    r"(?:\.|_)(?:lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(?:down|up))"
    r"(?:\.[^.]+)?\.weight$"
)
_DOWN_SUFFIX = re.compile(
    r"(?:\.lora_down|\.lora_A|\.lora\.down|_lora\.down|\.lora_linear_layer\.down)(?:\.[^.]+)?\.weight$"
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


# --------------------------------------------------------------------------- family


def _component(key: str) -> str:
    """Which pipeline part a LoRA key belongs to: unet, te1, te2 or ? (unknown)."""
    if key.startswith(("lora_te2_", "text_encoder_2.", "te2.")):
        return "te2"
    if key.startswith(("lora_te_", "lora_te1_", "text_encoder.", "te1.", "te.")):
        return "te1"
    if key.startswith(("lora_unet_", "unet.")):
        return "unet"
    flat = key.replace(".", "_")
    if re.search(
        r"(?:^|_)(?:down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)_", flat
    ):
        return "unet"
    if "text_model" in flat:
        return "te1"
    return "?"


# (metadata key, value prefix, family): modelspec first, then kohya's training metadata.
_METADATA_FAMILIES = (
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd15"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v1", "sd15"),
    ("ss_base_model_version", "sd_v2", "sd2"),
    ("ss_v2", "true", "sd2"),
)


def _metadata_family(metadata: Mapping[str, str]) -> str | None:
    for key, prefix, family in _METADATA_FAMILIES:
        if metadata.get(key, "").lower().startswith(prefix):
            return family
    return None


def _structural_votes(unet_keys: list[str], has_te2: bool) -> set[str]:
    """Family cues from layer names that hold for every real SDXL / SD 1.x UNet."""
    votes: set[str] = set()
    if has_te2:
        votes.add("sdxl")  # SDXL is the only family with a second text encoder
    for key in unet_keys:
        flat = key.replace(".", "_")
        if "add_embedding" in flat or "label_emb" in flat:
            votes.add("sdxl")  # the added-conditioning MLP exists only in SDXL
        depth = re.search(r"transformer_blocks_(\d+)_", flat)
        if depth and int(depth[1]) >= 1:
            votes.add("sdxl")  # SD 1.x/2.x transformers are one block deep; SDXL's 2 or 10
        if re.search(r"(?:^|_)down_blocks_0_attentions_", flat) or re.search(
            r"(?:^|_)(?:down|up)_blocks_3_", flat
        ):
            votes.add("sd15")  # SDXL has no attention in its first down block and 3 up blocks
        sgm = re.search(r"(?:^|_)input_blocks_(\d+)_1_", flat)
        if sgm and int(sgm[1]) in (1, 2):
            votes.add("sd15")  # attention at SGM input block 1/2 only in SD 1.x/2.x
        sgm = re.search(r"(?:^|_)output_blocks_(\d+)_1_", flat)
        if sgm and int(sgm[1]) >= 9:
            votes.add("sd15")  # SDXL has output blocks 0..8 only
    return votes


def _down_in_features(header: SafetensorsHeader, keys: list[str], pattern: str) -> set[int]:
    found = set()
    for key in keys:
        if re.search(pattern, key) and _DOWN_SUFFIX.search(key):
            shape = header.shapes.get(key, ())
            if len(shape) == 2:
                found.add(int(shape[1]))
    return found


def _size_vote(header: SafetensorsHeader, unet_keys: list[str], te1_keys: list[str]) -> str | None:
    cross = _down_in_features(header, unet_keys, r"attn2[._](?:processor[._])?to[._]?[kv]")
    te1 = _down_in_features(header, te1_keys, r"[._]q[._]?proj")
    if len(cross) == 1:
        width = next(iter(cross))
        if width in _CROSS_ATTENTION_WIDTH:
            return _CROSS_ATTENTION_WIDTH[width]
        if len(te1) == 1:
            hidden = next(iter(te1))
            # SD 1.x conditions on its one text encoder; SDXL on two, concatenated.
            return "sd15" if width == hidden else "sdxl" if width > hidden else None
    if not cross and te1 == {1024}:
        return "sd2"  # OpenCLIP-H, SD 2.x's only text encoder
    return None


def _classify(header: SafetensorsHeader, name: str) -> str | None:
    """The family ("sdxl", "sd15", "sd2"), None when nothing tells; raises for a non-LoRA."""
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
    parts: dict[str, list[str]] = {"unet": [], "te1": [], "te2": [], "?": []}
    for key in lora_keys:
        parts[_component(key)].append(key)

    votes = _structural_votes(parts["unet"] + parts["?"], has_te2=bool(parts["te2"]))
    size = _size_vote(header, parts["unet"] + parts["?"], parts["te1"])
    if size == "sd2":
        return "sd2"
    if len(votes) > 1:
        raise LoraError(name, "unsupported format: its layer names mix the SDXL and SD 1.x layouts")
    if votes:
        return next(iter(votes))
    if size:
        return size
    meta = _metadata_family(header.metadata)
    if meta:
        return meta
    if any(re.search(r"(?:^|[._])(?:input_blocks|middle_block|output_blocks)[._]", k) for k in keys):
        return "sdxl"  # kohya names the UNet the SGM way only for SDXL
    return None


def detect_lora_family(path: Path | str, *, name: str | None = None) -> Family:
    """SDXL ("sdxl") or SD 1.x ("sd15"), read from the file's safetensors header only.

    Cues, strongest first: layer names that exist in only one family (a second text encoder,
    SDXL's added-conditioning MLP, transformer depth > 1, attention in the first down block,
    a fourth UNet block), then the cross-attention width (2048 SDXL, 768 SD 1.x, and the tiny
    test pipelines' 64 / 32), then kohya/modelspec metadata, then SGM (`input_blocks_`) naming.
    Raises LoraError (named `name`, default the file stem) for an unreadable file, a file
    without LoRA weights, an unsupported format (LyCORIS, SD 2.x), and its subclass
    LoraFamilyUnknown for a LoRA whose family nothing tells.
    """
    path = Path(path)
    label = name or path.stem
    family = _classify(read_header(path, name=label), label)
    if family == "sd2":
        raise LoraError(
            label, f"unsupported: it is an {FAMILY_LABELS['sd2']} LoRA; only SDXL and SD 1.x are served"
        )
    if family is None:
        raise LoraFamilyUnknown(
            label,
            "cannot tell whether it is an SDXL or an SD 1.x LoRA; declare its family in models.yaml",
        )
    return family  # type: ignore[return-value]
