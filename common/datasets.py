"""A bulk data set run: the JSONL line format, its validation, seeds, and where a run's files live.

Shared by the API (validates and stores the input) and the worker's feeder (reads it back, writes outputs).
Nothing here knows HTTP, Redis or JAX.

A line is one image: {"id": "cat-001", "prompt": "a cat", ...}; fields a line leaves out come from the run's
`defaults`. Every line is checked against the same limits as an interactive job before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from common.jobs import MAX_SEED, JobRequest, LimitError, OutputFormat, Scheduler, check_limits, with_size

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # safe as an object key and as a WebDataset sample key
LINE_FIELDS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler")
CHUNK_LINES = 1000  # normalized lines per stored input chunk: the feeder reads one chunk at a time


class DatasetStatus(StrEnum):
    running = "running"  # lines are being fed and generated
    canceling = "canceling"  # canceled: feeding stopped, lines already on a device finish and are kept
    completed = "completed"  # every line ended (succeeded or failed); manifest and shards are final
    canceled = "canceled"  # canceled and wound down; what finished is in the manifest and shards


FINISHED = frozenset({DatasetStatus.completed, DatasetStatus.canceled})


class DatasetDefaults(BaseModel):
    """Run-wide values for what a line leaves out."""

    model_config = {"extra": "forbid"}

    negative_prompt: str | None = None  # absent or null: none; "" is the empty string, encoded
    width: int | None = None  # absent (here and on the line): the deployment's first served size
    height: int | None = None
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(5.0, ge=0, le=50, allow_inf_nan=False)
    scheduler: Scheduler = Scheduler.euler
    output_format: OutputFormat = OutputFormat.png


class DatasetOptions(BaseModel):
    """How to run a JSONL file (the `options` part of an upload, or the JSON body with `input_key`)."""

    model_config = {"extra": "forbid"}

    defaults: DatasetDefaults = DatasetDefaults()
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Run seed: lines without a seed derive theirs from it and their id."
    )
    on_invalid: Literal["reject", "skip"] = Field(
        "reject", description="reject: any bad line refuses the whole file; skip: bad lines are left out and listed."
    )
    shard_size: int = Field(1000, ge=1, le=100_000, description="Images per WebDataset tar shard.")
    loose_images: bool = Field(
        True,
        description="Keep each image as its own object beside the shards (manifest `key`); false: only in the "
        "shards, stored once instead of twice (each image is deleted once its shard is written; `key` is null).",
    )
    input_key: str | None = Field(
        None, max_length=1024, description="Object-store key of the JSONL (instead of an upload)."
    )


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based line number in the input file
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message}


@dataclass(frozen=True)
class Line:
    """A valid line, normalized: every parameter filled in, the seed included."""

    line: int
    id: str
    request: JobRequest

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "id": self.id, "request": self.request.model_dump(mode="json")})

    @staticmethod
    def from_json(text: str | bytes) -> Line:
        d = json.loads(text)
        return Line(d["line"], d["id"], JobRequest.model_validate(d["request"]))


def derive_seed(run_seed: int, line_id: str) -> int:
    """A line's seed from the run's seed and its id (not its position): reordering or filtering the file
    keeps every image the same."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{line_id}".encode()).digest()[:4], "big")


@dataclass
class Limits:
    sizes: list[tuple[int, int]]
    max_steps: int
    max_prompt_chars: int


class Validator:
    """Checks lines one at a time (a file of millions never sits in memory whole), remembering ids."""

    def __init__(self, options: DatasetOptions, run_seed: int, limits: Limits):
        self.defaults = options.defaults.model_dump(exclude={"output_format"})
        self.output_format = options.defaults.output_format
        self.run_seed = run_seed
        self.limits = limits
        self.seen: dict[str, int] = {}

    def check(self, number: int, raw: bytes | str) -> Line | LineError | None:
        """A Line, a LineError, or None for a blank line (allowed anywhere, e.g. a trailing newline)."""
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return LineError(number, "line", "not UTF-8 text")
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return LineError(number, "line", f"not valid JSON: {exc.msg} at column {exc.colno}")
        if not isinstance(data, dict):
            return LineError(number, "line", 'each line must be a JSON object, e.g. {"id": "a1", "prompt": "..."}')
        unknown = sorted(set(data) - set(LINE_FIELDS))
        if unknown:
            return LineError(number, unknown[0], f"unknown field; a line may have: {', '.join(LINE_FIELDS)}")
        raw_id = data.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            return LineError(number, "id", "required: a string or integer unique within the file")
        line_id = str(raw_id)
        if not ID_PATTERN.match(line_id):
            return LineError(number, "id", "use 1-128 letters, digits, '_' or '-' (it names files in the output)")
        if line_id in self.seen:
            return LineError(number, "id", f"duplicate id {line_id!r}, first used on line {self.seen[line_id]}")
        fields = {**self.defaults, **{k: v for k, v in data.items() if k != "id"}}
        if fields.get("seed") is None:
            fields["seed"] = derive_seed(self.run_seed, line_id)
        try:
            request = with_size(JobRequest(**fields, output_format=self.output_format), self.limits.sizes)
            check_limits(request, self.limits.sizes, self.limits.max_steps, 1, self.limits.max_prompt_chars)
        except ValidationError as exc:
            first = exc.errors()[0]
            return LineError(number, ".".join(str(p) for p in first["loc"]) or "line", first["msg"])
        except LimitError as exc:
            return LineError(number, exc.field, str(exc))
        self.seen[line_id] = number
        return Line(number, line_id, request)


def lines_of(stream: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) for each line of a binary stream."""
    for number, raw in enumerate(stream, start=1):
        yield number, raw.rstrip(b"\r\n")


# ---------------------------------------------------------------------- where a run's files live


@dataclass(frozen=True)
class Layout:
    """Object-store keys of one run, all under datasets/<run>/."""

    run_id: str

    @property
    def prefix(self) -> str:
        return f"datasets/{self.run_id}"

    def chunk(self, index: int) -> str:
        return f"{self.prefix}/input/chunk-{index:05d}.jsonl"

    @property
    def original(self) -> str:
        return f"{self.prefix}/input/original.jsonl"

    @property
    def invalid(self) -> str:
        return f"{self.prefix}/input/invalid.jsonl"

    @property
    def images(self) -> str:
        return f"{self.prefix}/images"

    def image(self, line_id: str, extension: str) -> str:
        return f"{self.images}/{line_id}.{extension}"

    def shard(self, index: int) -> str:
        return f"{self.prefix}/shards/shard-{index:06d}.tar"

    def manifest_part(self, index: int, extension: str) -> str:
        return f"{self.prefix}/manifest/part-{index:06d}.{extension}"

    def manifest(self, extension: str) -> str:
        return f"{self.prefix}/manifest.{extension}"

    @property
    def failures(self) -> str:
        return f"{self.prefix}/failures.jsonl"


MANIFEST_COLUMNS = (
    "id", "line", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler",
    "key", "sha256", "shard",
)  # fmt: skip


def manifest_row(line: Line, key: str, sha256: str) -> dict[str, Any]:
    r = line.request
    return {
        "id": line.id, "line": line.line, "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed,
        "width": r.width, "height": r.height, "steps": r.steps, "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler.value, "key": key, "sha256": sha256,
    }  # fmt: skip
