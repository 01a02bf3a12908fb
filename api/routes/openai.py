"""OpenAI's Images API on this service: `POST /v1/images/generations`, so that code written for OpenAI (the
official `openai` package pointed here with `base_url`) makes SDXL images unchanged.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sdxl_...")
    client.images.generate(model="sdxl", prompt="a lighthouse", n=2, size="1024x1024", response_format="b64_json")

A generation is a job like any other (same API keys, rate limits, tenant and queue; it shows in
GET /v1/jobs): it is submitted and the answer waits for its end, up to SDXL_MAX_WAIT_S. OpenAI's fields map as:
    n -> num_images; size "WIDTHxHEIGHT" (or "auto": the first served size) -> width, height;
    quality -> steps (low 10, medium/standard/auto 20, high/hd 40, capped at SDXL_MAX_STEPS);
    response_format url (signed, as GET /v1/jobs gives) or b64_json; output_format png/jpeg/webp;
    model: absent, "sdxl", or a served model's name (SDXL_MODELS); user and style: accepted, not used.
Extensions outside OpenAI's API (pass them with the SDK's `extra_body`): negative_prompt, seed, steps,
guidance_scale, scheduler, timestep_spacing. The job's other fields are not mapped (NOT_MAPPED says why): an
`extra_body` naming one is a 422 naming it; POST /v1/jobs (or a data set line) takes them all. Errors are the
service's problem details with OpenAI's `error` object added (api/errors.py), which the SDK reads.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api import job_service
from api.deps import CallerDep, ServicesDep
from common.jobs import MAX_SEED, JobRequest, JobStatus, LimitError, OutputFormat, Scheduler, Spacing, Text

router = APIRouter(prefix="/v1/images", tags=["openai"])
STEPS_BY_QUALITY = {"low": 10, "medium": 20, "standard": 20, "auto": 20, "high": 40, "hd": 40}
FIELDS = {"num_images": "n", "width": "size", "height": "size"}  # our field -> OpenAI's, in error messages
# a job's fields this route does not take, and why (tests/api/test_openai.py holds it to JobRequest's fields)
NOT_MAPPED = {
    "init_image": "OpenAI's images.edit (POST /v1/images/edits, multipart) is not served: use POST /v1/jobs",
    "mask_image": "likewise: images.edit's mask",
    "strength": "with init_image only",
    "refiner": "no OpenAI parameter; POST /v1/jobs",
    "loras": "no OpenAI parameter; POST /v1/jobs",
    "controlnets": "no OpenAI parameter, and its images would be base64 in a JSON body; POST /v1/jobs",
    "ip_adapter": "likewise",
    "preview": "an answer that waits for the end has no progress to show; GET /v1/jobs/{id}/events does",
    "webhook_url": "the answer waits for the end already",
}


class ImageGeneration(BaseModel):
    """OpenAI's image generation request (the fields this service can honour), plus a few of SDXL's own."""

    model_config = {"extra": "forbid"}

    prompt: Text = Field(min_length=1)
    model: Text | None = None
    n: int = Field(1, ge=1)
    size: Text | None = Field(None, description='"WIDTHxHEIGHT", one of the served sizes, or "auto"')
    response_format: Literal["url", "b64_json"] = "url"
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    output_format: OutputFormat = OutputFormat.png
    user: Text | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for compatibility; not used.")
    # SDXL's own, outside OpenAI's API
    negative_prompt: Text | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=150, description="Overrides quality.")
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    scheduler: Scheduler | None = None
    timestep_spacing: Spacing | None = None  # "trailing" for SDXL-Turbo and Lightning


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None  # OpenAI's rewrite of the prompt: this service never rewrites one


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    quality: str
    output_format: str
    job_id: str  # the job behind the answer (GET /v1/jobs/{id})


def to_job(body: ImageGeneration, models: list[str], sizes: list[tuple[int, int]], max_steps: int) -> JobRequest:
    """models: the served models' names, the default first."""
    if body.model not in (None, "sdxl", *models):
        raise LimitError("model", f"{body.model!r} is not served here; use one of {models} (or 'sdxl', or omit it)")
    model = body.model if body.model in models[1:] else None  # the default: recorded as the jobs API's would be
    width = height = None
    if body.size not in (None, "auto"):
        w, _, h = body.size.lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise LimitError("size", f"{body.size!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
        width, height = int(w), int(h)
        if (height, width) not in sizes:
            served = ", ".join(f"{sw}x{sh}" for sh, sw in sizes)
            raise LimitError("size", f"{body.size} is not served; choose one of: {served}")
    steps = body.steps or min(STEPS_BY_QUALITY[body.quality or "auto"], max_steps)
    own = ("negative_prompt", "seed", "guidance_scale", "scheduler", "timestep_spacing")
    extra = {k: v for k in own if (v := getattr(body, k)) is not None}
    return JobRequest(
        prompt=body.prompt,
        width=width,
        height=height,
        num_images=body.n,
        steps=steps,
        output_format=body.output_format,
        model=model,
        **extra,
    )


@router.post("/generations", response_model=ImagesResponse, responses={400: {}, 401: {}, 422: {}, 429: {}, 504: {}})
async def generate_images(
    body: ImageGeneration,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> ImagesResponse:
    """Make images as OpenAI's `images.generate` does: the answer carries them (URLs or base64)."""
    s = services.settings
    try:
        job_request = to_job(body, [e.name for e in s.model_entries], s.served_sizes, s.max_steps)
        submitted = await run_in_threadpool(job_service.submit, job_request, services, caller.tenant, idempotency_key)
    except LimitError as exc:
        field = FIELDS.get(exc.field, exc.field)
        raise LimitError(field, str(exc).replace("num_images", "n")) from exc
    job_id, stored = submitted.job_id, submitted.request
    job = await job_service.until_ended(services, request, caller, job_id, s.max_wait_s)
    if job is None:  # the client left; the job runs on, as any job does
        raise HTTPException(499, "the client closed the connection")
    if job.status == JobStatus.failed:
        raise HTTPException(500, f"generation failed: {job.error} (job {job_id})")
    if job.status == JobStatus.canceled:
        raise HTTPException(409, f"job {job_id} was canceled")
    if job.status != JobStatus.succeeded:
        waited = f"did not end within {s.max_wait_s:g} s (SDXL_MAX_WAIT_S)"
        raise HTTPException(504, f"job {job_id} {waited}; it goes on: GET /v1/jobs/{job_id}")
    if body.response_format == "b64_json":
        blobs = [await run_in_threadpool(services.storage.get, image.key) for image in job.images]
        data = [ImageData(b64_json=base64.b64encode(blob).decode()) for blob in blobs]
    else:
        data = [ImageData(url=services.storage.url(image.key, s.url_expiry_s)) for image in job.images]
    return ImagesResponse(
        created=int(job.created_at or time.time()),
        data=data,
        size=f"{stored.width}x{stored.height}",
        quality=body.quality or "auto",
        output_format=stored.output_format.value,
        job_id=job_id,
    )
