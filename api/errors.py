"""One error shape for every 4xx and 5xx: RFC 9457 problem details (`application/problem+json`).

    {"type": "urn:sdxl:problem:validation", "title": "Invalid request", "status": 422,
     "detail": "invalid request: width: ...", "errors": [{"field": "width", "message": "..."}]}

`detail` is the sentence to show a person; `type` is stable for code to branch on (the table below and
the README); `errors` lists each field to fix on a 422. Other members (`invalid_lines`, `lines`) are
extensions that a data set refusal adds. Redis outages are 503 with Retry-After, never a 500 or a hang;
an unexpected error is a 500 problem that says nothing of the internals (the log has the traceback).
The OpenAPI document declares this schema for every error response (`problem_openapi`).

On OpenAI's paths (/v1/images/..., api/routes/openai.py) the problem also carries OpenAI's own member,
`"error": {"message", "type", "param", "code"}`, which the `openai` package reads for its exceptions' message.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.jobs import LimitError
from common.loras import RegistryUnavailable
from common.outage import REDIS_DOWN
from common.redis_connection import NotReplicated

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
# The problem types, by status; `type` is about:blank where the status says everything (RFC 9457 4.2.1).
TYPES = {
    400: "urn:sdxl:problem:bad-request",
    401: "urn:sdxl:problem:unauthorized",
    403: "urn:sdxl:problem:forbidden",
    404: "urn:sdxl:problem:not-found",
    409: "urn:sdxl:problem:conflict",
    413: "urn:sdxl:problem:too-large",
    415: "urn:sdxl:problem:unsupported-media-type",
    422: "urn:sdxl:problem:validation",
    429: "urn:sdxl:problem:rate-limited",
    503: "urn:sdxl:problem:unavailable",
}


class FieldError(BaseModel):
    field: str = Field(description="What to change: a dotted path into the body, or a query/header name.")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; every 4xx and 5xx body has this shape."""

    model_config = {"extra": "allow"}  # extension members (RFC 9457 3.2), e.g. a data set's invalid lines

    type: str = Field("about:blank", description="A URI that names the kind of problem (stable; see the README).")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(ge=400, le=599)
    detail: str = Field(description="What went wrong with this request, and what to do about it.")
    errors: list[FieldError] | None = Field(None, description="On a 422: each field to fix.")


OPENAI_PATHS = "/v1/images/"


class ProblemError(Exception):
    """Raised by the API's services to answer with a problem naming the field to fix (`errors`), with extension
    members (a data set refusal's invalid lines) and headers (Retry-After)."""

    def __init__(
        self, status: int, detail: str, field: str = "body", headers: dict[str, str] | None = None, **extensions: Any
    ):
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers, self.extensions = status, detail, field, headers, extensions


def problem(
    status: int,
    detail: str,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPES.get(status, "about:blank"),
        "title": _title(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extensions)
    if request is not None and request.url.path.startswith(OPENAI_PATHS):
        kind = "invalid_request_error" if status < 500 else "server_error"
        param = errors[0]["field"] if errors else None
        body["error"] = {"message": detail, "type": kind, "param": param, "code": None}
    return JSONResponse(status_code=status, content=body, headers=headers, media_type=MEDIA_TYPE)


def _title(status: int) -> str:
    if status == 422:
        return "Invalid request"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _field(loc: tuple) -> str:
    """A validation error's location as a field name. A malformed JSON body is located by a character
    offset (("body", 15)): that names no field, so it is the body."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if loc and loc[0] == "body" and len(loc) == 2 and isinstance(loc[1], int):
        return "body"
    return ".".join(parts) or "body"


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    fields = []
    for e in errors:
        message = e["msg"]
        if e.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({e.get('ctx', {}).get('error', message)})"
        fields.append({"field": _field(tuple(e["loc"])), "message": message})
    return fields


def invalid(fields: list[dict[str, str]], what: str = "request", request: Request | None = None) -> JSONResponse:
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return problem(422, f"invalid {what}: {summary}", errors=fields, request=request)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None), request=request)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(validation_errors(list(exc.errors())), request=request)

    @app.exception_handler(ProblemError)
    async def service_problem(request: Request, exc: ProblemError) -> JSONResponse:
        errors = [{"field": exc.field, "message": exc.detail}]
        return problem(exc.status, exc.detail, errors, exc.headers, request, **exc.extensions)

    @app.exception_handler(LimitError)
    async def limit(request: Request, exc: LimitError) -> JSONResponse:
        return invalid([{"field": exc.field, "message": str(exc)}], request=request)

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            503,
            "the job store (Redis) is unreachable; nothing was stored, retry later",
            headers={"Retry-After": "5"},
            request=request,
        )

    for outage in REDIS_DOWN:  # the Celery producer's broker outage too: the broker is the same Redis
        app.add_exception_handler(outage, redis_down)

    @app.exception_handler(NotReplicated)
    async def not_replicated(request: Request, exc: Exception) -> JSONResponse:
        # The primary holds the job, so it may well run; but a failover now would lose it, so it is not
        # acknowledged. A retry with the same Idempotency-Key answers with that job if it survived.
        return problem(
            503,
            f"the job was not yet copied to enough Redis replicas ({exc}); retry with the same Idempotency-Key",
            headers={"Retry-After": "2"},
            request=request,
        )

    @app.exception_handler(RegistryUnavailable)
    async def adapters_down(request: Request, exc: Exception) -> JSONResponse:
        return problem(503, f"{exc}; nothing was stored, retry later", headers={"Retry-After": "5"}, request=request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem(
            500, "an unexpected error; it has been logged. Retry, and report it if it persists", request=request
        )


def problem_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the problem shape for every error response in an OpenAPI document, and a catch-all 4XX and
    5XX on every operation (generated clients then parse any error), in place of FastAPI's own 422 shape."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in components["Problem"].pop("$defs", {}).items():
        components[name] = sub
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    content = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code, response in list(responses.items()):
                if code[0] in "45":
                    response["content"] = content
                    if code.isdigit():
                        response["description"] = _title(int(code))
            responses.setdefault("4XX", {"description": "Client error (problem details)", "content": content})
            responses.setdefault("5XX", {"description": "Server error (problem details)", "content": content})
    return schema
