"""Dependencies: one settings object, one Redis client, one store, one storage, one Celery producer and one
job-event subscription per process, built at start-up (api.main.lifespan) and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.job_events import JobEvents
from api.metrics import RedisFigures
from api.served import ServedModels
from common import rate_limit
from common.api_keys import ApiKeyStore
from common.dataset_store import DatasetStore
from common.job_store import JobStore
from common.loras import Registry
from common.settings import Settings
from common.storage import Storage


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    storage: Storage
    celery: Celery
    keys: ApiKeyStore
    datasets: DatasetStore
    events: JobEvents  # wakes requests that wait for a job to end
    loras: Registry  # the LoRA adapters served (SDXL_LORA_DIR)
    served: ServedModels  # which models live workers hold
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
    wait_s = rate_limit.hit(services.redis, services.store.key("rate", kind, record.key_id), limit)
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
