"""Input images of image-to-image and inpainting jobs: read from what a client sends (base64 or a data: URL),
checked, brought to the job's size, and kept in storage under the tenant's input prefix by their content hash.
Shared by the API (which stores them) and the worker (which reads them back as pixels). No HTTP, no JAX.

A job's request then holds the key (`inputs/<tenant>/<sha256>.png`), so its record stays small, a retry reads
the same bytes, and a client may send the key again instead of the image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

PREFIX = "inputs"
MAX_BYTES = 16 * 2**20  # an encoded input image, before base64
MAX_PIXELS = 4096 * 4096  # refuse larger images before decoding them (a decompression bomb)
FORMATS = ("PNG", "JPEG", "WEBP")
_STORED = re.compile(r"^[0-9a-f]{64}\.png$")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class InputError(ValueError):
    """An input image that cannot be used; the message says why, for the client."""


def prefix(tenant: str) -> str:
    """The tenant's input prefix; the open deployment (no API keys) has tenant ""."""
    return f"{PREFIX}/{tenant or '_'}/"


def is_key(value: str) -> bool:
    return value.startswith(f"{PREFIX}/")


def is_stored_key(value: str, tenant: str) -> bool:
    """Whether `value` is a key this service answered the tenant with: its prefix, a sha256, .png. Checked
    before storage is asked (a key too long for S3 is refused with an error that reads as an outage)."""
    return _STORED.match(value.removeprefix(prefix(tenant))) is not None and value.startswith(prefix(tenant))


def decode(value: str, max_pixels: int = MAX_PIXELS, size: tuple[int, int] | None = None) -> Image.Image:
    """base64 (or a data: URL) -> a loaded PIL image; InputError when it is not a PNG, JPEG or WebP image, or
    would decode to more than max_pixels (read()'s rules)."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("is neither base64 image data, a data: URL, nor an inputs/ key") from None
    if len(data) > MAX_BYTES:
        raise InputError(f"is {len(data)} bytes; at most {MAX_BYTES}")
    return read(data, max_pixels, size)


def read(data: bytes, max_pixels: int = MAX_PIXELS, size: tuple[int, int] | None = None) -> Image.Image:
    """Encoded bytes -> a loaded PIL image, its dimensions checked from the header before any pixel is decoded.
    A JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers `size` (width, height: the
    job's, when known; Pillow's draft), so a large photo costs what its reduced size does; any other image over
    max_pixels is refused (a 40 KB WebP can hold 4096x4096 pixels: 64 MB decoded, more as it is converted)."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.format not in FORMATS:
            raise InputError(f"is {image.format}; send PNG, JPEG or WebP")
        if image.width * image.height > MAX_PIXELS:
            raise InputError(f"is {image.width}x{image.height}; at most {MAX_PIXELS} pixels")
        if image.format == "JPEG" and size is not None:
            image.draft(image.mode if image.mode in ("L", "RGB") else "RGB", size)
        if image.width * image.height > max_pixels:
            raise InputError(
                f"is {image.width}x{image.height} ({image.width * image.height} pixels); at most {max_pixels} "
                "pixels are decoded here: scale it down to about the job's size before sending"
            )
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"could not be read as an image ({type(exc).__name__})") from None
    return image


def normalize(image: Image.Image, width: int, height: int, mask: bool) -> Image.Image:
    """RGB (a mask: grayscale) at width x height, resized with Lanczos where it differs (as diffusers'
    VaeImageProcessor does)."""
    image = image.convert("L" if mask else "RGB")
    if image.size != (width, height):
        # reducing_gap: a larger image is first shrunk by an integer factor (Image.reduce, a box filter) to within
        # 2x of the size, then Lanczos: far less work and memory than Lanczos from the full size, same look
        image = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return image


def encode(image: Image.Image) -> tuple[str, bytes]:
    """(the content hash, PNG bytes): lossless, so the worker sees exactly the pixels checked here."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    data = out.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def key(tenant: str, digest: str) -> str:
    return f"{prefix(tenant)}{digest}.png"


def content_hash(stored_key: str) -> str:
    """The sha256 of a stored input (its key's file name): what an image's metadata records of its inputs, never
    the key, whose folder names the tenant."""
    return stored_key.rsplit("/", 1)[-1].removesuffix(".png")


def by_hash(part: Any) -> dict[str, Any]:
    """A ControlNet's or IP-Adapter's request (a pydantic model with an `image` key) as an image's record keeps it
    (PNG parameters, a data set's manifest): its image by content hash (`image_sha256`), never by key."""
    return {**part.model_dump(mode="json", exclude={"image"}), "image_sha256": content_hash(part.image)}


def pixels(data: bytes, mask: bool, size: tuple[int, int] | None = None) -> np.ndarray:
    """Stored PNG bytes -> (H, W, 3) uint8, or (H, W) uint8 for a mask; at `size` (width, height) where given and
    the stored image has another (a data set line names an image a job of another size stored: normalize's
    Lanczos; a job's own inputs were stored at its size, and come back untouched)."""
    with Image.open(io.BytesIO(data)) as image:
        converted = normalize(image, *(size or image.size), mask=mask)
    return np.asarray(converted, dtype=np.uint8)
