"""Request and answer shapes of the rest of A1111's surface (app.api.a1111.extra_routes), as
A1111 v1.10's `modules/api/models.py` names them, and gradio 3.41's queue estimation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class A1111PromptStyle(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class A1111Hypernetwork(BaseModel):
    name: str
    path: str | None = None


class A1111FaceRestorer(BaseModel):
    name: str
    cmd_dir: str | None = None


class A1111Realesrgan(BaseModel):
    name: str
    path: str | None = None
    scale: int | None = None


class A1111SdModule(BaseModel):
    model_name: str
    filename: str


class A1111Extension(BaseModel):
    name: str
    remote: str
    branch: str
    commit_hash: str
    commit_date: int
    version: str
    enabled: bool


class A1111ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[dict[str, Any]] = Field(default_factory=list)


class A1111Memory(BaseModel):
    ram: dict[str, Any] = Field(description="free, used (this process), total (the machine), bytes")
    cuda: dict[str, Any] = Field(description="A1111's per-device numbers of the first CUDA device and, "
                                 "by name, of each (`devices`); {\"error\": \"unavailable\"} without CUDA")


class A1111PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="a base64 image (PNG, JPEG, WebP, ...; a data: URL is fine; an "
                       "http(s) URL where CRAFTSERVE_ALLOW_IMAGE_URLS lets it be fetched)")


class A1111PngInfoResponse(BaseModel):
    info: str = Field(description="the `parameters` text the image carries (\"\" when none)")
    items: dict[str, Any] = Field(description="the image's other metadata")
    parameters: dict[str, Any] = Field(description="the text parsed into A1111's fields")


class A1111InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str | None = ""
    model: str | None = "clip"


class GradioEstimation(BaseModel):
    """GET /queue/status, gradio 3.41's `Estimation`."""

    msg: str | None = "estimation"
    rank: int | None = None
    queue_size: int = Field(description="jobs waiting, every key's")
    avg_event_process_time: float | None = None
    avg_event_concurrent_process_time: float | None = None
    rank_eta: float | None = None
    queue_eta: float = Field(0.0, description="always 0: no estimate")
