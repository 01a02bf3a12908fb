"""The Celery application both sides share: the API sends `sdxl.generate` by name, the worker runs it.

Delivery settings, and why:
- acks_late: a message is acknowledged only after its job's result is recorded, so a worker that dies
  mid-batch leaves its messages unacknowledged and they are delivered again.
- prefetch multiplier 1: a worker reserves `concurrency` messages, no more: jobs wait in Redis where
  another worker can take them, not in a busy worker's buffer.
- a queue per model: a job's message goes to its model's queue in its lane (`generate_queue`: the lane's own,
  `queue_name` / `bulk_queue_name`, for the default model; `{queue_name}.{model}`, `{bulk_queue_name}.{model}`
  for the others), and a worker consumes the queues of the models it holds (`worker_queues`), so a job never
  reaches a worker without its model (a message from before model queues that does is sent on to its model's).
- queue order "priority": interactive jobs (`queue_name`'s) are always taken before data set lines
  (`bulk_queue_name`'s) when both wait.
- transport: kombu's Redis transport without its restore of unacknowledged messages at a channel's close,
  which stopped Celery for good at a busy worker's Redis outage (common/broker.py).
- broker: the same Redis as the job store, one server or the primary the sentinels name, over TLS with the URL's
  user and password where SDXL_REDIS_URL says so (common/redis_connection.py `broker`).
- visibility_timeout: how long Redis waits before redelivering an unacknowledged message. It must exceed
  the longest time a message can be held (buffering + one batch + upload), or a live worker's jobs are
  delivered twice; it also bounds how long a crashed worker's jobs wait (plus RESTORE_INTERVAL_S).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from common import redis_connection
from common.settings import Settings

TASK_GENERATE = "sdxl.generate"
TASK_WEBHOOK = "sdxl.webhook"
RESTORE_INTERVAL_S = 5


def make_celery(settings: Settings) -> Celery:
    url, sentinel_options, use_ssl = redis_connection.broker(settings)
    app = Celery("sdxl", broker=url)
    app.conf.update(
        # the Redis of SDXL_REDIS_URL, or the primary SDXL_REDIS_SENTINELS name (common/redis_connection.py)
        broker_transport="common.broker:SentinelTransport" if sentinel_options else "common.broker:Transport",
        broker_use_ssl=use_ssl,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results live in the job store, not in Celery's backend
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu looks for abandoned messages every interval x throttle seconds (100 s by default);
            # every 5 s bounds crash recovery at about visibility_timeout_s + 5 s. One cheap Redis call.
            "unacked_restore_interval": RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
            # A worker consuming several queues asks Redis for them in the order given (interactive, then
            # bulk) every time; kombu's default rotates the order, which would let bulk lines go first.
            "queue_order_strategy": "priority",
            **sentinel_options,
        },
        worker_hijack_root_logger=False,
        # On a lost broker connection, tasks in progress keep waiting for their jobs (the device loop rides out
        # the outage and records them; common/outage.py) instead of being cancelled; their messages are
        # acknowledged, or redelivered and dropped as ended. Said explicitly: Celery 6 changes the default.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def generate_queue(settings: Settings, model: str | None, lane: str = "") -> str:
    """The queue of a job's `sdxl.generate` message in its lane ("bulk": data set lines; else interactive): the
    lane's own for the deployment's default model (the first of SDXL_MODELS; a job without `model`), so a one-model
    deployment's queues keep their names (infra/k8s/keda.yaml scales on them); `{lane's}.{model}` for the others."""
    base = settings.bulk_queue_name if lane == "bulk" else settings.queue_name
    name = model or settings.model_entries[0].name
    return base if name == settings.model_entries[0].name else f"{base}.{name}"


def worker_queues(settings: Settings, models: Iterable[str]) -> list[str]:
    """The queues a worker holding `models` consumes, in priority order: per lane (interactive first, as
    SDXL_WORKER_LANES gives them), its models' queues. Webhooks travel on the lanes' own queue: the default model's
    workers deliver them."""
    held = list(models)
    return [generate_queue(settings, model, lane) for lane in settings.worker_lanes_list for model in held]
