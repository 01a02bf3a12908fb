"""Images in local-folder storage, behind signed, expiring URLs (S3 URLs go to the S3 server instead)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from api.deps import ServicesDep
from common.storage import LocalStorage, SignatureError

router = APIRouter(prefix="/v1/files", tags=["files"])
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


@router.get("/{key:path}", responses={403: {}, 404: {}})
def get_file(key: str, expires: int, signature: str, services: ServicesDep) -> FileResponse:
    """An image, when the URL's signature and expiry hold."""
    storage = services.storage
    if not isinstance(storage, LocalStorage):
        raise HTTPException(404, "this deployment stores images in S3; use the URL from the job")
    try:
        path = storage.verify(key, expires, signature)
    except SignatureError as exc:
        raise HTTPException(403, f"forbidden: {exc}") from exc
    except ValueError as exc:
        raise HTTPException(404, str(exc)) from exc
    if not path.is_file():
        raise HTTPException(404, "no such image")
    return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"))
