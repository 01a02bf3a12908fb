"""Data sets: a JSONL of prompts in, a finished image data set out (images, manifest, WebDataset shards).

POST takes either an upload (multipart/form-data: `input` the JSONL file, `options` a JSON object) or a
JSON body naming an object already in storage (`input_key`). Every line is validated before the run exists.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import dataset_service
from api.deps import CallerDep, OffsetQuery, OwnedRun, ServicesDep
from api.errors import ProblemError, invalid
from api.schemas import (
    DatasetFailuresPublic,
    DatasetFilesPublic,
    DatasetPublic,
    DatasetsPublic,
    ResumePublic,
    RetryPublic,
)
from common.datasets import DatasetOptions

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["input"],
                "properties": {
                    "input": {"type": "string", "format": "binary", "description": "The JSONL, one line per image."},
                    "options": {"type": "string", "description": "DatasetOptions as JSON (without input_key)."},
                },
            }
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/DatasetOptions"}},
    },
}


@router.post(
    "",
    status_code=202,
    response_model=DatasetPublic,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={401: {}, 409: {}, 413: {}, 415: {}, 422: {}, 429: {}},
)
async def create_dataset(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> DatasetPublic | JSONResponse:
    """Validate a JSONL of prompts and start generating it; answers with the run once it is stored."""
    # a slot before the body is read: a tenant's uploads spool (and are checked) a few at a time per process
    with services.uploads.taken(caller.tenant):
        return await _create_dataset(request, services, caller, response, idempotency_key)


async def _create_dataset(
    request: Request, services: ServicesDep, caller: CallerDep, response: Response, idempotency_key: str | None
) -> DatasetPublic | JSONResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: UploadFile | None = None
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=2)
        part = form.get("input")
        if not isinstance(part, UploadFile):
            raise ProblemError(422, "multipart upload needs a file part named `input` (the JSONL)", "input")
        upload = part
        raw_options = form.get("options") or "{}"
        if not isinstance(raw_options, str):
            raise ProblemError(422, "`options` must be a JSON object in a text part", "options")
    elif content_type == "application/json":
        raw_options = (await request.body()).decode("utf-8", errors="replace")
    else:
        message = "send multipart/form-data (parts `input` and `options`) or application/json with input_key"
        raise ProblemError(415, message)
    try:
        options = DatasetOptions.model_validate_json(raw_options)
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "options", "message": e["msg"]} for e in exc.errors()]
        return invalid(fields, "options")
    if upload is not None and options.input_key is not None:
        raise ProblemError(422, "send either an upload or input_key, not both", "input_key")
    if upload is None and options.input_key is None:
        raise ProblemError(422, "input_key is required with a JSON body (or upload the file as multipart)", "input_key")
    created = await run_in_threadpool(
        dataset_service.create, services, caller.tenant, options, upload, idempotency_key, request
    )
    if created.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return created.run


@router.get("/{run_id}", response_model=DatasetPublic, responses={404: {}})
def get_dataset(run: OwnedRun, services: ServicesDep, request: Request) -> DatasetPublic:
    """Progress: counts by state, images per second, ETA, shards written."""
    return dataset_service.to_public(run, services, request)


@router.get("/{run_id}/files", response_model=DatasetFilesPublic, responses={404: {}})
def dataset_files(run: OwnedRun, services: ServicesDep) -> DatasetFilesPublic:
    """Signed URLs of the shards and manifest parts written so far, and of the whole manifest once finished."""
    return dataset_service.files(run, services)


@router.get("/{run_id}/failures", response_model=DatasetFailuresPublic, responses={404: {}})
def dataset_failures(
    run: OwnedRun,
    services: ServicesDep,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetFailuresPublic:
    """Lines that failed, with the reason, in line order."""
    return dataset_service.failures(run, services, offset, limit)


@router.post(
    "/{run_id}/cancel",
    response_model=DatasetPublic,
    responses={404: {}, 409: {}},
    description="Lines not started never run, lines on a device finish; everything finished is kept and the run "
    "ends with its manifest and shards.",
)
def cancel_dataset(run: OwnedRun, services: ServicesDep, request: Request) -> DatasetPublic:
    """Stop feeding a data set run."""
    return dataset_service.cancel(run, services, request)


@router.post("/{run_id}/retry", response_model=RetryPublic, responses={404: {}, 409: {}, 429: {}})
def retry_dataset(run: OwnedRun, services: ServicesDep, request: Request) -> RetryPublic:
    """Generate the failed lines again (same seeds); the run goes back to running and finishes again."""
    return dataset_service.retry(run, services, request)


@router.post(
    "/{run_id}/resume",
    response_model=ResumePublic,
    responses={404: {}, 409: {}, 429: {}},
    description="The run goes back to running and ends `completed` once every line has succeeded or failed.",
)
def resume_dataset(run: OwnedRun, services: ServicesDep, request: Request) -> ResumePublic:
    """Generate a canceled run's canceled lines (same ids, same seeds)."""
    return dataset_service.resume(run, services, request)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    offset: OffsetQuery = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DatasetsPublic:
    """Recent data set runs, newest first."""
    return dataset_service.recent(services, caller, request, offset, limit)
