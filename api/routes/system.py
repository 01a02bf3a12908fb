"""What is served, and whether the service is alive and ready."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from api import metrics
from api.deps import ServicesDep, bearer
from api.schemas import LoraPublic, LorasPublic, ModelPublic, ServedModelPublic
from common.jobs import LCM_MAX_STEPS, OutputFormat, Scheduler, Spacing
from common.outage import REDIS_DOWN

router = APIRouter(tags=["system"])


@router.get("/v1/models", response_model=ModelPublic)
def models(services: ServicesDep) -> ModelPublic:
    """The served models (and which live workers hold them), sizes, schedulers and limits."""
    s = services.settings
    try:
        holders = services.served.served()
    except REDIS_DOWN:
        holders = {}  # Redis away: what is configured, without the workers
    entries = []
    for i, e in enumerate(s.model_entries):
        reported = [m for w in holders.get(e.name, []) for m in w.models if m.get("name") == e.name]
        entries.append(
            ServedModelPublic(
                name=e.name,
                source=e.spec,
                vae=e.vae or None,
                unet=e.unet or None,
                default=i == 0,
                workers=len(holders.get(e.name, [])),
                bytes=reported[0].get("bytes") if reported else None,
                weights_sha256=reported[0].get("weights_sha256") if reported else None,
            )
        )
    return ModelPublic(
        model=s.model_entries[0].name,
        models=entries,
        sizes=[{"width": w, "height": h} for h, w in s.served_sizes],
        schedulers=[x.value for x in Scheduler],
        timestep_spacings=[x.value for x in Spacing],
        refiner=s.refiner or None,
        controlnets=list(s.controlnet_specs),
        ip_adapters=list(s.ip_adapter_specs),
        options={
            "guidance_free": "guidance_scale <= 1 runs a program with one UNet row per image (half the work): what "
            "SDXL-Turbo (4 steps, trailing, guidance 0) and SDXL-Lightning (trailing euler) want",
            "euler_ancestral": "fresh noise at every step, drawn from the image's seed",
            "lcm": f"for latent consistency models (an LCM-distilled UNet or LCM-LoRA): 2-8 steps, at most "
            f"{LCM_MAX_STEPS}, guidance 1-2",
            "init_image": "image-to-image with `strength` (default 0.3): any model",
            "mask_image": "inpainting with init_image (default strength 0.9999): on a base model the image is kept "
            "outside the mask at every step; an inpainting model (9-channel UNet) is given the mask and masked image",
            "prediction_type": "epsilon, v_prediction or sample, from the served model's scheduler config",
            "model": "which of `models` runs the job (default: the first); batches are made per model",
            "loras": '[{"name": "pixel-art", "scale": 0.8}]: LoRA adapters from GET /v1/loras, applied per image (rows '
            "with other adapters share a batch)",
            "refiner": '{"switch_at": 0.8, "aesthetic_score": 6.0}: the last steps on the refiner (where one is '
            "served: `refiner` above), as diffusers' base + refiner ensemble",
            "controlnets": '[{"name": "canny", "image": "<base64>", "scale": 0.7, "start": 0, "end": 1}]: ControlNets '
            'from `controlnets` above, several at once; "preprocess": "canny" takes a picture\'s edges as the map '
            "(rows with other ControlNets, or none, share a batch)",
        },
        output_formats=[x.value for x in OutputFormat],
        limits={
            "max_steps": s.max_steps,
            "max_images_per_job": min(s.max_images_per_job, s.batch_rows),
            "max_prompt_chars": s.max_prompt_chars,
            "max_prompt_tokens": 77,
            "url_expiry_s": s.url_expiry_s,
            "job_ttl_s": s.job_ttl_s,
            "max_wait_s": s.max_wait_s,  # the longest `Prefer: wait=N` / `?wait_s=N` honoured
            "max_loras_per_job": s.max_loras_per_job,
            "lora_max_rank": s.lora_max_rank,
        },
    )


@router.get("/v1/loras", response_model=LorasPublic)
async def loras(services: ServicesDep) -> LorasPublic:
    """The LoRA adapters a job may name in `loras`: name, size, sha256, layout, what they touch and their rank."""
    good, bad = await run_in_threadpool(services.loras.list)
    s = services.settings
    return LorasPublic(
        loras=[LoraPublic(**a.public()) for a in good],
        unusable=bad,
        max_per_job=s.max_loras_per_job,
        max_rank=s.lora_max_rank,
    )


@router.get("/healthz")
def healthz() -> dict[str, bool]:
    """The API process is up."""
    return {"ok": True}


@router.get("/readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when Redis answers and at least one worker has sent a heartbeat in the last 15 s."""
    problems = []
    workers = 0
    try:
        workers = len(services.workers.live_names())
        if not workers:
            problems.append("no live worker")
    except Exception as exc:
        problems.append(f"redis unreachable: {type(exc).__name__}")
    body = {"ready": not problems, "workers": workers, "problems": problems}
    return JSONResponse(status_code=503 if problems else 200, content=body)


@router.get("/metrics", response_class=Response, responses={200: {"content": {metrics.CONTENT_TYPE: {}}}})
async def prometheus_metrics(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Response:
    """Queue, workers and devices in Prometheus' text format (with SDXL_METRICS_KEY set, only for that key)."""
    key = services.settings.metrics_key
    if key is not None:
        given = credentials.credentials.strip().encode() if credentials is not None else b""
        if not hmac.compare_digest(given, key.get_secret_value().encode()):
            raise HTTPException(
                401, "send `Authorization: Bearer <SDXL_METRICS_KEY>`", headers={"WWW-Authenticate": "Bearer"}
            )
    redis_up = True
    try:
        services.metrics_figures = await run_in_threadpool(
            metrics.read, services.store, services.datasets, services.workers
        )
    except REDIS_DOWN:
        redis_up = False  # the last figures read, marked stale: the page answers during an outage
    text = metrics.render(services.metrics_figures, redis_up)
    return Response(text, media_type=metrics.CONTENT_TYPE)
