"""Data sets: a JSONL of prompts in, a finished image data set out (images, manifest, WebDataset shards).

POST takes either an upload (multipart/form-data: `input` the JSONL file, `options` a JSON object) or a
JSON body naming an object already in storage (`input_key`). Every line is validated before the run exists.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import suppress
from typing import Annotated, Any, BinaryIO

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.dataset_ingest import InputInvalid, create_run, discard, ingest
from api.deps import CallerDep, OffsetQuery, Services, ServicesDep
from api.errors import invalid, problem
from api.schemas import (
    DatasetCounts,
    DatasetFailuresPublic,
    DatasetFilesPublic,
    DatasetPublic,
    DatasetsPublic,
    FailurePublic,
    LineErrorPublic,
    ResumePublic,
    RetryPublic,
)
from common.dataset_store import DatasetRun, TooManyRuns
from common.datasets import FINISHED, DatasetOptions, DatasetStatus, Layout
from common.jobs import JobStatus

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["input"],
                "properties": {
                    "input": {"type": "string", "format": "binary", "description": "The JSONL, one line per image."},
                    "options": {"type": "string", "description": "DatasetOptions as JSON (without input_key)."},
                },
            }
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/DatasetOptions"}},
    },
}


def _error(status: int, message: str, field: str = "body", **extra: Any) -> JSONResponse:
    return problem(status, message, errors=[{"field": field, "message": message}], **extra)


@router.post(
    "",
    status_code=202,
    response_model=DatasetPublic,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={401: {}, 409: {}, 413: {}, 415: {}, 422: {}, 429: {}},
)
async def create_dataset(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Any:
    """Validate a JSONL of prompts and start generating it; answers with the run once it is stored."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: UploadFile | None = None
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=2)
        part = form.get("input")
        if not isinstance(part, UploadFile):
            return _error(422, "multipart upload needs a file part named `input` (the JSONL)", "input")
        upload = part
        raw_options = form.get("options") or "{}"
        if not isinstance(raw_options, str):
            return _error(422, "`options` must be a JSON object in a text part", "options")
    elif content_type == "application/json":
        raw_options = (await request.body()).decode("utf-8", errors="replace")
    else:
        return _error(415, "send multipart/form-data (parts `input` and `options`) or application/json with input_key")
    try:
        options = DatasetOptions.model_validate_json(raw_options)
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "options", "message": e["msg"]} for e in exc.errors()]
        return invalid(fields, "options")
    if upload is not None and options.input_key is not None:
        return _error(422, "send either an upload or input_key, not both", "input_key")
    if upload is None and options.input_key is None:
        return _error(422, "input_key is required with a JSON body (or upload the file as multipart)", "input_key")
    tenant = caller.tenant
    return await run_in_threadpool(_create, services, tenant, options, upload, idempotency_key, request, response)


def _create(
    services: Services,
    tenant: str,
    options: DatasetOptions,
    upload: UploadFile | None,
    idempotency_key: str | None,
    request: Request,
    response: Response,
) -> Any:
    s = services.settings
    if upload is not None:
        stream: BinaryIO = upload.file
        source = f"upload:{upload.filename or 'input.jsonl'}"
    else:
        key = options.input_key or ""
        # Each tenant reads only its own folder: the manifest a run writes holds every prompt of its input,
        # so reading another tenant's file would be reading their prompts. Without auth there is one tenant.
        prefix = f"{s.dataset_input_prefix}{tenant}/" if tenant else s.dataset_input_prefix
        if not key.startswith(prefix) or ".." in key.split("/"):
            return _error(422, f"input_key must be under {prefix!r} (this tenant's input folder)", "input_key")
        try:
            data = services.storage.get(key)
        except (KeyError, ValueError):
            return _error(422, f"no object at input_key {key!r}", "input_key")
        if len(data) > s.max_dataset_bytes:
            return _error(413, f"the input is larger than {s.max_dataset_bytes} bytes; split it", "input_key")
        stream, source = io.BytesIO(data), f"object:{key}"
    fingerprint = _fingerprint(stream, options)
    key_hash = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
    if key_hash:
        found = services.datasets.idempotent_run(tenant, key_hash)
        if found and services.datasets.get(found[0]) is None:
            # Claimed by a create whose run was never stored (Redis went away between the two; the claim
            # expires before any run it names): the key is free again.
            services.datasets.release_idempotency(tenant, key_hash)
        elif found:
            return _replay(services, tenant, key_hash, found, fingerprint, request, response)
    # Checked here so that a tenant at its cap is refused before a large file is read, and again, atomically,
    # when the run is stored (concurrent uploads).
    active = services.datasets.active_count(tenant)
    if active >= s.max_active_datasets_per_tenant:
        return _too_many_runs(active, s.max_active_datasets_per_tenant)
    try:
        ingested = ingest(stream, options, s, services.storage, registry=services.loras)
    except InputInvalid as exc:
        return _error(
            exc.status,
            str(exc),
            "input",
            invalid_lines=exc.invalid,
            lines=[e.as_dict() for e in exc.errors],
        )
    if upload is not None:
        stream.seek(0)
        services.storage.put_file(Layout(ingested.run_id).original, stream, "application/x-ndjson")
    if key_hash:
        run_id, seen = services.datasets.claim_idempotency(tenant, key_hash, ingested.run_id, fingerprint)
        if run_id != ingested.run_id:  # a concurrent request with the same key won: answer with its run
            return _replay(services, tenant, key_hash, (run_id, seen), fingerprint, request, response)
    try:
        create_run(services.datasets, ingested, options, tenant, source, s.max_active_datasets_per_tenant)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        # 503 "nothing was stored": the run's record was not (one script), and its input goes too. Storage
        # away as well: the chunks stay under datasets/<run>/, named by no record (docs/reliability.md).
        with suppress(Exception):
            discard(services.storage, ingested)
        raise
    except TooManyRuns as exc:
        discard(services.storage, ingested)
        if key_hash:
            services.datasets.release_idempotency(tenant, key_hash)
        return _too_many_runs(exc.active, s.max_active_datasets_per_tenant)
    run = services.datasets.get(ingested.run_id)
    assert run is not None
    return to_public(run, services, request)


