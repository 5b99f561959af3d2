"""FastAPI dependencies: the heavy objects built in the lifespan, kept on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.job_tracker import JobTracker
from app.auth import Authenticator
from app.config import Settings
from app.engine.protocol import EngineAPI
from app.imaging import ImageStore
from app.registry import Registry


def _engine(request: Request) -> EngineAPI:
    return request.app.state.engine


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _auth(request: Request) -> Authenticator:
    return request.app.state.auth


def _images(request: Request) -> ImageStore:
    return request.app.state.images


def _tracker(request: Request) -> JobTracker:
    return request.app.state.jobs


EngineDep = Annotated[EngineAPI, Depends(_engine)]
RegistryDep = Annotated[Registry, Depends(_registry)]
SettingsDep = Annotated[Settings, Depends(_settings)]
AuthDep = Annotated[Authenticator, Depends(_auth)]
ImagesDep = Annotated[ImageStore, Depends(_images)]
TrackerDep = Annotated[JobTracker, Depends(_tracker)]  # the job API's jobs
