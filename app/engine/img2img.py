"""Image-to-image and inpainting on a loaded model's own components.

A model loads one text-to-image pipeline; its image-to-image and inpainting pipelines are made
from it with diffusers' `from_pipe` the first time a job needs them (`pipeline_for`): the same
UNet, VAE, text encoders and tokenizers, no weight copied, so LoRAs, embeddings, the CPU's
batch-invariant forwards and a compiled UNet apply to every task alike.

The inpainting pipelines here add A1111's latent masked-content modes (`inpainting_fill` 2
"latent noise" and 3 "latent nothing"): the init latents get noise (from the job's seed, as
A1111) or zeros where the mask is, before the pipeline noises them to the first step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image


class _LatentFill:
    """Mixin for the inpainting pipelines: `craft_fill` = (mode, per-job masks (L images, 255
    = repaint), per-job seeds) for one call, or None."""

    craft_fill: tuple[int, list[Image.Image], list[int]] | None = None

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        fill = self.craft_fill
        image = kwargs.get("image")
        if fill is not None and image is not None and image.shape[1] != 4:
            mode, masks, seeds = fill
            dtype, device, generator = args[4], args[5], args[6]
            latents = self._encode_vae_image(image.to(device=device, dtype=dtype), generator=generator)  # type: ignore[attr-defined]
            kwargs["image"] = apply_latent_fill(latents.to(dtype), masks, seeds, mode)
        return super().prepare_latents(*args, **kwargs)  # type: ignore[misc]


def latent_masks(masks: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """A1111's latent mask: each mask scaled to the latents' size (PIL's default resampling),
    as 0..1 rounded to 0 or 1; (B, 1, height, width)."""
    rows = [np.around(np.asarray(m.convert("L").resize((width, height)), np.float32) / 255) for m in masks]
    return torch.from_numpy(np.stack(rows)[:, None])


def apply_latent_fill(latents: torch.Tensor, masks: list[Image.Image], seeds: list[int],
                      mode: int) -> torch.Tensor:
    """Init latents with noise (mode 2, drawn from each job's seed) or zeros (mode 3) where
    each job's mask is."""
    if mode not in (2, 3):
        return latents
    nmask = latent_masks(masks, latents.shape[2], latents.shape[3]).to(latents.device, latents.dtype)
    kept = latents * (1 - nmask)
    if mode == 3:
        return kept
    noise = torch.cat([
        torch.randn((1, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
        for seed in seeds
    ]).to(latents.device, latents.dtype)
    return kept + noise * nmask


class CraftSDXLInpaint(_LatentFill, StableDiffusionXLInpaintPipeline):
    pass


class CraftSDInpaint(_LatentFill, StableDiffusionInpaintPipeline):
    pass


_CLASSES = {
    ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", "inpaint"): CraftSDXLInpaint,
    ("sd15", "img2img"): StableDiffusionImg2ImgPipeline,
    ("sd15", "inpaint"): CraftSDInpaint,
}


def inpainting_unet(pipe: Any) -> bool:
    """A dedicated inpainting checkpoint: its UNet also reads the mask and the masked picture
    (9 input channels); every task goes through the inpainting pipeline."""
    return int(pipe.unet.config.in_channels) == 9


_BASES = {
    ("sdxl", False): StableDiffusionXLPipeline,
    ("sdxl", True): StableDiffusionXLInpaintPipeline,
    ("sd15", False): StableDiffusionPipeline,
    ("sd15", True): StableDiffusionInpaintPipeline,
}


def shared_from_pipe(cls: Any, pipe: Any, **components: Any) -> Any:
    """`cls.from_pipe(pipe, **components)` with every module shared as it is. diffusers'
    from_pipe ends by moving the new pipeline to `dtype`, float32 when none is given,
    and the modules are shared: without the model's own dtype here, a half-precision model
    would turn float32 in place (twice the memory, every later job slower) on its first
    image-to-image or ControlNet job. A loaded pipeline has one dtype throughout."""
    return cls.from_pipe(pipe, dtype=pipe.unet.dtype, **components)


def base_pipeline(pipe: Any, family: str) -> Any:
    """The pipeline a model serves from, by what its UNet takes rather than the class a folder
    was saved as: the family's inpainting pipeline for an inpainting UNet, its text-to-image
    pipeline otherwise (made from the same components when the loaded class differs, e.g. a
    4-channel model saved from an inpainting pipeline)."""
    want = _BASES[(family, inpainting_unet(pipe))]
    return pipe if isinstance(pipe, want) else shared_from_pipe(want, pipe)


def pipeline_for(model: Any, task: str) -> Any:
    """The LoadedModel's pipeline for `task` (txt2img, img2img, inpaint), made once from the
    model's own components."""
    base = model.pipe
    if inpainting_unet(base):
        task = "inpaint"
    if task == "txt2img" or type(base) is _CLASSES.get((model.family, task)):
        return base
    made = model.variants.get(task)
    if made is None:
        made = shared_from_pipe(_CLASSES[(model.family, task)], base)
        made.set_progress_bar_config(disable=True)
        model.variants[task] = made
    return made


def encode_latents(pipe: Any, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
    """One picture's VAE latents (1, 4, h/8, w/8), sampled with the job's generator and scaled
    as the pipelines scale them (resize mode 3: the worker then resizes these)."""
    return _encode(pipe, pipe.image_processor.preprocess(image), generator)


def _encode(pipe: Any, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixels in -1..1 to scaled latents: sampled with `generator`, the mean without."""
    vae = pipe.vae
    pixels = pixels.to(vae.device, vae.dtype)
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
        pixels = pixels.float()
    try:
        dist = vae.encode(pixels).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
        latents = latents * vae.config.scaling_factor
    finally:
        if upcast:
            vae.to(torch.float16)
    return latents.to(pipe.unet.dtype)


def blank_sources(count: int, width: int, height: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """Text to image on an inpainting checkpoint (as A1111 does): a blank picture, all of it
    masked, at full strength."""
    return ([Image.new("RGB", (width, height), (127, 127, 127))] * count,
            [Image.new("L", (width, height), 255)] * count)


def blank_masked_latents(pipe: Any, count: int, width: int, height: int) -> torch.Tensor:
    """What an inpainting UNet reads as the masked picture when all of it is masked: the
    latents of a mid-grey picture (zeros in -1..1, as the pipelines mask pixels and as A1111
    conditions its second hires pass), for passes that start from latents and so have no
    pixels for the pipeline to mask; (count, 4, height/8, width/8)."""
    latents = _encode(pipe, torch.zeros(1, 3, height, width), None)
    return latents.expand(count, -1, -1, -1)
