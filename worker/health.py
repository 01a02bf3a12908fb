"""Container healthcheck: exit 0 when a worker on this host sent a heartbeat in the last 15 s.

python -m worker.health
"""

from __future__ import annotations

import socket
import sys

import redis

from common import worker_status
from common.settings import get_settings


def main() -> int:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    pattern = worker_status.key(settings.key_prefix, f"{socket.gethostname()}-*")
    try:
        alive = any(True for _ in client.scan_iter(match=pattern, count=100))
    except redis.exceptions.RedisError as exc:
        print(f"redis unreachable: {exc}", file=sys.stderr)
        return 1
    if not alive:
        print(f"no heartbeat matching {pattern}", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
