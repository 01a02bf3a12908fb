"""Celery's Redis transport (kombu's), made to survive Redis going away under a busy worker.

kombu puts a channel's delivered, unacknowledged messages back on their queue when the channel closes.
When the close comes from a lost connection (Redis killed or restarted), that restore needs a Redis client
the connection no longer has: it raises AttributeError ("'NoneType' object has no attribute 'hostname'"),
which Celery reports as "Unrecoverable error" and stops consuming, in a process that stays up. The chaos
run (bench/chaos.py) met it at a busy worker's first Redis outage (kombu 5.7, celery 5.7; kombu's issues
#582 and #970 show the same path). The restore would be wrong here even when it works: those messages'
tasks are still running in this process, waiting for their jobs (the device loop rides out the outage), so
putting them back would hand the jobs to a second worker.

Unacknowledged messages come back the documented ways instead: a dead worker's held jobs within seconds of
its heartbeat lapsing (worker/sweeper.py), anything else after the visibility timeout (common/queue.py).

The same run then met the second half: a task that ends after the reconnection acknowledges its message on
the channel it came from, which the lost connection has closed. The ack needs a Redis client, building one
reads the connection's address from the closed connection, and the AttributeError ("'NoneType' object has
no attribute 'client'") stops Celery the same way. The unacknowledged-message index is global in Redis, so
the ack is right on any connection: a channel keeps the parameters it was opened with and builds its client
from them once its connection has gone.

Selected by name in `make_celery` (`broker_transport`), so the broker URL stays `redis://`.

Under Sentinel (SDXL_REDIS_SENTINELS) the same channel sits on kombu's sentinel channel, which asks the sentinels
for the primary at every (re)connection, so Celery follows a failover. kombu reads the sentinels from a
`sentinel://a;sentinel://b` URL list, but on a connection error it moves to the next URL of that list and with it
to the scheme's own transport, which is kombu's, without the two mends above; so the URL names one sentinel and
the list travels in the transport option `sentinels` (common/redis_connection.py `broker`).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    do_restore = False  # read by kombu's QoS.restore_unacked_once, the restore at close (see above)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened_with = super()._connparams()  # while the connection is whole

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if getattr(self.connection, "client", None) is None and not asynchronous:
            return dict(self._opened_with)  # closed under us: an ack of a message received before (see above)
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "sentinels")
    sentinels: list[list[Any]] | None = None  # [[host, port], ...]: every sentinel (see above)

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)
        params = self._connparams(asynchronous)
        params.pop("host", None)
        params.pop("port", None)
        manager = redis.sentinel.Sentinel(
            [(host, int(port)) for host, port in self.sentinels],
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **params,
        )
        if asynchronous:  # kept, as kombu keeps its own, so that closing the transport closes its connections
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        return manager.master_for(self.master_name, redis.Redis).connection_pool


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
