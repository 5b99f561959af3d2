"""Model families: the one place that names them, labels them and tells them from pipelines.

Torch-free, so the registry, the LoRA file reader, the API layer and the engine all import it
without importing each other.
"""

from __future__ import annotations

from typing import Literal

Family = Literal["sdxl", "sd15"]

# Labels for messages; "sd2" is recognised (in LoRA files) but never served.
FAMILY_LABELS: dict[str, str] = {"sdxl": "SDXL", "sd15": "SD 1.x", "sd2": "SD 2.x"}

# diffusers pipeline class (model_index.json's `_class_name`, or type(pipe).__name__) → family.
# Only the text-to-image classes are served; a folder saved from an img2img pipeline is read as
# its family (the registry) but refused when loaded (the engine).
PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionInpaintPipeline": "sd15",
}
# Dedicated inpainting checkpoints load as the inpainting pipelines (9-channel UNets); they
# serve every task through it (app.engine.img2img).
SERVED_PIPELINES: frozenset[str] = frozenset({"StableDiffusionXLPipeline", "StableDiffusionPipeline",
                                              "StableDiffusionXLInpaintPipeline",
                                              "StableDiffusionInpaintPipeline"})
# SDXL's refiner as published (stabilityai/stable-diffusion-xl-refiner-1.0): an image-to-image
# pipeline with no first text encoder (only OpenCLIP bigG) and aesthetic-score time ids. Served
# as a refiner only (ModelSpec.refiner_only), never as a job's own model.
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
REFINER_ONLY_RULE = ("is SDXL's refiner (no first text encoder): it serves only as a refiner "
                     "(A1111's refiner_checkpoint, the `refiner` extension); use an SDXL model here "
                     "and this one as its refiner")


def is_refiner_layout(index: dict) -> bool:
    """Whether a model_index.json (as a dict) describes the refiner's own layout: the SDXL
    image-to-image class with no first text encoder (`text_encoder: [null, null]`)."""
    if index.get("_class_name") != REFINER_PIPELINE:
        return False
    encoder = index.get("text_encoder")
    return encoder is None or (isinstance(encoder, list) and not any(encoder))


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)
