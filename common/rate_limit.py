"""A fixed-window request counter per API key: one INCR (and an EXPIRE on the first hit) per request."""

from __future__ import annotations

import time

import redis


def hit(client: redis.Redis, key: str, limit: int, window_s: int = 60) -> int | None:
    """Count a request; None when allowed, else the seconds until the window resets (for Retry-After)."""
    now = time.time()
    window = int(now // window_s)
    counter = f"{key}:{window}"
    pipe = client.pipeline()
    pipe.incr(counter)
    pipe.expire(counter, window_s + 1)
    count, _ = pipe.execute()
    if count <= limit:
        return None
    return max(1, int((window + 1) * window_s - now) + 1)
