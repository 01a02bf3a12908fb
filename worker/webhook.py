"""Delivering a job's webhook: one signed POST per try; the Celery task re-sends itself with backoff.

Delivery is at least once: a receiver may see an event twice (dedupe on `webhook-id`, which is the same on
every try of one event). Tries live in Redis as Celery messages, so a worker restart loses none.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import httpx

from common import webhooks
from common.job_store import JobStore
from common.jobs import TERMINAL
from common.settings import Settings

log = logging.getLogger(__name__)


def payload(settings: Settings, store: JobStore, job_id: str) -> tuple[str, bytes] | None:
    """(event id, body) for a job that ended and asked for a webhook; None otherwise."""
    job = store.get(job_id)
    if job is None or job.status not in TERMINAL or not job.request.webhook_url:
        return None
    event = {
        "type": f"job.{job.status.value}",
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {
            "id": job.id,
            "status": job.status.value,
            "error": job.error,
            "status_url": settings.public_url(f"/v1/jobs/{job.id}"),
        },
    }
    return f"{job.id}.{job.status.value}", json.dumps(event, separators=(",", ":")).encode()


def deliver(settings: Settings, store: JobStore, job_id: str) -> bool:
    """One try. True when delivered (2xx) or when there is nothing to deliver; False to try again."""
    made = payload(settings, store, job_id)
    if made is None or settings.webhook_secret is None:
        return True
    msg_id, body = made
    url = store.get(job_id).request.webhook_url
    try:
        webhooks.check_url(url, settings.webhook_allow_private)  # again: DNS may have changed since submit
    except webhooks.WebhookError as exc:
        log.warning("webhook for %s not sent: %s", job_id, exc)
        return True  # never retried: it would fail the same way
    signed = webhooks.headers(settings.webhook_secret.get_secret_value(), msg_id, body)
    try:
        response = httpx.post(url, content=body, headers=signed, timeout=settings.webhook_timeout_s)
    except httpx.HTTPError as exc:
        log.info("webhook for %s failed: %s", job_id, exc)
        return False
    return 200 <= response.status_code < 300
