"""Jobs: submit, poll (or wait for the end), cancel, list."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Annotated

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import job_inputs, metrics, served
from api.deps import CallerDep, OffsetQuery, Services, ServicesDep
from api.schemas import CancelPublic, ImagePublic, JobPublic, JobsPublic
from common import loras, webhooks
from common.job_store import IdempotencyConflict, QueueFull
from common.jobs import MAX_SEED, TERMINAL, Job, JobRequest, JobStatus, LimitError, check_limits, with_size
from common.queue import TASK_GENERATE, TASK_WEBHOOK

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger(__name__)
EVENTS_POLL_S = 1.0  # an event stream reads its job at least this often (a queued job's position moves unannounced)
EVENTS_KEEPALIVE_S = 15.0  # a comment line after this long without an event
EVENTS_RETRY_S = 2.0  # the reconnect delay the stream asks EventSource clients to use


def to_public(job: Job, services: Services, request: Request) -> JobPublic:
    s = services.settings
    images = (
        [
            ImagePublic(
                url=services.storage.url(i.key, s.url_expiry_s),
                seed=i.seed,
                width=i.width,
                height=i.height,
                sha256=i.sha256,
                model=i.model,
                model_hash=i.model_hash,
                loras=i.loras,
            )
            for i in job.images
        ]
        if job.status == JobStatus.succeeded
        else []
    )
    return JobPublic(
        id=job.id,
        status=job.status,
        status_url=str(request.url_for("get_job", job_id=job.id)),
        request=job.request,
        queue_position=_queue_position(job, services),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.finished_at + s.job_ttl_s if job.finished_at is not None else None,
        error=job.error,
        images=images,
        truncated=job.truncated,
        attempts=job.attempts,
        progress=job.progress if job.status != JobStatus.queued else None,
    )


def _queue_position(job: Job, services: Services) -> int | None:
    """1 for the next job to start; None when not queued, or unknown right now (Redis away)."""
    if job.status != JobStatus.queued:
        return None
    try:
        return services.store.queue_position(job.id)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return None


@router.post("", status_code=202, response_model=JobPublic, responses={401: {}, 409: {}, 422: {}, 429: {}, 503: {}})
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
    """Submit a text-to-image job; answers once it is stored and queued, or with `Prefer: wait=N` once it
    has ended (200) or N seconds have passed (202)."""
    wait_s = preferred_wait_s(request.headers.getlist("prefer"), services.settings.max_wait_s)
    job_id, created, stored = await run_in_threadpool(submit, body, services, caller.tenant, idempotency_key)
    # no wait: one read, as a plain submit
    read = functools.partial(run_in_threadpool, owned, job_id, services, caller)
    try:
        job = await until_ended(services, request, job_id, wait_s or 0, read)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        if not created:
            raise
        # Redis went away after the job was stored: it will run, so the answer is 202 with what was stored
        # (a 503 would tell the client that nothing was, and a retry without an Idempotency-Key would double it)
        job = Job(id=job_id, tenant=caller.tenant, status=JobStatus.queued, request=stored, created_at=time.time())
        wait_s = None
    if job is None:  # nobody to answer; the access log shows 499, nginx's code for a client that left first
        return Response(status_code=499)
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    if not created or (wait_s is not None and job.status in TERMINAL):  # without a wait: 202, however fast
        response.status_code = 200
    return await run_in_threadpool(to_public, job, services, request)


def submit(
    body: JobRequest, services: Services, tenant: str, idempotency_key: str | None
) -> tuple[str, bool, JobRequest]:
    """Check, store and queue a job: (its id, whether it is new, the request as stored). A replayed
    Idempotency-Key gives the earlier job's id."""
    s = services.settings
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()  # the client's body, before defaults
    body, found = job_inputs.decode(body, services.storage, tenant, s.served_sizes)  # a size from the init image
    body = with_size(body, s.served_sizes)  # absent width/height: the deployment's first size
    check_limits(body, s.served_sizes, s.max_steps, min(s.max_images_per_job, s.batch_rows), s.max_prompt_chars)
    if body.refiner is not None and not s.refiner:
        raise LimitError("refiner", "this deployment serves no refiner (SDXL_REFINER); leave `refiner` out")
    served.check_model(body, s, services.served)
    loras.check(body.loras, services.loras, s.max_loras_per_job, s.lora_max_rank)
    if body.webhook_url is not None:
        if s.webhook_secret is None:
            raise LimitError("webhook_url", "webhooks are not configured on this deployment (no SDXL_WEBHOOK_SECRET)")
        try:
            webhooks.check_url(body.webhook_url, s.webhook_allow_private)
        except webhooks.WebhookError as exc:
            raise LimitError("webhook_url", str(exc)) from exc
    if body.seed is None:  # random, but always returned so the image can be made again
        body = body.model_copy(update={"seed": secrets.randbelow(MAX_SEED - body.num_images + 2)})
    body = job_inputs.store(body, found, services.storage, tenant)  # last: only a job that passed every check
    try:
        # a replay is answered whatever the limits; only new work counts against the queued cap
        job_id, created = services.store.create(
            body, idempotency_key, fingerprint, tenant=tenant, max_queued=s.max_queued_per_tenant
        )
    except BaseException as exc:
        job_inputs.undo(found, services.storage)  # refused (or Redis away): nothing stored, its inputs neither
        if isinstance(exc, IdempotencyConflict):
            raise HTTPException(
                409, f"Idempotency-Key was already used for job {exc.job_id} with a different request body"
            ) from exc
        if isinstance(exc, QueueFull):
            raise HTTPException(
                429,
                f"this tenant already has {exc.queued} queued jobs (the limit is {s.max_queued_per_tenant}); "
                "retry when some have run",
                headers={"Retry-After": "10"},
            ) from exc
        raise
    if not created:
        job_inputs.undo(found, services.storage)  # a replay: the first submit's inputs are its job's
    if created:
        log.info("job submitted", extra={"job_id": job_id})
        metrics.SUBMITTED.labels(f"{body.width}x{body.height}").inc()
        # The record and its outbox entry were stored by one script: from here on the job runs whatever
        # happens. A failed send (or a lost confirmation) leaves the entry, and a worker's sweep sends the
        # message within OUTBOX_GRACE_S (worker/sweeper.py); so the answer is 202 either way.
        try:
            services.celery.send_task(TASK_GENERATE, args=[job_id, 0], queue=s.queue_name)
            services.store.sent(job_id)
        except Exception:
            log.warning(
                "job %s stored but its message not confirmed sent; a worker's sweep will send it", job_id, exc_info=True
            )
    return job_id, created, body


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


