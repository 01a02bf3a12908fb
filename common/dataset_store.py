"""Data set runs in Redis: a run's counters and the few bounded structures its feeder works through.

Keys (prefix P), for run R:
    P:dataset:R            hash: status, counters (total, cursor, succeeded, failed, canceled, shards ...), options
    P:dataset:R:inflight   hash: line index -> job id, for lines fed and not yet reaped (<= the feed depth)
    P:dataset:R:done       list: manifest rows of finished lines not yet in a shard (< shard size + depth)
    P:dataset:R:rows       hash: line index -> manifest row, the same for runs in input order (shard k is lines
                           k*size.., written once all have ended)
    P:dataset:R:failed     hash: line index -> {"line", "id", "error"} (grows only with failures)
    P:dataset:R:canceled   hash: line index -> {"line", "id"} of lines canceled once fed (or retried); lines
                           never fed are the range from the run's `resume_from` to its end
    P:dataset:R:retry      list: line indices to feed again (a retry of failed lines)
    P:dataset:R:rate       list: "time:succeeded" samples, newest first, for images/s and the ETA
    P:dataset:R:lock       the feeder lock: one worker feeds a run at a time
    P:datasets:active      list of runs that need a feeder (a KEDA trigger can scale the bulk pool on it)
    P:datasets:recent:T    a tenant's runs by creation time
    P:dataset-idem:T:H     the run an Idempotency-Key made
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

from common.datasets import DatasetOptions, DatasetStatus
from common.job_store import page

RATE_SAMPLE_S = 5.0  # one images/s sample per 5 s, the last 60 kept: the rate is over the last ~5 minutes
RATE_SAMPLES = 60

# KEYS: run hash, inflight, cursor-or-retry list. ARGV: index, job id, "cursor"|"retry".
# The line is recorded as in flight only if it is still the next one to feed.
_FEED = """
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

# KEYS: run hash, inflight, done list, failed hash, job hash, rows hash, canceled hash. ARGV: index, outcome,
# payload, order. Only the first reap of a line counts (HDEL says whether it was still in flight).
_REAP = """
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

# KEYS: run hash, done list. ARGV: shard index, rows written. Commits a written shard exactly once.
_SHARD = """
if tonumber(redis.call('HGET', KEYS[1], 'shards')) ~= tonumber(ARGV[1]) then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
redis.call('HINCRBY', KEYS[1], 'shards', 1)
redis.call('HINCRBY', KEYS[1], 'sharded', tonumber(ARGV[2]))
return 1
"""

# KEYS: run hash, rows hash. ARGV: the window expected, the next window, the shard index (-1: a window with
# no row to write), then the line indices written. Input order: commits a window exactly once.
_SHARD_INPUT = """
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
# them). O(active runs), which that cap keeps small.
_ACTIVE_RUNS = """
local function active_runs(active_key, run_prefix, tenant)
  local n = 0
  for _, id in ipairs(redis.call('LRANGE', active_key, 0, -1)) do
    if redis.call('HGET', run_prefix .. id, 'tenant') == tenant then n = n + 1 end
  end
  return n
end
"""

# KEYS: run hash, tenant's recent set, active list. ARGV: run id, now, tenant, the tenant's cap of active runs
# (0: none), run-hash key prefix, then the run's fields as name, value pairs.
# Returns the tenant's active runs before the call, negated when the cap refused this one (nothing stored).
_CREATE = """
local before = active_runs(KEYS[3], ARGV[5], ARGV[3])
local cap = tonumber(ARGV[4])
if cap > 0 and before >= cap then return -before end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
return before
"""

# KEYS: run hash, failed hash, retry list, active list. ARGV: run id, the tenant's cap of active runs (0: none),
# run-hash key prefix. Failed lines go back to be fed; a run that had ended becomes active again, which the
# cap counts (-3: refused).
_RETRY = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'canceling' then return -2 end
local indices = redis.call('HKEYS', KEYS[2])
if #indices == 0 then return 0 end
local cap = tonumber(ARGV[2])
if status ~= 'running' and cap > 0 then
  if active_runs(KEYS[4], ARGV[3], redis.call('HGET', KEYS[1], 'tenant')) >= cap then return -3 end
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

