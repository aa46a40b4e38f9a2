"""FastAPI dependencies as `Annotated` aliases: settings, registry, queue client.

Every dependency is `async def` although none awaits: FastAPI runs a plain `def` dependency in a thread pool, and a
thread hop per dependency per request is most of what a request costs the API on a small machine."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.queue_client import QueueClient
from service.errors import UnsupportedMediaTypeError
from service.models.registry import Registry
from service.settings import Settings


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _queue(request: Request) -> QueueClient:
    return request.app.state.queue


async def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json, got {content_type or 'none'!r}", field="content-type"
        )


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
QueueDep = Annotated[QueueClient, Depends(_queue)]
JsonBody = Depends(require_json)
