"""`POST /v1/uploads`: store a control image once and name it by id in any number of jobs; `GET` gives it back."""

from __future__ import annotations

import io
import time

from fastapi import APIRouter, Request, Response
from PIL import Image

from service.api.auth import CallerDep
from service.api.deps import QueueDep, SettingsDep
from service.errors import NotFoundError, UnsupportedMediaTypeError
from service.jobs import UploadView
from service.models.control import decode_image

router = APIRouter(prefix="/v1", tags=["uploads"])

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


@router.post("/uploads", status_code=201, response_model=UploadView,
             openapi_extra={"requestBody": {"required": True, "content": {
                 t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}})
async def upload(request: Request, response: Response, settings: SettingsDep, queue: QueueDep,
                 caller: CallerDep) -> UploadView:
    """Upload a control image as the raw request body (Content-Type image/png, image/jpeg or image/webp). 413 over
    T2I_MAX_IMAGE_BYTES, 415 for another content type, 422 when it does not decode."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES:
        raise UnsupportedMediaTypeError(f"Content-Type must be one of {', '.join(IMAGE_TYPES)}, got "
                                        f"{content_type or 'none'!r}", field="content-type")
    data = await request.body()
    image = decode_image(data, field="body", max_bytes=settings.max_image_bytes)
    upload_id = await queue.put_upload(data, caller.owner)
    response.headers["Location"] = f"/v1/uploads/{upload_id}"
    return UploadView(id=upload_id, width=image.width, height=image.height, bytes=len(data),
                      expires_at=time.time() + settings.upload_ttl_s,
                      url=str(request.base_url).rstrip("/") + f"/v1/uploads/{upload_id}")


@router.get("/uploads/{upload_id}", response_class=Response,
            responses={200: {"content": {t: {} for t in IMAGE_TYPES}}})
async def get_upload(upload_id: str, queue: QueueDep, caller: CallerDep) -> Response:
    """An uploaded image, as uploaded (to the key that uploaded it)."""
    data = await queue.upload(upload_id, caller.owner)
    if data is None:
        raise NotFoundError(f"upload {upload_id!r} not found (unknown or expired)", field="upload_id")
    kind = Image.open(io.BytesIO(data)).format  # checked to decode when it was uploaded
    return Response(data, media_type=f"image/{kind.lower()}")