# KEYS: run hash, canceled hash, retry list, active list. ARGV: run id, the tenant's cap of active runs
# (0: none), run-hash key prefix. A canceled run's canceled lines go back to be fed (same ids, same seeds): those
# canceled once fed through the retry list, the never-fed range by moving the cursor back to it. -1: no such
# run; -2: not a canceled run; -3: the tenant's cap.
_RESUME = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'canceled' then return -2 end
local cap = tonumber(ARGV[2])
if cap > 0 and active_runs(KEYS[4], ARGV[3], redis.call('HGET', KEYS[1], 'tenant')) >= cap then return -3 end
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

# KEYS: run hash, retry list, inflight, active list. ARGV: expected status, new status, now, run id, ttl.
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if redis.call('LLEN', KEYS[2]) > 0 or redis.call('HLEN', KEYS[3]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
redis.call('LREM', KEYS[4], 0, ARGV[4])
for _, suffix in ipairs({'', ':done', ':failed', ':rate', ':rows', ':canceled'}) do
  redis.call('EXPIRE', KEYS[1] .. suffix, ARGV[5])
end
return 1
"""

# KEYS: lock. ARGV: owner, ttl ms. Take the lock, or extend it if already ours.
_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""


class TooManyRuns(Exception):
    """The tenant already has its cap of active runs; nothing was stored."""

    def __init__(self, active: int):
        super().__init__(active)
        self.active = active


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

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.canceled


class DatasetStore:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl", ttl_s: int = 7 * 24 * 3600):
        self.r = client
        self.prefix = prefix
        self.ttl_s = ttl_s  # how long a finished run's record lives
        self._feed = client.register_script(_FEED)
        self._reap = client.register_script(_REAP)
        self._shard = client.register_script(_SHARD)
        self._shard_input = client.register_script(_SHARD_INPUT)
        self._resume = client.register_script(_ACTIVE_RUNS + _RESUME)
        self._retry = client.register_script(_ACTIVE_RUNS + _RETRY)
        self._lock = client.register_script(_LOCK)
        self._finish = client.register_script(_FINISH)
        self._create = client.register_script(_ACTIVE_RUNS + _CREATE)
        self._active_count = client.register_script(_ACTIVE_RUNS + "return active_runs(KEYS[1], ARGV[1], ARGV[2])")

    def key(self, run_id: str, part: str = "") -> str:
        return f"{self.prefix}:dataset:{run_id}" + (f":{part}" if part else "")

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:datasets:active"

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
        **extra: Any,
    ) -> None:
        """Store a new running run. With `max_active` (> 0) and that many of the tenant's runs active already,
        raises TooManyRuns and stores nothing: counted and stored in one script, so concurrent creates
        cannot all pass."""
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
        keys = [self.key(run_id), f"{self.prefix}:datasets:recent:{tenant}", self.active_key]
        pairs = [str(v) for kv in fields.items() for v in kv]
        before = int(self._create(keys=keys, args=[run_id, now, tenant, max_active, self.key(""), *pairs]))
        if before < 0:
            raise TooManyRuns(-before)

    def active_count(self, tenant: str) -> int:
        """The tenant's runs that are being fed (running, canceling, or retried), counted as the caps count."""
        return int(self._active_count(keys=[self.active_key], args=[self.key(""), tenant]))

    def claim_idempotency(self, tenant: str, key_hash: str, run_id: str, fingerprint: str) -> tuple[str, str]:
        """(run id, fingerprint) stored under the key: ours if it was free, else the earlier run's."""
        k = f"{self.prefix}:dataset-idem:{tenant}:{key_hash}"
        if self.r.set(k, json.dumps([run_id, fingerprint]), nx=True, ex=self.ttl_s):
            return run_id, fingerprint
        found = json.loads(self.r.get(k) or json.dumps([run_id, fingerprint]))
        return found[0], found[1]

    def idempotent_run(self, tenant: str, key_hash: str) -> tuple[str, str] | None:
        """(run id, fingerprint) an Idempotency-Key made, if any."""
        found = self.r.get(f"{self.prefix}:dataset-idem:{tenant}:{key_hash}")
        return tuple(json.loads(found)) if found else None  # type: ignore[return-value]

    def release_idempotency(self, tenant: str, key_hash: str) -> None:
        self.r.delete(f"{self.prefix}:dataset-idem:{tenant}:{key_hash}")

    def cancel(self, run_id: str) -> DatasetStatus | None:
        """running -> canceling; returns the status before (None: no such run)."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.key(run_id))
                    raw = pipe.hget(self.key(run_id), "status")
                    if raw is None:
                        return None
                    before = DatasetStatus(raw.decode())
                    pipe.multi()
                    if before == DatasetStatus.running:
                        pipe.hset(
                            self.key(run_id),
                            mapping={"status": DatasetStatus.canceling.value, "canceled_at": time.time()},
                        )
                    pipe.execute()
                    return before
                except redis.WatchError:
                    continue

    def retry(self, run_id: str, max_active: int = 0) -> int:
        """Failed lines go back to be fed; returns how many (-1: no such run, -2: the run is being canceled,
        -3: it had ended and its tenant already has `max_active` active runs)."""
        keys = [self.key(run_id), self.key(run_id, "failed"), self.key(run_id, "retry"), self.active_key]
        count = int(self._retry(keys=keys, args=[run_id, max_active, self.key("")]))
        if count > 0:
            self.r.persist(self.key(run_id))  # it had been given its expiry when it finished
        return count

    def resume(self, run_id: str, max_active: int = 0) -> int:
        """A canceled run's canceled lines go back to be fed, with their seeds; returns how many (-1: no such
        run, -2: the run is not canceled, -3: its tenant already has `max_active` active runs)."""
        keys = [self.key(run_id), self.key(run_id, "canceled"), self.key(run_id, "retry"), self.active_key]
        count = int(self._resume(keys=keys, args=[run_id, max_active, self.key("")]))
        if count > 0:
            for suffix in ("", "rows", "failed"):
                self.r.persist(self.key(run_id, suffix))  # they had been given their expiry when it finished
        return count

    def recent(self, tenant: str, offset: int, limit: int) -> tuple[list[DatasetRun], int]:
        return page(self.r, f"{self.prefix}:datasets:recent:{tenant}", offset, limit, self.get)

    # ------------------------------------------------------------------ reading

    def get(self, run_id: str) -> DatasetRun | None:
        raw = self.r.hgetall(self.key(run_id))
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
        )

    def inflight(self, run_id: str) -> dict[int, str]:
        return {int(k): v.decode() for k, v in self.r.hgetall(self.key(run_id, "inflight")).items()}

    def retry_pending(self, run_id: str) -> int:
        return int(self.r.llen(self.key(run_id, "retry")))

    def failures(self, run_id: str) -> list[dict[str, Any]]:
        found = [json.loads(v) for v in self.r.hvals(self.key(run_id, "failed"))]
        return sorted(found, key=lambda f: f["line"])

    def rate(self, run_id: str, succeeded: int, now: float | None = None) -> float | None:
        """Images per second over the sampled window (None until there is a window to measure)."""
        samples = self.r.lrange(self.key(run_id, "rate"), 0, -1)
        if not samples:
            return None
        t0, done0 = (float(x) for x in samples[-1].decode().split(":"))
        elapsed = (now or time.time()) - t0
        return (succeeded - done0) / elapsed if elapsed >= 1 else None

    def idle_s(self, run_id: str, succeeded: int, now: float | None = None) -> float:
        """How long no line has succeeded, at the samples' 5 s resolution: 0 while the count still moves."""
        now = now or time.time()
        since = now
        for raw in self.r.lrange(self.key(run_id, "rate"), 0, -1):  # newest first
            t, done = (float(x) for x in raw.decode().split(":"))
            if done != succeeded:
                break
            since = t
        return now - since

    # ------------------------------------------------------------------ the feeder's side

    def active(self) -> list[str]:
        return [i.decode() for i in self.r.lrange(self.active_key, 0, -1)]

    def lock(self, run_id: str, owner: str, ttl_s: float) -> bool:
        return bool(self._lock(keys=[self.key(run_id, "lock")], args=[owner, int(ttl_s * 1000)]))

    def unlock(self, run_id: str, owner: str) -> None:
        k = self.key(run_id, "lock")
        if self.r.get(k) == owner.encode():
            self.r.delete(k)

    def next_retry(self, run_id: str) -> int | None:
        head = self.r.lindex(self.key(run_id, "retry"), 0)
        return int(head) if head is not None else None

    def mark_fed(self, run_id: str, index: int, job_id: str, source: str) -> bool:
        keys = [self.key(run_id), self.key(run_id, "inflight"), self.key(run_id, "retry")]
        return bool(self._feed(keys=keys, args=[index, job_id, source, time.time()]))

    def reap(
        self,
        run_id: str,
        index: int,
        job_key: str,
        outcome: str,
        payload: dict[str, Any] | None,
        order: str = "completion",
    ) -> bool:
        keys = [
            self.key(run_id),
            self.key(run_id, "inflight"),
            self.key(run_id, "done"),
            self.key(run_id, "failed"),
            job_key,
            self.key(run_id, "rows"),
            self.key(run_id, "canceled"),
        ]
        return bool(self._reap(keys=keys, args=[index, outcome, json.dumps(payload or {}), order]))

    def retry_indices(self, run_id: str) -> list[int]:
        return [int(i) for i in self.r.lrange(self.key(run_id, "retry"), 0, -1)]

    def row_indices(self, run_id: str) -> list[int]:
        """Input order: the finished lines whose rows wait for their shard, sorted."""
        return sorted(int(i) for i in self.r.hkeys(self.key(run_id, "rows")))

    def rows(self, run_id: str, indices: list[int]) -> list[dict[str, Any]]:
        found = self.r.hmget(self.key(run_id, "rows"), indices) if indices else []
        return [json.loads(v) for v in found if v is not None]

    def commit_window(self, run_id: str, window: int, next_window: int, shard: int, indices: list[int]) -> bool:
        """Input order: the window starting at `window` is written as shard `shard` (-1: it had no row)."""
        keys = [self.key(run_id), self.key(run_id, "rows")]
        return bool(self._shard_input(keys=keys, args=[window, next_window, shard, *indices]))

    def done_rows(self, run_id: str, limit: int) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(self.key(run_id, "done"), 0, limit - 1)]

    def done_count(self, run_id: str) -> int:
        return int(self.r.llen(self.key(run_id, "done")))

    def commit_shard(self, run_id: str, shard: int, rows: int) -> bool:
        return bool(self._shard(keys=[self.key(run_id), self.key(run_id, "done")], args=[shard, rows]))

    def skip_rest(self, run_id: str, cursor: int, total: int) -> int:
        """On cancel: lines never fed (and retries never re-fed) count as canceled, kept for a resume (the
        never-fed ones as the range from `resume_from`); returns how many."""
        with self.r.pipeline() as pipe:
            pipe.hset(self.key(run_id), "cursor", total)
            if cursor < total:
                pipe.hset(self.key(run_id), "resume_from", cursor)
            pipe.lrange(self.key(run_id, "retry"), 0, -1)
            pipe.delete(self.key(run_id, "retry"))
            retry = pipe.execute()[-2]
        if retry:
            self.r.hset(self.key(run_id, "canceled"), mapping={int(i): "{}" for i in retry})
        count = (total - cursor) + len(retry)
        if count:
            self.r.hincrby(self.key(run_id), "canceled", count)
        return count

    def sample_rate(self, run_id: str, succeeded: int, now: float | None = None) -> None:
        now = now or time.time()
        k = self.key(run_id, "rate")
        newest = self.r.lindex(k, 0)
        if newest is not None and now - float(newest.decode().split(":")[0]) < RATE_SAMPLE_S:
            return
        pipe = self.r.pipeline()
        pipe.lpush(k, f"{now}:{succeeded}")
        pipe.ltrim(k, 0, RATE_SAMPLES - 1)
        pipe.execute()

    def finish(self, run_id: str, expected: DatasetStatus, status: DatasetStatus) -> bool:
        """The run is done (if still `expected`, with nothing in flight or waiting to be retried): off the
        active list; its record expires after ttl_s."""
        keys = [self.key(run_id), self.key(run_id, "retry"), self.key(run_id, "inflight"), self.active_key]
        return bool(self._finish(keys=keys, args=[expected.value, status.value, time.time(), run_id, self.ttl_s]))