@router.get("/{job_id}", response_model=JobPublic, responses={404: {}, 422: {}})
async def get_job(
    job_id: str,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    wait_s: Annotated[
        float, Query(ge=0, allow_inf_nan=False, description="Answer once the job has ended or after this long.")
    ] = 0,
) -> JobPublic | Response:
    """A job's status, and its images (with freshly signed URLs) once it has succeeded; with `wait_s`, once
    it has ended or `wait_s` has passed (a long poll: one request instead of many)."""
    max_wait_s = services.settings.max_wait_s
    if wait_s > max_wait_s:
        raise LimitError("wait_s", f"at most {max_wait_s:g} s on this deployment (SDXL_MAX_WAIT_S), got {wait_s:g}")
    # wait_s 0: one read, as a plain poll
    read = functools.partial(run_in_threadpool, owned, job_id, services, caller)
    job = await until_ended(services, request, job_id, wait_s, read)
    if job is None:  # nobody to answer; the access log shows 499, nginx's code for a client that left first
        return Response(status_code=499)
    return await run_in_threadpool(to_public, job, services, request)


async def until_ended(
    services: Services, request: Request, job_id: str, wait_s: float, read: Callable[[], Awaitable[Job]]
) -> Job | None:
    """The job once it has ended or wait_s has passed (api/job_events.py), or None as soon as the client
    closes the connection: a dropped long poll stops waiting at once instead of at its deadline."""
    if not wait_s:
        return await services.events.until_ended(job_id, 0, read)
    waiting = asyncio.ensure_future(services.events.until_ended(job_id, wait_s, read))
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gone, waiting):
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
    return None if waiting.cancelled() else waiting.result()


