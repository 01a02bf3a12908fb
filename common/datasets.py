"""A bulk data set run: the JSONL line format, its validation, seeds, and where a run's files live.

Shared by the API (validates and stores the input) and the worker's feeder (reads it back, writes outputs).
Nothing here knows HTTP, Redis or JAX.

A line is one image: {"id": "cat-001", "prompt": "a cat", ...}; fields a line leaves out come from the run's
`defaults`. A line takes every generation field of a job (OTHER_JOB_FIELDS names the rest, and why), its images by
the tenant's stored key only. Every line is checked by the job's own code before anything runs: check_limits here,
and what the API passes in Limits (api/served.py check_request, api/job_inputs.py StoredImages).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from common import inputs
from common.jobs import (
    MAX_CONTROLNETS_PER_JOB,
    MAX_SEED,
    ControlNetRequest,
    IPAdapterRequest,
    JobRequest,
    LimitError,
    LoraRequest,
    OutputFormat,
    RefinerRequest,
    RenderConditions,
    Scheduler,
    Spacing,
    Text,
    check_limits,
    images_of,
    with_size,
)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # safe as an object key and as a WebDataset sample key
GENERATION_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "timestep_spacing",
    "init_image",
    "mask_image",
    "strength",
    "refiner",
    "model",
    "loras",
    "controlnets",
    "ip_adapter",
)
# A job's fields that are not generation fields of a line, and what a data set has instead: the rest of JobRequest
# is (tests/common/test_datasets.py holds the two to JobRequest, so a new job field is a line field or named here)
OTHER_JOB_FIELDS = {
    "num_images": "a line field of its own: each image its own id and manifest row",
    "output_format": "one per run: `defaults.output_format`",
    "preview": "a job's live progress; a data set's progress is its counts",
    "webhook_url": "a job's end; a data set run is followed by its status (GET /v1/datasets/{id})",
}
# the image fields: a line names each by this tenant's stored key (inputs/<tenant>/<sha256>.png), never base64
IMAGE_FIELDS = ("init_image", "mask_image", "controlnets[i].image", "ip_adapter.image")
# besides the generation parameters: the user's own fields (copied, never interpreted) and how many images
LINE_FIELDS = ("id", *GENERATION_FIELDS, "aspect_ratio", "num_images", "caption", "metadata")
CHUNK_LINES = 1000  # normalized lines per stored input chunk: the feeder reads one chunk at a time
MAX_METADATA_BYTES = 4096  # a line's `metadata` as compact JSON: it travels in Redis with each line in flight
MAX_CAPTION_CHARS = 4096
MAX_IMAGES_PER_LINE = 64


KEYS_ONLY = (
    "a data set line names an image by this tenant's stored key (inputs/<tenant>/<sha256>.png: what a job answered "
    "with in its `request`), not base64 or a data: URL"
)


class DatasetStatus(StrEnum):
    running = "running"  # lines are being fed and generated
    canceling = "canceling"  # canceled: feeding stopped, lines already on a device finish and are kept
    completed = "completed"  # every line ended (succeeded or failed); manifest and shards are final
    canceled = "canceled"  # ended with lines canceled (POST .../resume feeds them); the rest is in the outputs
    # its feeder failed at the same step dataset_step_attempts times in a row (`error` says how): given up on,
    # rather than retried twice a second for ever; what was written before stays
    failed = "failed"


FINISHED = frozenset({DatasetStatus.completed, DatasetStatus.canceled, DatasetStatus.failed})


class DatasetDefaults(BaseModel):
    """Run-wide values for what a line leaves out."""

    model_config = {"extra": "forbid"}

    negative_prompt: Text | None = None  # absent or null: none; "" is the empty string, encoded
    width: int | None = None  # absent (here and on the line): the deployment's first served size
    height: int | None = None
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(5.0, ge=0, le=50, allow_inf_nan=False)
    scheduler: Scheduler = Scheduler.euler
    timestep_spacing: Spacing | None = None  # absent: the model's scheduler config
    # images by this tenant's stored key only (inputs/<tenant>/<sha256>.png), as a job answered with them
    init_image: Text | None = Field(None, max_length=1024)
    mask_image: Text | None = Field(None, max_length=1024)
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    refiner: RefinerRequest | None = None
    model: Text | None = None  # absent: the deployment's default model (SDXL_MODELS' first)
    loras: list[LoraRequest] = []  # LoRA adapters for every line that names none
    controlnets: list[ControlNetRequest] = Field([], max_length=MAX_CONTROLNETS_PER_JOB)
    ip_adapter: IPAdapterRequest | None = None
    output_format: OutputFormat = OutputFormat.png

    @field_validator("init_image", "mask_image", "controlnets", "ip_adapter")
    @classmethod
    def _by_key(cls, value: Any) -> Any:
        """Images by key, as on a line (refused here, once, rather than on every line); whose key it is, and
        whether it is stored, is checked with each line (api/job_inputs.py StoredImages)."""
        values = value if isinstance(value, list) else [value]
        for v in values:
            image = v.image if isinstance(v, ControlNetRequest | IPAdapterRequest) else v
            if image is not None and not inputs.is_key(image):
                raise ValueError(KEYS_ONLY)
        return value

    def public(self) -> dict[str, Any]:
        """As the data set card shows them: input images by content hash (`init_image_sha256`, a ControlNet's
        `image_sha256`), as the manifest records them; never the key, whose folder names the tenant."""
        images = ("init_image", "mask_image", "controlnets", "ip_adapter")
        shown = self.model_dump(mode="json", exclude=set(images))
        hashed = conditioning(JobRequest(prompt="-", **{k: getattr(self, k) for k in images}))
        return shown | {k: hashed[k] for k in ("init_image_sha256", "mask_image_sha256", "controlnets", "ip_adapter")}


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
    input_key: Text | None = Field(
        None, max_length=1024, description="Object-store key of the JSONL (instead of an upload)."
    )
    caption_field: str = Field(
        "caption",
        max_length=200,
        pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$",
        description="The line field whose text is written as <id>.txt in the shards: a top-level field, or "
        "metadata.KEY. A line without it is captioned with its prompt.",
    )
    order: Literal["completion", "input"] = Field(
        "completion",
        description="completion: shards fill as lines finish (fastest); input: shard k holds lines "
        "k*shard_size.. in input order, written once each of them has ended.",
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
    """One image of a valid line, normalized: every parameter filled in, the seed included. A line asking for
    `num_images` n > 1 becomes n of these, ids `<id>_<k>`; `source_id` is the line's own id."""

    line: int
    id: str
    request: JobRequest
    caption: str = ""
    metadata: dict[str, Any] | None = None
    source_id: str = ""
    aspect_ratio: float | None = None  # as asked (width / height); the bucket chosen is the request's size

    def to_json(self) -> str:
        return json.dumps(
            {"line": self.line, "id": self.id, "request": self.request.model_dump(mode="json"), **self.extra()}
        )

    def extra(self) -> dict[str, Any]:
        """What travels with the line's job besides its request (its `dataset` record), for the manifest."""
        return {
            "caption": self.caption,
            "metadata": self.metadata,
            "source_id": self.source_id or self.id,
            "aspect_ratio": self.aspect_ratio,
        }

    @staticmethod
    def from_json(text: str | bytes) -> Line:
        d = json.loads(text)
        return Line.of(d, JobRequest.model_validate(d["request"]))

    @staticmethod
    def of(record: dict[str, Any], request: JobRequest) -> Line:
        """A line from a stored record (a chunk's line, or a job's `dataset` record: line, id and `extra()`)."""
        return Line(
            record["line"],
            record["id"],
            request,
            record.get("caption", ""),
            record.get("metadata"),
            record.get("source_id", ""),
            record.get("aspect_ratio"),
        )


