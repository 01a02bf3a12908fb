"""What the data set routes do, apart from HTTP parsing: validate and store a run (idempotently, within the
tenant's cap), answer a run as DatasetPublic, its files and failures, cancel, retry and resume it.
api/routes/datasets.py calls these; refusals are ProblemErrors or HTTPExceptions (api/errors.py)."""

from __future__ import annotations

import hashlib
import io
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from api.dataset_ingest import InputInvalid, create_run, discard, ingest
from api.deps import Caller, Services
from api.errors import ProblemError
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
from common.dataset_store import DatasetRun, TooManyImages, TooManyRuns
from common.datasets import FINISHED, DatasetOptions, DatasetStatus, Layout
from common.jobs import JobStatus
from common.outage import REDIS_DOWN
from common.storage import key_problem

STALL_MIN_S = 15.0  # at least three of the 5 s progress samples without a finished line


@dataclass(frozen=True)
class Created:
    run: DatasetPublic
    replayed: bool  # an Idempotency-Key seen before: the earlier run


def create(
    services: Services,
    tenant: str,
    options: DatasetOptions,
    upload: UploadFile | None,
    idempotency_key: str | None,
    request: Request,
) -> Created:
    """Read the input (an upload, or an object under the tenant's input folder), validate every line, and store
    the run; a replayed Idempotency-Key answers with the earlier run."""
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
            raise ProblemError(422, f"input_key must be under {prefix!r} (this tenant's input folder)", "input_key")
        problem = key_problem(key)
        if problem is not None:
            raise ProblemError(422, f"input_key {problem}", "input_key")
        try:
            data = services.storage.get(key)
        except (KeyError, ValueError) as exc:
            raise ProblemError(422, f"no object at input_key {key!r}", "input_key") from exc
        if len(data) > s.max_dataset_bytes:
            raise ProblemError(413, f"the input is larger than {s.max_dataset_bytes} bytes; split it", "input_key")
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
            return _replay(services, tenant, key_hash, found, fingerprint, request)
    # Checked here so that a tenant at its cap is refused before a large file is read, and again, atomically,
    # when the run is stored (concurrent uploads).
    active = services.datasets.active_count(tenant)
    if active >= s.max_active_datasets_per_tenant:
        raise _too_many_runs(active, s.max_active_datasets_per_tenant)
    try:
        ingested = ingest(
            stream, options, s, services.storage, registry=services.loras, tenant=tenant, served_models=services.served
        )
    except InputInvalid as exc:
        lines = [e.as_dict() for e in exc.errors]
        raise ProblemError(exc.status, str(exc), "input", invalid_lines=exc.invalid, lines=lines) from exc
    if upload is not None:
        stream.seek(0)
        services.storage.put_file(Layout(ingested.run_id).original, stream, "application/x-ndjson")
    if key_hash:
        run_id, seen = services.datasets.claim_idempotency(tenant, key_hash, ingested.run_id, fingerprint)
        if run_id != ingested.run_id:  # a concurrent request with the same key won: answer with its run
            return _replay(services, tenant, key_hash, (run_id, seen), fingerprint, request)
    try:
        create_run(
            services.datasets,
            ingested,
            options,
            tenant,
            source,
            s.max_active_datasets_per_tenant,
            s.max_dataset_images_per_tenant,
        )
    except REDIS_DOWN:
        # 503 "nothing was stored": the run's record was not (one script), and its input goes too. Storage
        # away as well: the chunks stay under datasets/<run>/, named by no record (docs/reliability.md).
        with suppress(Exception):
            discard(services.storage, ingested)
        raise
    except TooManyRuns as exc:
        discard(services.storage, ingested)
        if key_hash:
            services.datasets.release_idempotency(tenant, key_hash)
        raise _too_many_runs(exc.active, s.max_active_datasets_per_tenant) from exc
    except TooManyImages as exc:
        discard(services.storage, ingested)
        if key_hash:
            services.datasets.release_idempotency(tenant, key_hash)
        cap = s.max_dataset_images_per_tenant
        message = (
            f"this tenant's data set runs in progress have {exc.pending} images still to generate; with this run's "
            f"{ingested.total} that is more than {cap} (SDXL_MAX_DATASET_IMAGES_PER_TENANT, num_images counted); "
            "retry when some have finished"
        )
        raise ProblemError(429, message, headers={"Retry-After": "60"}) from exc
    run = services.datasets.get(ingested.run_id)
    assert run is not None
    return Created(to_public(run, services, request), replayed=False)


