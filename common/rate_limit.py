"""A fixed-window request counter per API key: one INCR (and an EXPIRE on the first hit) per request, on
P:rate:<kind>:<key id>:<window> (common/keys.py)."""

from __future__ import annotations

import time

import redis

from common.keys import Keys


class RateLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl"):
        self._r = client
        self.keys = Keys(prefix)

    def hit(self, kind: str, key_id: str, limit: int, window_s: int = 60) -> int | None:
        """Count a request of `kind` (read, write) by an API key; None when allowed, else the seconds until the
        window resets (for Retry-After)."""
        now = time.time()
        window = int(now // window_s)
        counter = self.keys.rate_window(kind, key_id, window)
        pipe = self._r.pipeline(transaction=True)
        pipe.incr(counter)
        pipe.expire(counter, window_s + 1)
        count, _ = pipe.execute()
        if count <= limit:
            return None
        return max(1, int((window + 1) * window_s - now) + 1)
