"""Jobs: submit, poll (or wait for the end), cancel, list, stream. What each does is api/job_service.py."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from api import job_service
from api.deps import CallerDep, JobId, OffsetQuery, OwnedJob, ServicesDep
from api.schemas import CancelPublic, JobPublic, JobsPublic
from common.jobs import TERMINAL, JobRequest, LimitError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={401: {}, 409: {}, 422: {}, 429: {}, 503: {}},
    description="Answers once the job is stored and queued (202), or with `Prefer: wait=N` once it has ended (200) "
    "or N seconds have passed (202). A replayed Idempotency-Key answers 200 with the earlier job.",
)
async def create_job(
    body: JobRequest,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    prefer: Annotated[  # declared for the OpenAPI page; read below as a list, since the header may repeat
        str | None,
        Header(description="`wait=N`: answer once the job has ended or after N seconds (RFC 7240)"),
    ] = None,
) -> JobPublic | Response:
    """Submit a text-to-image job."""
    wait_s = preferred_wait_s(request.headers.getlist("prefer"), services.settings.max_wait_s)
    answer = await job_service.submit_and_wait(body, services, caller, request, idempotency_key, wait_s)
    job = answer.job
    if job is None:  # nobody to answer; the access log shows 499, nginx's code for a client that left first
        return Response(status_code=499)
    if answer.wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={answer.wait_s:g}"
    if not answer.created:
        response.headers["Idempotent-Replayed"] = "true"
    if not answer.created or (answer.wait_s is not None and job.status in TERMINAL):  # no wait: 202, however fast
        response.status_code = 200
    return await run_in_threadpool(job_service.to_public, job, services, request)


def preferred_wait_s(prefer_headers: list[str], max_wait_s: float) -> float | None:
    """Seconds from an RFC 7240 `Prefer: wait=N` (a bare `wait`: the most allowed), capped at `max_wait_s`;
    None when no wait is asked for. Other preferences are ignored, as the RFC asks."""
    for header in prefer_headers:
        for preference in header.split(","):
            name, has_value, value = preference.split(";")[0].strip().partition("=")
            if name.strip().lower() != "wait":
                continue
            value = value.strip().strip('"')
            if not has_value:
                return max_wait_s
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds >= 0):
                example = f"e.g. `Prefer: wait=30` (at most {max_wait_s:g})"
                raise LimitError("Prefer", f"wait={value!r} is not a number of seconds; {example}")
            return min(seconds, max_wait_s)
    return None


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses={404: {}, 422: {}},
    description="Its images (with freshly signed URLs) once it has succeeded; with `wait_s`, the answer comes once "
    "the job has ended or `wait_s` has passed (a long poll: one request instead of many).",
)
async def get_job(
    job_id: JobId,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    wait_s: Annotated[
        float, Query(ge=0, allow_inf_nan=False, description="Answer once the job has ended or after this long.")
    ] = 0,
) -> JobPublic | Response:
    """A job's status and images."""
    max_wait_s = services.settings.max_wait_s
    if wait_s > max_wait_s:
        raise LimitError("wait_s", f"at most {max_wait_s:g} s on this deployment (SDXL_MAX_WAIT_S), got {wait_s:g}")
    job = await job_service.until_ended(services, request, caller, job_id, wait_s)  # wait_s 0: one read
    if job is None:  # nobody to answer; the access log shows 499, nginx's code for a client that left first
        return Response(status_code=499)
    return await run_in_threadpool(job_service.to_public, job, services, request)


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}, 404: {}, 429: {}},
    response_class=StreamingResponse,
    description="`queued` (data: `queue_position`) each time its position changes, `running` (data: `progress` "
    "{step, steps}) at each reported step, then one of `succeeded`, `failed` or `canceled` whose data is the whole "
    "job, as GET /v1/jobs/{id} answers it. Every event's data is a JSON object with `id` and `status`. A stream "
    "opened on an ended job sends its end at once.",
)
async def job_events(job: OwnedJob, services: ServicesDep, caller: CallerDep, request: Request) -> StreamingResponse:
    """The job's changes as Server-Sent Events, ending with the job."""
    give_back = services.waits.take(caller.key_id)  # 429 when this key holds its cap of streams and waits

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in job_service.event_stream(job, services, caller, request):
                yield event
        finally:
            give_back()

    return StreamingResponse(  # the job was read (a 404) before the stream starts
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering of the stream
        background=BackgroundTask(give_back),  # also when the stream never started (gives back once either way)
    )


@router.post("/{job_id}/cancel", response_model=CancelPublic, responses={404: {}, 409: {}})
def cancel_job(job: OwnedJob, services: ServicesDep) -> CancelPublic:
    """Cancel a job: a queued job never runs; a running job's results are discarded."""
    return job_service.cancel(job, services)


@router.get("", response_model=JobsPublic)
def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobsPublic:
    """Recent jobs, newest first."""
    return job_service.recent(services, caller, request, offset, limit)
