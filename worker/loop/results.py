"""Where images are written: a job's pixels as a file (its parameters in the PNG, encoded), under its key, uploaded
with the storage backoff. No Redis: what the job store says of the images is the recorder's (recorder.py)."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from common import inputs
from common.jobs import ImageRecord, Job, RenderConditions
from common.storage import Storage
from worker import images, metrics
from worker.engine.program_kind import Role
from worker.image_retention import image_key
from worker.loop.engine_port import AdapterInfo, EnginePort
from worker.loop.retry import StorageRetry


def adapters_used(job: Job, adapters: Sequence[AdapterInfo]) -> list[dict[str, Any]]:
    """What each adapter of the job was: its name, scale and file's sha256 (a name may later point at another
    file). `adapters`: the engine's, in the job's order ([]: the row used none)."""
    r = job.request
    return [
        {"name": a.name, "scale": lr.scale, "sha256": a.sha256}
        for a, lr in zip(adapters, r.loras, strict=bool(adapters))
    ]


def parameters(job: Job, index: int, engine: EnginePort, adapters: Sequence[AdapterInfo]) -> dict[str, Any]:
    """What made image `index` of the job, and nothing else (written into the PNG): the same line gives the same
    bytes on every run."""
    r = job.request
    assert r.seed is not None
    refiner = engine.models[Role.refiner] if r.refiner else None
    return {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed + index,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler.value,
        # image-to-image, inpainting and spacing only where the job asked: a text-to-image line's bytes stay
        # what they were
        **{
            name: value
            for name, value in (
                ("timestep_spacing", r.timestep_spacing.value if r.timestep_spacing else None),
                # the inputs' content hashes, not their keys: a key's folder names the tenant, and the PNG
                # travels (a shared image, a published data set)
                ("init_image_sha256", inputs.content_hash(r.init_image) if r.init_image else None),
                ("mask_image_sha256", inputs.content_hash(r.mask_image) if r.mask_image else None),
                ("strength", r.strength),
                ("refiner", r.refiner.model_dump() if r.refiner else None),
                ("refiner_model", refiner.name if refiner else None),
                ("refiner_hash", refiner.weights_hash if refiner else None),
                ("loras", adapters_used(job, adapters) or None),
                # each ControlNet: its name, control image's hash, scale, window and preprocessing; the
                # IP-Adapter's name, image hash and scale (hashes, as for the init image: never a key)
                ("controlnets", [inputs.by_hash(c) for c in r.controlnets] or None),
                ("ip_adapter", inputs.by_hash(r.ip_adapter) if r.ip_adapter else None),
                ("model_name", r.model),  # the name the job picked it by (SDXL_MODELS)
            )
            if value is not None
        },
        "width": r.width,
        "height": r.height,
        "model": engine.model.name,
        "model_hash": engine.model.weights_hash,
    }


class ImageWriter:
    def __init__(self, storage: Storage, retry: StorageRetry):
        self.storage = storage
        self.retry = retry

    def write(
        self, job: Job, index: int, pixels: np.ndarray, engine: EnginePort, adapters: Sequence[AdapterInfo] = ()
    ) -> ImageRecord:
        """Encode image `index` of the job and upload it under its key (deterministic: a second run of the job
        overwrites, never duplicates); raises once the storage backoff is spent."""
        t0 = time.perf_counter()
        r = job.request
        assert r.seed is not None and r.width is not None and r.height is not None
        fmt = r.output_format.value
        params = parameters(job, index, engine, adapters)
        data = images.encode(pixels, fmt, params)
        key = image_key(job, index, fmt)
        self.retry(functools.partial(self.storage.put, key, data, images.CONTENT_TYPES[fmt]))
        metrics.UPLOAD.labels(*metrics.job_labels(job)).observe(time.perf_counter() - t0)
        return ImageRecord(
            key=key,
            seed=r.seed + index,
            width=r.width,
            height=r.height,
            sha256=hashlib.sha256(data).hexdigest(),
            model=params["model"],
            model_hash=params["model_hash"],
            loras=adapters_used(job, adapters),
            conditions=RenderConditions(**engine.conditions),
        )

    def delete(self, written: list[ImageRecord]) -> None:
        """A job's images and their folder (images/<hour>/<job>) gone: its run's results discarded."""
        self.storage.delete_many([record.key for record in written])
        self.storage.prune(written[0].key.rsplit("/", 1)[0])
