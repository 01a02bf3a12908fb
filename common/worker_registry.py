"""The fleet's workers in Redis: each one's heartbeat record, the jobs it holds, and the locks that pick the
worker that runs a fleet-wide chore (rq keeps the same in worker_registration.py). Keys: common/keys.py.

A worker rewrites its heartbeat (P:worker:<name>, a common/worker_status.py record) every period with a life
of three: the key's existence is the worker's liveness, readable or not. It notes each job it takes off the
queue in P:held:<name> and drops it once the job's message is answered; when its heartbeat lapses, the sweep
sends its held jobs again at once (worker/sweeper.py). Live workers are found by a SCAN of the heartbeat
keys, O(keys in the database) a call, so they are read seldom: /readyz, a /metrics scrape, the API's model
check (at most every 2 s), one sweep per heartbeat period across the fleet.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from common.keys import Keys
from common.worker_status import WorkerStatus

SCAN_COUNT = 100  # keys SCAN looks at per call


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl"):
        self._r = client
        self.keys = Keys(prefix)

    # ------------------------------------------------------------------ heartbeats

    def beat(self, status: WorkerStatus, ttl_s: float) -> None:
        """Write a worker's record; it lapses `ttl_s` after this unless written again."""
        self._r.set(self.keys.worker(status.name), status.to_json(), px=int(1000 * ttl_s))

    def status(self, name: str) -> WorkerStatus | None:
        raw = self._r.get(self.keys.worker(name))
        return WorkerStatus.from_json(raw) if raw is not None else None

    def live(self) -> list[WorkerStatus]:
        """The records of the workers whose heartbeat has not lapsed; one that is unreadable is skipped."""
        names = list(self._r.scan_iter(match=self.keys.worker("*"), count=SCAN_COUNT))
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
        """The workers whose heartbeat key exists, readable or not; `pattern`: a glob on the names."""
        found = self._r.scan_iter(match=self.keys.worker(pattern), count=SCAN_COUNT)
        return {self.keys.worker_name(k) for k in found}

    def forget(self, name: str) -> None:
        """A clean exit: the worker's heartbeat and held set go now (it holds nothing, and /readyz need not
        wait for the heartbeat to lapse)."""
        self._r.delete(self.keys.worker(name), self.keys.held(name))

    # ------------------------------------------------------------------ held jobs

    def hold(self, worker: str, job_id: str) -> None:
        """The worker has taken this job's message off the queue."""
        self._r.sadd(self.keys.held(worker), job_id)

    def release(self, worker: str, job_ids: Iterable[str]) -> None:
        """The worker has answered these jobs' messages (or given them back)."""
        job_ids = list(job_ids)
        if job_ids:
            self._r.srem(self.keys.held(worker), *job_ids)

    def held(self, worker: str) -> list[str]:
        """The jobs a worker holds, sorted."""
        return sorted(i.decode() for i in self._r.smembers(self.keys.held(worker)))

    def holders(self) -> list[str]:
        """The workers that hold jobs, live or not."""
        found = self._r.scan_iter(match=self.keys.held("*"), count=SCAN_COUNT)
        return sorted({self.keys.held_worker(k) for k in found})

    def drop_held(self, worker: str) -> None:
        """Forget what a dead worker held (its jobs have been sent again)."""
        self._r.delete(self.keys.held(worker))

    # ------------------------------------------------------------------ fleet-wide chores

    def take_sweep(self, owner: str, ttl_s: int) -> bool:
        """Whether `owner` runs this period's sweeps: nobody has in the last `ttl_s`."""
        return bool(self._r.set(self.keys.sweep_lock, owner, nx=True, ex=ttl_s))

    def take_image_sweep(self, owner: str, ttl_s: int) -> bool:
        """Whether `owner` runs this interval's image sweep: nobody has in the last `ttl_s`."""
        return bool(self._r.set(self.keys.image_sweep_lock, owner, nx=True, ex=ttl_s))
