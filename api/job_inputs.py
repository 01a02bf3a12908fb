"""A job's input images at submit: decoded and checked (common/inputs.py), the job's size taken from the init
image when the request names none, then stored under the tenant's input prefix and named by key in the
request. Checking comes first and storing last, so a refused job leaves nothing behind.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from PIL import Image

from common import inputs
from common.jobs import JobRequest, LimitError
from common.storage import Storage

log = logging.getLogger(__name__)
NAMES = ("init_image", "mask_image")


@dataclass
class Inputs:
    """The decoded images of one request, by field name, and the keys this submit wrote (for undoing)."""

    images: dict[str, Image.Image] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeLimits:
    """How much decoding one API process does: at most max_pixels per image, `slots` images at once (the
    decode, and later the resize and PNG encode); a request waits up to wait_s for a slot, then 503."""

    max_pixels: int
    slots: threading.BoundedSemaphore
    wait_s: float = 30.0

    @staticmethod
    def of(max_pixels: int, concurrent: int) -> DecodeLimits:
        return DecodeLimits(max_pixels, threading.BoundedSemaphore(concurrent))

    def slot(self) -> _Slot:
        return _Slot(self)


class _Slot:
    def __init__(self, limits: DecodeLimits):
        self.limits = limits

    def __enter__(self) -> None:
        if not self.limits.slots.acquire(timeout=self.limits.wait_s):
            raise HTTPException(
                503, "every image decoder of this API process is busy; retry shortly", headers={"Retry-After": "2"}
            )

    def __exit__(self, *exc: object) -> None:
        self.limits.slots.release()


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(
        503,
        f"storage is unreachable ({type(exc).__name__}); nothing was stored, retry later",
        headers={"Retry-After": "5"},
    )


def decode(
    body: JobRequest, storage: Storage, tenant: str, sizes: list[tuple[int, int]], limits: DecodeLimits
) -> tuple[JobRequest, Inputs]:
    """Read the request's images; with no width or height given, the init image's size (which must be
    served). Raises LimitError naming the field."""
    found = Inputs()
    if body.init_image is None:
        return body, found  # a mask or strength alone is refused by check_limits, unread
    for name in NAMES:
        value = getattr(body, name)
        if value is None:
            continue
        if inputs.is_key(value):
            # a tenant reads only its own inputs: another's key would be another's picture
            if not value.startswith(inputs.prefix(tenant)) or ".." in value.split("/"):
                raise LimitError(name, f"{value[:200]!r} is not under this tenant's inputs ({inputs.prefix(tenant)!r})")
            if not inputs.is_stored_key(value, tenant):
                raise LimitError(name, f"{value[:200]!r} is not an input key (inputs/<tenant>/<sha256>.png)")
            try:
                data = storage.get(value)
            except (KeyError, ValueError):
                raise LimitError(name, f"no stored input {value!r}") from None
            except Exception as exc:
                raise _unavailable(exc) from exc
            reader = inputs.read
        else:
            data, reader = value, inputs.decode
        # the job's size when the request gives it: a JPEG is then decoded no larger than it needs
        size = (body.width, body.height) if body.width is not None and body.height is not None else None
        try:
            with limits.slot():
                found.images[name] = reader(data, limits.max_pixels, size)  # type: ignore[arg-type]
        except inputs.InputError as exc:
            raise LimitError(name, f"the image {exc}") from None
    if found.images and body.width is None and body.height is None:
        w, h = found.images["init_image"].size
        if (h, w) not in sizes:
            served = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
            raise LimitError(
                "init_image", f"is {w}x{h}, which is not served ({served}); give width and height to resize it"
            )
        body = body.model_copy(update={"width": w, "height": h})
    return body, found


def store(body: JobRequest, found: Inputs, storage: Storage, tenant: str, limits: DecodeLimits) -> JobRequest:
    """Bring each image to the job's size and store it (PNG, by content hash); the request names the keys."""
    assert body.width is not None and body.height is not None
    update: dict[str, Any] = {}
    for name in list(found.images):
        with limits.slot():
            image = inputs.normalize(found.images.pop(name), body.width, body.height, mask=name == "mask_image")
            digest, data = inputs.encode(image)
        del image  # the decoded pixels go now, not when the request ends
        key = inputs.key(tenant, digest)
        try:
            try:
                storage.get(key)  # already there (sent before, or by another job): shared, never undone
            except KeyError:
                storage.put(key, data, "image/png")
                found.written.append(key)
        except Exception as exc:
            undo(found, storage)
            raise _unavailable(exc) from exc
        update[name] = key
    return body.model_copy(update=update)


def undo(found: Inputs, storage: Storage) -> None:
    """The job was refused after its inputs were stored: remove what this submit wrote."""
    try:
        storage.delete_many(found.written)
    except Exception:
        log.warning("could not delete the inputs of a refused job: %s", found.written, exc_info=True)
    found.written.clear()
