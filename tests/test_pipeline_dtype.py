"""A half-precision model keeps its dtype when its image-to-image, inpainting and ControlNet
pipelines are made from it: diffusers' from_pipe moves the shared modules to float32 unless
told the dtype (found while benchmarking the full-size SDXL with a ControlNet in bfloat16)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.controlnet_files import tiny_controlnet


def test_task_and_controlnet_pipelines_keep_a_bfloat16_model_in_bfloat16() -> None:
    from app.engine import tiny
    from app.engine.controlnet import controlnet_pipeline
    from app.engine.img2img import pipeline_for

    pipe = tiny.build_tiny_sdxl().to(dtype=torch.bfloat16)
    model = SimpleNamespace(pipe=pipe, family="sdxl", variants={})
    made = [pipeline_for(model, "img2img"), pipeline_for(model, "inpaint"),
            controlnet_pipeline(model, "txt2img", tiny_controlnet("sdxl").to(dtype=torch.bfloat16)),
            controlnet_pipeline(model, "img2img", tiny_controlnet("sdxl").to(dtype=torch.bfloat16))]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert all(getattr(m, name) is module for m in made)


def test_diffusers_from_pipe_alone_would_turn_the_model_float32() -> None:
    """The premise: if diffusers stops doing this, the helper is no longer needed."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from app.engine import tiny

    pipe = tiny.build_tiny_sdxl().to(dtype=torch.bfloat16)
    StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    assert pipe.unet.dtype == torch.float32