def _too_many_runs(active: int, cap: int) -> JSONResponse:
    message = (
        f"this tenant already has {active} data set runs in progress (the limit is {cap}); "
        "retry when one has finished, or cancel one"
    )
    response = _error(429, message)
    response.headers["Retry-After"] = "60"
    return response


def _fingerprint(stream: BinaryIO, options: DatasetOptions) -> str:
    digest = hashlib.sha256(options.model_dump_json().encode())
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


def _replay(
    services: Services,
    tenant: str,
    key_hash: str,
    found: list[str],
    fingerprint: str,
    request: Request,
    response: Response,
) -> Any:
    run_id, seen = found
    if seen != fingerprint:
        raise HTTPException(409, f"Idempotency-Key was already used for data set {run_id} with other input or options")
    run = services.datasets.get(run_id)
    if run is None:  # the key outlived its run (both expire after job_ttl_s; the run can go first by a moment)
        services.datasets.release_idempotency(tenant, key_hash)
        raise HTTPException(409, f"Idempotency-Key was used for data set {run_id}, which has expired; use a new key")
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    return to_public(run, services, request)


STALL_MIN_S = 15.0  # at least three of the 5 s progress samples without a finished line


def to_public(run: DatasetRun, services: Services, request: Request) -> DatasetPublic:
    queued, running = _live_counts(run, services)
    if run.status in FINISHED:  # the whole run's average
        elapsed = (run.finished_at or 0) - (run.started_at or run.created_at)
        rate = run.succeeded / elapsed if elapsed > 0 else None
    else:  # over the last ~5 minutes
        rate = services.datasets.rate(run.id, run.succeeded)
    remaining = run.total - run.ended
    # No line finished for several of their usual intervals (lines waiting out a dead worker's recovery, an
    # outage): the rate says nothing about when the rest ends, so there is no ETA until progress resumes.
    stalled_s = None
    if run.status not in FINISHED and remaining > 0:
        idle_s = services.datasets.idle_s(run.id, run.succeeded)
        if idle_s > max(STALL_MIN_S, 3 / rate if rate else 0):
            stalled_s = round(idle_s, 1)
    return DatasetPublic(
        id=run.id,
        status=run.status,
        status_url=str(request.url_for("get_dataset", run_id=run.id)),
        files_url=str(request.url_for("dataset_files", run_id=run.id)),
        seed=run.seed,
        options=run.options,
        counts=DatasetCounts(
            total=run.total,
            queued=queued,
            running=running,
            succeeded=run.succeeded,
            failed=run.failed,
            canceled=run.canceled,
            skipped=run.skipped,
        ),
        images_per_s=round(rate, 3) if rate is not None else None,
        eta_s=round(remaining / rate, 1) if rate and remaining > 0 and stalled_s is None else None,
        stalled_s=stalled_s,
        shards=run.shards,
        output_prefix=Layout(run.id).prefix,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        expires_at=run.finished_at + services.settings.job_ttl_s if run.finished_at is not None else None,
        invalid_lines=[LineErrorPublic(**e) for e in run.extra.get("invalid", [])],
    )


def _live_counts(run: DatasetRun, services: Services) -> tuple[int, int]:
    """(queued, running): lines not yet fed count as queued; fed lines as their job says."""
    statuses = services.store.statuses(list(services.datasets.inflight(run.id).values()))
    queued_fed = statuses.count(JobStatus.queued)
    not_fed = 0 if run.status in FINISHED else (run.total - run.cursor) + services.datasets.retry_pending(run.id)
    return not_fed + queued_fed, len(statuses) - queued_fed


def owned(run_id: str, services: Services, caller: CallerDep) -> DatasetRun:
    run = services.datasets.get(run_id)
    if run is None or run.tenant != caller.tenant:
        raise HTTPException(404, f"no data set {run_id} (unknown, another tenant's, or its record expired)")
    return run