def derive_seed(run_seed: int, line_id: str) -> int:
    """A line's seed from the run's seed and its id (not its position): reordering or filtering the file
    keeps every image the same."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{line_id}".encode()).digest()[:4], "big")


def parse_aspect_ratio(value: Any) -> float:
    """width / height from a number (1.5) or a "W:H" string ("3:2"); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    if isinstance(value, str) and ":" in value:
        w, _, h = value.partition(":")
        ratio = float(w) / float(h)
    else:
        ratio = float(value)
    if not math.isfinite(ratio) or not 0.05 <= ratio <= 20:
        raise ValueError("out of range")
    return ratio


def nearest_bucket(ratio: float, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is nearest `ratio` (width / height), compared as
    logarithms so that 2:1 and 1:2 are as far from 1:1; ties go to the earlier bucket."""
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - math.log(ratio)))


@dataclass
class Limits:
    sizes: list[tuple[int, int]]
    max_steps: int
    max_prompt_chars: int
    buckets: list[tuple[int, int]] | None = None  # (height, width) pairs aspect_ratio maps to; None: the sizes
    # a line's images, before its size is filled in: (request) -> the request (with no width or height given,
    # the init image's size, as a job takes it) or a LimitError naming the field; None: images not checked
    check_images: Callable[[JobRequest], JobRequest] | None = None
    # what the deployment serves (model, refiner, adapters, ControlNets, IP-Adapters), the job route's own check
    # (api/served.py check_request): (request) -> None or a LimitError; None: not checked
    check_served: Callable[[JobRequest], None] | None = None

    def served_buckets(self) -> list[tuple[int, int]]:
        return [b for b in (self.buckets or self.sizes) if b in self.sizes]


class Validator:
    """Checks lines one at a time (a file of millions never sits in memory whole), remembering ids."""

    def __init__(self, options: DatasetOptions, run_seed: int, limits: Limits):
        self.defaults = options.defaults.model_dump(exclude={"output_format"})
        self.output_format = options.defaults.output_format
        self.caption_field = options.caption_field
        self.run_seed = run_seed
        self.limits = limits
        self.seen: dict[str, int] = {}

    def check(self, number: int, raw: bytes | str) -> list[Line] | LineError | None:
        """The line's images (one Line each), a LineError, or None for a blank line (allowed anywhere)."""
        if isinstance(raw, LineTooLong):
            return LineError(number, "line", f"longer than {len(raw)} bytes (SDXL_MAX_DATASET_LINE_BYTES); not read")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return LineError(number, "line", "not UTF-8 text")
        if number == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as some editors write
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return LineError(number, "line", f"not valid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:  # Python's parser gives up at its recursion limit (~1000 levels)
            return LineError(number, "line", "nested too deeply to be a data set line")
        if not isinstance(data, dict):
            return LineError(number, "line", 'each line must be a JSON object, e.g. {"id": "a1", "prompt": "..."}')
        broken = _not_unicode(data)
        if broken is not None:
            return LineError(number, broken, "has a lone surrogate (e.g. \\ud800): not Unicode text")
        unknown = sorted(set(data) - set(LINE_FIELDS))
        if unknown:
            return LineError(
                number,
                unknown[0],
                f"unknown field; a line may have: {', '.join(LINE_FIELDS)} (put your own fields in `metadata`)",
            )
        raw_id = data.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            return LineError(number, "id", "required: a string or integer unique within the file")
        line_id = str(raw_id)
        if not ID_PATTERN.match(line_id):
            return LineError(number, "id", "use 1-128 letters, digits, '_' or '-' (it names files in the output)")
        if line_id in self.seen:
            return LineError(number, "id", f"duplicate id {line_id!r}, first used on line {self.seen[line_id]}")
        user = self._user_fields(number, data)
        if isinstance(user, LineError):
            return user
        caption, metadata, count = user
        fields = {**self.defaults, **{k: v for k, v in data.items() if k in GENERATION_FIELDS}}
        ratio = None
        if data.get("aspect_ratio") is not None:
            if data.get("width") is not None or data.get("height") is not None:
                return LineError(number, "aspect_ratio", "give either aspect_ratio or width and height, not both")
            try:
                ratio = parse_aspect_ratio(data["aspect_ratio"])
            except (TypeError, ValueError, ZeroDivisionError):
                return LineError(number, "aspect_ratio", 'a number (width / height) between 0.05 and 20, or "W:H"')
            buckets = self.limits.served_buckets()
            if not buckets:
                return LineError(
                    number,
                    "aspect_ratio",
                    "no aspect-ratio bucket is served here (SDXL_ASPECT_BUCKETS "
                    "and SDXL_IMAGE_SIZES share no size); give width and height",
                )
            fields["height"], fields["width"] = nearest_bucket(ratio, buckets)
        ids = [line_id] if count == 1 else [f"{line_id}_{k}" for k in range(count)]
        if any(not ID_PATTERN.match(i) or i in self.seen for i in ids):
            return LineError(number, "num_images", f"the ids {ids[0]}..{ids[-1]} are too long or already used")
        lines = []
        for k, image_id in enumerate(ids):
            image = dict(fields)
            if image.get("seed") is None:
                image["seed"] = derive_seed(self.run_seed, image_id)
            else:
                image["seed"] = image["seed"] + k
            try:
                # the job's own checks, in a job's order: its images, its size, its limits, what is served
                request = JobRequest(**image, output_format=self.output_format)
                for name, value in images_of(request):
                    if not inputs.is_key(value):
                        raise LimitError(name, KEYS_ONLY)
                if self.limits.check_images is not None:
                    request = self.limits.check_images(request)
                request = with_size(request, self.limits.sizes)
                check_limits(request, self.limits.sizes, self.limits.max_steps, 1, self.limits.max_prompt_chars)
                if self.limits.check_served is not None:
                    self.limits.check_served(request)
            except ValidationError as exc:
                first = exc.errors()[0]
                return LineError(number, ".".join(str(p) for p in first["loc"]) or "line", first["msg"])
            except LimitError as exc:
                return LineError(number, exc.field, str(exc))
            lines.append(
                Line(
                    number,
                    image_id,
                    request,
                    caption if caption is not None else request.prompt,
                    metadata,
                    line_id,
                    ratio,
                )
            )
        for image_id in [line_id, *ids]:
            self.seen[image_id] = number
        return lines

    def _user_fields(self, number: int, data: dict[str, Any]) -> tuple[str | None, dict | None, int] | LineError:
        """(caption or None for the prompt, metadata, num_images), checked."""
        metadata = data.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                return LineError(number, "metadata", 'an object of your own fields, e.g. {"label": "cat"}')
            size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
            if size > MAX_METADATA_BYTES:
                return LineError(number, "metadata", f"{size} bytes as JSON; at most {MAX_METADATA_BYTES}")
        caption = data.get("caption")
        if caption is not None and (not isinstance(caption, str) or len(caption) > MAX_CAPTION_CHARS):
            return LineError(number, "caption", f"a string of at most {MAX_CAPTION_CHARS} characters")
        field, _, key = self.caption_field.partition(".")
        chosen = (metadata or {}).get(key) if field == "metadata" and key else data.get(field)
        if chosen is not None and not isinstance(chosen, str):
            return LineError(number, self.caption_field, "the caption field must hold a string")
        count = data.get("num_images", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES_PER_LINE:
            return LineError(number, "num_images", f"an integer from 1 to {MAX_IMAGES_PER_LINE}")
        return chosen, metadata, count


def _not_unicode(data: dict[str, Any]) -> str | None:
    """The first field (a key's name, or "line" for a key) holding a lone surrogate anywhere inside, or None:
    such text cannot be written as UTF-8 (the job record, the manifest, the shards) and would stall the run."""
    for key, value in data.items():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return "line"
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return key
    return None


class LineTooLong(bytes):
    """What lines_of gives for a line over its byte cap: the line's first bytes only (the rest was skipped
    unread), marked so that it is refused, not parsed."""


def lines_of(stream: Iterable[bytes], max_bytes: int = 0) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) for each line of a binary stream; a UTF-8 byte order mark at the start is
    dropped. With max_bytes (> 0) and a stream that has readline (a file), a longer line is never held whole: it
    comes as a LineTooLong of its first max_bytes, and the rest of it is read past in pieces."""
    readline = getattr(stream, "readline", None)
    raws: Iterable[bytes] = stream if not max_bytes or readline is None else _capped_lines(readline, max_bytes)
    for number, raw in enumerate(raws, start=1):
        line = raw.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf") if number == 1 else raw.rstrip(b"\r\n")
        yield number, LineTooLong(line) if isinstance(raw, LineTooLong) else line


def _capped_lines(readline: Any, max_bytes: int) -> Iterator[bytes]:
    while True:
        raw = readline(max_bytes + 1)
        if not raw:
            return
        if raw.endswith(b"\n") or len(raw) <= max_bytes:  # whole: a newline within max_bytes + 1, or the end
            yield raw
            continue
        head = raw[:max_bytes]
        while raw and not raw.endswith(b"\n"):  # the rest of the long line, a piece at a time, dropped
            raw = readline(1 << 16)
        yield LineTooLong(head)


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

    def shard_stats(self, index: int) -> str:
        return f"{self.prefix}/stats/shard-{index:06d}.json"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats.json"

    @property
    def card(self) -> str:
        """The data set card: README.md with the Hugging Face `datasets` YAML header."""
        return f"{self.prefix}/README.md"


MANIFEST_COLUMNS = (
    "id",
    "line",
    "source_id",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "aspect_ratio",
    "steps",
    "guidance_scale",
    "scheduler",
    "timestep_spacing",
    "strength",
    "init_image_sha256",
    "mask_image_sha256",
    "refiner",
    "controlnets",
    "ip_adapter",
    "model",
    "model_hash",
    "adapters",
    "conditions",
    "truncated",
    "attempts",
    "caption",
    "metadata",
    "key",
    "sha256",
    "shard",
)


def manifest_row(
    line: Line,
    key: str,
    sha256: str,
    model: str = "",
    model_hash: str = "",
    truncated: bool = False,
    attempts: int = 1,
    adapters: list[dict[str, Any]] | None = None,
    conditions: RenderConditions | None = None,
) -> dict[str, Any]:
    """A generated image's manifest row: what made it (parameters, model and weights hash, adapters, and the
    conditions that decide its bytes: common/jobs.py RenderConditions) and the user's own fields. Nothing in it
    but `key` and `shard` names the run, so reruns compare row for row."""
    r = line.request
    return {
        "id": line.id,
        "line": line.line,
        "source_id": line.source_id or line.id,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed,
        "width": r.width,
        "height": r.height,
        "aspect_ratio": line.aspect_ratio,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler.value,
        **conditioning(r),
        "model": model,
        "model_hash": model_hash,
        "adapters": adapters or [],  # LoRA adapters applied: name, scale, sha256
        "conditions": conditions.model_dump() if conditions is not None else None,
        "truncated": truncated,
        "attempts": attempts,
        "caption": line.caption,
        "metadata": line.metadata,
        "key": key,
        "sha256": sha256,
    }


def conditioning(request: JobRequest) -> dict[str, Any]:
    """The manifest's record of what steers a line's pixels besides its prompt, sampler and LoRA adapters (the
    `adapters` column): spacing, image-to-image and inpainting, the refiner, ControlNets, the IP-Adapter; null
    (ControlNets: []) where the line had none. Input images by content hash, never by key: a key's folder names
    the tenant, and a manifest travels (a published data set)."""
    r = request
    return {
        "timestep_spacing": r.timestep_spacing.value if r.timestep_spacing else None,
        "strength": r.strength,
        "init_image_sha256": inputs.content_hash(r.init_image) if r.init_image else None,
        "mask_image_sha256": inputs.content_hash(r.mask_image) if r.mask_image else None,
        "refiner": r.refiner.model_dump() if r.refiner else None,
        "controlnets": [inputs.by_hash(c) for c in r.controlnets],
        "ip_adapter": inputs.by_hash(r.ip_adapter) if r.ip_adapter is not None else None,
    }
