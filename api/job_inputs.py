"""A job's input images at submit: decoded and checked (common/inputs.py), the job's size taken from the init
image when the request names none, then stored under the tenant's input prefix and named by key in the
request. Checking comes first and storing last, so a refused job leaves nothing behind. The images are the
init image, the mask, each ControlNet's control image (named `controlnets[i].image`) and the IP-Adapter's image
prompt (`ip_adapter.image`, brought to the job's size like the others: its encoder resizes it again).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from common import inputs
from common.jobs import JobRequest, LimitError, images_of, with_size
from common.storage import Storage

log = logging.getLogger(__name__)
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


def decode(
    body: JobRequest, storage: Storage, tenant: str, sizes: list[tuple[int, int]], limits: DecodeLimits
) -> tuple[JobRequest, Inputs]:
    """Read the request's images and bring each to the job's size as PNG bytes, one decoder slot per image
    (decode, resize and encode together: the pixels never outlive the slot, so a process holds at most
    `limits.slots` decoded images). With no width or height given, the job takes the init image's size (which
    must be served). Raises LimitError naming the field."""
    found = Inputs()
    for name, value in images_of(body):
        if inputs.is_key(value):
            data, reader = read_key(name, value, storage, tenant), inputs.read
        else:
            data, reader = value, inputs.decode
        # the job's size, where the request gives it (or the first served size with the one it gives): a JPEG is
        # then decoded no larger than it needs; with neither, the init image's own size, read from its header
        its_size = name == "init_image" and body.width is None and body.height is None
        size = None if its_size else _size(with_size(body, sizes))

        try:
            mask = name == "mask_image"
            found.images[name], (w, h) = limits.run(partial(_convert, reader, data, limits.max_pixels, size, mask))
        except inputs.InputError as exc:
            raise LimitError(name, f"the image {exc}") from None
        if size is None:  # the job takes the init image's own size, which must be served
            body = own_size(body, w, h, sizes)
    return body, found


def read_key(name: str, key: str, storage: Storage, tenant: str) -> bytes:
    """The stored input a request names by key (field `name`): the tenant's own, in the form this service answers
    with, and stored; else a LimitError naming the field. Storage away: 503."""
    # a tenant reads only its own inputs: another's key would be another's picture
    if not key.startswith(inputs.prefix(tenant)) or ".." in key.split("/"):
        raise LimitError(name, f"{key[:200]!r} is not under this tenant's inputs ({inputs.prefix(tenant)!r})")
    if not inputs.is_stored_key(key, tenant):
        raise LimitError(name, f"{key[:200]!r} is not an input key (inputs/<tenant>/<sha256>.png)")
    try:
        return storage.get(key)
    except (KeyError, ValueError):
        raise LimitError(name, f"no stored input {key!r}") from None
    except Exception as exc:
        raise _unavailable(exc) from exc


def own_size(body: JobRequest, width: int, height: int, sizes: list[tuple[int, int]]) -> JobRequest:
    """The request at its init image's size (it gave no width or height), which must be served."""
    if (height, width) not in sizes:
        served = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
        raise LimitError(
            "init_image", f"is {width}x{height}, which is not served ({served}); give width and height to resize it"
        )
    return body.model_copy(update={"width": width, "height": height})


class StoredImages:
    """A data set line's images, which it names by this tenant's stored keys only (common/datasets.py KEYS_ONLY):
    each key checked as a job's is (read_key: the tenant's, in the service's form, stored) and its size read from
    the PNG's header, once per key and file (a file may name one control image on every line). As for a job,
    a request with no width or height takes its init image's size. The worker brings the init image, mask and
    control images to the line's size (worker/loop/admission.py; a job's were brought to its size here, as they
    were stored); the IP-Adapter's encoder resizes its image whatever its size."""

    MAX_KEYS = 10_000  # sizes remembered per file: a file naming more distinct images reads some twice

    def __init__(self, storage: Storage, tenant: str, sizes: list[tuple[int, int]]):
        self.storage, self.tenant, self.sizes = storage, tenant, sizes
        self._size_of: dict[str, tuple[int, int]] = {}

    def __call__(self, body: JobRequest) -> JobRequest:
        for name, key in images_of(body):
            width, height = self._size(name, key)
            if name == "init_image" and body.width is None and body.height is None:
                body = own_size(body, width, height, self.sizes)
        return body

    def _size(self, name: str, key: str) -> tuple[int, int]:
        size = self._size_of.get(key)
        if size is None:
            data = read_key(name, key, self.storage, self.tenant)
            try:
                with Image.open(io.BytesIO(data)) as image:  # the header only
                    size = image.size
            except (UnidentifiedImageError, OSError):
                raise LimitError(name, f"the stored input {key!r} could not be read as an image") from None
            if len(self._size_of) >= self.MAX_KEYS:
                self._size_of.clear()
            self._size_of[key] = size
        return size


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
