"""What the API answers. Requests use common.jobs.JobRequest directly."""

from __future__ import annotations

from pydantic import BaseModel

from common.jobs import JobRequest, JobStatus


class ImagePublic(BaseModel):
    url: str  # signed afresh at each read; expires after `url_expiry_s`
    seed: int
    width: int
    height: int
    sha256: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    status_url: str
    request: JobRequest
    queue_position: int | None = None  # 1 = next to start; only while queued
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    images: list[ImagePublic] = []
    truncated: bool = False  # the prompt or negative prompt was longer than 77 tokens and was cut
    attempts: int = 0


class JobsPublic(BaseModel):
    jobs: list[JobPublic]
    total: int
    offset: int
    limit: int


class CancelPublic(BaseModel):
    id: str
    status: JobStatus
    # "never_ran": it was queued and will not run; "results_discarded": it was running and its images
    # will not be kept.
    outcome: str


class ModelPublic(BaseModel):
    model: str
    sizes: list[dict[str, int]]
    schedulers: list[str]
    output_formats: list[str]
    limits: dict[str, int | float]
