"""How an input image is kept (common/inputs.py stored_form): in the smallest encoding that decodes, the way the
worker decodes it, to exactly the job's pixels, under the hash of those pixels' PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from common import inputs
from tests.helpers.pictures import encoded, photo

# A JPEG is kept as sent: k = 1, the stored bytes are the upload's. Before, the PNG of the job's pixels was
# stored: 6.3 times the upload for this picture (JPEG quality 90, 1024x1024, at the job's size).
K_SENT_AT_THE_JOBS_SIZE = 1.0


def _job_pixels(data: bytes, size: tuple[int, int] | None, mask: bool = False) -> Image.Image:
    """The pixels a job used before (api/job_inputs.py: read, then normalize to the job's size)."""
    image = inputs.read(data, inputs.MAX_PIXELS, size)
    return inputs.normalize(image, *(size or image.size), mask=mask)


def test_a_photo_sent_as_a_jpeg_at_the_jobs_size_is_kept_as_sent_and_decodes_to_the_jobs_pixels():
    sent = encoded(photo(1024, 1024))
    pixels = _job_pixels(sent, None)
    kept = inputs.stored_form(pixels, sent, mask=False)
    png_digest, png = inputs.encode(pixels)
    assert len(kept.data) <= K_SENT_AT_THE_JOBS_SIZE * len(sent) and kept.content_type == "image/jpeg"
    assert len(png) > 5 * len(sent)  # what was stored before
    assert kept.digest == png_digest  # the key (and what the output image records) is the pixels' hash, as before
    assert np.array_equal(inputs.pixels(kept.data, False, (1024, 1024)), np.asarray(pixels))


def test_a_jpeg_the_job_enlarges_is_kept_as_sent_and_the_worker_resizes_it_to_the_same_pixels():
    # the usual case behind "~50x": a request body is at most 64 KiB, so a client sends a small JPEG for a
    # 1024x1024 job. The PNG of the enlarged pixels was stored: 23.5 times the upload for this one
    sent = encoded(photo(512, 512), quality=85)
    pixels = _job_pixels(sent, (1024, 1024))
    kept = inputs.stored_form(pixels, sent, mask=False)
    assert kept.data == sent and kept.size == (1024, 1024) and len(inputs.encode(pixels)[1]) > 20 * len(sent)
    assert np.array_equal(inputs.pixels(kept.data, False, (1024, 1024)), np.asarray(pixels))


def test_an_input_larger_than_the_png_of_the_jobs_pixels_is_stored_as_that_png():
    sent = encoded(photo(300, 200), "PNG")
    pixels = _job_pixels(sent, (96, 64))
    kept = inputs.stored_form(pixels, sent, mask=False)
    assert kept.content_type == "image/png" and kept.data == inputs.encode(pixels)[1] and len(kept.data) < len(sent)
    assert np.array_equal(inputs.pixels(kept.data, False, (96, 64)), np.asarray(pixels))


def test_a_mask_sent_as_an_rgb_jpeg_is_kept_as_sent_when_it_decodes_to_the_same_grey_levels():
    sent = encoded(photo(96, 64, seed=3))
    pixels = _job_pixels(sent, (96, 64), mask=True)
    kept = inputs.stored_form(pixels, sent, mask=True)
    assert kept.data == sent and pixels.mode == "L"
    assert np.array_equal(inputs.pixels(kept.data, True, (96, 64)), np.asarray(pixels))


def test_a_bloated_png_is_stored_as_the_smaller_png_of_its_pixels():
    picture = photo(96, 64, seed=1)
    sent = encoded(picture, "PNG", compress_level=0)  # a lossless upload larger than it needs to be
    pixels = _job_pixels(sent, (96, 64))
    kept = inputs.stored_form(pixels, sent, mask=False)
    assert len(kept.data) < len(sent) and kept.content_type == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept.data))), np.asarray(picture))


def test_a_small_lossless_upload_at_the_jobs_size_is_kept_as_sent():
    picture = photo(96, 64, seed=2)
    sent = encoded(picture, "WEBP", lossless=True)
    pixels = _job_pixels(sent, None)
    kept = inputs.stored_form(pixels, sent, mask=False)
    assert kept.data == sent and kept.content_type == "image/webp" and len(sent) < len(inputs.encode(pixels)[1])
    assert np.array_equal(inputs.pixels(kept.data, False, (96, 64)), np.asarray(picture))


def test_an_input_the_job_shrinks_is_stored_as_the_png_even_when_smaller_as_sent():
    # kept as sent, the worker would decode and shrink every pixel sent (a 40 KB WebP can hold 2048x2048)
    sent = encoded(photo(192, 128), quality=30)
    pixels = _job_pixels(sent, (96, 64))
    kept = inputs.stored_form(pixels, sent, mask=False)
    assert len(sent) < len(inputs.encode(pixels)[1]) and kept.content_type == "image/png"
