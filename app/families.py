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


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)
