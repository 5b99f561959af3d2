"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`): a translator onto the shared generation core."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
