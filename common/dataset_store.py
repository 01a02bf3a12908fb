"""Data set runs in Redis: a run's counters and the few bounded structures its feeder works through.

The keys ({P}:dataset:R and its parts, the active list, a tenant's recent runs, idempotency keys) are listed
and built in common/keys.py; every key a script touches is passed to it in KEYS.
Nothing grows with the size of the input: lines live in object storage and come in one chunk at a time.
Every change the feeder makes is a compare-and-set script, so two feeders (a lock that expired under a
paused worker) cannot feed a line twice, count a line twice or write a shard's rows twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.commands.core import Script

from common.datasets import DatasetOptions, DatasetStatus
from common.job_store import page
from common.keys import Keys

RATE_SAMPLE_S = 5.0  # one images/s sample per 5 s, the last 60 kept: the rate is over the last ~5 minutes
RATE_SAMPLES = 60

# The line is recorded as in flight only if it is still the next one to feed.
_FEED = """
-- KEYS: 1 run hash, 2 inflight hash, 3 retry list
-- ARGV: 1 line index, 2 job id, 3 "cursor" | "retry" (where the line came from), 4 now
-- Returns 1 when recorded, 0 when another feeder moved on meanwhile.
if ARGV[3] == 'cursor' then
  if tonumber(redis.call('HGET', KEYS[1], 'cursor')) ~= tonumber(ARGV[1]) then return 0 end
  redis.call('HSET', KEYS[1], 'cursor', tonumber(ARGV[1]) + 1)
else
  if redis.call('LINDEX', KEYS[3], 0) ~= ARGV[1] then return 0 end
  redis.call('LPOP', KEYS[3])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
return 1
"""

# Only the first reap of a line counts (HDEL says whether it was still in flight).
_REAP = """
-- KEYS: 1 run hash, 2 inflight hash, 3 done list, 4 failed hash, 5 the line's job hash, 6 rows hash,
--       7 canceled hash
-- ARGV: 1 line index, 2 outcome (succeeded | failed | canceled), 3 payload JSON, 4 order (input | completion)
-- Returns 1 when reaped, 0 when it was reaped before.
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'succeeded' then
  if ARGV[4] == 'input' then
    redis.call('HSET', KEYS[6], ARGV[1], ARGV[3])
  else
    redis.call('RPUSH', KEYS[3], ARGV[3])
  end
  redis.call('HINCRBY', KEYS[1], 'succeeded', 1)
