"""A job's input images at submit: decoded and checked (common/inputs.py), the job's size taken from the init
image when the request names none, then stored under the tenant's input prefix and named by key in the
request. Checking comes first and storing last, so a refused job leaves nothing behind. The images are the
init image, the mask, each ControlNet's control image (named `controlnets[i].image`) and the IP-Adapter's image
prompt (`ip_adapter.image`, brought to the job's size like the others: its encoder resizes it again).
"""

from __future__ import annotations

import logging
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


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(
        503,
        f"storage is unreachable ({type(exc).__name__}); nothing was stored, retry later",
        headers={"Retry-After": "5"},
    )


def _given(body: JobRequest) -> list[tuple[str, str]]:
    """(field, value) of each image the request carries: a mask without an init image is refused by check_limits,
    unread."""
    given = [(name, getattr(body, name)) for name in NAMES if body.init_image is not None]
    given += [(f"controlnets[{i}].image", c.image) for i, c in enumerate(body.controlnets)]
    given += [("ip_adapter.image", body.ip_adapter.image)] if body.ip_adapter is not None else []
    return [(name, value) for name, value in given if value is not None]


def decode(body: JobRequest, storage: Storage, tenant: str, sizes: list[tuple[int, int]]) -> tuple[JobRequest, Inputs]:
    """Read the request's images; with no width or height given, the init image's size (which must be
    served). Raises LimitError naming the field."""
    found = Inputs()
    for name, value in _given(body):
        if inputs.is_key(value):
            # a tenant reads only its own inputs: another's key would be another's picture
            if not value.startswith(inputs.prefix(tenant)) or ".." in value.split("/"):
                raise LimitError(name, f"{value!r} is not under this tenant's inputs ({inputs.prefix(tenant)!r})")
            try:
                data = storage.get(value)
            except (KeyError, ValueError):
                raise LimitError(name, f"no stored input {value!r}") from None
            except Exception as exc:
                raise _unavailable(exc) from exc
            reader = inputs.read
        else:
            data, reader = value, inputs.decode
        try:
            found.images[name] = reader(data)  # type: ignore[arg-type]
        except inputs.InputError as exc:
            raise LimitError(name, f"the image {exc}") from None
    if "init_image" in found.images and body.width is None and body.height is None:
        w, h = found.images["init_image"].size
        if (h, w) not in sizes:
            served = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
            raise LimitError(
                "init_image", f"is {w}x{h}, which is not served ({served}); give width and height to resize it"
            )
        body = body.model_copy(update={"width": w, "height": h})
    return body, found


def store(body: JobRequest, found: Inputs, storage: Storage, tenant: str) -> JobRequest:
    """Bring each image to the job's size and store it (PNG, by content hash); the request names the keys."""
    assert body.width is not None and body.height is not None
    update: dict[str, Any] = {}
    for name, image in found.images.items():
        image = inputs.normalize(image, body.width, body.height, mask=name == "mask_image")
        digest, data = inputs.encode(image)
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
