"""The job: what a client asks for, its status, and what comes back. Shared by the API and the worker."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, model_validator

from common.vocabulary import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_STRENGTH,
    LCM_MAX_STEPS,
    MAX_SEED,
    MAX_STEPS,
    REFINER_AESTHETIC_SCORE,
    REFINER_NEGATIVE_AESTHETIC_SCORE,
    REFINER_SWITCH_AT,
    OutputFormat,
    Scheduler,
    Spacing,
)

# Re-exported: the API's and the client's modules name them through the job they describe.
__all__ = ["LCM_MAX_STEPS", "MAX_SEED", "OutputFormat", "Scheduler", "Spacing"]


class JobStatus(StrEnum):
    queued = "queued"  # stored and on the queue; no worker has started it
    running = "running"  # in a device batch
    succeeded = "succeeded"  # images uploaded and recorded
    failed = "failed"  # ended with an error; `error` says why
    canceled = "canceled"  # stopped by the client; a running job's results were discarded


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
# Which status may follow which. running -> queued is a requeue (a worker gave the job back); running ->
# running is a new attempt (the message came back after a worker died mid-batch; attempts counts them);
# queued -> queued is a re-issue (the worker holding its message died before running it: a new message).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.queued, JobStatus.running, JobStatus.canceled, JobStatus.failed}),
    JobStatus.running: frozenset(
        {JobStatus.running, JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.queued}
    ),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.canceled: frozenset(),
}


def unicode_text(value: str) -> str:
    """Refuse a lone surrogate (JSON's "\\ud800" decodes to one): it is no Unicode text, cannot be written as
    UTF-8, and would fail later where the job is stored, encoded or written to a shard."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"has a lone surrogate ({value[exc.start]!r} at character {exc.start}): not Unicode text; "
            "send each character whole (a surrogate pair, or the character itself in UTF-8)"
        ) from None
    return value


# A string that must be valid Unicode: every text field of a request is one
Text = Annotated[str, AfterValidator(unicode_text)]


class RefinerRequest(BaseModel):
    """SDXL's ensemble of experts: the base model denoises down to `switch_at` of the noise, the refiner the rest."""

    model_config = {"extra": "forbid"}

    switch_at: float = Field(
        REFINER_SWITCH_AT,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description="The share of the noise the base removes before handing over (diffusers' denoising_end).",
    )
    aesthetic_score: float = Field(
        REFINER_AESTHETIC_SCORE, ge=0, le=10, allow_inf_nan=False, description="The refiner's conditioning."
    )
    negative_aesthetic_score: float = Field(
        REFINER_NEGATIVE_AESTHETIC_SCORE,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="Its conditioning for the unconditional row.",
    )


class LoraRequest(BaseModel):
    """A LoRA adapter for a job: its name in GET /v1/loras, and how strongly it applies."""

    model_config = {"extra": "forbid"}
    name: Text = Field(min_length=1, max_length=128, description="An adapter's name, as GET /v1/loras lists it.")
    scale: float = Field(
        1.0, ge=-4, le=4, allow_inf_nan=False, description="Its weight: 1 as trained, 0 off, negative to invert."
    )


class ControlPreprocess(StrEnum):
    """What the worker makes of a ControlNet's image before the ControlNet sees it."""

    none = "none"  # the image is the control map already (edges, depth, pose, ...), prepared by the client
    canny = "canny"  # the image is a picture: its canny edges (thresholds low_threshold, high_threshold) are the map


class ControlNetRequest(BaseModel):
    """A ControlNet for a job: its name in GET /v1/models `controlnets`, the control image, and how it applies."""

    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=128, description="A ControlNet's name, as GET /v1/models lists it.")
    image: str = Field(
        min_length=1,
        max_length=23_000_000,
        description="The control image, like init_image: base64, a data: URL, or this tenant's `inputs/...` key; "
        "resized to the job's size. A prepared map (edges, depth, pose) unless `preprocess` says otherwise.",
    )
    scale: float = Field(1.0, ge=0, le=4, allow_inf_nan=False, description="Its conditioning scale; 0: off.")
    start: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False, description="The share of the steps before it acts.")
    end: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="The share of the steps after which it stops.")
    preprocess: ControlPreprocess = Field(
        ControlPreprocess.none, description="`canny`: take the image's canny edges as the map (no model involved)."
    )
    low_threshold: float = Field(100, ge=0, le=2040, allow_inf_nan=False, description="canny's lower threshold.")
    high_threshold: float = Field(200, ge=0, le=2040, allow_inf_nan=False, description="canny's upper threshold.")

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetRequest:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not exceed high_threshold")
        return self


