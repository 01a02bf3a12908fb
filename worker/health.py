"""Container healthcheck: exit 0 when a worker on this host sent a heartbeat in the last 15 s.

python -m worker.health
"""

from __future__ import annotations

import socket
import sys

import redis

from common import redis_connection
from common.settings import get_settings
from common.worker_registry import WorkerRegistry


def main() -> int:
    settings = get_settings()
    client = redis_connection.sync_client(settings, socket_timeout=3, socket_connect_timeout=3)
    names = f"{socket.gethostname()}-*"  # worker names start with their host's (worker/main.py)
    try:
        alive = bool(WorkerRegistry(client, settings.key_prefix).live_names(names))
    except redis.exceptions.RedisError as exc:
        print(f"redis unreachable: {exc}", file=sys.stderr)
        return 1
    if not alive:
        print(f"no heartbeat from a worker named {names}", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
