"""What the API answers. Requests use common.jobs.JobRequest directly."""

from __future__ import annotations

from pydantic import BaseModel

from common.datasets import DatasetOptions, DatasetStatus
from common.jobs import JobRequest, JobStatus, Progress


class ImagePublic(BaseModel):
    url: str  # signed afresh at each read; expires after `url_expiry_s`
    seed: int
    width: int
    height: int
    sha256: str
    model: str = ""  # the model's name and weights sha256: which weights made it
    model_hash: str = ""
    loras: list[dict] = []  # the adapters applied: name, scale, sha256


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    status_url: str
    request: JobRequest
    queue_position: int | None = None  # 1 = next to start; only while queued
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # once ended: when this record and its images are deleted (finished_at + the service's job_ttl_s)
    expires_at: float | None = None
    error: str | None = None
    images: list[ImagePublic] = []
    truncated: bool = False  # the prompt or negative prompt was longer than 77 tokens and was cut
    attempts: int = 0
    # once running: denoising steps done of the job's steps, as its worker last reported (every
    # SDXL_PROGRESS_EVERY_STEPS steps, at most 5 times a second); GET .../events streams each change
    progress: Progress | None = None


class JobsPublic(BaseModel):
    jobs: list[JobPublic]
    total: int
    offset: int
    limit: int


class CancelPublic(BaseModel):
    id: str
    status: JobStatus
    # "never_ran": it was queued and will not run; "results_discarded": it was running and its images
    # will not be kept.
    outcome: str


class ServedModelPublic(BaseModel):
    name: str
    source: str  # SDXL_MODELS' spec: a folder, a single file, a hub id or a preset
    vae: str | None = None  # the VAE override of its entry
    unet: str | None = None  # the UNet override of its entry
    default: bool  # what a job without `model` gets
    workers: int  # live workers holding it; 0 with workers up: jobs for it are refused (422)
    bytes: int | None = None  # its weights on a device, as a worker holding it reports; None: none does
    weights_sha256: str | None = None


class LoraPublic(BaseModel):
    name: str  # what a job's `loras` names
    bytes: int
    sha256: str
    layout: str  # kohya or diffusers
    touches: list[str]  # unet, text_encoder, text_encoder_2
    rank: int
    layers: int


class LorasPublic(BaseModel):
    loras: list[LoraPublic]
    unusable: dict[str, str]  # files in the folder that are not served, and why
    max_per_job: int
    max_rank: int


class ModelPublic(BaseModel):
    model: str  # the default model's name
    models: list[ServedModelPublic]
    sizes: list[dict[str, int]]
    schedulers: list[str]
    timestep_spacings: list[str]
    refiner: str | None = None  # SDXL's refiner served beside the model (jobs may ask for it), or none
    controlnets: list[str] = []  # the ControlNets a job may name (SDXL_CONTROLNETS), with the default model
    ip_adapters: list[str] = []  # the IP-Adapters a job may name (SDXL_IP_ADAPTERS), with the default model
    options: dict[str, str]  # what each sampling and image option does, and which model it needs
    output_formats: list[str]
    limits: dict[str, int | float]


class LineErrorPublic(BaseModel):
    line: int  # 1-based line number in the input file
    field: str
    message: str


class DatasetCounts(BaseModel):
    total: int  # valid lines, one image each
    queued: int  # not started yet (waiting to be fed, or on the bulk queue)
    running: int  # on a worker
    succeeded: int
    failed: int
    canceled: int
    skipped: int  # invalid lines left out (on_invalid=skip)


class DatasetPublic(BaseModel):
    id: str
    status: DatasetStatus
    status_url: str
    files_url: str
    seed: int  # the run seed: lines without a seed derive theirs from it and their id
    options: DatasetOptions
    counts: DatasetCounts
    images_per_s: float | None = None  # over the last ~5 minutes; once finished, the whole run's average
    eta_s: float | None = None  # lines left / images_per_s; null while unknown, or while stalled
    stalled_s: float | None = None  # no line has finished for this long (a recovery, an outage): no ETA meanwhile
    shards: int = 0  # WebDataset shards written so far
    output_prefix: str  # object-store prefix of everything this run writes
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # once finished: when this record goes (finished_at + job_ttl_s), and with it this status and the signed
    # URLs of GET .../files; the files themselves stay in storage
    expires_at: float | None = None
    invalid_lines: list[LineErrorPublic] = []  # the first 100 lines left out (on_invalid=skip)
    error: str | None = None  # status `failed`: why the run was given up on


class DatasetsPublic(BaseModel):
    datasets: list[DatasetPublic]
    total: int
    offset: int
    limit: int


class DatasetFilesPublic(BaseModel):
    """Signed URLs (they expire after `url_expiry_s`; ask again for fresh ones)."""

    shards: list[str]  # WebDataset tars, in order; more appear while the run goes on
    manifest_parts: list[str]  # JSONL per shard, same order
    manifest_jsonl: str | None = None  # the whole manifest, once the run has finished
    manifest_parquet: str | None = None
    failures: str | None = None  # failures.jsonl, once finished
    invalid: str | None = None  # lines left out at submit (on_invalid=skip), with their text
    stats: str | None = None  # stats.json, once finished: counts and each shard's figures
    card: str | None = None  # README.md, once finished: the data set card (Hugging Face `datasets` YAML header)


class FailurePublic(BaseModel):
    line: int
    id: str
    error: str


class DatasetFailuresPublic(BaseModel):
    failures: list[FailurePublic]
    total: int
    offset: int
    limit: int


class RetryPublic(BaseModel):
    retried: int  # failed lines sent back to be generated again
    dataset: DatasetPublic


class ResumePublic(BaseModel):
    resumed: int  # canceled lines sent back to be generated (same ids, same seeds)
    dataset: DatasetPublic
