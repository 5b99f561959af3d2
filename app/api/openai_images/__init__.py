"""OpenAI's images API (`/v1/images/generations`, `/edits`, `/variations`, `/v1/models`): a
translator onto the shared generation core.

What the openai SDK, Open WebUI (OpenAI mode) and LibreChat send is mapped onto an
`ImageRequest`; the answer is OpenAI's `{"created", "data": [...], ...}` and every error under
`/v1/` is OpenAI's `{"error": {"message", "type", "param", "code"}}` (errors.py).

Choices (documented in README.md and docs/clients.md):
- `model` absent or null: the first model of models.yaml. A name that is not served is looked
  up in the setting CRAFTSERVE_OPENAI_MODEL_ALIASES (e.g. dall-e-3=sdxl-base); else 404
  `model_not_found` naming the served models.
- `size` absent or `auto`: the model family's native size (1024x1024 SDXL, 512x512 SD 1.x).
  Sides and steps have the limits of the A1111 dialect (settings CRAFTSERVE_A1111_MAX_SIZE,
  CRAFTSERVE_A1111_MAX_STEPS): OpenAI clients ask for sizes such as 1792x1024.
- `response_format` absent: `url`, except for a requested model named `gpt-image-*`, which at
  OpenAI only ever answers base64 (clients written for it read `b64_json` without asking).
- URLs point into the in-memory image store (`/v1/images/files/<key>.<png|jpeg|webp>`): the
  random key is the credential, as for `/generate`; the Bearer header clients such as Open
  WebUI send along is accepted and not needed.

- Edits and variations are multipart/form-data (forms.py reads them; the form guard lets them
  through with a Bearer header, app/api/guards.py): a mask's alpha-0 pixels are inpainted at
  strength 1.0 and the rest kept; no mask: image to image at 0.75 (variations 0.6, no prompt);
  `size` auto: the picture's size scaled down to the model's trained area (translate.edit_size).

- models.py: the request and answer shapes; translate.py: a request as the core's;
  errors.py: OpenAI's error shape; routes.py: the routes. The key: as every route's
  (app.api.credentials), `Authorization: Bearer`; missing or wrong: 401.
"""

from app.api.openai_images.errors import render_error
from app.api.openai_images.routes import router

__all__ = ["render_error", "router"]
