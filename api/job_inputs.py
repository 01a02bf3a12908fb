"""A job's input images at submit: decoded and checked (common/inputs.py), the job's size taken from the init
image when the request names none, then stored under the tenant's input prefix and named by key in the
request. Checking comes first and storing last, so a refused job leaves nothing behind. Each stored input is
claimed for the job (common/input_store.py): kept while a job that names it lives, charged to the tenant's
stored input bytes (SDXL_MAX_INPUT_BYTES_PER_TENANT, 429 over it). The images are the
init image, the mask, each ControlNet's control image (named `controlnets[i].image`) and the IP-Adapter's image
prompt (`ip_adapter.image`, brought to the job's size like the others: its encoder resizes it again).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from common import inputs
from common.input_store import Claim, InputQuotaFull, InputStore, run_claim
from common.jobs import JobRequest, LimitError, images_of, with_size
from common.outage import REDIS_DOWN
from common.storage import Storage

log = logging.getLogger(__name__)
T = TypeVar("T")


CLAIM_TRIES = 10  # an input being deleted as it is sent again: asked again this many times, CLAIM_WAIT_S apart
CLAIM_WAIT_S = 0.2


@dataclass
class Inputs:
    """The images of one request by field name, each as it will be stored (common/inputs.Stored, at the job's
    size), and the claims this submit made: (hash, made it), for undoing."""

    images: dict[str, inputs.Stored] = field(default_factory=dict)
    claims: list[tuple[str, bool]] = field(default_factory=list)


@dataclass(frozen=True)
class InputLife:
    """Where a submit's inputs are recorded and what bounds them: the tenant's stored input bytes (0: no quota)
    and how long after its last claim the sweep leaves an input alone."""

    store: InputStore
    quota_bytes: int
    grace_s: float


def _quota_full(used: int, quota: int) -> HTTPException:
    return HTTPException(
        429,
        f"this tenant's stored input images take {used} bytes (the limit, SDXL_MAX_INPUT_BYTES_PER_TENANT, is "
        f"{quota}); send the inputs/ key of an image stored before, or retry once older jobs have expired and "
        "their inputs are swept",
        headers={"Retry-After": "60"},
    )


def check_quota(body: JobRequest, life: InputLife, tenant: str) -> None:
    """Before any image is decoded: a tenant at its input quota sending a new image (not an inputs/ key) is
    refused (429). The claim checks again, exactly, once the images' sizes are known."""
    if life.quota_bytes and any(not inputs.is_key(value) for _, value in images_of(body)):
        used = life.store.used_bytes(tenant)
        if used >= life.quota_bytes:
            raise _quota_full(used, life.quota_bytes)


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
    body: JobRequest,
    storage: Storage,
    tenant: str,
    sizes: list[tuple[int, int]],
    limits: DecodeLimits,
    records: InputStore,
) -> tuple[JobRequest, Inputs]:
    """Read the request's images and bring each to the job's size, in the form it will be stored, one decoder
    slot per image (decode, resize and encode together: the pixels never outlive the slot, so a process holds at most
    `limits.slots` decoded images). With no width or height given, the job takes the init image's size (which
    must be served; a stored input's is the size its key's hash is of). Raises LimitError naming the field."""
    found = Inputs()
    for name, value in images_of(body):
        # the job's size, where the request gives it (or the first served size with the one it gives): a JPEG is
        # then decoded no larger than it needs; with neither, the init image's own size, read from its header
        its_size = name == "init_image" and body.width is None and body.height is None
        size = None if its_size else _size(with_size(body, sizes))
        if inputs.is_key(value):
            sent: str | bytes = read_key(name, value, storage, tenant)
            if its_size:  # kept as sent, it may be of another size than its pixels': the record says which
                size = records.pixels(tenant, inputs.content_hash(value))
        else:
            sent = value  # base64 or a data: URL, unwrapped on the decoder thread

        try:
            mask = name == "mask_image"
            convert = partial(_convert, sent, limits.max_pixels, size, mask)
            found.images[name], (w, h) = limits.run(convert)
        except inputs.InputError as exc:
            raise LimitError(name, f"the image {exc}") from None
        if its_size:  # the job takes the init image's own size, which must be served
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
    each key checked as a job's is (read_key: the tenant's, in the service's form, stored) once per file (a file
    may name one control image on every line), and with `life`, claimed for the run (`run_id`: its claim,
    common/input_store.run_claim, keeps the input while the run's record lives) and sized by its record: the size
    its hash is of (an input kept as sent may hold an image of another size), else the header's. As for a job, a
    request with no width or height takes its init image's size. The worker reads every image at the line's size
    (worker/loop/admission.py, as it reads a job's, which were stored for its size here)."""

    MAX_KEYS = 10_000  # sizes remembered per file: a file naming more distinct images reads some twice

    def __init__(
        self,
        storage: Storage,
        tenant: str,
        sizes: list[tuple[int, int]],
        life: InputLife | None = None,
        run_id: str = "",
    ):
        self.storage, self.tenant, self.sizes, self.life, self.run_id = storage, tenant, sizes, life, run_id
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
                    size, content_type = image.size, Image.MIME.get(image.format or "", "image/png")
            except (UnidentifiedImageError, OSError):
                raise LimitError(name, f"the stored input {key!r} could not be read as an image") from None
            if self.life is not None:
                digest = inputs.content_hash(key)
                size = self.life.store.pixels(self.tenant, digest) or size
                self._claim(inputs.Stored(digest, data, content_type, size))
            if len(self._size_of) >= self.MAX_KEYS:
                self._size_of.clear()
            self._size_of[key] = size
        return size

    def _claim(self, image: inputs.Stored) -> None:
        """The run's claim. Made anew (an input stored before records were kept, or one deleted since it was read):
        written back as read and charged, never refused (no quota: the tenant sends no new image)."""
        assert self.life is not None
        key = inputs.key(self.tenant, image.digest)
        if _claim(self.life, self.storage, self.tenant, image, run_claim(self.run_id)) is Claim.new:
            try:
                self.storage.put(key, image.data, image.content_type)
            except Exception as exc:
                raise _unavailable(exc) from exc
            self.life.store.stored(self.tenant, image.digest, len(image.data))


def _convert(
    sent: str | bytes, max_pixels: int, size: tuple[int, int] | None, mask: bool
) -> tuple[inputs.Stored, tuple[int, int]]:
    """On a decoder thread: the image (base64 text, or a stored input's bytes) at `size` (None: its own) as it will
    be stored, and that size."""
    data = inputs.unwrap(sent) if isinstance(sent, str) else sent
    image: Image.Image = inputs.read(data, max_pixels, size)
    target = size or image.size
    pixels = inputs.normalize(image, *target, mask=mask)
    del image  # freed before stored_form decodes the bytes again (its check): one decoded original a slot at most
    return inputs.stored_form(pixels, data, mask), target


def _size(request: JobRequest) -> tuple[int, int]:
    assert request.width is not None and request.height is not None
    return request.width, request.height


def store(body: JobRequest, found: Inputs, storage: Storage, tenant: str, job_id: str, life: InputLife) -> JobRequest:
    """Claim each image for the job and store the ones nobody had (by content hash); the request names the keys.
    Over the tenant's input quota: 429, and nothing this submit claimed is left."""
    update: dict[str, Any] = {}
    for name, image in found.images.items():
        key = inputs.key(tenant, image.digest)
        try:
            claim = _claim(life, storage, tenant, image, job_id)  # first: over the quota, nothing is written
            found.claims.append((image.digest, claim is Claim.new))
            if claim is Claim.shared:
                try:
                    storage.get(key)  # stored for another job (or by another submit right now): nothing to write
                    claim = None
                except KeyError:  # its first submit is still writing it, or failed to: written here too
                    pass
            if claim is not None:
                storage.put(key, image.data, image.content_type)
                life.store.stored(tenant, image.digest, len(image.data))
        except InputQuotaFull as exc:
            undo(found, storage, tenant, job_id, life)
            raise _quota_full(exc.used_bytes, exc.quota_bytes) from None
        except (HTTPException, *REDIS_DOWN):  # Redis away: the app's handler answers 503 naming it
            undo(found, storage, tenant, job_id, life)
            raise
        except Exception as exc:
            undo(found, storage, tenant, job_id, life)
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


def _claim(life: InputLife, storage: Storage, tenant: str, image: inputs.Stored, job_id: str) -> Claim:
    """The claim, asked again while the input is being deleted (its object goes, then its record: one storage
    call); a deletion abandoned half way is finished here first. 503 when it stays busy."""
    for _ in range(CLAIM_TRIES):
        look_at = time.time() + life.grace_s
        claim = life.store.claim(tenant, image.digest, job_id, len(image.data), life.quota_bytes, look_at, image.size)
        if claim is Claim.stale:
            storage.delete(inputs.key(tenant, image.digest))
            life.store.forget(tenant, image.digest)
        elif claim is not Claim.busy:
            return claim
        else:
            time.sleep(CLAIM_WAIT_S)
    raise HTTPException(
        503, "an input image of this job is being deleted right now; retry shortly", headers={"Retry-After": "2"}
    )


def undo(found: Inputs, storage: Storage, tenant: str, job_id: str, life: InputLife) -> None:
    """The job was refused (or was a replay) after its inputs were claimed: its claims go, and an input this
    submit made that no other job has claimed since is deleted."""
    try:
        for digest, made in found.claims:
            if life.store.release(tenant, digest, job_id, made):
                storage.delete(inputs.key(tenant, digest))
                life.store.forget(tenant, digest)
    except Exception:  # what is left unclaimed is swept after the grace period (worker/input_retention.py)
        log.warning("could not undo the input claims of a refused job: %s", found.claims, exc_info=True)
    found.claims.clear()
