"""A batch as the device loop sees it: the key its jobs share (`BatchKey`), each job as admitted (`Admitted`: its
record, the Celery task's future, its input images as pixels), and the engine rows a job makes."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from common.jobs import Job
from common.vocabulary import REFINER_AESTHETIC_SCORE, REFINER_NEGATIVE_AESTHETIC_SCORE
from worker.batcher import Batch, Item
from worker.engine.batch_inputs import Row
from worker.engine.control_inputs import Control
from worker.engine.image_prompts import ImagePrompt
from worker.loop.outcome import JobOutcome


class BatchKey(NamedTuple):
    """The batcher's group: jobs share a batch only with jobs of the same key. Guided and guidance-free rows run
    different programs (two UNet rows per image or one), refined rows go on to the refiner's, and each model has
    its own engine. LoRA adapters are not in it: rows with different adapters share a batch
    (worker/engine/lora.py)."""

    height: int
    width: int
    guided: bool
    refined: bool
    model: str  # the job's, "" for the default

    @classmethod
    def of(cls, job: Job) -> BatchKey:
        r = job.request
        assert r.height is not None and r.width is not None  # the API fills them in
        return cls(r.height, r.width, r.guidance_scale > 1, r.refiner is not None, r.model or "")


@dataclass(frozen=True)
class InputPixels:
    """A job's input images read back from storage: (H, W, 3) uint8, and (H, W) uint8 for the mask; the control
    maps, one per ControlNet of the request in its order (preprocessed: canny edges where it asks)."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    controls: tuple[np.ndarray, ...] = ()
    ip_image: np.ndarray | None = None  # the IP-Adapter's image prompt


@dataclass
class Admitted:
    """A job admitted to wait for a batch: its record as read at admission, the future its Celery task waits
    on, and its input images (read before it was batched)."""

    job: Job
    future: Future[JobOutcome]
    pixels: InputPixels = field(default_factory=InputPixels)

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def rows(self) -> list[Row]:
        return rows_for(self.job, self.pixels)

    def item(self, arrived_s: float) -> LoopItem:
        """As the batcher holds it: data set lines (lane "bulk") go after interactive jobs."""
        priority = 1 if self.job.lane == "bulk" else 0
        return Item(self.id, BatchKey.of(self.job), self.job.request.num_images, arrived_s, self, priority)


LoopItem = Item[BatchKey, Admitted]
LoopBatch = Batch[BatchKey, Admitted]


def rows_for(job: Job, pixels: InputPixels | None = None) -> list[Row]:
    """The engine's rows for a job: one per image, seeds seed..seed+n-1."""
    r = job.request
    assert r.seed is not None  # the API fills it in
    pixels = pixels or InputPixels()
    refiner = r.refiner
    return [
        Row(
            r.prompt,
            r.negative_prompt,
            r.seed + i,
            r.guidance_scale,
            r.steps,
            r.scheduler.value,
            timestep_spacing=r.timestep_spacing.value if r.timestep_spacing else None,
            image=pixels.image,
            mask=pixels.mask,
            strength=r.strength,
            refiner_switch=refiner.switch_at if refiner else None,
            aesthetic_score=refiner.aesthetic_score if refiner else REFINER_AESTHETIC_SCORE,
            negative_aesthetic_score=refiner.negative_aesthetic_score if refiner else REFINER_NEGATIVE_AESTHETIC_SCORE,
            loras=tuple((a.name, a.scale) for a in r.loras),
            controlnets=tuple(
                Control(c.name, image, c.scale, c.start, c.end)
                for c, image in zip(r.controlnets, pixels.controls, strict=True)
            ),
            ip_adapter=(
                ImagePrompt(r.ip_adapter.name, pixels.ip_image, r.ip_adapter.scale)
                if r.ip_adapter is not None and pixels.ip_image is not None
                else None
            ),
        )
        for i in range(r.num_images)
    ]
