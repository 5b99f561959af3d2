"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`): a translator onto the shared generation core.

What webuiapi, Open WebUI (A1111 mode) and SillyTavern send is mapped onto an `ImageRequest`
(app.api.generation); the answer is A1111's `{"images", "parameters", "info"}` and every error
under `/sdapi/` is A1111's `{"error", "detail", "body", "errors"}`.

- models.py: the request and answer shapes, as A1111 v1.10 names them;
- translate.py: a txt2img body as the core's request, and the core's images as A1111's answer;
- state.py: what A1111 keeps between requests (options, skipped jobs), built with the app;
- errors.py: A1111's error shape;
- controlnet.py: sd-webui-controlnet's units (alwayson_scripts.controlnet) and /controlnet routes;
- routes.py: the routes: generation, progress, options, discovery, refreshes;
- extra_routes.py (+ extra_models.py): the rest of A1111's surface (styles, memory, cmd-flags,
  png-info, unload/reload-checkpoint, the empty lists, gradio's ping / queue / login checks);
- hashes.py: every model's sha256 and short hash (app.file_hashes caches them);
- infotext.py: an image's `parameters` text read back and parsed (png-info);
- memory.py: RAM and CUDA numbers.

Choices (documented in README.md and docs/clients.md):
- Auth: as every route's (app.api.credentials): HTTP Basic with the API key as the password
  (any user name), `Authorization: Bearer <key>`; missing or wrong: 401 with
  `WWW-Authenticate: Basic`. With --allow-anonymous, a header that is not a key (clients send
  `Basic ` with nothing after it) is ignored and the caller is anonymous.
- Options (`GET/POST options`) are one dict per caller (API key, or address when anonymous)
  over the server's defaults, in `app.state.a1111` (`A1111State`), lost on restart: what one
  key POSTs applies to its own requests only (A1111 has one dict for its one user; here many
  keys share a box). `sd_model_checkpoint` (the default model, the first of models.yaml whose
  weights are here, until the caller changes it) is the model of its requests whose
  override_settings name none; one a reload removed answers 422 naming it.
- `CLIP_stop_at_last_layers` / `clip_skip` (1-12) is applied as A1111 does: on SD 1.x models the
  n-th layer from the end, then the final norm; SDXL always uses the penultimate layer (A1111's
  default, its `sdxl_clip_l_skip` off), so there it changes nothing, as in A1111.
- Every A1111 feature craftserve does not run (face restoration, tiling, scripts other than
  ControlNet, subseeds) is accepted and named in `info.craftserve_not_applied`; the hires fix,
  ControlNet units and the SDXL refiner (`refiner_checkpoint`, `refiner_switch_at`) run.
- Styles (`styles`) are applied as A1111 applies them (app.styles), from models.yaml's
  `styles_file:`; an unknown style is a 422 naming it (A1111 skips it silently).
- Hashes are never null: `sd-models` `hash`/`sha256`, options' `sd_checkpoint_hash`,
  `info.sd_model_hash` (hashes.py says which file stands for each kind of model). `title`
  stays the served name (what clients send back); a title with A1111's ` [hash]` is accepted.
- `interrupt` stops every job of the caller (running and waiting, whatever route submitted them),
  `skip` only its running ones; never another key's. A running job that shares its batch with
  another key's job finishes (stopping the batch would stop that job too). An interrupted request
  answers 409 `Interrupted`: craftserve has no half-done image to return.
"""

from app.api.a1111.controlnet import router as controlnet_router
from app.api.a1111.errors import render_error
from app.api.a1111.extra_routes import gradio_router
from app.api.a1111.extra_routes import router as extra_router
from app.api.a1111.hashes import ModelHashes
from app.api.a1111.routes import router
from app.api.a1111.state import A1111State

__all__ = ["A1111State", "ModelHashes", "controlnet_router", "extra_router", "gradio_router", "render_error",
           "router"]
