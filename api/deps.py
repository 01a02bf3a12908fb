"""Dependencies: one settings object, one set of Redis stores (on one client), one storage, one Celery producer
and one job-event subscription per process, built at start-up (api.main.lifespan) and handed to handlers; the
caller (API key -> tenant, after the rate limit); and the caller's job or data set run named by the path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.job_events import JobEvents
from api.job_inputs import DecodeLimits
from api.metrics import RedisFigures
from api.served import ServedModels
from api.slots import Slots
from common.api_keys import ApiKeyStore
from common.dataset_store import DatasetRun, DatasetStore
from common.input_store import InputStore
from common.job_store import JobStore
from common.jobs import Job
from common.keys import RECORD_ID_PATTERN
from common.loras import Registry
from common.rate_limit import RateLimiter
from common.settings import Settings
from common.storage import Storage
from common.worker_registry import WorkerRegistry


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    celery: Celery
    keys: ApiKeyStore
    datasets: DatasetStore
    workers: WorkerRegistry  # the live workers' heartbeats (/readyz, /metrics, the models served)
    rate_limits: RateLimiter
    events: JobEvents  # wakes requests that wait for a job to end
    loras: Registry  # the LoRA adapters served (SDXL_LORA_DIR)
    served: ServedModels  # which models live workers hold
    decodes: DecodeLimits  # input images: pixels per image, decodes at once (api/job_inputs.py)
    inputs: InputStore  # which jobs name each stored input image, and each tenant's input bytes
    waits: Slots  # event streams and waits open per API key (api/slots.py)
    uploads: Slots  # data set uploads being read per tenant
    metrics_figures: RedisFigures | None = None  # the last /metrics read of Redis, served stale in an outage


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str


# Declares the scheme in OpenAPI (so generated clients send the key); the check itself is ours, below, so
# that a missing key is a 401 problem with our wording rather than FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="An API key from `python -m api.keys create TENANT`.")


def authenticate(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller's tenant from `Authorization: Bearer <key>`, after the per-key rate limit."""
    if not services.settings.auth_required:
        return Caller(tenant="", key_id="")
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials.strip():
        raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`", headers=challenge)
    record = services.keys.verify(credentials.credentials.strip())
    if record is None:
        raise HTTPException(401, "unknown or revoked API key", headers=challenge)
    s = services.settings
    # Reads (polls, lists, waits) and writes (submits, cancels, uploads) are counted apart: a client that
    # polls its 40 jobs once a second must not lose the right to submit.
    read = request.method in ("GET", "HEAD")
    limit = s.read_rate_limit_per_min if read else s.rate_limit_per_min
    kind = "read" if read else "write"
    wait_s = services.rate_limits.hit(kind, record.key_id, limit)
    if wait_s is not None:
        advice = "; instead of polling, wait for the end in one request: GET /v1/jobs/{id}?wait_s=30" if read else ""
        raise HTTPException(
            429,
            f"rate limit: {limit} {kind} requests per minute per key; retry in {wait_s} s{advice}",
            headers={"Retry-After": str(wait_s)},
        )
    return Caller(tenant=record.tenant, key_id=record.key_id)


CallerDep = Annotated[Caller, Depends(authenticate)]

# A list's offset: bounded, so it stays inside Redis' integer range (a fuzzer found the 500 an unbounded one gave)
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000_000)]


# A job's or run's id in a path, checked before it reaches Redis: 422 naming it when it cannot be an id.
JobId = Annotated[str, Path(pattern=RECORD_ID_PATTERN, description="The job's id.")]
RunId = Annotated[str, Path(pattern=RECORD_ID_PATTERN, description="The data set run's id.")]


def owned_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Job:
    """The caller's job; another tenant's job is as absent as an unknown one (404, never 403)."""
    job = services.store.get(job_id)
    if job is None or job.tenant != caller.tenant:
        raise HTTPException(404, f"no job {job_id} (unknown, another tenant's, or its record expired)")
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]


def owned_run(run_id: RunId, services: ServicesDep, caller: CallerDep) -> DatasetRun:
    """The caller's data set run; another tenant's is as absent as an unknown one (404, never 403)."""
    run = services.datasets.get(run_id)
    if run is None or run.tenant != caller.tenant:
        raise HTTPException(404, f"no data set {run_id} (unknown, another tenant's, or its record expired)")
    return run


OwnedRun = Annotated[DatasetRun, Depends(owned_run)]
