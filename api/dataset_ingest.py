"""Taking in a data set's JSONL: validate every line, store the valid ones as normalized chunks, create the run.

Plain code over a binary stream (an upload spooled to disk, or an object read from storage); the route only
parses the request. Nothing runs until the whole file has been read: with on_invalid=reject one bad line
refuses the file and nothing is stored.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass

from fastapi import HTTPException

from api import job_inputs, served
from common.dataset_store import DatasetStore
from common.datasets import CHUNK_LINES, DatasetOptions, Layout, Limits, LineError, Validator, lines_of
from common.jobs import MAX_SEED
from common.loras import Registry
from common.settings import Settings
from common.storage import Storage

MAX_INVALID_TEXT_BYTES = 64 * 1024  # of a bad line's text kept in invalid.jsonl
REPORTED_ERRORS = 100  # bad lines listed in an answer; all of them go to input/invalid.jsonl (skip mode)


class InputInvalid(Exception):
    """The file cannot run: bad lines under on_invalid=reject, no valid line at all, or too many lines."""

    def __init__(self, message: str, errors: list[LineError], invalid: int, status: int = 422):
        super().__init__(message)
        self.errors = errors
        self.invalid = invalid
        self.status = status


@dataclass
class Ingested:
    run_id: str
    seed: int
    total: int
    invalid: int
    errors: list[LineError]  # the first REPORTED_ERRORS


def ingest(
    stream: Iterable[bytes],
    options: DatasetOptions,
    settings: Settings,
    storage: Storage,
    run_id: str | None = None,
    registry: Registry | None = None,
    tenant: str = "",
    served_models: served.ServedModels | None = None,
) -> Ingested:
    """Each line is checked as a job is (api/served.py check_request, api/job_inputs.py StoredImages: the same
    fields and reasons), its images read from the `tenant`'s inputs. registry: the API's adapter registry (its
    hashes kept between uploads), None: one made for this run; served_models: which models live workers hold,
    None: not read."""
    run_id = run_id or uuid.uuid4().hex
    seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)
    layout = Layout(run_id)
    registry = registry or Registry(settings.lora_dir or None, storage, settings.lora_cache_dir)
    limits = Limits(
        settings.served_sizes,
        settings.max_steps,
        settings.max_prompt_chars,
        settings.bucket_sizes,
        check_images=job_inputs.StoredImages(storage, tenant, settings.served_sizes),
        check_served=lambda request: served.check_request(request, settings, served_models, registry),
    )
    validator = Validator(options, seed, limits)
    rejecting = options.on_invalid == "reject"
    errors: list[LineError] = []
    invalid_lines: list[bytes] = []
    chunk: list[str] = []
    written = total = invalid = 0
    try:
        for number, raw in lines_of(stream, settings.max_dataset_line_bytes):
            if number > settings.max_dataset_lines:
                _discard(storage, layout, written)
                too_many = f"more than {settings.max_dataset_lines} lines; split the file"
                raise InputInvalid(too_many, errors, invalid, 413)
            result = validator.check(number, raw)
            if result is None:
                continue
            if isinstance(result, LineError):
                invalid += 1
                if len(errors) < REPORTED_ERRORS:
                    errors.append(result)
                if not rejecting:
                    invalid_lines.append(_json_line(result, raw))
                continue
            total += len(result)
            if total > settings.max_dataset_images:  # counted after num_images: a line asking for 64 is 64
                _discard(storage, layout, written)
                raise InputInvalid(
                    f"the file asks for at least {total} images by line {number} (num_images counted), more than "
                    f"{settings.max_dataset_images} per run (SDXL_MAX_DATASET_IMAGES); split it",
                    errors,
                    invalid,
                    413,
                )
            if rejecting and invalid:
                continue  # the file is refused: keep checking (to report every bad line), store nothing more
            for line in result:
                chunk.append(line.to_json())
                if len(chunk) == CHUNK_LINES:
                    storage.put(layout.chunk(written), "\n".join(chunk).encode() + b"\n", "application/x-ndjson")
                    written, chunk = written + 1, []
    except HTTPException:  # storage away while a line's image was read (503): what was stored goes
        with suppress(Exception):
            _discard(storage, layout, written)
        raise
    if rejecting and invalid:
        _discard(storage, layout, written)
        raise InputInvalid(
            f"{invalid} of {invalid + total} lines are invalid and nothing was stored; fix them, or send "
            "on_invalid=skip to run the valid lines and leave these out",
            errors,
            invalid,
        )
    if total == 0:
        _discard(storage, layout, written)
        raise InputInvalid("the file has no valid line to run", errors, invalid)
    if chunk:
        storage.put(layout.chunk(written), "\n".join(chunk).encode() + b"\n", "application/x-ndjson")
    if invalid_lines:
        storage.put(layout.invalid, b"".join(invalid_lines), "application/x-ndjson")
    return Ingested(run_id, seed, total, invalid, errors)


def create_run(
    datasets: DatasetStore,
    ingested: Ingested,
    options: DatasetOptions,
    tenant: str,
    source: str,
    max_active: int = 0,
    max_images: int = 0,
) -> None:
    """The run's record (raises TooManyRuns, storing nothing, when the tenant has max_active runs already;
    TooManyImages when its runs' images not yet ended and this run's are more than max_images)."""
    datasets.create(
        ingested.run_id,
        tenant,
        options,
        ingested.seed,
        ingested.total,
        ingested.invalid,
        max_active,
        max_images,
        source=source,
        invalid=[e.as_dict() for e in ingested.errors],
    )


def discard(storage: Storage, ingested: Ingested) -> None:
    """Remove what ingest (and the route, for an upload) stored, for a run that was refused after all."""
    layout = Layout(ingested.run_id)
    _discard(storage, layout, -(-ingested.total // CHUNK_LINES))
    for key in (layout.invalid, layout.original):
        storage.delete(key)


def _json_line(error: LineError, raw: bytes) -> bytes:
    """invalid.jsonl's line: where and why, and the line's own text (to fix and send again)."""
    text = raw[:MAX_INVALID_TEXT_BYTES].decode("utf-8", errors="replace")
    return json.dumps({**error.as_dict(), "text": text}, ensure_ascii=False).encode() + b"\n"


def _discard(storage: Storage, layout: Layout, chunks: int) -> None:
    for i in range(chunks):
        storage.delete(layout.chunk(i))
