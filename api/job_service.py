"""What the jobs routes do, apart from HTTP parsing: check, store and queue a job; wait for its end; cancel it;
answer it as JobPublic; stream its changes. api/routes/jobs.py and api/routes/openai.py call these."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from api import job_inputs, metrics, served
from api.deps import Caller, Services, owned_job
from api.schemas import CancelPublic, ImagePublic, JobPublic, JobsPublic
from common import webhook_target
from common.job_store import IdempotencyConflict, QueueFull
from common.jobs import (
    MAX_SEED,
    TERMINAL,
    Job,
    JobRequest,
    JobStatus,
    LimitError,
    Progress,
    check_limits,
    with_size,
)
from common.outage import REDIS_DOWN
from common.queue import TASK_GENERATE, TASK_WEBHOOK, generate_queue
from common.redis_connection import NotReplicated

log = logging.getLogger(__name__)
EVENTS_POLL_S = 1.0  # an event stream reads its job at least this often (a queued job's position moves unannounced)
EVENTS_KEEPALIVE_S = 15.0  # a comment line after this long without an event
EVENTS_RETRY_S = 2.0  # the reconnect delay the stream asks EventSource clients to use


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool  # False: an Idempotency-Key replay, answered with the earlier job
    request: JobRequest  # as stored: defaults (size, seed) filled in


@dataclass(frozen=True)
class SubmitAnswer:
    job: Job | None  # None: the client closed the connection while it waited
    created: bool
    wait_s: float | None  # the wait applied (Preference-Applied), None when none was


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
        status_url=s.public_url(f"/v1/jobs/{job.id}"),  # not the Host header: a client may send any
        request=job.request,
        queue_position=queue_position(job, services),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.finished_at + s.job_ttl_s if job.finished_at is not None else None,
        error=job.error,
        images=images,
        truncated=job.truncated,
        attempts=job.attempts,
        progress=_progress(job),
    )


def _progress(job: Job) -> Progress | None:
    """The worker's last report while running; as it ended once ended, without a preview (the image is there)."""
    if job.status == JobStatus.queued or job.progress is None:
        return None
    return job.progress if job.status not in TERMINAL else job.progress.model_copy(update={"preview": None})


def queue_position(job: Job, services: Services) -> int | None:
    """1 for the next job to start; None when not queued, or unknown right now (Redis away)."""
    if job.status != JobStatus.queued:
        return None
    try:
        return services.store.queue_position(job.id)
    except REDIS_DOWN:
        return None


def submit(body: JobRequest, services: Services, tenant: str, idempotency_key: str | None) -> Submitted:
    """Check, store and queue a job. A replayed Idempotency-Key gives the earlier job's id."""
    s = services.settings
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()  # the client's body, before defaults
    # a size from the init image
    body, found = job_inputs.decode(body, services.storage, tenant, s.served_sizes, services.decodes)
    body = with_size(body, s.served_sizes)  # absent width/height: the deployment's first size
    check_limits(body, s.served_sizes, s.max_steps, min(s.max_images_per_job, s.batch_rows), s.max_prompt_chars)
    served.check_request(body, s, services.served, services.loras)  # as for each data set line
    if body.webhook_url is not None:
        if s.webhook_secret is None:
            raise LimitError("webhook_url", "webhooks are not configured on this deployment (no SDXL_WEBHOOK_SECRET)")
        try:
            webhook_target.check_url(body.webhook_url, s.webhook_allow_private)
        except webhook_target.WebhookError as exc:
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
        if not isinstance(exc, NotReplicated):  # the primary holds that job: it may run, with its inputs
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
        # message within OUTBOX_GRACE_S (worker/sweeper.py); so the answer is 202 either way. The message names
        # no job: it wakes a worker holding the job's model (on the model's queue), which takes the next job for
        # that model in fair order (tenants in turn), not necessarily this one.
        try:
            services.celery.send_task(
                TASK_GENERATE, args=[], kwargs={"model": body.model}, queue=generate_queue(s, body.model)
            )
            services.store.sent(job_id)
        except Exception:
            log.warning(
                "job %s stored but its message not confirmed sent; a worker's sweep will send it", job_id, exc_info=True
            )
    return Submitted(job_id, created, body)


