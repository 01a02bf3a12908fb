"""Schemathesis against the service's own OpenAPI: generated requests to every route, valid and not, with
and without a key, must never get a 5xx. A real Redis behind it; no worker (jobs stay queued)."""

from __future__ import annotations

import uuid

import hypothesis
import redis
import schemathesis
from fastapi.testclient import TestClient

from api.main import create_app
from common.api_keys import ApiKeyStore
from common.settings import Settings


def test_no_route_answers_5xx(redis_url):
    prefix = f"fz{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url, key_prefix=prefix, queue_name=f"{prefix}-q", sizes="1024x1024,64x96",
        url_signing_secret="f" * 32, rate_limit_per_min=100_000, max_queued_per_tenant=100_000,
        max_wait_s=0.05,  # generated waits (`?wait_s=`, `Prefer: wait=`) are exercised, but stay short
    )  # fmt: skip
    _, key = ApiKeyStore(redis.Redis.from_url(redis_url), prefix).create("fuzz")
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures: list[tuple[str, int, str]] = []
    calls = 0

    @hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(data=hypothesis.strategies.data())
    def run(data: hypothesis.strategies.DataObject) -> None:
        nonlocal calls
        for operation in operations:
            case = data.draw(operation.as_strategy())
            for headers in ({"Authorization": f"Bearer {key}"}, {}):
                response = case.call(headers=headers)
                calls += 1
                # /readyz's 503 is its answer when no worker runs (none does here), not a failure
                if response.status_code >= 500 and operation.label != "GET /readyz":
                    failures.append((operation.label, response.status_code, response.text[:200]))

    with TestClient(app):  # the app's lifespan (Redis client, store) around the calls, as under a server
        run()
    assert calls >= 25 * len(operations)
    assert not failures, failures[:5]
