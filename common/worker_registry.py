"""The fleet's workers in Redis: each one's heartbeat record, the jobs it holds, and the locks that pick the
worker that runs a fleet-wide chore (rq keeps the same in worker_registration.py). Keys: common/keys.py.

A worker rewrites its heartbeat ({P}:worker:<name>, a common/worker_status.py record) every period with a life
of three, and in the same transaction its name in {P}:workers scored by when that life ends: a worker is live
while its score is in the future, readable or not. Live workers are read from that sorted set, O(log n + live
workers) a call, never by a SCAN of the keyspace (a SCAN is O(keys in the database): at 300k keys a /readyz
cost 3,861 SCAN calls, and /readyz and /metrics are anonymous). Lapsed names are trimmed by each beat.
A worker notes each job it takes off the queue in {P}:held:<name> and drops it once the job's message is
answered; when its heartbeat lapses, the sweep sends its held jobs again at once (worker/sweeper.py). The held
sets are found through {P}:holders, the workers that have held any, written with each hold: no SCAN either.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import redis

from common.keys import Keys
from common.worker_status import WorkerStatus

# Both read Redis' clock, not the callers': a worker's and an API's clocks may disagree by more than a life.
_BEAT = """
-- KEYS: 1 the worker's heartbeat record, 2 the live set
-- ARGV: 1 the record (JSON), 2 its life in ms, 3 the worker's name
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)  -- the lapsed: whoever beats trims them
return 1
"""

_LIVE = """
-- KEYS: 1 the live set
-- ARGV: none
-- Returns the names whose heartbeat has not lapsed.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf')
"""


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl"):
        self._r = client
        self.keys = Keys(prefix)
        self._beat = client.register_script(_BEAT)
        self._live = client.register_script(_LIVE)

    # ------------------------------------------------------------------ heartbeats

    def beat(self, status: WorkerStatus, ttl_s: float) -> None:
        """Write a worker's record; it lapses `ttl_s` after this unless written again."""
        self._beat(
            keys=[self.keys.worker(status.name), self.keys.workers],
            args=[status.to_json(), max(1, int(1000 * ttl_s)), status.name],
        )

    def status(self, name: str) -> WorkerStatus | None:
        raw = self._r.get(self.keys.worker(name))
        return WorkerStatus.from_json(raw) if raw is not None else None

    def live(self) -> list[WorkerStatus]:
        """The records of the workers whose heartbeat has not lapsed; one that is unreadable is skipped."""
        names = [self.keys.worker(name) for name in sorted(self.live_names())]
        out = []
        for raw in self._r.mget(names) if names else []:
            if raw is None:  # lapsed between the scan and the read
                continue
            try:
                out.append(WorkerStatus.from_json(raw))
            except (ValueError, TypeError):
                continue
        return out

    def live_names(self, pattern: str = "*") -> set[str]:
        """The workers whose heartbeat has not lapsed, readable or not; `pattern`: a glob on the names. One
        ZRANGEBYSCORE, O(log n + live workers)."""
        found = self._live(keys=[self.keys.workers])
        names = {_text(name) for name in found}
        return names if pattern == "*" else {n for n in names if fnmatch.fnmatchcase(n, pattern)}

    def forget(self, name: str) -> None:
        """A clean exit: the worker's heartbeat and held set go now (it holds nothing, and /readyz need not
        wait for the heartbeat to lapse)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self.keys.worker(name), self.keys.held(name))
        pipe.zrem(self.keys.workers, name)
        pipe.srem(self.keys.holders, name)
        pipe.execute()

    # ------------------------------------------------------------------ held jobs

    def hold(self, worker: str, job_id: str) -> None:
        """The worker has taken this job's message off the queue."""
        pipe = self._r.pipeline(transaction=True)  # both or neither: a held set the sweep cannot find is lost
        pipe.sadd(self.keys.held(worker), job_id)
        pipe.sadd(self.keys.holders, worker)
        pipe.execute()

    def release(self, worker: str, job_ids: Iterable[str]) -> None:
        """The worker has answered these jobs' messages (or given them back)."""
        job_ids = list(job_ids)
        if job_ids:
            self._r.srem(self.keys.held(worker), *job_ids)

    def held(self, worker: str) -> list[str]:
        """The jobs a worker holds, sorted."""
        return sorted(i.decode() for i in self._r.smembers(self.keys.held(worker)))

    def holders(self) -> list[str]:
        """The workers that have held jobs and were neither forgotten (a clean exit) nor dropped (the sweep, once
        their heartbeat lapsed), live or not, sorted; their held sets may be empty. One SMEMBERS, never a SCAN."""
        return sorted(_text(n) for n in self._r.smembers(self.keys.holders))

    def drop_held(self, worker: str) -> None:
        """Forget what a dead worker held (its jobs have been sent again)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self.keys.held(worker))
        pipe.srem(self.keys.holders, worker)
        pipe.execute()

    # ------------------------------------------------------------------ fleet-wide chores

    def take_sweep(self, owner: str, ttl_s: int) -> bool:
        """Whether `owner` runs this period's sweeps: nobody has in the last `ttl_s`."""
        return bool(self._r.set(self.keys.sweep_lock, owner, nx=True, ex=ttl_s))

    def take_image_sweep(self, owner: str, ttl_s: int) -> bool:
        """Whether `owner` runs this interval's image sweep: nobody has in the last `ttl_s`."""
        return bool(self._r.set(self.keys.image_sweep_lock, owner, nx=True, ex=ttl_s))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
