"""Webhooks: Standard Webhooks signing (https://www.standardwebhooks.com).

Headers: `webhook-id` (unique per event), `webhook-timestamp` (unix seconds), `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the secret after its `whsec_` prefix,
base64-decoded). Receivers verify with any Standard Webhooks library, or `verify` below.

Where a webhook may go is common/webhook_target.py; how it is sent, worker/webhook_post.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    ts = int(now if now is not None else time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def verify(secret: str, got: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    ts = int(got["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = sign(secret, got["webhook-id"], ts, body).split(",", 1)[1]
    return any(hmac.compare_digest(expected, s.split(",", 1)[1]) for s in got["webhook-signature"].split() if "," in s)