class IPAdapterRequest(BaseModel):
    """An IP-Adapter for a job: its name in GET /v1/models `ip_adapters`, the image prompt, and its scale."""

    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=128, description="An IP-Adapter's name, as GET /v1/models lists it.")
    image: str = Field(
        min_length=1,
        max_length=23_000_000,
        description="The image prompt, like init_image: base64, a data: URL, or this tenant's `inputs/...` key.",
    )
    scale: float = Field(
        1.0, ge=0, le=4, allow_inf_nan=False, description="How strongly the image steers the picture; 0: off."
    )


MAX_CONTROLNETS_PER_JOB = 4  # each runs on every step of its rows; more is rarely useful and costs each one


class JobRequest(BaseModel):
    """A text-to-image job. Limits that depend on the deployment (sizes, steps, images) are checked by
    `check_limits` against the settings."""

    model_config = {"extra": "forbid"}

    prompt: Text = Field(min_length=1, description="What to draw.")
    negative_prompt: Text | None = Field(
        None,
        description='What to avoid. Absent or null: none (zero embeddings on SDXL base, as diffusers does); "" is '
        "the empty string, encoded like any text.",
    )
    width: int | None = Field(
        None, description="Pixels; one of the served sizes (GET /v1/models). Absent: the first served size."
    )
    height: int | None = Field(
        None, description="Pixels; one of the served sizes (GET /v1/models). Absent: the first served size."
    )
    steps: int = Field(20, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance_scale: float = Field(
        5.0, ge=0, le=50, allow_inf_nan=False, description="Classifier-free guidance; <= 1 turns it off."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when absent; image i uses seed + i.")
    num_images: int = Field(1, ge=1, description="Images from this prompt, seeds seed..seed+n-1.")
    scheduler: Scheduler = Scheduler.euler
    timestep_spacing: Spacing | None = Field(
        None,
        description="Where the steps fall on the model's 1000 training timesteps. Absent: the model's scheduler "
        "config. `trailing` for SDXL-Turbo and SDXL-Lightning (with guidance_scale 0 and 1-8 steps).",
    )
    init_image: Text | None = Field(
        None,
        max_length=23_000_000,
        description="Image-to-image: a PNG, JPEG or WebP image as base64 or a data: URL, or the `inputs/...` key "
        "a previous job of this tenant answered with. Stored, and replaced by its key. Resized to width x height "
        "when they are given; otherwise its own size must be served.",
    )
    mask_image: Text | None = Field(
        None,
        max_length=23_000_000,
        description="Inpainting (with init_image): white (>= 128) where to generate, black where the image is kept; "
        "taken as grayscale and resized like init_image.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="With init_image: how much of the image is redrawn, the share of `steps` that run (the rest "
        "are skipped). Absent: 0.3, or 0.9999 with a mask (diffusers' defaults).",
    )
    refiner: RefinerRequest | None = Field(
        None,
        description="Finish with SDXL's refiner (where the deployment serves one, GET /v1/models): "
        '{"switch_at": 0.8} runs the last 20% of the steps on it. Not with init_image.',
    )
    model: Text | None = Field(
        None,
        max_length=128,
        description="Which served model (GET /v1/models `models`). Absent: the deployment's default, the first.",
    )
    loras: list[LoraRequest] = Field(
        [],
        description='LoRA adapters to apply, e.g. [{"name": "pixel-art", "scale": 0.8}] (GET /v1/loras); at most '
        "the deployment's max_loras_per_job. Rows with other adapters still share a batch: no compile, no wait.",
    )
    controlnets: list[ControlNetRequest] = Field(
        [],
        max_length=MAX_CONTROLNETS_PER_JOB,
        description='ControlNets, e.g. [{"name": "canny", "image": "<base64>", "scale": 0.7}] (GET /v1/models '
        "`controlnets`), several at once, each by name once. With text-to-image, image-to-image and inpainting; not "
        "with the refiner. Rows with other ControlNets, or none, still share a batch.",
    )
    ip_adapter: IPAdapterRequest | None = Field(
        None,
        description='An image prompt, e.g. {"name": "style", "image": "<base64>", "scale": 0.6} (GET /v1/models '
        "`ip_adapters`). With text-to-image, image-to-image and inpainting; not with the refiner. Rows with another "
        "IP-Adapter, or none, still share a batch.",
    )
    output_format: OutputFormat = OutputFormat.png
    preview: bool = Field(
        False,
        strict=True,  # true or false only: "yes" or 1 is a 422 naming the field, not a guess
        description="Every few steps (the deployment's SDXL_PREVIEW_EVERY_STEPS) the job's progress carries a "
        "small image of its current estimate: `progress.preview`, a WebP data URL at most 256 px on its long side.",
    )
    webhook_url: Text | None = Field(
        None, max_length=2000, description="Called (signed, Standard Webhooks) when the job ends."
    )


class LimitError(ValueError):
    """A request outside this deployment's limits; `field` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def with_size(request: JobRequest, sizes: list[tuple[int, int]]) -> JobRequest:
    """The request with width and height filled in where absent: the first served size, or with only one of
    them given, the first served size that has it. `sizes` are (height, width) pairs, the default first."""
    if request.width is not None and request.height is not None:
        return request
    for h, w in sizes:
        if request.width in (None, w) and request.height in (None, h):
            return request.model_copy(update={"width": w, "height": h})
    given, value = ("width", request.width) if request.width is not None else ("height", request.height)
    served = ", ".join(f"{w}x{h}" for h, w in sizes)
    raise LimitError(given, f"no served size has {given} {value}; served (width x height): {served}")


def check_limits(
    request: JobRequest, sizes: list[tuple[int, int]], max_steps: int, max_images: int, max_prompt_chars: int
) -> None:
    if request.width is None or request.height is None:
        request = with_size(request, sizes)
    if (request.height, request.width) not in sizes:
        served = ", ".join(f"{w}x{h} (width x height)" for h, w in sizes)
        field = "height" if any(w == request.width for _, w in sizes) else "width"
        raise LimitError(field, f"{request.width}x{request.height} is not served; choose one of: {served}")
    if request.steps > max_steps:
        raise LimitError("steps", f"at most {max_steps} here, got {request.steps}")
    if request.num_images > max_images:
        raise LimitError("num_images", f"at most {max_images} per job, got {request.num_images}")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name) or "") > max_prompt_chars:
            raise LimitError(name, f"at most {max_prompt_chars} characters")
    if request.init_image is None:
        for name in ("mask_image", "strength"):
            if getattr(request, name) is not None:
                raise LimitError(name, "needs init_image (image-to-image or inpainting)")
    else:
        strength = request.strength
        if strength is None:
            strength = DEFAULT_INPAINT_STRENGTH if request.mask_image is not None else DEFAULT_STRENGTH
        if min(int(request.steps * strength), request.steps) < 1:  # diffusers' get_timesteps: steps that run
            raise LimitError("strength", f"{strength} of {request.steps} steps runs none; raise strength or steps")
    if request.refiner is not None and request.init_image is not None:
        raise LimitError("refiner", "the refiner is not served with init_image; leave one of them out")
    if request.refiner is not None and request.controlnets:
        raise LimitError("refiner", "the refiner is not served with controlnets; leave one of them out")
    if request.refiner is not None and request.ip_adapter is not None:
        raise LimitError("refiner", "the refiner is not served with ip_adapter; leave one of them out")
    if request.scheduler is Scheduler.lcm and request.steps > LCM_MAX_STEPS:
        raise LimitError("steps", f"the lcm scheduler runs at most {LCM_MAX_STEPS} steps, got {request.steps}")
    if request.seed is not None and request.seed + request.num_images - 1 > MAX_SEED:
        raise LimitError("seed", f"seed + num_images - 1 must be at most {MAX_SEED}")


def images_of(request: JobRequest) -> list[tuple[str, str]]:
    """(field, value) of each image a request carries, the init image first, each field named as a job's 422 names
    it (`controlnets[0].image`); a mask without an init image is left out (check_limits refuses it, unread)."""
    given = [(name, getattr(request, name)) for name in ("init_image", "mask_image") if request.init_image is not None]
    given += [(f"controlnets[{i}].image", c.image) for i, c in enumerate(request.controlnets)]
    given += [("ip_adapter.image", request.ip_adapter.image)] if request.ip_adapter is not None else []
    return [(name, value) for name, value in given if value is not None]


def check_controlnets(request: JobRequest, served: list[str]) -> None:
    """The request's ControlNets against the deployment's (SDXL_CONTROLNETS): each served, each once."""
    names = [c.name for c in request.controlnets]
    for name in names:
        if name not in served:
            known = ", ".join(served) or "none (no SDXL_CONTROLNETS)"
            raise LimitError("controlnets", f"no ControlNet named {name!r}; served: {known}")
    if len(set(names)) != len(names):
        raise LimitError("controlnets", f"each ControlNet at most once per job, got {names}")


def check_ip_adapter(request: JobRequest, served: list[str]) -> None:
    """The request's IP-Adapter against the deployment's (SDXL_IP_ADAPTERS)."""
    if request.ip_adapter is not None and request.ip_adapter.name not in served:
        known = ", ".join(served) or "none (no SDXL_IP_ADAPTERS)"
        raise LimitError("ip_adapter", f"no IP-Adapter named {request.ip_adapter.name!r}; served: {known}")


class Progress(BaseModel):
    """How far a running job is: `step` of `steps` denoising steps done; with `preview: true` on the request,
    `preview` is the current estimate of its first image (a WebP data URL, at most 256 px; worker/loop/preview.py)
    on the reports that carry one."""

    step: int
    steps: int
    # left out of the JSON when absent: a report without one reads {"step", "steps"}, as before previews
    preview: str | None = Field(None, exclude_if=lambda v: v is None)


class RenderConditions(BaseModel):
    """What decides an image's bytes besides its request and its weights (ImageRecord.model_hash). The programs
    are deterministic, so two runs of one request with the same weights and equal conditions give the same bytes;
    a change in any of these may move pixels by a level (XLA fuses and orders reductions by batch shape, device
    and version: a rerun with another SDXL_BATCH_ROWS changed 40 of 52 images of a data set by one level)."""

    dtype: str  # the networks' compute dtype (SDXL_DTYPE)
    vae_dtype: str  # the VAE's (SDXL_VAE_DTYPE)
    quantize: str  # "none" or the weights' quantization (SDXL_QUANTIZE)
    attention: str  # the attention implementation, resolved (SDXL_ATTENTION)
    batch_rows: int  # rows every batch is padded to (SDXL_BATCH_ROWS)
    devices: int  # devices a batch is spread over
    platform: str  # JAX's platform: cpu, gpu, tpu (the stand-in engine: standin)
    device_kind: str  # e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"
    jax: str  # versions
    jaxlib: str


class ImageRecord(BaseModel):
    """One produced image, as stored in the job record (the URL is signed at each read)."""

    key: str
    seed: int
    width: int
    height: int
    sha256: str
    model: str = ""  # the model's name and weights hash: which weights made it
    model_hash: str = ""
    loras: list[dict] = []  # the adapters applied: name, scale, sha256
    conditions: RenderConditions | None = None  # None: recorded before conditions were


class Job(BaseModel):
    """A job record as kept in Redis."""

    id: str
    tenant: str = ""  # the tenant of the API key that submitted it
    status: JobStatus
    request: JobRequest  # with `seed` filled in
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    canceled_at: float | None = None
    error: str | None = None
    images: list[ImageRecord] = []
    truncated: bool = False  # the prompt or negative prompt was cut to the tokenizer's 77 tokens
    attempts: int = 0
    progress: Progress | None = None  # while running (and as it ended): the worker's last report
    # bumped each time the job's message is sent again because its worker died: a worker drops a message
    # older than the record's generation (the dead worker's own message, redelivered late)
    generation: int = 0
    lane: str = ""  # "" interactive, "bulk" a data set line (goes after interactive jobs)
    output_key: str | None = None  # where a data set line's image goes (else images/<id>/<index>.<ext>)
    dataset: dict | None = None  # a data set line's run, index and id
