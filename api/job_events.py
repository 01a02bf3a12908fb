"""Waiting for a job to end without polling: one Redis subscription per API process.

The job store publishes each interactive job's id on `P:ended` in the same script that writes its final
status (common/job_store.py). This keeps one pub/sub connection per API process and wakes the requests
waiting on that id (`Prefer: wait=N` on submit, `?wait_s=N` on a poll): a client hears of the end one round
trip after it happened instead of up to a poll interval later, and a waiting request costs Redis one read
when it starts and one when it is woken, not one per poll.

No end is missed: a waiter registers before it reads the job, and every waiter is woken to read again each
time the subscription is (re)established, so an end published while the connection was down is seen then.

The same subscription listens on `P:progress`, where a worker publishes a running job's id each time it
records the job's step: an event stream (GET /v1/jobs/{id}/events) `watch`es a job and is woken by either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import redis
import redis.asyncio as aioredis

from api import metrics
from common.jobs import TERMINAL, Job
from common.outage import Outage

log = logging.getLogger(__name__)
LISTEN_SLICE_S = 1.0  # how often the listener looks up from the socket (to ping when idle)
IDLE_PING_S = 15.0  # a silent subscription is pinged after this long; no answer in as long again: reconnect
FIRST_BACKOFF_S = 0.1  # before the first reconnect; doubles while Redis stays unreachable
MAX_BACKOFF_S = 5.0


class JobEvents:
    def __init__(
        self, connect: Callable[[str], aioredis.Redis], channel: str, progress_channel: str | None = None
    ) -> None:
        self.connect = connect  # a new client named as given (common/redis_connection.py async_client)
        self.channel = channel
        self.progress_channel = progress_channel
        self._watchers: dict[str, set[asyncio.Event]] = {}  # woken by an end or by progress
        self.client_name = f"api-events:{channel}"  # how the connection shows in CLIENT LIST
        self.subscribed = False  # True while the subscription is live (tests read it)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.outage = Outage("API job events: Redis", logger=log)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="job-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def until_ended(self, job_id: str, timeout_s: float, read: Callable[[], Awaitable[Job]]) -> Job:
        """The job as `read` returns it, once it has ended or `timeout_s` has passed, whichever is first.
        `read` is called at once (timeout 0: only then), after every wake-up, and once more at the deadline:
        the answer is always fresh."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with _registered(self._waiters, job_id) as event, metrics.WAITING.track_inprogress():
            while True:
                event.clear()  # before the read: an end published after it sets the event again
                job = await read()
                remaining = deadline - loop.time()
                if job.status in TERMINAL or remaining <= 0:
                    return job
                with suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)

    @asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job records progress or ends (and after every reconnect); clear it before
        reading the job, then wait on it."""
        with _registered(self._watchers, job_id) as event:
            yield event

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return sum(len(events) for events in self._waiters.values())

    def _wake(self, job_id: str, ended: bool = True) -> None:
        for event in self._waiters.get(job_id, ()) if ended else ():
            event.set()
        for event in self._watchers.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for table in (self._waiters, self._watchers):
            for events in table.values():
                for event in events:
                    event.set()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        backoff_s = FIRST_BACKOFF_S
        while True:
            client = self.connect(self.client_name)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*(c for c in (self.channel, self.progress_channel) if c))
                heard_s, pinged = loop.time(), False
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_SLICE_S)
                    now = loop.time()
                    if message is None:
                        if now - heard_s > 2 * IDLE_PING_S:
                            raise redis.ConnectionError(f"no answer to a ping in {IDLE_PING_S:g} s")
                        if now - heard_s > IDLE_PING_S and not pinged:
                            await pubsub.ping()
                            pinged = True
                        continue
                    heard_s, pinged = now, False
                    if message["type"] == "subscribe":  # also after redis-py reconnected by itself
                        self.subscribed, backoff_s = True, FIRST_BACKOFF_S
                        self.outage.ok()
                        self._wake_all()  # anything that ended while we were not listening is read again
                    elif message["type"] == "message":
                        self._wake(message["data"].decode(), ended=message["channel"].decode() == self.channel)
            except (redis.RedisError, OSError) as exc:
                self.outage.failed(exc)  # one line an outage (and one when it ends), not one per try
            finally:
                self.subscribed = False
                with suppress(Exception):
                    await pubsub.aclose()
                with suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)


@contextmanager
def _registered(table: dict[str, set[asyncio.Event]], job_id: str) -> Iterator[asyncio.Event]:
    """A new event in `table` under the job's id while inside; the id's entry goes with its last event."""
    event = asyncio.Event()
    table.setdefault(job_id, set()).add(event)
    try:
        yield event
    finally:
        events = table.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del table[job_id]
