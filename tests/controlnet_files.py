"""Tiny random ControlNets for the tests: `ControlNetModel.from_unet` on the tiny models' UNets
(app.engine.tiny), the zero-initialised output convolutions randomised (else a unit would
change nothing), saved as a diffusers folder or a single diffusers-layout .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_controlnet(family: str, seed: int = 1):  # noqa: ANN201
    from diffusers import ControlNetModel

    from app.engine import tiny

    pipe = tiny.build_tiny_sdxl() if family == "sdxl" else tiny.build_tiny_sd15()
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn_like(param) * 0.3)
    return net.eval()


def save_folder(net, folder: Path) -> Path:  # noqa: ANN001
    net.save_pretrained(folder)
    return folder


def save_file(net, path: Path) -> Path:  # noqa: ANN001
    from safetensors.torch import save_file as save

    save({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def controlnet_models(folder: Path) -> str:
    """models.yaml of the ControlNet tests: tiny-sdxl (preloaded), tiny-sd15 and the nets of
    `folder`."""
    return f"""
models:
  tiny-sdxl: {{source: "builtin:tiny-sdxl", preload: true}}
  tiny-sd15: {{source: "builtin:tiny-sd15"}}
controlnet_dirs: ["{folder}"]
"""


def write_nets(folder: Path) -> dict:
    """The ControlNet tests' two nets written to `folder`: an SDXL one as the diffusers folder
    `cn-xl`, an SD 1.5 one as the single file `cn_sd15.safetensors`; with the nets themselves."""
    xl, sd = tiny_controlnet("sdxl"), tiny_controlnet("sd15", seed=2)
    save_folder(xl, folder / "cn-xl")
    save_file(sd, folder / "cn_sd15.safetensors")
    return {"folder": folder, "sdxl": xl, "sd15": sd}
