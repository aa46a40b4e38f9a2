"""`/ab`: the encoder A/B dashboard, a static page (HTML, CSS, JavaScript; no build step, nothing from a CDN) that
uses the public API only: compare runs, their grid and summary, and the blind-vote view."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static" / "ab"
FILES = {"ab.js": "text/javascript", "ab.css": "text/css"}


@router.get("/ab")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/ab/{name}")
async def asset(name: str) -> FileResponse:
    if name not in FILES:  # a fixed list: nothing from the request becomes a path
        raise HTTPException(404, f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name])
