"""The submit API. It never imports JAX or the worker: jobs reach workers through Redis and Celery.

uvicorn api.main:app
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from api import errors, metrics
from api.deps import Services
from api.job_events import JobEvents
from api.job_inputs import DecodeLimits
from api.limits import BodyLimit
from api.routes import datasets, files, jobs, openai, playground, system
from api.security import SecurityHeaders
from api.served import ServedModels
from api.slots import Slots
from common import logs, redis_connection
from common.api_keys import ApiKeyStore
from common.dataset_store import DatasetStore
from common.job_store import JobStore
from common.loras import Registry
from common.queue import make_celery
from common.rate_limit import RateLimiter
from common.settings import Settings, get_settings
from common.storage import from_settings
from common.worker_registry import WorkerRegistry


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Short timeouts: a dead Redis must give a quick 503, not a hung request.
        # A broken connection (Redis restarted since it was pooled) is tried again on a fresh one, twice, within
        # ~0.1 s: the first request after an outage must not be a 503. Timeouts are not retried: they would
        # hold a request 5 s more each.
        client = redis_connection.sync_client(
            settings,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 2),
            retry_on_error=[redis.exceptions.ConnectionError],
        )
        redis_connection.check_credentials(client)  # a wrong password stops the start, naming SDXL_REDIS_URL
        store = JobStore(
            client,
            settings.key_prefix,
            settings.job_ttl_s,
            default_model=settings.model_entries[0].name,
            durability=redis_connection.Durability.of(settings),
        )
        workers = WorkerRegistry(client, settings.key_prefix)
        events = JobEvents(
            lambda name: redis_connection.async_client(settings, socket_connect_timeout=2, client_name=name),
            store.keys.ended,
            store.keys.progress,
        )
        storage = from_settings(settings)  # fails here, at start, when the signing secret is missing
        app.state.services = Services(
            settings=settings,
            store=store,
            storage=storage,
            celery=make_celery(settings),
            keys=ApiKeyStore(client, settings.key_prefix),
            datasets=DatasetStore(client, settings.key_prefix, settings.job_ttl_s),
            workers=workers,
            rate_limits=RateLimiter(client, settings.key_prefix),
            events=events,
            loras=Registry(settings.lora_dir or None, storage, settings.lora_cache_dir),
            served=ServedModels(workers),
            decodes=DecodeLimits.of(settings.input_pixel_cap, settings.max_concurrent_decodes),
            waits=Slots(settings.max_waits_per_key, "event streams and waits per API key", "SDXL_MAX_WAITS_PER_KEY"),
            uploads=Slots(
                settings.max_uploads_per_tenant, "data set uploads per tenant", "SDXL_MAX_UPLOADS_PER_TENANT", 10
            ),
        )
        events.start()  # connects in the background: an API started before Redis still starts
        yield
        await events.stop()
        app.state.services.decodes.workers.shutdown(wait=False)  # idle by now: requests have ended
        client.close()

    app = FastAPI(
        title="SDXL job service",
        version="0.1.0",
        description="Text-to-image jobs (submit, poll, fetch by signed URL) and whole data sets from JSONL.",
        lifespan=lifespan,
        # FastAPI's pages load Swagger UI and ReDoc from a CDN: served only when asked for (api/security.py)
        docs_url="/docs" if settings.interactive_docs else None,
        redoc_url="/redoc" if settings.interactive_docs else None,
    )
    errors.install(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = errors.problem_openapi(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # the documented way to extend FastAPI's schema
    uploads = {"/v1/datasets": settings.max_dataset_bytes}  # JSONL uploads are far larger than a job
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, by_path=uploads)
    app.add_middleware(SecurityHeaders)  # on every answer, the refusals of the middlewares inside it included
    app.add_middleware(metrics.RequestTimer)  # added last: outermost, so it times what the others refuse too
    for module in (jobs, datasets, openai, files, system, playground):
        _summaries(module.router)
        app.include_router(module.router)
    app.mount("/playground", playground.assets(), name="playground")
    return app


def _summaries(router: APIRouter) -> None:
    """Each handler's one-line docstring is its operation's OpenAPI summary (FastAPI title-cases the function's
    name otherwise); longer text is the route's own `description` (without one, FastAPI repeats the docstring)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint.__doc__ and route.summary is None:
            route.summary = inspect.cleandoc(route.endpoint.__doc__)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` builds the app on first access, so importing this module reads no settings.
    if name == "app":
        settings = get_settings()
        logs.configure(settings.log_format)  # here, not in create_app: tests build many apps in one process
        return create_app(settings)
    raise AttributeError(name)
