"""`/healthz` (the process is up) and `/readyz` (Redis answers and a worker's heartbeat is fresh)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import QueueDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(queue: QueueDep) -> JSONResponse:
    try:
        await queue.client.ping()
        workers = await queue.live_workers()
    except Exception as exc:  # Redis down: not ready, and say why
        return JSONResponse({"status": "unready", "redis": f"unreachable: {type(exc).__name__}", "workers": 0},
                            status_code=503)
    ready = bool(workers)
    return JSONResponse({"status": "ready" if ready else "unready", "redis": "ok", "workers": len(workers)},
                        status_code=200 if ready else 503)
