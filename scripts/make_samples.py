"""Write the sample LoRA, textual-inversion embedding and ControlNet made for `tiny-sdxl`.

The shipped models.yaml serves `tiny-sdxl` (app/engine/tiny.py, random weights built in code),
the model that serves on any machine, offline too; the examples of README.md and
docs/clients.md use these three files with it, so they run as written on a fresh clone:

- `loras/tiny-style.safetensors`: a LoRA in the diffusers/PEFT layout (`unet.<module>.lora_A.weight`,
  `text_encoder.`, `text_encoder_2.`), rank 4, on every attention projection of tiny-sdxl's UNet
  and both text encoders. Its layers fit tiny-sdxl and no real SDXL (their widths differ), so
  `GET /loras-xl` lists it and a request on `sdxl-base` is refused naming the misfit.
- `embeddings/tiny-token.safetensors`: an SDXL embedding in A1111's layout (`clip_l` and
  `clip_g`, two vectors each), used by writing its name, `tiny-token`, in a prompt.
- `controlnet/tiny-canny.safetensors`: a ControlNet for tiny-sdxl in diffusers' single-file
  layout, `ControlNetModel.from_unet` on tiny-sdxl's UNet (its encoder copied) with the layers
  that are not copied (the conditioning embedding, the zero convolutions) seeded random numbers,
  so a unit changes the picture. Stored in half precision (about 1 MB: the copied encoder is
  most of it, and its shapes must be tiny-sdxl's); the server casts it to the model's dtype.
  Named for the canny examples it serves; it was trained on nothing.

All are seeded random numbers: they change the image, they carry no style. The files are
committed; this script writes the same bytes again (tests/test_first_hour.py checks that):

  .venv/bin/python scripts/make_samples.py            # rewrite the three files
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
CONTROLNET = ROOT / "controlnet" / "tiny-canny.safetensors"
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


# The ControlNet's layers that from_unet does not copy from the UNet: diffusers initialises the
# zero convolutions (and the embedding's last one) to zero, so the net would change nothing.
_ZERO_INITIALISED = ("controlnet_down_blocks.", "controlnet_mid_block.",
                     "controlnet_cond_embedding.conv_out.")
_NOT_COPIED = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def controlnet_tensors() -> dict[str, torch.Tensor]:
    """The sample ControlNet's tensors (half precision), by their diffusers names: tiny-sdxl's
    UNet encoder as from_unet copies it, the other layers drawn from a seeded generator (never
    from diffusers' initialisation, which uses the global random state)."""
    from diffusers import ControlNetModel

    from app.engine.tiny import build_tiny_sdxl

    net = ControlNetModel.from_unet(build_tiny_sdxl().unet,
                                    conditioning_embedding_out_channels=(16, 16, 32, 32))
    gen = torch.Generator().manual_seed(SEED + 2)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in net.state_dict().items():
        if name.startswith(_NOT_COPIED):
            if name.startswith(_ZERO_INITIALISED):
                value = torch.randn(value.shape, generator=gen) * 0.3
            elif name.endswith(".weight"):
                fan_in = value[0].numel()
                value = torch.randn(value.shape, generator=gen) / fan_in ** 0.5
            else:
                value = torch.zeros(value.shape)
        tensors[name] = value.detach().to(torch.float16).contiguous()
    return tensors


def write(lora: Path = LORA, embedding: Path = EMBEDDING, controlnet: Path = CONTROLNET) -> None:
    from safetensors.torch import save_file

    for path in (lora, embedding, controlnet):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(), str(lora), metadata={"format": "pt"})
    save_file(embedding_tensors(), str(embedding), metadata={"format": "pt"})
    save_file(controlnet_tensors(), str(controlnet), metadata={"format": "pt"})


if __name__ == "__main__":
    write()
    for path in (LORA, EMBEDDING, CONTROLNET):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