async def client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (ASGI `http.disconnect`). The body has been read by
    the time a handler runs, so these messages are nobody else's."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def owned(job_id: str, services: Services, caller: CallerDep) -> Job:
    """The caller's job; another tenant's job is as absent as an unknown one (404, never 403)."""
    job = services.store.get(job_id)
    if job is None or job.tenant != caller.tenant:
        raise HTTPException(404, f"no job {job_id} (unknown, another tenant's, or its record expired)")
    return job


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}, 404: {}},
    response_class=StreamingResponse,
)
async def job_events(job_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> StreamingResponse:
    """The job's changes as Server-Sent Events, ending with the job: `queued` (data: `queue_position`) each
    time its position changes, `running` (data: `progress` {step, steps}) at each reported step, then one of
    `succeeded`, `failed` or `canceled` whose data is the whole job, as GET /v1/jobs/{id} answers it. Every
    event's data is a JSON object with `id` and `status`. A stream opened on an ended job sends its end at once."""
    first = await run_in_threadpool(owned, job_id, services, caller)  # a 404 now, before the stream starts
    return StreamingResponse(
        _event_stream(first, services, caller, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering of the stream
    )


async def _event_stream(first: Job, services: Services, caller: CallerDep, request: Request) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    job_id, sent, job = first.id, None, first
    quiet_since = loop.time()
    yield f"retry: {int(1000 * EVENTS_RETRY_S)}\n\n"
    async with services.events.watch(job_id) as changed:
        while True:
            if job is not None:
                public = await run_in_threadpool(to_public, job, services, request)
                if job.status in TERMINAL:
                    yield _event(job.status.value, public.model_dump_json())
                    return
                state = (job.status, public.queue_position, public.progress)
                if state != sent:
                    data = {"id": job_id, "status": job.status.value}
                    if job.status == JobStatus.queued:
                        data["queue_position"] = public.queue_position
                    else:
                        data["progress"] = public.progress.model_dump() if public.progress else None
                    yield _event(job.status.value, json.dumps(data))
                    sent, quiet_since = state, loop.time()
            if loop.time() - quiet_since >= EVENTS_KEEPALIVE_S:  # a comment line: proxies keep the stream open
                yield ": keep-alive\n\n"
                quiet_since = loop.time()
            # Woken by the job's progress or end; a queued job's position is read again each second.
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), EVENTS_POLL_S)
            changed.clear()  # before the read: a change published after it sets the event again
            try:
                job = await run_in_threadpool(owned, job_id, services, caller)
            except HTTPException:  # the record expired meanwhile: nothing more will happen
                return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                job = None  # Redis away: the stream stays open and reads again after the next wait


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


@router.post("/{job_id}/cancel", response_model=CancelPublic, responses={404: {}, 409: {}})
def cancel_job(job_id: str, services: ServicesDep, caller: CallerDep) -> CancelPublic:
    """Cancel a job: a queued job never runs; a running job's results are discarded."""
    owned(job_id, services, caller)
    changed, before = services.store.transition(job_id, JobStatus.canceled, [JobStatus.queued, JobStatus.running])
    if before is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or its record expired)")
    if not changed:
        raise HTTPException(409, f"job {job_id} has already ended ({before.value}); nothing to cancel")
    outcome = "never_ran" if before == JobStatus.queued else "results_discarded"
    if before == JobStatus.queued and services.store.get(job_id).request.webhook_url:
        # no worker will see this job again: the API queues its webhook (a running job's worker does)
        services.celery.send_task(TASK_WEBHOOK, args=[job_id], queue=services.settings.queue_name)
    return CancelPublic(id=job_id, status=JobStatus.canceled, outcome=outcome)


@router.get("", response_model=JobsPublic)
def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobsPublic:
    """Recent jobs, newest first."""
    jobs, total = services.store.recent(offset, limit, tenant=caller.tenant)
    return JobsPublic(jobs=[to_public(j, services, request) for j in jobs], total=total, offset=offset, limit=limit)
