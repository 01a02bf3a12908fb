"""Schemathesis against the service's own OpenAPI: generated requests to every route, valid and not, with
and without a key, must never get a 5xx, and every error body is an RFC 9457 problem that validates against
the schema the document declares for it. A real Redis behind it; no worker (jobs stay queued)."""

from __future__ import annotations

import uuid

import hypothesis
import jsonschema
import redis
import schemathesis
from fastapi.testclient import TestClient

from api.main import create_app
from common.api_keys import ApiKeyStore
from common.settings import Settings


def test_no_route_answers_5xx(redis_url):
    prefix = f"fz{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        queue_name=f"{prefix}-q",
        image_sizes="1024x1024,96x64",
        url_signing_secret="f" * 32,
        rate_limit_per_min=100_000,
        max_queued_per_tenant=100_000,
        max_wait_s=0.05,  # generated waits (`?wait_s=`, `Prefer: wait=`) are exercised, but stay short
    )
    _, key = ApiKeyStore(redis.Redis.from_url(redis_url), prefix).create("fuzz")
    app = create_app(settings)
    document = app.openapi()
    problem_schema = {**document["components"]["schemas"]["Problem"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(problem_schema)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures: list[tuple[str, int, str]] = []
    shapes: list[tuple[str, int, str]] = []  # error answers that are not problem details
    calls = 0
    errors = 0

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
                # an accepted OpenAI generation waits for its job's end: with no worker it is 504 after max_wait_s,
                # by design (the job stays queued; the answer names it)
                timed_out = response.status_code == 504 and operation.label == "POST /v1/images/generations"
                if response.status_code >= 500 and operation.label != "GET /readyz" and not timed_out:
                    failures.append((operation.label, response.status_code, response.text[:200]))
                if response.status_code >= 400 and operation.label != "GET /readyz":  # readyz: its own body
                    nonlocal errors
                    errors += 1
                    kind = response.headers.get("content-type", [""])  # schemathesis: a list per header
                    kind = kind[0] if isinstance(kind, list) else kind
                    try:
                        body = response.json()
                        problems = [e.message for e in validator.iter_errors(body)]
                    except ValueError:
                        problems = ["not JSON"]
                    if kind != "application/problem+json" or problems or body["status"] != response.status_code:
                        shapes.append((operation.label, response.status_code, f"{kind} {problems} {response.text}"))

    with TestClient(app):  # the app's lifespan (Redis client, store) around the calls, as under a server
        run()
    assert calls >= 25 * len(operations)
    assert not failures, failures[:5]
    assert errors > 100  # the generated requests did reach the error paths (401s, 404s, 422s...)
    assert not shapes, shapes[:5]


def test_openapi_declares_problems_and_the_bearer_scheme(redis_url):
    document = create_app(Settings(redis_url=redis_url, url_signing_secret="f" * 32)).openapi()
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    create = document["paths"]["/v1/jobs"]["post"]
    assert create["security"] == [{"HTTPBearer": []}]
    ref = {"$ref": "#/components/schemas/Problem"}
    for code in ("401", "422", "429", "503", "4XX", "5XX"):
        assert create["responses"][code]["content"] == {"application/problem+json": {"schema": ref}}, code
    assert "HTTPValidationError" not in document["components"]["schemas"]
