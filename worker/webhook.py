"""Delivering a job's webhook: one signed POST per try; the sender's Celery task (worker/webhook_sender.py) queues
the next try with backoff.

Delivery is at least once: a receiver may see an event twice (dedupe on `webhook-id`, which is the same on
every try of one event). Tries live in Redis as Celery messages, so a worker restart loses none.
"""

from __future__ import annotations

import json
import logging
import ssl
from datetime import UTC, datetime

import httpcore

from common import webhook_target, webhooks
from common.job_store import JobStore
from common.jobs import TERMINAL
from common.settings import Settings
from worker import webhook_post

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


def deliver(
    settings: Settings, store: JobStore, job_id: str, resolve: webhook_target.Resolver = webhook_target.system_resolver
) -> bool:
    """One try. True when delivered (2xx) or when there is nothing to deliver; False to try again. At most
    settings.webhook_timeout_s from the look-up to the last byte read, whatever the receiver does."""
    made = payload(settings, store, job_id)
    if made is None or settings.webhook_secret is None:
        return True
    msg_id, body = made
    url = store.get(job_id).request.webhook_url
    try:
        # again: DNS may have changed since submit. The one answer checked here is the address connected to.
        target = webhook_target.check_url(url, settings.webhook_allow_private, resolve)
    except webhook_target.WebhookError as exc:
        log.warning("webhook for %s not sent: %s", job_id, exc)
        return True  # never retried: it would fail the same way
    signed = webhooks.headers(settings.webhook_secret.get_secret_value(), msg_id, body)
    try:
        reply = webhook_post.post(target, body, signed, settings.webhook_timeout_s, settings.webhook_max_response_bytes)
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError, OSError) as exc:
        log.info("webhook for %s failed: %s", job_id, exc or type(exc).__name__)
        return False
    return 200 <= reply.status < 300
