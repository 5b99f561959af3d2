"""Write the sample LoRA and textual-inversion embedding made for `tiny-sdxl`.

The shipped models.yaml serves `tiny-sdxl` (app/engine/tiny.py, random weights built in code),
the model that serves on any machine, offline too; the examples of README.md and
docs/clients.md use these two files with it, so they run as written on a fresh clone:

- `loras/tiny-style.safetensors`: a LoRA in the diffusers/PEFT layout (`unet.<module>.lora_A.weight`,
  `text_encoder.`, `text_encoder_2.`), rank 4, on every attention projection of tiny-sdxl's UNet
  and both text encoders. Its layers fit tiny-sdxl and no real SDXL (their widths differ), so
  `GET /loras-xl` lists it and a request on `sdxl-base` is refused naming the misfit.
- `embeddings/tiny-token.safetensors`: an SDXL embedding in A1111's layout (`clip_l` and
  `clip_g`, two vectors each), used by writing its name, `tiny-token`, in a prompt.

Both are seeded random numbers: they change the image, they carry no style. The files are
committed; this script writes the same bytes again (tests/test_first_hour.py checks that):

  .venv/bin/python scripts/make_samples.py            # rewrite both files
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LORA = ROOT / "loras" / "tiny-style.safetensors"
EMBEDDING = ROOT / "embeddings" / "tiny-token.safetensors"
RANK = 4
SEED = 2025
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linears(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(targets)
            and any(name.endswith(f".{t}") for t in targets)]


def lora_tensors() -> dict[str, torch.Tensor]:
    """The sample LoRA's tensors, by their names in the file."""
    from app.engine.tiny import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    gen = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    parts = [("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder, TEXT_TARGETS),
             ("text_encoder_2", pipe.text_encoder_2, TEXT_TARGETS)]
    for component, model, targets in parts:
        for name, linear in _linears(model, targets):
            if component != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # how LoRA files in the wild name CLIP's layers
            down = torch.randn((RANK, linear.in_features), generator=gen) / linear.in_features ** 0.5
            up = torch.randn((linear.out_features, RANK), generator=gen) * 0.5
            tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    return tensors


def embedding_tensors() -> dict[str, torch.Tensor]:
    """The sample embedding: two vectors per text encoder of tiny-sdxl, at the scale of its
    token embeddings."""
    from app.engine.tiny import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    gen = torch.Generator().manual_seed(SEED + 1)
    out = {}
    for key, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        table = encoder.get_input_embeddings().weight.detach()
        out[key] = (torch.randn((2, table.shape[1]), generator=gen) * table.std() * 4).contiguous()
    return out


def write(lora: Path = LORA, embedding: Path = EMBEDDING) -> None:
    from safetensors.torch import save_file

    lora.parent.mkdir(parents=True, exist_ok=True)
    embedding.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(), str(lora), metadata={"format": "pt"})
    save_file(embedding_tensors(), str(embedding), metadata={"format": "pt"})


if __name__ == "__main__":
    write()
    for path in (LORA, EMBEDDING):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
