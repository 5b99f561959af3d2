"""OpenAI's images API (`/v1/images/generations`, `/v1/models`): a translator onto the shared
generation core."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["openai"])
