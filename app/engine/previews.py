"""Previews of a running job: the cheap linear latent-to-RGB projection ("Approx cheap" in
AUTOMATIC1111), a 4x3 matrix per latent space. It costs one tiny matrix product per preview,
made on the worker thread from the step callback's latents; the PNG is encoded elsewhere."""

from __future__ import annotations

import torch

# Rows: the 4 latent channels; columns: R, G, B. Fitted projections of each VAE's latent
# space (the SD 1.x and SDXL latent spaces differ).
SD15_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173),
                   (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_LATENT_RGB = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250),
                   (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))


def approx_cheap(latents: torch.Tensor, sdxl: bool) -> torch.Tensor:
    """One image's latents (4, h, w) → (h, w, 3) uint8 RGB on the CPU (h, w: 1/8 the image)."""
    matrix = torch.tensor(SDXL_LATENT_RGB if sdxl else SD15_LATENT_RGB,
                          dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), matrix)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()