elseif ARGV[2] == 'failed' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
else
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'canceled', 1)
end
redis.call('DEL', KEYS[5])
return 1
"""

# Commits a written shard exactly once.
_SHARD = """
-- KEYS: 1 run hash, 2 done list
-- ARGV: 1 shard index, 2 rows written
-- Returns 1 when committed, 0 when that shard was committed before.
if tonumber(redis.call('HGET', KEYS[1], 'shards')) ~= tonumber(ARGV[1]) then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
redis.call('HINCRBY', KEYS[1], 'shards', 1)
redis.call('HINCRBY', KEYS[1], 'sharded', tonumber(ARGV[2]))
return 1
"""

# Input order: commits a window exactly once.
_SHARD_INPUT = """
-- KEYS: 1 run hash, 2 rows hash
-- ARGV: 1 the window expected, 2 the next window, 3 the shard index (-1: a window with no row to write),
--       4.. the line indices written
-- Returns 1 when committed, 0 when that window was committed before.
if tonumber(redis.call('HGET', KEYS[1], 'window') or '0') ~= tonumber(ARGV[1]) then return 0 end
if tonumber(ARGV[3]) >= 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'shards')) ~= tonumber(ARGV[3]) then return 0 end
  for i = 4, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
  redis.call('HINCRBY', KEYS[1], 'shards', 1)
  redis.call('HINCRBY', KEYS[1], 'sharded', #ARGV - 3)
end
redis.call('HSET', KEYS[1], 'window', ARGV[2])
return 1
"""

# A tenant's runs in the active list, for the scripts that apply the per-tenant cap (registered in front of
# them). The runs' hashes are read, so they come in KEYS: the caller reads the list first and passes its ids
# (ARGV) and their hashes (KEYS from `first`); a list that changed since is answered nil, and the caller
# reads it again. O(active runs), which that cap keeps small.
_ACTIVE_RUNS = """
-- KEYS[active]: the active list; KEYS[first..]: the hashes of the runs the caller read from it, in its order
-- ARGV: the caller's; `snapshot` is the slot that holds those runs' ids as a JSON list
-- Returns the tenant's runs among them, or nil when the list is not what the caller read.
local function active_runs(active, snapshot, first, tenant)
  local ids = redis.call('LRANGE', KEYS[active], 0, -1)
  local expected = cjson.decode(snapshot)
  if #ids ~= #expected or #KEYS - first + 1 ~= #ids then return nil end
  local n = 0
  for i, id in ipairs(ids) do
    if id ~= expected[i] then return nil end
    if redis.call('HGET', KEYS[first + i - 1], 'tenant') == tenant then n = n + 1 end
  end
  return n
end

-- The images not yet ended in the tenant's active runs (their hashes KEYS[first..], checked by active_runs).
local function pending_images(first, tenant)
  local n = 0
  for i = first, #KEYS do
    local run = redis.call('HMGET', KEYS[i], 'tenant', 'total', 'succeeded', 'failed', 'canceled')
    if run[1] == tenant then
      n = n + tonumber(run[2] or 0) - tonumber(run[3] or 0) - tonumber(run[4] or 0) - tonumber(run[5] or 0)
    end
  end
  return n
end
"""

_CREATE = """
-- KEYS: 1 run hash, 2 the tenant's recent set, 3 active list, 4.. the active runs' hashes (_ACTIVE_RUNS)
-- ARGV: 1 run id, 2 now, 3 tenant, 4 the tenant's cap of active runs (0: none), 5 the tenant's cap of images
--       not yet ended in its active runs, this run's included (0: none), 6 the active runs' ids (JSON),
--       7.. the run's fields as name, value pairs (`total` among them)
-- Returns the tenant's active runs before the call, negated when the cap refused this one (nothing stored);
-- {'images', pending} when the image cap did (nothing stored); nil when the active list changed since the
-- caller read it (nothing stored).
local before = active_runs(3, ARGV[6], 4, ARGV[3])
if not before then return nil end
local cap = tonumber(ARGV[4])
if cap > 0 and before >= cap then return -before end
local image_cap = tonumber(ARGV[5])
if image_cap > 0 then
  local pending = pending_images(4, ARGV[3])
  local total = 0
  for i = 7, #ARGV, 2 do if ARGV[i] == 'total' then total = tonumber(ARGV[i + 1]) end end
  if pending + total > image_cap then return {'images', pending} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
return before
"""

# Failed lines go back to be fed; a run that had ended becomes active again, which the cap counts.
_RETRY = """
-- KEYS: 1 run hash, 2 failed hash, 3 retry list, 4 active list, 5.. the active runs' hashes (_ACTIVE_RUNS)
-- ARGV: 1 run id, 2 the tenant's cap of active runs (0: none), 3 the active runs' ids (JSON)
-- Returns the lines retried; -1: no such run; -2: being canceled; -3: the tenant's cap; nil: the active
-- list changed since the caller read it (nothing changed).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'canceling' then return -2 end
local indices = redis.call('HKEYS', KEYS[2])
if #indices == 0 then return 0 end
local cap = tonumber(ARGV[2])
if status ~= 'running' and cap > 0 then
  local active = active_runs(4, ARGV[3], 5, redis.call('HGET', KEYS[1], 'tenant'))
  if not active then return nil end
  if active >= cap then return -3 end
end
table.sort(indices, function(a, b) return tonumber(a) < tonumber(b) end)
for _, i in ipairs(indices) do redis.call('RPUSH', KEYS[3], i) end
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'failed', -#indices)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HDEL', KEYS[1], 'finished_at')
if status ~= 'running' then
  redis.call('LREM', KEYS[4], 0, ARGV[1])
  redis.call('RPUSH', KEYS[4], ARGV[1])
end
return #indices
"""

# A canceled run's canceled lines go back to be fed (same ids, same seeds): those canceled once fed through
# the retry list, the never-fed range by moving the cursor back to it.
_RESUME = """
-- KEYS: 1 run hash, 2 canceled hash, 3 retry list, 4 active list, 5.. the active runs' hashes (_ACTIVE_RUNS)
-- ARGV: 1 run id, 2 the tenant's cap of active runs (0: none), 3 the active runs' ids (JSON)
-- Returns the lines resumed; -1: no such run; -2: not a canceled run; -3: the tenant's cap; nil: the active
-- list changed since the caller read it (nothing changed).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'canceled' then return -2 end
local cap = tonumber(ARGV[2])
if cap > 0 then
  local active = active_runs(4, ARGV[3], 5, redis.call('HGET', KEYS[1], 'tenant'))
  if not active then return nil end
  if active >= cap then return -3 end
end
local indices = redis.call('HKEYS', KEYS[2])
table.sort(indices, function(a, b) return tonumber(a) < tonumber(b) end)
for _, i in ipairs(indices) do redis.call('RPUSH', KEYS[3], i) end
redis.call('DEL', KEYS[2])
local n = #indices
local from = redis.call('HGET', KEYS[1], 'resume_from')
if from then
  n = n + tonumber(redis.call('HGET', KEYS[1], 'total')) - tonumber(from)
  redis.call('HSET', KEYS[1], 'cursor', from)
  redis.call('HDEL', KEYS[1], 'resume_from')
end
if n == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'canceled', -n)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HDEL', KEYS[1], 'finished_at', 'canceled_at')
redis.call('LREM', KEYS[4], 0, ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[1])
return n
"""

_FINISH = """
-- KEYS: 1 run hash, 2 retry list, 3 inflight hash, 4 active list, 5.. what the finished run keeps until it
--       expires, the run hash among them (RunKeys.kept)
-- ARGV: 1 expected status, 2 new status, 3 now, 4 run id, 5 ttl
-- Returns 1 when finished, 0 when the run is not `expected` or still has lines to feed.
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if redis.call('LLEN', KEYS[2]) > 0 or redis.call('HLEN', KEYS[3]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
redis.call('LREM', KEYS[4], 0, ARGV[4])
for i = 5, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return 1
"""

# Give up on a run whatever is in flight: its lines' jobs end on their own, and nobody reaps them.
_FAIL = """
-- KEYS: 1 run hash, 2 active list, 3.. what the finished run keeps until it expires (RunKeys.kept)
-- ARGV: 1 now, 2 run id, 3 ttl, 4 the error (JSON string)
-- Returns 1 when failed, 0 when the run had already finished (or is gone).
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'canceling' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[4])
redis.call('LREM', KEYS[2], 0, ARGV[2])
for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

