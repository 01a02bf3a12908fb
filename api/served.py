"""What the deployment serves, as a job is checked against it: its models (SDXL_MODELS, and which of them live
workers hold, from their heartbeats); its adapters are checked by common/loras.py (`check`). Errors are LimitErrors
naming the field (a 422), raised before anything is stored."""

from __future__ import annotations

import threading
import time

from common.jobs import JobRequest, LimitError
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


def check_model(body: JobRequest, settings: Settings, served: ServedModels) -> None:
    """The job's model is one of the deployment's, and (while any worker is alive) one a live worker holds: a
    job for a model nobody serves would wait on the queue for ever. With no live worker at all, the job is
    queued, as any job is while workers start."""
    names = [e.name for e in settings.model_entries]
    name = body.model if body.model is not None else names[0]
    if name not in names:
        raise LimitError("model", f"no model named {name!r} here; served: {names} (GET /v1/models)")
    if body.refiner is not None and name != names[0]:
        raise LimitError("refiner", f"the refiner is served with the default model {names[0]!r} only")
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
