"""Every 4xx says what to fix: validation errors name each field and what is allowed; Redis outages are 503
with Retry-After, never a 500 or a hang."""

from __future__ import annotations

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from common.jobs import LimitError


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": _field(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse(status_code=422, content={"error": f"invalid request: {summary}", "fields": fields})

    @app.exception_handler(LimitError)
    async def limit(_: Request, exc: LimitError) -> JSONResponse:
        return JSONResponse(
            status_code=422,
            content={
                "error": f"invalid request: {exc.field}: {exc}",
                "fields": [{"field": exc.field, "message": str(exc)}],
            },
        )

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            headers={"Retry-After": "5"},
            content={"error": "the job store (Redis) is unreachable; nothing was stored, retry later"},
        )
