"""What the deployment serves, as a job is checked against it: its models (SDXL_MODELS, and which of them live
workers hold, from their heartbeats); its adapters are checked by common/loras.py (`check`). Errors are LimitErrors
naming the field (a 422), raised before anything is stored."""

from __future__ import annotations

import threading
import time

from common import loras
from common.jobs import JobRequest, LimitError, check_controlnets, check_ip_adapter
from common.loras import Registry
from common.outage import REDIS_DOWN
from common.settings import Settings
from common.worker_registry import WorkerRegistry
from common.worker_status import WorkerStatus

WORKERS_FRESH_S = 2.0  # how long one read of the heartbeats answers for (a submit does not scan Redis each time)


class ServedModels:
    """Which models live workers serve, from their heartbeats, read at most every WORKERS_FRESH_S."""

    def __init__(self, registry: WorkerRegistry):
        self.registry = registry
        self._lock = threading.Lock()
        self._at = -WORKERS_FRESH_S
        self._workers: list[WorkerStatus] = []

    def workers(self) -> list[WorkerStatus]:
        with self._lock:
            if time.monotonic() - self._at >= WORKERS_FRESH_S:
                self._workers = self.registry.live()
                self._at = time.monotonic()
            return self._workers

    def served(self) -> dict[str, list[WorkerStatus]]:
        """model name -> the live workers that hold it."""
        out: dict[str, list[WorkerStatus]] = {}
        for w in self.workers():
            for m in w.models or [{"name": w.model}]:
                out.setdefault(m["name"], []).append(w)
        return out


def check_model(body: JobRequest, settings: Settings, served: ServedModels | None) -> None:
    """The job's model is one of the deployment's, and (while any worker is alive) one a live worker holds: a
    job for a model nobody serves would wait on the queue for ever. With no live worker at all, the job is
    queued, as any job is while workers start. served None: the heartbeats are not read (no Redis at hand)."""
    names = [e.name for e in settings.model_entries]
    name = body.model if body.model is not None else names[0]
    if name not in names:
        raise LimitError("model", f"no model named {name!r} here; served: {names} (GET /v1/models)")
    if body.refiner is not None and name != names[0]:
        raise LimitError("refiner", f"the refiner is served with the default model {names[0]!r} only")
    if served is None:
        return
    try:
        holders = served.served()
    except REDIS_DOWN:
        return  # Redis away: the store refuses the job next, with the outage's own answer
    if holders and name not in holders:
        raise LimitError(
            "model",
            f"no live worker serves model {name!r} (its weights did not fit in any worker's "
            f"SDXL_MODEL_MEMORY_BYTES); live workers serve {sorted(holders)}",
        )


def check_request(body: JobRequest, settings: Settings, served: ServedModels | None, registry: Registry) -> None:
    """What the deployment serves, for one request: the refiner, the model (check_model), the LoRA adapters, the
    ControlNets and the IP-Adapter. One function for a job (api/job_service.py `submit`) and each data set line
    (api/dataset_ingest.py), so that a line is refused for what a job is, with the same field and reason."""
    if body.refiner is not None and not settings.refiner:
        raise LimitError("refiner", "this deployment serves no refiner (SDXL_REFINER); leave `refiner` out")
    check_model(body, settings, served)
    loras.check(body.loras, registry, settings.max_loras_per_job, settings.lora_max_rank)
    default = settings.model_entries[0].name
    check_controlnets(body, list(settings.controlnet_specs))
    if body.controlnets and body.model not in (None, default):
        raise LimitError("controlnets", "ControlNets are served with the default model only; leave `model` out")
    check_ip_adapter(body, list(settings.ip_adapter_specs))
    if body.ip_adapter is not None and body.model not in (None, default):
        raise LimitError("ip_adapter", "IP-Adapters are served with the default model only; leave `model` out")