# Take the lock, or extend it if already ours.
_LOCK = """
-- KEYS: 1 lock
-- ARGV: 1 owner, 2 ttl ms
-- Returns 1 when the lock is ours.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""


class TooManyRuns(Exception):
    """The tenant already has its cap of active runs; nothing was stored."""

    def __init__(self, active: int):
        super().__init__(active)
        self.active = active


class TooManyImages(Exception):
    """The tenant's active runs have `pending` images not yet ended: with this run's, over its cap; nothing was
    stored."""

    def __init__(self, pending: int):
        super().__init__(pending)
        self.pending = pending


COUNTERS = ("total", "skipped", "cursor", "succeeded", "failed", "canceled", "shards", "sharded", "retries")
LATER_COUNTERS = ("window",)  # absent from runs stored by an older version: 0


@dataclass
class DatasetRun:
    id: str
    tenant: str
    status: DatasetStatus
    options: DatasetOptions
    seed: int
    total: int  # valid lines: each is one image
    skipped: int  # invalid lines left out (on_invalid=skip)
    cursor: int  # lines fed so far, in order
    succeeded: int
    failed: int
    canceled: int
    shards: int
    sharded: int  # rows already written to shards
    retries: int
    created_at: float
    window: int = 0  # input order: the first line of the next shard's window
    started_at: float | None = None
    finished_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a failed run: why its feeder gave up

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.canceled


class DatasetStore:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl", ttl_s: int = 7 * 24 * 3600):
        self._r = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s  # how long a finished run's record lives
        self._feed = client.register_script(_FEED)
        self._reap = client.register_script(_REAP)
        self._shard = client.register_script(_SHARD)
        self._shard_input = client.register_script(_SHARD_INPUT)
        self._resume = client.register_script(_ACTIVE_RUNS + _RESUME)
        self._retry = client.register_script(_ACTIVE_RUNS + _RETRY)
        self._lock = client.register_script(_LOCK)
        self._finish = client.register_script(_FINISH)
        self._fail = client.register_script(_FAIL)
        self._create = client.register_script(_ACTIVE_RUNS + _CREATE)

    def _capped(self, script: Script, keys: list[str], args: list[Any], snapshot_at: int) -> Any:
        """Run a script that counts the tenant's active runs (_ACTIVE_RUNS): the active list is read here and
        its runs' hashes passed in KEYS, their ids in ARGV at `snapshot_at`; read again while the list changes
        between the read and the script (the script then changes nothing)."""
        while True:
            ids = self.active()
            hashes = [self.keys.run(i).record for i in ids]
            answer = script(keys=[*keys, *hashes], args=[*args[:snapshot_at], json.dumps(ids), *args[snapshot_at:]])
            if answer is not None:
                return answer

    # ------------------------------------------------------------------ the API's side

    def create(
        self,
        run_id: str,
        tenant: str,
        options: DatasetOptions,
        seed: int,
        total: int,
        skipped: int,
        max_active: int = 0,
        max_images: int = 0,
        **extra: Any,
    ) -> None:
        """Store a new running run. With `max_active` (> 0) and that many of the tenant's runs active already,
        raises TooManyRuns and stores nothing; with `max_images` (> 0) and the images not yet ended in its active
        runs plus this run's `total` over it, TooManyImages. Counted and stored in one script, so concurrent
        creates cannot all pass."""
        now = time.time()
        fields = {
            "id": run_id,
            "tenant": tenant,
            "status": DatasetStatus.running.value,
            "options": options.model_dump_json(),
            "seed": seed,
            "total": total,
            "skipped": skipped,
            "cursor": 0,
            "succeeded": 0,
            "failed": 0,
            "canceled": 0,
            "shards": 0,
            "sharded": 0,
            "retries": 0,
            "created_at": now,
            "extra": json.dumps(extra),
        }
        keys = [self.keys.run(run_id).record, self.keys.datasets_recent(tenant), self.keys.datasets_active]
        pairs = [str(v) for kv in fields.items() for v in kv]
        answer = self._capped(self._create, keys, [run_id, now, tenant, max_active, max_images, *pairs], snapshot_at=5)
        if isinstance(answer, list):
            raise TooManyImages(int(answer[1]))
        before = int(answer)
        if before < 0:
            raise TooManyRuns(-before)

    def active_count(self, tenant: str) -> int:
        """The tenant's runs that are being fed (running, canceling, or retried), counted as the caps count
        (a read for a first check: the caps are applied again, atomically, by the scripts that store)."""
        ids = self.active()
        pipe = self._r.pipeline(transaction=False)
        for run_id in ids:
            pipe.hget(self.keys.run(run_id).record, "tenant")
        return sum(1 for t in pipe.execute() if t is not None and t.decode() == tenant) if ids else 0

    def claim_idempotency(self, tenant: str, key_hash: str, run_id: str, fingerprint: str) -> tuple[str, str]:
        """(run id, fingerprint) stored under the key: ours if it was free, else the earlier run's."""
        k = self.keys.dataset_idempotency(tenant, key_hash)
        if self._r.set(k, json.dumps([run_id, fingerprint]), nx=True, ex=self.ttl_s):
            return run_id, fingerprint
        found = json.loads(self._r.get(k) or json.dumps([run_id, fingerprint]))
        return found[0], found[1]

    def idempotent_run(self, tenant: str, key_hash: str) -> tuple[str, str] | None:
        """(run id, fingerprint) an Idempotency-Key made, if any."""
        found = self._r.get(self.keys.dataset_idempotency(tenant, key_hash))
        return tuple(json.loads(found)) if found else None  # type: ignore[return-value]

    def release_idempotency(self, tenant: str, key_hash: str) -> None:
        self._r.delete(self.keys.dataset_idempotency(tenant, key_hash))

    def cancel(self, run_id: str) -> DatasetStatus | None:
        """running -> canceling; returns the status before (None: no such run)."""
        record = self.keys.run(run_id).record
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(record)
                    raw = pipe.hget(record, "status")
                    if raw is None:
                        return None
                    before = DatasetStatus(raw.decode())
                    pipe.multi()
                    if before == DatasetStatus.running:
                        pipe.hset(record, mapping={"status": DatasetStatus.canceling.value, "canceled_at": time.time()})
                    pipe.execute()
                    return before
                except redis.WatchError:
                    continue

    def retry(self, run_id: str, max_active: int = 0) -> int:
        """Failed lines go back to be fed; returns how many (-1: no such run, -2: the run is being canceled,
        -3: it had ended and its tenant already has `max_active` active runs)."""
        k = self.keys.run(run_id)
        keys = [k.record, k.failed, k.retry, self.keys.datasets_active]
        count = int(self._capped(self._retry, keys, [run_id, max_active], snapshot_at=2))
        if count > 0:
            self._r.persist(k.record)  # it had been given its expiry when it finished
        return count

    def resume(self, run_id: str, max_active: int = 0) -> int:
        """A canceled run's canceled lines go back to be fed, with their seeds; returns how many (-1: no such
        run, -2: the run is not canceled, -3: its tenant already has `max_active` active runs)."""
        k = self.keys.run(run_id)
        keys = [k.record, k.canceled, k.retry, self.keys.datasets_active]
        count = int(self._capped(self._resume, keys, [run_id, max_active], snapshot_at=2))
        if count > 0:
            for key in (k.record, k.rows, k.failed):
                self._r.persist(key)  # they had been given their expiry when it finished
        return count

    def recent(self, tenant: str, offset: int, limit: int) -> tuple[list[DatasetRun], int]:
        return page(self._r, self.keys.datasets_recent(tenant), offset, limit, self.get)

    # ------------------------------------------------------------------ reading

    def get(self, run_id: str) -> DatasetRun | None:
        raw = self._r.hgetall(self.keys.run(run_id).record)
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}

        def opt(name: str) -> float | None:
            return float(d[name]) if name in d else None

        return DatasetRun(
            id=d["id"],
            tenant=d["tenant"],
            status=DatasetStatus(d["status"]),
            options=DatasetOptions.model_validate_json(d["options"]),
            seed=int(d["seed"]),
            **{k: int(d[k]) for k in COUNTERS},
            **{k: int(d.get(k, 0)) for k in LATER_COUNTERS},
            created_at=float(d["created_at"]),
            started_at=opt("started_at"),
            finished_at=opt("finished_at"),
            extra=json.loads(d.get("extra", "{}")),
            error=d.get("error"),
        )

    def inflight(self, run_id: str) -> dict[int, str]:
        return {int(k): v.decode() for k, v in self._r.hgetall(self.keys.run(run_id).inflight).items()}

    def retry_pending(self, run_id: str) -> int:
        return int(self._r.llen(self.keys.run(run_id).retry))

    def failures(self, run_id: str) -> list[dict[str, Any]]:
        found = [json.loads(v) for v in self._r.hvals(self.keys.run(run_id).failed)]
        return sorted(found, key=lambda f: f["line"])

    def rate(self, run_id: str, succeeded: int, now: float | None = None) -> float | None:
        """Images per second over the sampled window (None until there is a window to measure)."""
        samples = self._r.lrange(self.keys.run(run_id).rate, 0, -1)
        if not samples:
            return None
        t0, done0 = (float(x) for x in samples[-1].decode().split(":"))
        elapsed = (now or time.time()) - t0
        return (succeeded - done0) / elapsed if elapsed >= 1 else None

    def idle_s(self, run_id: str, succeeded: int, now: float | None = None) -> float:
        """How long no line has succeeded, at the samples' 5 s resolution: 0 while the count still moves."""
        now = now or time.time()
        since = now
        for raw in self._r.lrange(self.keys.run(run_id).rate, 0, -1):  # newest first
            t, done = (float(x) for x in raw.decode().split(":"))
            if done != succeeded:
                break
            since = t
        return now - since

    def active_runs_count(self) -> int:
        """Runs being fed, all tenants'."""
        return int(self._r.llen(self.keys.datasets_active))

    # ------------------------------------------------------------------ the feeder's side

    def active(self) -> list[str]:
        return [i.decode() for i in self._r.lrange(self.keys.datasets_active, 0, -1)]

    def deactivate(self, run_id: str) -> None:
        """Off the active list: a run that has expired, or that another feeder finished."""
        self._r.lrem(self.keys.datasets_active, 0, run_id)

    def lock(self, run_id: str, owner: str, ttl_s: float) -> bool:
        return bool(self._lock(keys=[self.keys.run(run_id).lock], args=[owner, int(ttl_s * 1000)]))

    def unlock(self, run_id: str, owner: str) -> None:
        k = self.keys.run(run_id).lock
        if self._r.get(k) == owner.encode():
            self._r.delete(k)

    def next_retry(self, run_id: str) -> int | None:
        head = self._r.lindex(self.keys.run(run_id).retry, 0)
        return int(head) if head is not None else None

    def mark_fed(self, run_id: str, index: int, job_id: str, source: str) -> bool:
        k = self.keys.run(run_id)
        return bool(self._feed(keys=[k.record, k.inflight, k.retry], args=[index, job_id, source, time.time()]))

    def reap(
        self,
        run_id: str,
        index: int,
        job_id: str,
        outcome: str,
        payload: dict[str, Any] | None,
        order: str = "completion",
    ) -> bool:
        """A fed line's job has ended: its outcome is counted and kept, and its job record deleted, once."""
        k = self.keys.run(run_id)
        keys = [k.record, k.inflight, k.done, k.failed, self.keys.job(job_id), k.rows, k.canceled]
        return bool(self._reap(keys=keys, args=[index, outcome, json.dumps(payload or {}), order]))

    def retry_indices(self, run_id: str) -> list[int]:
        return [int(i) for i in self._r.lrange(self.keys.run(run_id).retry, 0, -1)]

    def row_indices(self, run_id: str) -> list[int]:
        """Input order: the finished lines whose rows wait for their shard, sorted."""
        return sorted(int(i) for i in self._r.hkeys(self.keys.run(run_id).rows))

    def rows(self, run_id: str, indices: list[int]) -> list[dict[str, Any]]:
        found = self._r.hmget(self.keys.run(run_id).rows, indices) if indices else []
        return [json.loads(v) for v in found if v is not None]

    def commit_window(self, run_id: str, window: int, next_window: int, shard: int, indices: list[int]) -> bool:
        """Input order: the window starting at `window` is written as shard `shard` (-1: it had no row)."""
        k = self.keys.run(run_id)
        return bool(self._shard_input(keys=[k.record, k.rows], args=[window, next_window, shard, *indices]))

    def done_rows(self, run_id: str, limit: int) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self._r.lrange(self.keys.run(run_id).done, 0, limit - 1)]

    def done_count(self, run_id: str) -> int:
        return int(self._r.llen(self.keys.run(run_id).done))

    def commit_shard(self, run_id: str, shard: int, rows: int) -> bool:
        k = self.keys.run(run_id)
        return bool(self._shard(keys=[k.record, k.done], args=[shard, rows]))

    def skip_rest(self, run_id: str, cursor: int, total: int) -> int:
        """On cancel: lines never fed (and retries never re-fed) count as canceled, kept for a resume (the
        never-fed ones as the range from `resume_from`); returns how many."""
        k = self.keys.run(run_id)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(k.record, "cursor", total)
            if cursor < total:
                pipe.hset(k.record, "resume_from", cursor)
            pipe.lrange(k.retry, 0, -1)
            pipe.delete(k.retry)
            retry = pipe.execute()[-2]
        if retry:
            self._r.hset(k.canceled, mapping={int(i): "{}" for i in retry})
        count = (total - cursor) + len(retry)
        if count:
            self._r.hincrby(k.record, "canceled", count)
        return count

    def sample_rate(self, run_id: str, succeeded: int, now: float | None = None) -> None:
        now = now or time.time()
        k = self.keys.run(run_id).rate
        newest = self._r.lindex(k, 0)
        if newest is not None and now - float(newest.decode().split(":")[0]) < RATE_SAMPLE_S:
            return
        pipe = self._r.pipeline(transaction=True)
        pipe.lpush(k, f"{now}:{succeeded}")
        pipe.ltrim(k, 0, RATE_SAMPLES - 1)
        pipe.execute()

    def fail(self, run_id: str, error: str) -> bool:
        """Give up on a running (or canceling) run: `failed`, off the active list, its record expiring after
        ttl_s like any finished run's. False when it had finished already."""
        k = self.keys.run(run_id)
        keys = [k.record, self.keys.datasets_active, *k.kept]
        return bool(self._fail(keys=keys, args=[time.time(), run_id, self.ttl_s, error]))

    def finish(self, run_id: str, expected: DatasetStatus, status: DatasetStatus) -> bool:
        """The run is done (if still `expected`, with nothing in flight or waiting to be retried): off the
        active list; its record expires after ttl_s."""
        k = self.keys.run(run_id)
        keys = [k.record, k.retry, k.inflight, self.keys.datasets_active, *k.kept]
        return bool(self._finish(keys=keys, args=[expected.value, status.value, time.time(), run_id, self.ttl_s]))
