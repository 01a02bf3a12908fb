"""Logging for every process: one line per record, as text or as JSON (`SDXL_LOG_FORMAT`), carrying the
job and batch ids in play.

    logs.configure(settings.log_format)              # once, at process start
    with logs.bound(job_id=job.id):                  # every record inside carries it
        log.info("job submitted")                    # {"time": ..., "level": "INFO", "logger": ..., "message":
                                                     #  "job submitted", "job_id": "..."}
    log.info("batch done", extra={"batch_id": b})    # or per record

The API logs a job's id when it stores it; the worker logs the same id with the id of the device batch
that ran it, so a job's path (submit -> batch -> upload -> end) is one search for its id across processes.
Ids are kept in context variables: a thread or task that binds them does not leak them into another.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

IDS = ("job_id", "batch_id", "run_id", "worker")
_bound: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("sdxl_log_ids", default={})  # noqa: B039
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(ids)s"
# records of these loggers keep their own handlers otherwise (uvicorn installs its own at start)
OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker")


@contextlib.contextmanager
def bound(**ids: str) -> Iterator[None]:
    """Every record logged inside carries these ids (besides any bound further out)."""
    token = _bound.set({**_bound.get(), **{k: str(v) for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


class _Ids(logging.Filter):
    """Copies the bound ids onto each record (an id given in `extra=` wins), and a text suffix of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _bound.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        ids = [f"{name}={getattr(record, name)}" for name in IDS if getattr(record, name, None)]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in IDS:
            if getattr(record, name, None):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Route every record (the root logger's, uvicorn's and Celery's) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Ids())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
