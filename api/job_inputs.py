"""A job's input images at submit: decoded and checked (common/inputs.py), the job's size taken from the init
image when the request names none, then stored under the tenant's input prefix and named by key in the
request. Checking comes first and storing last, so a refused job leaves nothing behind. The images are the
init image, the mask, each ControlNet's control image (named `controlnets[i].image`) and the IP-Adapter's image
prompt (`ip_adapter.image`, brought to the job's size like the others: its encoder resizes it again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from fastapi import HTTPException
from PIL import Image

from common import inputs
from common.jobs import JobRequest, LimitError, with_size
from common.storage import Storage

log = logging.getLogger(__name__)
NAMES = ("init_image", "mask_image")
T = TypeVar("T")


@dataclass
class Inputs:
    """The images of one request by field name, each (sha256, PNG bytes) at the job's size, and the keys this
    submit wrote (for undoing)."""

    images: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeLimits:
    """How much decoding one API process does: at most max_pixels per image, and `slots` images at once, each
    decoded, resized and encoded on one of `workers` (as many threads as slots). A request waits up to wait_s
    for a slot, then 503.

    Own threads, not the request's: glibc keeps what a thread freed in that thread's arena, so 16 concurrent
    submits of a 2048x2048 WebP, decoded on their request threads 4 at a time, peaked at 813 MB resident; on 4
    decoder threads, 423 MB (tests/api/test_bounds_served.py, uvicorn's VmHWM)."""

    max_pixels: int
    slots: threading.BoundedSemaphore
    workers: ThreadPoolExecutor
    wait_s: float = 30.0

    @staticmethod
    def of(max_pixels: int, concurrent: int) -> DecodeLimits:
        workers = ThreadPoolExecutor(concurrent, thread_name_prefix="decode")
        return DecodeLimits(max_pixels, threading.BoundedSemaphore(concurrent), workers)

    def run(self, work: Callable[[], T]) -> T:
        """work() on a decoder thread, once a slot is free (503 after wait_s)."""
        if not self.slots.acquire(timeout=self.wait_s):
            raise HTTPException(
                503, "every image decoder of this API process is busy; retry shortly", headers={"Retry-After": "2"}
            )
        try:
            return self.workers.submit(work).result()
        finally:
            self.slots.release()


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(
        503,
        f"storage is unreachable ({type(exc).__name__}); nothing was stored, retry later",
        headers={"Retry-After": "5"},
    )


def _given(body: JobRequest) -> list[tuple[str, str]]:
    """(field, value) of each image the request carries, the init image first (with no width or height given, its
    size is the job's): a mask without an init image is refused by check_limits, unread."""
    given = [(name, getattr(body, name)) for name in NAMES if body.init_image is not None]
    given += [(f"controlnets[{i}].image", c.image) for i, c in enumerate(body.controlnets)]
    given += [("ip_adapter.image", body.ip_adapter.image)] if body.ip_adapter is not None else []
    return [(name, value) for name, value in given if value is not None]


def decode(
    body: JobRequest, storage: Storage, tenant: str, sizes: list[tuple[int, int]], limits: DecodeLimits
) -> tuple[JobRequest, Inputs]:
    """Read the request's images and bring each to the job's size as PNG bytes, one decoder slot per image
    (decode, resize and encode together: the pixels never outlive the slot, so a process holds at most
    `limits.slots` decoded images). With no width or height given, the job takes the init image's size (which
    must be served). Raises LimitError naming the field."""
    found = Inputs()
    for name, value in _given(body):
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
        # the job's size, where the request gives it (or the first served size with the one it gives): a JPEG is
        # then decoded no larger than it needs; with neither, the init image's own size, read from its header
        own_size = name == "init_image" and body.width is None and body.height is None
        size = None if own_size else _size(with_size(body, sizes))

        try:
            mask = name == "mask_image"
            found.images[name], (w, h) = limits.run(partial(_convert, reader, data, limits.max_pixels, size, mask))
        except inputs.InputError as exc:
            raise LimitError(name, f"the image {exc}") from None
        if size is None:  # the job takes the init image's own size, which must be served
            if (h, w) not in sizes:
                served = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
                raise LimitError(
                    "init_image", f"is {w}x{h}, which is not served ({served}); give width and height to resize it"
                )
            body = body.model_copy(update={"width": w, "height": h})
    return body, found


def _convert(
    reader: Callable[..., Image.Image], data: str | bytes, max_pixels: int, size: tuple[int, int] | None, mask: bool
) -> tuple[tuple[str, bytes], tuple[int, int]]:
    """On a decoder thread: the image at `size` (None: its own) as (sha256, PNG bytes), and that size."""
    image = reader(data, max_pixels, size)
    target = size or image.size
    return inputs.encode(inputs.normalize(image, *target, mask=mask)), target


def _size(request: JobRequest) -> tuple[int, int]:
    assert request.width is not None and request.height is not None
    return request.width, request.height


def store(body: JobRequest, found: Inputs, storage: Storage, tenant: str) -> JobRequest:
    """Store each image (PNG at the job's size, by content hash); the request names the keys."""
    update: dict[str, Any] = {}
    for name, (digest, data) in found.images.items():
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
    controls = [
        c.model_copy(update={"image": update.pop(f"controlnets[{i}].image", c.image)})
        for i, c in enumerate(body.controlnets)
    ]
    if body.ip_adapter is not None:
        update["ip_adapter"] = body.ip_adapter.model_copy(
            update={"image": update.pop("ip_adapter.image", body.ip_adapter.image)}
        )
    return body.model_copy(update=update | ({"controlnets": controls} if controls else {}))


def undo(found: Inputs, storage: Storage) -> None:
    """The job was refused after its inputs were stored: remove what this submit wrote."""
    try:
        storage.delete_many(found.written)
    except Exception:
        log.warning("could not delete the inputs of a refused job: %s", found.written, exc_info=True)
    found.written.clear()
