"""One settings object per process, read from SDXL_* environment variables (or a .env file) once at start.

Every field is documented in the README's configuration table; tests/test_settings_docs.py keeps the two
in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# SDXL's trained resolutions (WIDTHxHEIGHT), about one megapixel each: the default aspect-ratio buckets
SDXL_BUCKETS = "1024x1024,1152x896,896x1152,1216x832,832x1216,1344x768,768x1344,1536x640,640x1536"

Size = tuple[int, int]  # (height, width) in pixels: the engine's (array) order, inside the code only
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+:-]{0,127}$")


@dataclass(frozen=True)
class ModelEntry:
    """One served model: the name jobs pick it by, where its weights are (as SDXL_MODEL takes them), and its
    overrides (SDXL_VAE's and SDXL_UNET's forms); '' is none."""

    name: str
    spec: str
    vae: str = ""
    unet: str = ""


def parse_models(text: str) -> list[ModelEntry]:
    """'base=stabilityai/stable-diffusion-xl-base-1.0;vae=madebyollin/sdxl-vae-fp16-fix, turbo=stabilityai/sdxl-turbo'
    -> entries, in order (the first is the default): `name=spec`, then `;vae=...` / `;unet=...` options."""
    entries: list[ModelEntry] = []
    for part in text.split(","):
        head, *options = [p.strip() for p in part.split(";")]
        name, eq, spec = (x.strip() for x in head.partition("="))
        if not eq or not spec:
            raise ValueError(f"model entry {part.strip()!r} is not NAME=SPEC[;vae=...][;unet=...]")
        if not MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r}: letters, digits and . _ / + : - only")
        extra: dict[str, str] = {}
        for option in options:
            key, eq, value = (x.strip() for x in option.partition("="))
            if key not in ("vae", "unet") or not eq or not value:
                raise ValueError(f"model {name!r}: option {option!r} is not vae=... or unet=...")
            extra[key] = value
        if any(e.name == name for e in entries):
            raise ValueError(f"model name {name!r} is given twice")
        entries.append(ModelEntry(name, spec, **extra))
    return entries


def parse_sizes(text: str) -> list[Size]:
    """'1024x1024,1216x832' -> [(1024, 1024), (832, 1216)]: the text is WIDTHxHEIGHT, as OpenAI's `size`
    and every peer write it; the result is (height, width) pairs."""
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise ValueError(f"size {part!r} is not WIDTHxHEIGHT, e.g. 1216x832 (landscape)")
        sizes.append((int(h), int(w)))
    return sizes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", env_file=".env", extra="ignore")

    # --- queue and job records
    # redis://[user:password@]host:port/db, rediss://... (TLS; a private CA: ?ssl_ca_certs=/path/ca.pem) or
    # unix:///path.sock. With SDXL_REDIS_SENTINELS its host is not used: the sentinels name the primary
    # (common/redis_connection.py)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: the sentinels as host:port, comma-separated; '': SDXL_REDIS_URL's one server
    redis_sentinels: str = ""
    redis_sentinel_master: str = "sdxl"  # the name the sentinels monitor the primary under
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own (their requirepass); unset: none
    # a submit is answered 202 only once this many replicas hold its job (Redis' WAIT); fewer within
    # redis_wait_timeout_ms: 503 + Retry-After. 0: once the primary has it (a failover may lose it:
    # docs/reliability.md, "Redis that fails over")
    redis_wait_replicas: int = Field(0, ge=0)
    redis_wait_timeout_ms: int = Field(1000, ge=1)
    queue_name: str = "sdxl"  # interactive jobs
    bulk_queue_name: str = "sdxl-bulk"  # data set lines: consumed after the interactive queue is empty
    key_prefix: str = "sdxl"  # every Redis key the service writes starts with it, or with it in braces (a hash tag)
    # how long a job's record (and idempotency key) lives after its last change; an ended job's images are
    # deleted when its record goes (worker/image_retention.py)
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    # After this long unacknowledged, Redis gives a message to another worker: it bounds how long a dead
    # worker's jobs wait, and must exceed the longest a live worker holds one (common/queue.py).
    visibility_timeout_s: int = Field(300, ge=5)
    # A job still running this long after it started is stuck: the sweep requeues or fails it. Longer than
    # the visibility timeout, so Celery's own redelivery of a dead worker's jobs comes first.
    running_deadline_s: int = Field(900, ge=10)
    # --- model and batching (worker)
    # 'tiny', a diffusers folder, a single-file checkpoint (sd_xl_base_1.0.safetensors layout), a hub id, or
    # 'standin' (benchmarks of the queue only)
    model: str = "tiny"
    # a single-file checkpoint's configs, tokenizers and scheduler from this diffusers folder instead of SDXL's
    # defaults (as diffusers' from_single_file(config=...)); '': inferred from the tensors, SDXL's defaults
    model_config_dir: str = ""
    # a UNet-only weights file (diffusers' layout) or UNet folder served in place of the model's UNet, same
    # architecture: SDXL-Lightning's sdxl_lightning_4step_unet.safetensors on SDXL base; '': the model's own
    unet: str = ""
    # another VAE for the model: a diffusers AutoencoderKL folder or a hub id (madebyollin/sdxl-vae-fp16-fix, or
    # the VAE a fine-tune ships); '': the model's own
    vae: str = ""
    # SDXL's refiner beside the model (a diffusers folder, a hub id such as
    # stabilityai/stable-diffusion-xl-refiner-1.0, or 'tiny-refiner'): jobs may ask for it; '': none
    refiner: str = ""
    # several models on one deployment: NAME=SPEC entries, comma-separated, each SPEC as SDXL_MODEL takes it and
    # optionally ';vae=...' and ';unet=...' (as SDXL_VAE / SDXL_UNET): 'base=stabilityai/stable-diffusion-xl-
    # base-1.0;vae=madebyollin/sdxl-vae-fp16-fix,turbo=stabilityai/sdxl-turbo'. A job's `model` picks one (the
    # first by default). '': the one model SDXL_MODEL (with SDXL_VAE and SDXL_UNET), named as SDXL_MODEL is
    models: str = ""
    # a worker loads the models (in SDXL_MODELS' order) whose weights fit in this many bytes together, and says
    # which in its heartbeat; the API refuses a job for a model no live worker serves. 0: every model
    model_memory_bytes: int = Field(0, ge=0)
    # the host memory a worker may fill with weights while it reads them (bytes); a model that needs more is
    # refused at start with a message naming the bytes and dtype (worker/engine/host_memory.py). 0: what the
    # kernel says is available now (MemAvailable, or less under a container's memory limit)
    host_available_bytes: int = Field(0, ge=0)
    # the names of SDXL_MODELS this worker serves, comma-separated (a fleet whose workers hold different models);
    # '': every one that fits. Each model has its own queue (common/queue.py): a worker consumes its models' only
    worker_models: str = ""
    # '' reads model.safetensors; 'fp16' reads (and downloads only) model.fp16.safetensors: half of SDXL base
    model_variant: str = Field("", pattern=r"^[A-Za-z0-9_]*$")
    # LoRA adapters: a folder of .safetensors files (kohya's or diffusers/PEFT's layout), or 'storage:<prefix>' for
    # the objects under that prefix in the deployment's storage; each served by its file name without
    # .safetensors (GET /v1/loras); '': none. Read by the API (listing, checks) and workers.
    lora_dir: str = ""
    # where adapters from a storage prefix are copied the first time each is needed (kept: a name is one file)
    lora_cache_dir: str = "~/.cache/sdxl-service/loras"
    max_loras_per_job: int = Field(2, ge=1, le=8)  # adapters one job may combine
    # the largest adapter rank served: every row's adapters run padded to it inside the compiled program, so a
    # higher value costs every adapted layer more compute (docs/benchmarks.md); a higher-rank adapter: 422
    lora_max_rank: int = Field(64, ge=1, le=1024)
    # device memory for resident adapters (each slot: rank x the adapted layers' widths, SDXL at rank 64 in
    # bfloat16: ~0.33 GB); the least recently used is replaced when a new one is needed
    lora_cache_bytes: int = Field(4 * 1024**3, ge=1)
    # ControlNets for the default model: NAME=SPEC entries, comma-separated, each SPEC a diffusers ControlNetModel
    # folder or a single .safetensors file in diffusers' layout ('canny=/models/controlnet-canny-sdxl-1.0').
    # Requests name them (`controlnets`); every one runs in the batches that use any (compiled at start). '': none
    controlnets: str = ""
    # IP-Adapters for the default model, as SDXL_CONTROLNETS: NAME=SPEC, each SPEC an adapter's .safetensors in
    # diffusers' load_ip_adapter layout with its image encoder in `image_encoder/` beside it, or named after a colon
    # ('style=/models/ip-adapter_sdxl_vit-h.safetensors:/models/image_encoder'). Requests name one (`ip_adapter`).
    ip_adapters: str = ""
    standin_batch_s: float = Field(2.33, gt=0)  # with model=standin: simulated device time per batch
    # auto: bfloat16 on TPUs and GPUs; float32 on CPUs, where XLA emulates bfloat16 and runs it ~2x slower
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # fp8: the UNet's linear layers and 1x1 convolutions as FP8 (e4m3) matmuls, weights quantized per output
    # channel at load, activations per row per call; everything else stays in SDXL_DTYPE. Its own setting and not
    # an SDXL_DTYPE value: FP8 replaces some matmuls of a model that still runs in bf16 (or float32). Fast on
    # GPUs with FP8 (Ada, Hopper and later: cuBLASLt); elsewhere emulated, FP8's rounding at no gain
    quantize: Literal["none", "fp8"] = "none"
    # the VAE's weights and compute. auto: the model's dtype (bfloat16 has float32's range, so the VAE's
    # force_upcast, which guards float16, does not apply); float32: a float32 decode on a bfloat16 model
    vae_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # served sizes, WIDTHxHEIGHT, comma-separated; each is compiled at worker start. The first is what a job
    # that names no size gets.
    image_sizes: str = "1024x1024"
    # the old name, HEIGHTxWIDTH: refused (a value such as 832x1216 cannot say which order it meant)
    sizes: str | None = Field(None, exclude=True)
    # a data set line's `aspect_ratio` maps to the nearest of these that is also served (WIDTHxHEIGHT, comma
    # separated); the default: SDXL's trained resolutions
    aspect_buckets: str = SDXL_BUCKETS
    # rows per device batch; a multiple of the local device count. Unset, the worker picks by platform (8 per GPU
    # on GPUs of 80 GB or more, 4 elsewhere: worker/main.py batch_rows); this default is what the API assumes
    batch_rows: int = Field(4, ge=1)
    batch_timeout_s: float = Field(0.5, ge=0)  # flush a short batch once its oldest job waited this long
    compile_cache_dir: str = "~/.cache/sdxl-service/xla"
    # JAX's own compilation cache (executables JAX loads unchecked); '': inside compile_cache_dir. Set it to
    # the host's own disk when compile_cache_dir is shared between machines (worker/engine/cache.py)
    xla_cache_dir: str = ""
    # seals the serialized executables in compile_cache_dir (HMAC-SHA256): a file without this key's seal is
    # never unpickled. Unset: a key made once per host in ~/.config/sdxl-service/. A fleet that shares the
    # cache sets one key everywhere (a Secret), so each pod loads what another compiled.
    cache_signing_key: SecretStr | None = Field(None, min_length=16)
    # keep each model's weights converted to Flax's layout and the serving dtype in <compile cache>/weights, so
    # a restart maps them instead of converting (SDXL: the weights' share of a warm start; about the size of
    # the fp16 checkpoint on disk)
    weight_cache: bool = True
    # einsum: heads folded into the batch; split_head: heads as their own axis (the blog's TPU layout); xla /
    # cudnn: jax.nn.dot_product_attention (cudnn: flash attention, NVIDIA only); splash: the Pallas splash
    # kernel (TPU only). auto: splash on TPUs, cudnn on a one-GPU NVIDIA host (1.40x the einsum form for SDXL
    # on an H200, docs/benchmarks.md), else einsum
    attention: Literal["auto", "einsum", "split_head", "xla", "cudnn", "splash"] = "auto"
    # a running job reports its step after every this many steps (GET /v1/jobs/{id} `progress`, the event
    # stream). Each chunk is one more dispatch of the steps' program: 0.9% of a 20-step batch on the CPU mid
    # model at 1, within that run's noise (bench/progress.py); a larger value reports less often, costs less
    progress_every_steps: int = Field(1, ge=1)
    # a job with `preview: true` gets a small image of its current estimate in its progress about every this many
    # steps (at the first report due after them; never at the last step): one latent copied off the device and
    # a 128 px WebP made on the host, a few ms each (cost to a batch: docs/benchmarks.md, "Previews")
    preview_every_steps: int = Field(5, ge=1)
    # the worker's own Prometheus metrics (queue wait, latency, device and upload histograms) on this port's
    # /metrics; 0: not served. Several workers on one host need one port each
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    # both: interactive first, data set lines in idle capacity; interactive/bulk: a pool for one kind only
    worker_lanes: Literal["both", "interactive", "bulk"] = "both"
    # --- data sets (bulk)
    dataset_feeder: bool = True  # this worker may feed data set runs (one feeder per run, by Redis lock)
    dataset_feed_depth: int = Field(256, ge=1)  # a run's lines on the queue or a device at once: Redis stays bounded
    # a run whose feeder step fails this many times in a row (the same error each 0.5 s tick, not an outage) is
    # given up on: status `failed`, with `error`; what it had written stays
    dataset_step_attempts: int = Field(20, ge=1)
    # a tenant's runs being fed at once; more: 429. Each holds up to dataset_feed_depth lines in flight.
    max_active_datasets_per_tenant: int = Field(4, ge=1)
    max_dataset_bytes: int = Field(512 * 1024 * 1024, ge=1024)  # a data set upload's size limit (413 above it)
    max_dataset_lines: int = Field(10_000_000, ge=1)
    # `input_key` must start with this + "<tenant>/": other objects, and other tenants' inputs, stay unreadable
    dataset_input_prefix: str = "inputs/"
    # --- access (API)
    auth_required: bool = True  # every /v1/jobs call needs `Authorization: Bearer <key>` (python -m api.keys)
    rate_limit_per_min: int = Field(600, ge=1)  # writes (POST...) per API key per minute; more: 429 + Retry-After
    # reads (GET: polls, lists, waits) per API key per minute, counted apart from writes; more: 429
    read_rate_limit_per_min: int = Field(6000, ge=1)
    max_queued_per_tenant: int = Field(1000, ge=1)  # a tenant's queued jobs; more: 429 + Retry-After
    max_body_bytes: int = Field(64 * 1024, ge=1024)  # larger request bodies: 413
    # the longest a request may wait for its job to end (`Prefer: wait=N`, `?wait_s=N`); keep it under the
    # idle timeout of any proxy in front of the API (often 60 s)
    max_wait_s: float = Field(55, ge=0, le=600)
    # GET /metrics then needs `Authorization: Bearer <this key>` (Prometheus' `authorization` credentials); unset:
    # /metrics is open, for an API reached only from a private network (the GKE manifests set it)
    metrics_key: SecretStr | None = Field(None, min_length=16)
    # /docs (Swagger UI) and /redoc, whose pages load their scripts from a CDN (jsDelivr): off by default, so that
    # no page of the API runs a third party's code; /openapi.json is always served (no Swagger UI assets ship
    # in the service's packages to serve them locally)
    interactive_docs: bool = False
    # --- webhooks
    webhook_secret: SecretStr | None = None  # whsec_<base64>; unset: jobs with a webhook_url are refused
    webhook_allow_private: bool = False  # allow loopback/private targets (tests, trusted networks only)
    webhook_attempts: int = Field(6, ge=1)  # deliveries tried, backoff 2, 4, 8, 16, 32 s between them
    # one delivery, from the address look-up to the last byte read, whatever the receiver does (not per read)
    webhook_timeout_s: float = Field(10, gt=0)
    webhook_max_response_bytes: int = Field(64 * 1024, ge=1)  # of a receiver's reply read; the rest is never read
    # deliveries a worker makes at once, on threads of their own in a process of their own (worker/webhook_sender.py)
    webhook_concurrency: int = Field(8, ge=1)
    webhook_queue_name: str = ""  # deliveries wait here, apart from the jobs' queues; empty: "<queue_name>-webhooks"
    # --- request limits (API)
    max_steps: int = Field(150, ge=1, le=150)
    max_images_per_job: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    # --- work per request (API): each bounds one request's memory or CPU, so one tenant cannot starve the rest
    # an input image (init_image, mask_image) decoded to more pixels than this: 422 naming the field, refused from
    # its header before any pixel is decoded (a JPEG is decoded at 1/2, 1/4 or 1/8 scale first, down to the
    # job's size: Pillow's draft). 0: four times the largest served size (2048x2048 when 1024x1024 is served)
    max_input_pixels: int = Field(0, ge=0)
    # input images decoded, resized or encoded at once per API process; more wait their turn (each holds up to
    # max_input_pixels x 4 bytes, a few times over while it is converted and resized)
    max_concurrent_decodes: int = Field(4, ge=1)
    # a data set line longer than this is refused by number (422, `lines`) unread: it is never held whole
    max_dataset_line_bytes: int = Field(256 * 1024, ge=1024)
    # images one data set run may ask for, counted after num_images (a line of num_images 64 is 64): more, 413
    max_dataset_images: int = Field(10_000_000, ge=1)
    # images not yet generated in a tenant's runs in progress, the new run's included: more, 429 + Retry-After
    max_dataset_images_per_tenant: int = Field(10_000_000, ge=1)
    # data set uploads whose body is being read at once, per tenant and API process: more, 429 + Retry-After,
    # before the body is read
    max_uploads_per_tenant: int = Field(2, ge=1)
    # event streams (GET /v1/jobs/{id}/events) and waits (`?wait_s`, `Prefer: wait`) open at once per API key and
    # API process: more, 429 + Retry-After. Each costs a read of the job per second while it lasts
    max_waits_per_key: int = Field(32, ge=1)
    # --- logs
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with job_id / batch_id fields
    # --- storage
    storage: Literal["local", "s3"] = "local"
    local_storage_dir: str = "var/images"
    # where clients reach the API: status_url, webhooks' status_url and local-storage URLs are built on it
    public_base_url: str = "http://127.0.0.1:8000"
    url_signing_secret: SecretStr | None = None  # HMAC key for local-storage URLs; required with storage=local
    url_expiry_s: int = Field(3600, gt=0, le=7 * 24 * 3600)  # S3 SigV4 allows 7 days at most
    s3_bucket: str = "sdxl-images"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None  # MinIO, SeaweedFS, https://storage.googleapis.com for GCS
    s3_public_endpoint_url: str | None = None  # sign URLs for this host when clients reach S3 elsewhere
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None  # None: boto3's usual chain (env, profile, instance role)
    s3_secret_access_key: SecretStr | None = None
    upload_threads: int = Field(8, ge=1)
    # per image and run, with exponential backoff from upload_backoff_s up to upload_backoff_max_s: 0.5, 1, 2,
    # 4, then 8 s six times: a storage outage of ~60 s is ridden out in one run; after that the job goes back
    # to the queue (a new run) until max_attempts
    upload_attempts: int = Field(11, ge=1)
    upload_backoff_s: float = Field(0.5, gt=0)
    upload_backoff_max_s: float = Field(8.0, gt=0)
    max_attempts: int = Field(3, ge=1)  # runs of one job (redeliveries, storage outages) before it fails
    # one worker of the fleet deletes the images of expired jobs this often; 0: never (keep them, or leave it
    # to a bucket lifecycle rule)
    image_sweep_interval_s: int = Field(3600, ge=0)

    @field_validator("image_sizes", "aspect_buckets")
    @classmethod
    def _sizes(cls, value: str) -> str:
        parse_sizes(value)
        return value

    @field_validator("sizes")
    @classmethod
    def _old_sizes(cls, value: str | None) -> None:
        if value is not None:
            swapped = ",".join("x".join(reversed(p.strip().split("x"))) for p in value.split(","))
            raise ValueError(
                f"SDXL_SIZES is no longer read: it was HEIGHTxWIDTH, and sizes are now written WIDTHxHEIGHT in "
                f"SDXL_IMAGE_SIZES. What SDXL_SIZES={value} meant is SDXL_IMAGE_SIZES={swapped}; set that and unset "
                "SDXL_SIZES"
            )
        return None

    @model_validator(mode="after")
    def _visibility_exceeds_holding(self) -> Settings:
        # A worker holds a message for up to batch_timeout_s, plus up to two batches on the device, plus
        # uploads; a shorter visibility timeout makes Redis hand live jobs to a second worker.
        if self.visibility_timeout_s < 2 * self.batch_timeout_s + 5:
            raise ValueError(
                f"SDXL_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be at least "
                f"2 x SDXL_BATCH_TIMEOUT_S + 5 = {2 * self.batch_timeout_s + 5:g}, and more than the longest a "
                "worker holds a job (batch timeout + two batches on the device + upload)"
            )
        if self.running_deadline_s <= self.visibility_timeout_s:
            raise ValueError("SDXL_RUNNING_DEADLINE_S must exceed SDXL_VISIBILITY_TIMEOUT_S")
        return self

    @model_validator(mode="after")
    def _redis_reachable_as_said(self) -> Settings:
        from common.redis_connection import Topology  # imports this module

        Topology.of(self)  # RedisSettingError (a ValueError) naming the setting
        return self

    @field_validator("controlnets")
    @classmethod
    def _controlnets(cls, value: str) -> str:
        parse_controlnets(value)
        return value

    @field_validator("ip_adapters")
    @classmethod
    def _ip_adapters(cls, value: str) -> str:
        parse_controlnets(value, "SDXL_IP_ADAPTERS")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: str) -> str:
        if value.strip():
            parse_models(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> Settings:
        if self.models.strip() and (self.vae or self.unet):
            raise ValueError(
                "SDXL_VAE and SDXL_UNET apply to SDXL_MODEL alone; with SDXL_MODELS, give each model its own "
                "(';vae=...' / ';unet=...' in its entry)"
            )
        return self

    @property
    def model_entries(self) -> list[ModelEntry]:
        """The served models, the default first."""
        if self.models.strip():
            return parse_models(self.models)
        return [ModelEntry(self.model, self.model, self.vae, self.unet)]

    @property
    def controlnet_specs(self) -> dict[str, str]:
        """SDXL_CONTROLNETS as name -> spec, in its order."""
        return parse_controlnets(self.controlnets)

    @property
    def worker_lanes_list(self) -> list[str]:
        """The lanes a worker consumes, in priority order: "interactive", "bulk"."""
        return {"both": ["interactive", "bulk"], "interactive": ["interactive"], "bulk": ["bulk"]}[self.worker_lanes]

    @property
    def ip_adapter_specs(self) -> dict[str, str]:
        """SDXL_IP_ADAPTERS as name -> spec, in its order."""
        return parse_controlnets(self.ip_adapters, "SDXL_IP_ADAPTERS")

    @property
    def worker_queues(self) -> list[str]:
        """The queues a worker consumes, in priority order."""
        lanes = {
            "both": [self.queue_name, self.bulk_queue_name],
            "interactive": [self.queue_name],
            "bulk": [self.bulk_queue_name],
        }
        return lanes[self.worker_lanes]

    @property
    def webhook_queue(self) -> str:
        """The queue of webhook deliveries: consumed by each worker's sender process, never by its job threads."""
        return self.webhook_queue_name or f"{self.queue_name}-webhooks"

    @property
    def served_sizes(self) -> list[Size]:
        """(height, width) pairs; the first is the default."""
        return parse_sizes(self.image_sizes)

    @property
    def input_pixel_cap(self) -> int:
        """The most pixels an input image may be decoded to (SDXL_MAX_INPUT_PIXELS, or 4x the largest served)."""
        return self.max_input_pixels or 4 * max(h * w for h, w in self.served_sizes)

    @property
    def bucket_sizes(self) -> list[Size]:
        """The aspect-ratio buckets, (height, width) pairs."""
        return parse_sizes(self.aspect_buckets)

    def public_url(self, path: str) -> str:
        """An absolute URL of the API's for clients (status_url, webhooks): built on public_base_url, never on a
        request's Host header, which any client may set."""
        return self.public_base_url.rstrip("/") + path

    def signing_key(self) -> bytes:
        if self.url_signing_secret is None or len(self.url_signing_secret.get_secret_value()) < 16:
            raise ValueError(
                "SDXL_URL_SIGNING_SECRET must be set (16+ characters) to sign local-storage URLs, "
                "e.g. SDXL_URL_SIGNING_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return self.url_signing_secret.get_secret_value().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()


def parse_controlnets(value: str, setting: str = "SDXL_CONTROLNETS") -> dict[str, str]:
    """'canny=/models/cn-canny,depth=/models/cn-depth' -> {name: spec}; ValueError naming the bad entry (and
    `setting`: SDXL_IP_ADAPTERS is read by the same rule)."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, spec = (part.strip() for part in entry.partition("="))
        if not sep or not name or not spec or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"{setting}: {entry!r} is not NAME=SPEC (a name of letters, digits, . _ -)")
        if name in out:
            raise ValueError(f"{setting}: {name!r} is named twice")
        out[name] = spec
    return out