def _too_many_runs(active: int, cap: int) -> ProblemError:
    message = (
        f"this tenant already has {active} data set runs in progress (the limit is {cap}); "
        "retry when one has finished, or cancel one"
    )
    return ProblemError(429, message, headers={"Retry-After": "60"})


def _fingerprint(stream: BinaryIO, options: DatasetOptions) -> str:
    digest = hashlib.sha256(options.model_dump_json().encode())
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


def _replay(
    services: Services, tenant: str, key_hash: str, found: tuple[str, str], fingerprint: str, request: Request
) -> Created:
    run_id, seen = found
    if seen != fingerprint:
        raise HTTPException(409, f"Idempotency-Key was already used for data set {run_id} with other input or options")
    run = services.datasets.get(run_id)
    if run is None:  # the key outlived its run (both expire after job_ttl_s; the run can go first by a moment)
        services.datasets.release_idempotency(tenant, key_hash)
        raise HTTPException(409, f"Idempotency-Key was used for data set {run_id}, which has expired; use a new key")
    return Created(to_public(run, services, request), replayed=True)


def to_public(run: DatasetRun, services: Services, request: Request) -> DatasetPublic:
    queued, running = live_counts(run, services)
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
        status_url=services.settings.public_url(f"/v1/datasets/{run.id}"),  # not the Host header: a client may send any
        files_url=services.settings.public_url(f"/v1/datasets/{run.id}/files"),
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
        error=run.error,
    )


def live_counts(run: DatasetRun, services: Services) -> tuple[int, int]:
    """(queued, running): lines not yet fed count as queued; fed lines as their job says."""
    statuses = services.store.statuses(list(services.datasets.inflight(run.id).values()))
    queued_fed = statuses.count(JobStatus.queued)
    not_fed = 0 if run.status in FINISHED else (run.total - run.cursor) + services.datasets.retry_pending(run.id)
    return not_fed + queued_fed, len(statuses) - queued_fed


def files(run: DatasetRun, services: Services) -> DatasetFilesPublic:
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


def failures(run: DatasetRun, services: Services, offset: int, limit: int) -> DatasetFailuresPublic:
    found = services.datasets.failures(run.id)
    page = [FailurePublic(**f) for f in found[offset : offset + limit]]
    return DatasetFailuresPublic(failures=page, total=len(found), offset=offset, limit=limit)


def cancel(run: DatasetRun, services: Services, request: Request) -> DatasetPublic:
    before = services.datasets.cancel(run.id)
    if before is None:
        raise HTTPException(404, f"no data set {run.id}")
    if before != DatasetStatus.running:
        raise HTTPException(409, f"data set {run.id} is {before.value}; nothing to cancel")
    canceling = services.datasets.get(run.id)
    assert canceling is not None
    return to_public(canceling, services, request)


def retry(run: DatasetRun, services: Services, request: Request) -> RetryPublic:
    cap = services.settings.max_active_datasets_per_tenant
    count = services.datasets.retry(run.id, max_active=cap)
    if count == -2:
        raise HTTPException(409, f"data set {run.id} is being canceled; retry once it has ended")
    if count == -3:
        raise HTTPException(
            429,
            f"this tenant already has {cap} data set runs in progress (the limit); retry when one has finished",
            headers={"Retry-After": "60"},
        )
    if count <= 0:
        raise HTTPException(409, f"data set {run.id} has no failed lines to retry")
    retried = services.datasets.get(run.id)
    assert retried is not None
    return RetryPublic(retried=count, dataset=to_public(retried, services, request))


def resume(run: DatasetRun, services: Services, request: Request) -> ResumePublic:
    cap = services.settings.max_active_datasets_per_tenant
    count = services.datasets.resume(run.id, max_active=cap)
    if count == -3:
        raise HTTPException(
            429,
            f"this tenant already has {cap} data set runs in progress (the limit); resume when one has finished",
            headers={"Retry-After": "60"},
        )
    resumed = services.datasets.get(run.id)
    if count == -1 or resumed is None:
        raise HTTPException(404, f"no data set {run.id}")
    if count == -2:
        raise HTTPException(409, f"data set {run.id} is {resumed.status.value}; only a canceled run can be resumed")
    if count == 0:
        raise HTTPException(409, f"data set {run.id} has no canceled lines to resume")
    return ResumePublic(resumed=count, dataset=to_public(resumed, services, request))


def recent(services: Services, caller: Caller, request: Request, offset: int, limit: int) -> DatasetsPublic:
    runs, total = services.datasets.recent(caller.tenant, offset, limit)
    return DatasetsPublic(
        datasets=[to_public(r, services, request) for r in runs], total=total, offset=offset, limit=limit
    )
