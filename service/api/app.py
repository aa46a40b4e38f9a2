"""The HTTP API. It never imports torch: it validates, queues and reads results; workers do the work.

    T2I_REDIS_URL=redis://127.0.0.1:6379 t2i api --host 127.0.0.1 --port 8000

Docs at /docs, the OpenAPI spec at /openapi.json, metrics at /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.api.auth import authenticate, load_keys
from service.api.queue_client import QueueClient
from service.api.routes import ab, compare, generate, health, jobs, models, openai_images, uploads
from service.errors import OverloadedError, PayloadTooLargeError, RequestTimeoutError, T2IError, UnauthorizedError
from service.models.registry import Registry, load_registry
from service.settings import Settings, get_settings

log = logging.getLogger("t2i.api")


class ErrorBody(BaseModel):
    """Every error the API answers: what went wrong, its kind, and the field (or header, file) at fault."""

    error: str
    error_type: str
    field: str | None = None


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": text} for code, text in (
    (401, "missing or unknown API key"), (404, "not found (or another key's)"), (409, "conflict with the state"),
    (413, "body or image too large"), (415, "unsupported content type"), (422, "invalid field"),
    (429, "queue full, rate limit or quota (see Retry-After)"), (503, "no live worker or Redis down"))}


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    registry = registry or load_registry(settings.models_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # A `?wait=true` request blocks on Redis (BLMOVE) for up to T2I_WAIT_TIMEOUT_S: the socket timeout must outlast
        # it (redis-py's default of 5 s would fail every wait on a job longer than that).
        client = aioredis.Redis.from_url(settings.redis_url, health_check_interval=10,
                                         socket_timeout=settings.wait_timeout_s + 10)
        app.state.queue = QueueClient(client, max_queue=settings.max_queue, result_ttl_s=settings.result_ttl_s,
                                      upload_ttl_s=settings.upload_ttl_s)
        gauges = asyncio.create_task(_update_gauges(app.state.queue, period_s=2.0))
        yield
        gauges.cancel()
        await client.aclose()

    app = FastAPI(
        title="t2i-slim",
        version="0.1.0",
        summary="Text-to-image (FLUX, SD3) with a per-request choice of T5 text encoder.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.api_keys = load_keys(settings)
    keyed = [Depends(authenticate)]  # every API route needs a key once keys are configured
    for router in (generate.router, jobs.router, uploads.router, compare.router, openai_images.router,
                   models.router):
        app.include_router(router, dependencies=keyed, responses=ERROR_RESPONSES)
    for router in (health.router, ab.router):  # probes, and the dashboard page (its API calls carry the key)
        app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        if not settings.metrics_public:
            await authenticate(request)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app)
    if settings.cors_origins:  # closed unless origins are named
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    return app


# -- errors: one taxonomy, mapped to HTTP here and nowhere else --------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(T2IError)
    async def t2i_error(request: Request, exc: T2IError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "header", "path")]
        field = ".".join(loc) or "body"
        if first["type"] == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            given = first.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r:.80})"
            message = f"`{field}`: {first['msg']}{shown}"
        return JSONResponse({"error": message, "error_type": "validation", "field": field}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse({"error": str(exc.detail), "error_type": kinds.get(exc.status_code, "http")},
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error", "error_type": "internal"}, status_code=500)


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or while streaming (a chunked upload is cut off); 408 for a
    body that has not fully arrived within `timeout_s` (a client trickling its upload holds nothing for long)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send, int(length))
        # Read the whole body first (it is small by construction), so an oversize chunked upload is refused
        # here with 413 rather than half-parsed downstream. One timeout spans the whole read (no task per message).
        messages, seen = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while not messages or (messages[-1]["type"] == "http.request" and messages[-1].get("more_body")):
                    messages.append(message := await receive())
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        break
        except TimeoutError:
            error = RequestTimeoutError(f"the request body did not arrive within T2I_BODY_TIMEOUT_S="
                                        f"{self.timeout_s:g} s ({seen} bytes received)", field="body")
            return await JSONResponse(error.to_dict(), status_code=408)({"type": "http"}, None, send)
        if seen > self.max_bytes:
            return await self._too_large(send, seen)
        await self.app(scope, _replay(messages, receive), send)

    async def _too_large(self, send, size: int) -> None:
        error = PayloadTooLargeError(f"body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes",
                                     field="body")
        response = JSONResponse(error.to_dict(), status_code=413)
        await response({"type": "http"}, None, send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _update_gauges(queue: QueueClient, period_s: float) -> None:
    while True:
        try:
            metrics.QUEUE_DEPTH.set(await queue.depth())
            metrics.WORKERS_LIVE.set(len(await queue.live_workers()))
        except Exception as exc:  # Redis down: keep the last values, try again
            log.debug("gauge update failed: %s", exc)
        await asyncio.sleep(period_s)