async def submit_and_wait(
    body: JobRequest,
    services: Services,
    caller: Caller,
    request: Request,
    idempotency_key: str | None,
    wait_s: float | None,
) -> SubmitAnswer:
    """Submit, then read the job once (no wait) or once it has ended or `wait_s` has passed."""
    submitted = await run_in_threadpool(submit, body, services, caller.tenant, idempotency_key)
    try:
        try:
            job = await until_ended(services, request, caller, submitted.job_id, wait_s or 0)
        except HTTPException as exc:
            if exc.status_code != 429:
                raise
            # This key holds its cap of waits. The job is stored: a 429 would read as "not stored" and invite a
            # duplicate, so the preference is ignored instead (RFC 7240 allows it): 202 now, no Preference-Applied.
            wait_s = None
            job = await until_ended(services, request, caller, submitted.job_id, 0)
    except REDIS_DOWN:
        if not submitted.created:
            raise
        # Redis went away after the job was stored: it will run, so the answer is 202 with what was stored
        # (a 503 would tell the client that nothing was, and a retry without an Idempotency-Key would double it)
        stored = Job(
            id=submitted.job_id,
            tenant=caller.tenant,
            status=JobStatus.queued,
            request=submitted.request,
            created_at=time.time(),
        )
        return SubmitAnswer(stored, created=True, wait_s=None)
    return SubmitAnswer(job, submitted.created, wait_s)


async def until_ended(services: Services, request: Request, caller: Caller, job_id: str, wait_s: float) -> Job | None:
    """The caller's job once it has ended or wait_s has passed (api/job_events.py; wait_s 0: one read), or None
    as soon as the client closes the connection: a dropped long poll stops waiting at once, not at its
    deadline. 404 when the job is not the caller's."""

    async def read() -> Job:
        return await run_in_threadpool(owned_job, job_id, services, caller)

    if not wait_s:
        return await services.events.until_ended(job_id, 0, read)
    give_back = services.waits.take(caller.key_id)  # 429 when this key holds its cap of waits and streams
    try:
        return await _until_ended(services, request, job_id, wait_s, read)
    finally:
        give_back()


async def _until_ended(
    services: Services, request: Request, job_id: str, wait_s: float, read: Callable[[], Awaitable[Job]]
) -> Job | None:
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


def cancel(job: Job, services: Services) -> CancelPublic:
    """queued or running -> canceled; a canceled queued job's webhook is queued here (no worker sees it)."""
    changed, before = services.store.transition(
        job.id, JobStatus.canceled, [JobStatus.queued, JobStatus.running], tenant=job.tenant, model=job.request.model
    )
    if before is None:
        raise HTTPException(404, f"no job {job.id} (unknown, or its record expired)")
    if not changed:
        raise HTTPException(409, f"job {job.id} has already ended ({before.value}); nothing to cancel")
    outcome = "never_ran" if before == JobStatus.queued else "results_discarded"
    if before == JobStatus.queued and job.request.webhook_url:
        # no worker will see this job again: the API queues its webhook (a running job's worker does)
        services.celery.send_task(TASK_WEBHOOK, args=[job.id], queue=services.settings.webhook_queue)
    return CancelPublic(id=job.id, status=JobStatus.canceled, outcome=outcome)


def recent(services: Services, caller: Caller, request: Request, offset: int, limit: int) -> JobsPublic:
    jobs, total = services.store.recent(offset, limit, tenant=caller.tenant)
    return JobsPublic(jobs=[to_public(j, services, request) for j in jobs], total=total, offset=offset, limit=limit)


async def event_stream(first: Job, services: Services, caller: Caller, request: Request) -> AsyncIterator[str]:
    """The job's changes as Server-Sent Events, ending with the job (GET /v1/jobs/{id}/events says which)."""
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
                        # with `preview` on the reports that carry one (preview: true jobs, every few steps)
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
                job = await run_in_threadpool(owned_job, job_id, services, caller)
            except HTTPException:  # the record expired meanwhile: nothing more will happen
                return
            except REDIS_DOWN:
                job = None  # Redis away: the stream stays open and reads again after the next wait


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"
