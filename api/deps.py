"""Dependencies: one settings object, one Redis client, one store, one storage and one Celery producer per
process, built at start-up (api.main.lifespan) and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request

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


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
