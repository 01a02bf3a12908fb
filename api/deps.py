"""Dependencies: one settings object, one Redis client, one store, one storage, one Celery producer and one
job-event subscription per process, built at start-up (api.main.lifespan) and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, HTTPException, Query, Request

from api.job_events import JobEvents
from common import rate_limit
from common.api_keys import ApiKeyStore
from common.dataset_store import DatasetStore
from common.job_store import JobStore
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


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str


def authenticate(request: Request, services: ServicesDep) -> Caller:
    """The caller's tenant from `Authorization: Bearer <key>`, after the per-key rate limit."""
    if not services.settings.auth_required:
        return Caller(tenant="", key_id="")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not key:
        raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`", headers=challenge)
    record = services.keys.verify(key.strip())
    if record is None:
        raise HTTPException(401, "unknown or revoked API key", headers=challenge)
    wait_s = rate_limit.hit(
        services.redis, services.store.key("rate", record.key_id), services.settings.rate_limit_per_min
    )
    if wait_s is not None:
        raise HTTPException(
            429,
            f"rate limit: {services.settings.rate_limit_per_min} requests per minute per key; retry in {wait_s} s",
            headers={"Retry-After": str(wait_s)},
        )
    return Caller(tenant=record.tenant, key_id=record.key_id)


CallerDep = Annotated[Caller, Depends(authenticate)]

# A list's offset: bounded, so it stays inside Redis' integer range (a fuzzer found the 500 an unbounded one gave)
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000_000)]
