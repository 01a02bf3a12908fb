"""The headers every response carries (api/security.py), and the interactive docs' setting."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.security import CDN


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/playground/"),
        ("GET", "/metrics"),
        ("GET", "/v1/jobs/nope"),  # a 401 problem, refused before any handler
        ("POST", "/v1/jobs"),
        ("GET", "/no-such-path"),
    ],
)
def test_every_answer_forbids_framing_sniffing_and_foreign_scripts(client, method, path):
    client.headers.pop("Authorization", None)
    answer = client.request(method, path)
    csp = answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp and "default-src 'self'" in csp
    assert "unsafe-inline" not in csp and CDN not in csp
    assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"


def test_the_cdn_docs_are_off_unless_asked_for_and_then_only_they_may_load_from_it(settings):
    with TestClient(create_app(settings)) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(settings.model_copy(update={"interactive_docs": True}))) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and CDN in docs.text
        assert CDN in docs.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]
        assert CDN not in client.get("/openapi.json").headers["content-security-policy"]