@router.get("/{run_id}", response_model=DatasetPublic, responses={404: {}})
def get_dataset(run_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> DatasetPublic:
    """Progress: counts by state, images per second, ETA, shards written."""
    return to_public(owned(run_id, services, caller), services, request)


@router.get("/{run_id}/files", response_model=DatasetFilesPublic, responses={404: {}})
def dataset_files(run_id: str, services: ServicesDep, caller: CallerDep) -> DatasetFilesPublic:
    """Signed URLs of the shards and manifest parts written so far, and of the whole manifest once finished."""
    run = owned(run_id, services, caller)
    layout, expiry = Layout(run.id), services.settings.url_expiry_s

    def url(key: str) -> str:
        return services.storage.url(key, expiry)

    finished = run.status in FINISHED
    return DatasetFilesPublic(
        shards=[url(layout.shard(i)) for i in range(run.shards)],
        manifest_parts=[url(layout.manifest_part(i, "jsonl")) for i in range(run.shards)],
        manifest_jsonl=url(layout.manifest("jsonl")) if finished else None,
        manifest_parquet=url(layout.manifest("parquet")) if finished else None,
        failures=url(layout.failures) if finished else None,
        invalid=url(layout.invalid) if run.skipped else None,
        stats=url(layout.stats) if finished else None,
        card=url(layout.card) if finished else None,
    )


@router.get("/{run_id}/failures", response_model=DatasetFailuresPublic, responses={404: {}})
def dataset_failures(
    run_id: str,
    services: ServicesDep,
    caller: CallerDep,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetFailuresPublic:
    """Lines that failed, with the reason, in line order."""
    owned(run_id, services, caller)
    failures = services.datasets.failures(run_id)
    page = [FailurePublic(**f) for f in failures[offset : offset + limit]]
    return DatasetFailuresPublic(failures=page, total=len(failures), offset=offset, limit=limit)


@router.post("/{run_id}/cancel", response_model=DatasetPublic, responses={404: {}, 409: {}})
def cancel_dataset(run_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> DatasetPublic:
    """Stop feeding: lines not started never run, lines on a device finish; everything finished is kept and
    the run ends with its manifest and shards."""
    owned(run_id, services, caller)
    before = services.datasets.cancel(run_id)
    if before is None:
        raise HTTPException(404, f"no data set {run_id}")
    if before != DatasetStatus.running:
        raise HTTPException(409, f"data set {run_id} is {before.value}; nothing to cancel")
    run = services.datasets.get(run_id)
    assert run is not None
    return to_public(run, services, request)


@router.post("/{run_id}/retry", response_model=RetryPublic, responses={404: {}, 409: {}, 429: {}})
def retry_dataset(run_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> RetryPublic:
    """Generate the failed lines again (same seeds); the run goes back to running and finishes again."""
    owned(run_id, services, caller)
    cap = services.settings.max_active_datasets_per_tenant
    count = services.datasets.retry(run_id, max_active=cap)
    if count == -2:
        raise HTTPException(409, f"data set {run_id} is being canceled; retry once it has ended")
    if count == -3:
        raise HTTPException(
            429,
            f"this tenant already has {cap} data set runs in progress (the limit); retry when one has finished",
            headers={"Retry-After": "60"},
        )
    if count <= 0:
        raise HTTPException(409, f"data set {run_id} has no failed lines to retry")
    run = services.datasets.get(run_id)
    assert run is not None
    return RetryPublic(retried=count, dataset=to_public(run, services, request))


@router.post("/{run_id}/resume", response_model=ResumePublic, responses={404: {}, 409: {}, 429: {}})
def resume_dataset(run_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> ResumePublic:
    """Generate a canceled run's canceled lines (same ids, same seeds); the run goes back to running and ends
    `completed` once every line has succeeded or failed."""
    owned(run_id, services, caller)
    cap = services.settings.max_active_datasets_per_tenant
    count = services.datasets.resume(run_id, max_active=cap)
    if count == -3:
        raise HTTPException(
            429,
            f"this tenant already has {cap} data set runs in progress (the limit); resume when one has finished",
            headers={"Retry-After": "60"},
        )
    run = services.datasets.get(run_id)
    if count == -1 or run is None:
        raise HTTPException(404, f"no data set {run_id}")
    if count == -2:
        raise HTTPException(409, f"data set {run_id} is {run.status.value}; only a canceled run can be resumed")
    if count == 0:
        raise HTTPException(409, f"data set {run_id} has no canceled lines to resume")
    return ResumePublic(resumed=count, dataset=to_public(run, services, request))


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DatasetsPublic:
    """Recent data set runs, newest first."""
    runs, total = services.datasets.recent(caller.tenant, offset, limit)
    return DatasetsPublic(
        datasets=[to_public(r, services, request) for r in runs], total=total, offset=offset, limit=limit
    )
