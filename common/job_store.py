"""Job records in Redis: one hash per job, status changes as atomic compare-and-set scripts.

The keys ({P}:job:<id>, the queued, running, recent, tenant-queued, ready and outbox sets, the ring of tenants
with ready jobs, idempotency keys, the submit counter, the P:ended and P:progress channels) are listed and built
in common/keys.py; every key a script touches is passed to it in KEYS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from common.jobs import TRANSITIONS, ImageRecord, Job, JobRequest, JobStatus, Progress
from common.keys import Keys
from common.redis_connection import Durability

log = logging.getLogger(__name__)
T = TypeVar("T")
TURN_QUANTUM_ROWS = 1  # the credit a tenant's turn in the ring gives (_TAKE): a row, the smallest job's cost
UNREPLICATED_PAUSE_S = 2.0  # after a WAIT that ran out, replicated writes do not wait this long (_replicated)
OUTBOX_GRACE_S = 15.0  # an outbox entry older than this lost its sender: a worker's sweep sends the message

_TRANSITION = """
-- KEYS: 1 job hash, 2 queued set, 3 running set, 4 the tenant's queued set, 5 the tenant's ready set for the
--       job's model, 6 the ring of tenants with jobs ready for that model, 7 that model's turn credits (4 to 7
--       are the caller's guess of the tenant and the model)
-- ARGV: 1 id, 2 new status, 3 now, 4 ttl, 5 fields JSON, 6 running deadline, 7 ended channel, 8 the tenant and
--       9 the model KEYS[4..7] belong to, 10 the default model (a record from before per-model rings has no
--       model), 11.. the statuses the job may be in
-- An interactive job that becomes queued (a requeue, a dead worker's job sent again, one given back) is ready
-- for a worker holding its model to take again; one that leaves queued is no longer.
-- Returns "OK:<previous status>"; the current status when the change is not allowed; "" when there is no such
-- job; "GUESS:" .. JSON [tenant, model] (nothing changed) when the job is another tenant's than ARGV[8] says,
-- or, where its ready set is touched, another model's than ARGV[9]: call again with them.
local found = redis.call('HMGET', KEYS[1], 'status', 'tenant', 'model', 'lane')
local current = found[1]
if not current then return '' end
local tenant = found[2] or ''
local model = found[3] or ARGV[10]
local new = ARGV[2]
local bulk = found[4] == 'bulk'  -- in no queued or ready set: its feeder tracks it
local ready = not bulk and (current == 'queued' or new == 'queued')  -- it may be in, or go to, a ready set
if tenant ~= ARGV[8] or (ready and model ~= ARGV[9]) then return 'GUESS:' .. cjson.encode({tenant, model}) end
local allowed = false
for i = 11, #ARGV do if ARGV[i] == current then allowed = true end end
if not allowed then return current end
redis.call('HSET', KEYS[1], 'status', new, 'updated_at', ARGV[3])
if new == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
elseif new == 'queued' then
  redis.call('HDEL', KEYS[1], 'started_at')
end
if new == 'running' or new == 'queued' then
  redis.call('HDEL', KEYS[1], 'progress')  -- a new attempt starts from step 0
else
  redis.call('HSET', KEYS[1], new == 'canceled' and 'canceled_at' or 'finished_at', ARGV[3])
  if new == 'canceled' then redis.call('HSET', KEYS[1], 'finished_at', ARGV[3]) end
end
local fields = cjson.decode(ARGV[5])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
if bulk then
elseif new == 'queued' then
  local seq = redis.call('HGET', KEYS[1], 'seq')
  redis.call('HSET', KEYS[1], 'model', model)
  redis.call('ZADD', KEYS[2], seq, ARGV[1])
  redis.call('ZADD', KEYS[4], seq, ARGV[1])
  if redis.call('ZADD', KEYS[5], seq, ARGV[1]) == 1 and redis.call('ZCARD', KEYS[5]) == 1 then
    redis.call('RPUSH', KEYS[6], ARGV[8])  -- the tenant had nothing ready for the model: it joins the ring
  end
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  if ready and redis.call('ZREM', KEYS[5], ARGV[1]) == 1 and redis.call('ZCARD', KEYS[5]) == 0 then
    redis.call('LREM', KEYS[6], 0, ARGV[8])  -- canceled while ready: the tenant leaves the ring if it was its last
    redis.call('HDEL', KEYS[7], ARGV[8])  -- and its credit with it (_TAKE)
  end
end
if new == 'running' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if not bulk and (new == 'succeeded' or new == 'failed' or new == 'canceled') then
  redis.call('PUBLISH', ARGV[7], ARGV[1])  -- after the record is final: a woken reader sees it
end
return 'OK:' .. current
"""

# A replay is answered before the cap: only new work counts against it. The cap is checked here, not by the
# caller, so that concurrent submits cannot all pass a count taken before any of them was stored.
_CREATE = """
-- KEYS: 1 idempotency key (without one, the job's hash again: a key of the same slot, unread), 2 job hash,
--       3 queued set, 4 the tenant's recent set, 5 seq counter, 6 the tenant's queued set, 7 outbox, 8 the
--       tenant's ready set for the job's model, 9 the ring of tenants with jobs ready for that model
-- ARGV: 1 id, 2 body hash, 3 ttl, 4 now, 5 request JSON, 6 tenant, 7 the tenant's queued cap (0: none), 8 the
--       job's model (resolved: the default's name for a job that names none), 9 "1" when KEYS[1] is an
--       idempotency key
-- Returns {"new", id}, {"existing", id, body hash} or {"full", count}.
local idem = ARGV[9] == '1'
local seen = idem and redis.call('HGET', KEYS[1], 'job')
if seen then return {'existing', seen, redis.call('HGET', KEYS[1], 'body')} end
local cap = tonumber(ARGV[7])
if cap > 0 then
  local count = redis.call('ZCARD', KEYS[6])
  if count >= cap then return {'full', tostring(count)} end
end
if idem then
  redis.call('HSET', KEYS[1], 'job', ARGV[1], 'body', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'status', 'queued', 'request', ARGV[5], 'created_at', ARGV[4],
           'updated_at', ARGV[4], 'attempts', 0, 'seq', seq, 'tenant', ARGV[6], 'model', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[6], seq, ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[8], seq, ARGV[1])
if redis.call('ZCARD', KEYS[8]) == 1 then redis.call('RPUSH', KEYS[9], ARGV[6]) end  -- the tenant joins the ring
return {'new', ARGV[1]}
"""

# A data set line's job, under an id the feeder derives from the run and line. No seq and no queued sets:
# queue positions are for interactive jobs.
_CREATE_BULK = """
-- KEYS: 1 job hash
-- ARGV: 1 id, 2 ttl, 3 now, 4 request JSON, 5 tenant, 6 output key, 7 dataset JSON
-- Returns 1 when created, 0 when the job exists already.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'status', 'queued', 'request', ARGV[4], 'created_at', ARGV[3],
           'updated_at', ARGV[3], 'attempts', 0, 'tenant', ARGV[5], 'lane', 'bulk',
           'output_key', ARGV[6], 'dataset', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Fair order, per model, counted in rows (deficit round robin): tenants take turns, and a turn pays for a job's rows
# (its images), so that a tenant of 4-image jobs gets the rows of a tenant of 1-image jobs, not 4 times as many. The
# ring's head tenant gets a quantum of credit (a row) a turn; it takes its oldest job once its credit pays for the
# job's rows (the rest of the credit stays for its next turn), else it keeps the credit and goes to the tail. A
# tenant alone in the ring takes at once. The caller reads the head, its oldest job and that job's rows first, so
# that the tenant's ready set can be named in KEYS and no job key is built here; a head or an oldest job that moved
# meanwhile is answered with the head, and nothing changes.
_TAKE = """
-- KEYS: 1 the ring of tenants with jobs ready for one model, 2 the tenant's ready set for that model (the tenant
--       the caller read at the ring's head), 3 the worker's held set, 4 the set of workers that have held jobs,
--       5 the model's turn credits (tenant -> rows of credit)
-- ARGV: 1 the tenant KEYS[2] belongs to, 2 the worker, 3 the id of the tenant's oldest ready job as the caller
--       read it, 4 that job's rows (its cost), 5 the quantum: the rows of credit a turn gives
-- Returns "JOB:<id>" (now in the worker's held set), "" when nothing is ready, or "HEAD:<tenant>" (nothing
-- taken) when the ring's head is another tenant, or the head's oldest job is not ARGV[3], or the head could not
-- pay for its job and went to the tail with its turn's credit: read that tenant's oldest job and call again.
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return '' end
if head ~= ARGV[1] then return 'HEAD:' .. head end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
if #oldest == 0 then  -- cannot happen while the scripts keep the ring in step; never loop on it
  redis.call('LPOP', KEYS[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  local next = redis.call('LINDEX', KEYS[1], 0)
  if not next then return '' end
  return 'HEAD:' .. next
end
if oldest[1] ~= ARGV[3] then return 'HEAD:' .. head end  -- taken or canceled since the caller read it
local credit = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0') + tonumber(ARGV[5])
local cost = tonumber(ARGV[4])
if credit < cost and redis.call('LLEN', KEYS[1]) > 1 then
  redis.call('HSET', KEYS[5], ARGV[1], credit)
  redis.call('LPOP', KEYS[1])
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 'HEAD:' .. redis.call('LINDEX', KEYS[1], 0)
end
redis.call('ZREM', KEYS[2], oldest[1])
redis.call('SADD', KEYS[3], oldest[1])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('LPOP', KEYS[1])
local more = redis.call('ZCARD', KEYS[2]) > 0
if more then redis.call('RPUSH', KEYS[1], ARGV[1]) end  -- else it leaves the ring with its last job
if more and credit > cost then
  redis.call('HSET', KEYS[5], ARGV[1], credit - cost)
else
  redis.call('HDEL', KEYS[5], ARGV[1])  -- no credit left (a tenant alone may have taken on none: floor 0), or gone
end
return 'JOB:' .. oldest[1]
"""

# Only running jobs' progress is written (an ended or expired job's is not: a late report must neither resurrect
# a record nor contradict its end). Several jobs a call, as their hashes share one slot: one round trip on a
# cluster too, where a pipeline cannot carry scripts.
_PROGRESS = """
-- KEYS: the jobs' hashes
-- ARGV: 1 progress channel, then per job, in the order of KEYS, its id and its progress JSON
-- Returns how many were written.
local written = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('HSET', KEYS[i], 'progress', ARGV[2 * i + 1])
    if redis.call('HGET', KEYS[i], 'lane') ~= 'bulk' then redis.call('PUBLISH', ARGV[1], ARGV[2 * i]) end
    written = written + 1
  end
end
return written
"""


class QueueFull(Exception):
    """The tenant already has its cap of queued jobs; nothing was stored."""

    def __init__(self, queued: int):
        super().__init__(queued)
        self.queued = queued


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another request body."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "sdxl",
        ttl_s: int = 7 * 24 * 3600,
        running_deadline_s: float = 900,
        default_model: str = "",
        durability: Durability | None = None,
    ):
        self._r = client
        # how many replicas must hold a new job before `create` returns (SDXL_REDIS_WAIT_REPLICAS)
        self.durability = durability or Durability()
        self.unreplicated = 0  # replicated writes not confirmed: a WAIT ran out, or was skipped (see _replicated)
        self._wait_again_at = 0.0  # monotonic: replicated writes wait for the replicas again from then on
        self.keys = Keys(prefix)
        # the deployment's default model (the first of SDXL_MODELS): the ready sets of jobs that name no model
        self.default_model = default_model
        self.ttl_s = ttl_s
        self.running_deadline_s = running_deadline_s
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._create_bulk = client.register_script(_CREATE_BULK)
        self._progress = client.register_script(_PROGRESS)
        self._take = client.register_script(_TAKE)

    # ------------------------------------------------------------------ writing

    def create(
        self,
        request: JobRequest,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        tenant: str = "",
        max_queued: int = 0,
        job_id: str | None = None,
    ) -> tuple[str, bool]:
        """Store a new queued job; returns (id, created). With an idempotency key seen before and the same
        fingerprint (the client's body, before defaults such as a random seed are filled in), returns the
        earlier job (created=False); with another fingerprint raises IdempotencyConflict. With `max_queued`
        (> 0) and that many of the tenant's jobs queued already, raises QueueFull and stores nothing. `job_id`: the
        new job's, when the caller chose it (its inputs were claimed for it first: api/job_inputs.py)."""
        body = request.model_dump_json()
        body_hash = fingerprint or hashlib.sha256(body.encode()).hexdigest()
        job_id = job_id or uuid.uuid4().hex
        k, model = self.keys, self.model_of(request.model)
        idem = k.job(job_id)  # no key: a key of the script's slot stands in (an empty name would be slot 0's)
        has_key = bool(idempotency_key)
        if idempotency_key:
            idem = k.idempotency(tenant, hashlib.sha256(idempotency_key.encode()).hexdigest())
        keys = [
            idem,
            k.job(job_id),
            k.queued,
            k.recent(tenant),
            k.seq,
            k.tenant_queued(tenant),
            k.outbox,
            k.ready(model, tenant),
            k.ready_tenants(model),
        ]
        args = [job_id, body_hash, self.ttl_s, time.time(), body, tenant, max_queued, model, int(has_key)]
        if self.durability.replicas:
            answer, confirmed = self._waited(self._create, keys, args)
            if answer[0].decode() != "full":  # a refusal wrote nothing worth waiting for
                self.durability.check(confirmed)
        else:
            answer = self._create(keys=keys, args=args)
        kind, found = answer[0].decode(), answer[1].decode()
        if kind == "new":
            return found, True
        if kind == "full":
            raise QueueFull(int(found))
        if answer[2].decode() != body_hash:
            raise IdempotencyConflict(found)
        return found, False

    def _waited(self, script: Any, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """(The script's answer, the replicas that hold what it wrote). WAIT counts the replicas holding what *its
        connection* wrote: the script and WAIT go down one connection together (a pipeline), so waiting for the
        replicas costs their acknowledgement, not another round trip."""
        pipe = self._r.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", self.durability.replicas, self.durability.timeout_ms)
        try:
            answer, confirmed = pipe.execute()
        except redis.ResponseError as exc:
            raise self._moved(exc) from exc
        return answer, int(confirmed)

    def _replicated(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """A script's answer once the durability's replicas hold what it wrote, as `create` does it (the script and
        WAIT down one connection). A WAIT that runs out is counted (`unreplicated`) and logged, not raised: the
        write stands on the primary and is not undone by a retry; only a failover in that moment loses it. After
        one runs out, the next UNREPLICATED_PAUSE_S of writes do not wait: just after a failover the new primary
        has no replica for a second or two, and each of a batch's writes would wait out the timeout in turn."""
        if time.monotonic() < self._wait_again_at:
            self.unreplicated += 1
            return script(keys=keys, args=args)
        answer, confirmed = self._waited(script, keys, args)
        if confirmed < self.durability.replicas:
            self.unreplicated += 1
            self._wait_again_at = time.monotonic() + UNREPLICATED_PAUSE_S
            log.warning(
                "%d of %d replicas confirmed a job's change within %d ms (SDXL_REDIS_WAIT_REPLICAS); the next %.0f s of"
                " changes do not wait",
                confirmed,
                self.durability.replicas,
                self.durability.timeout_ms,
                UNREPLICATED_PAUSE_S,
            )
        return answer

    def _moved(self, exc: redis.ResponseError) -> Exception:
        """A pipeline's error where the server it reached is a replica now (a failover moved the primary): WAIT
        refuses to run on a replica and the script cannot write there. redis-py's sentinel connections turn a
        plain READONLY answer into a reconnect, but not an error inside a pipeline, which would otherwise be a
        500 on every submit that meets that pooled connection. The pool's idle connections are dropped (the next
        call asks the sentinels again; those in use by other requests are left to fail on their own, as closing
        them under a call is an OSError, a 500) and the caller gets a ReadOnlyError, which REDIS_DOWN answers
        with a 503."""
        text = str(exc)
        if "replica" not in text and "READONLY" not in text:
            return exc
        self._r.connection_pool.disconnect(inuse_connections=False)  # idle ones: others in use are mid-call
        return redis.ReadOnlyError(f"the primary moved during a submit: {text}")

    def create_bulk(
        self, job_id: str, request: JobRequest, tenant: str, output_key: str, dataset: dict[str, Any]
    ) -> bool:
        """Store a data set line's job under a derived id unless it exists; True when created. Bulk jobs stay
        out of the tenant's job list and queued cap: the feeder bounds them, and reaps their records."""
        created = self._create_bulk(
            keys=[self.keys.job(job_id)],
            args=[job_id, self.ttl_s, time.time(), request.model_dump_json(), tenant, output_key, json.dumps(dataset)],
        )
        return bool(created)

    def record_progress(self, steps_done: dict[str, Progress]) -> None:
        """Several running jobs' progress in one round trip (ended jobs are left alone)."""
        if steps_done:
            pairs = [v for job_id, progress in steps_done.items() for v in (job_id, progress.model_dump_json())]
            self._progress(keys=[self.keys.job(i) for i in steps_done], args=[self.keys.progress, *pairs])

    def sent(self, job_id: str) -> None:
        """The job's message is on the queue: its outbox entry goes (see {P}:outbox in common/keys.py)."""
        self._r.zrem(self.keys.outbox, job_id)

    def unsent(self, older_than_s: float = OUTBOX_GRACE_S, limit: int = 100) -> list[str]:
        """Jobs created more than `older_than_s` ago whose message the API never confirmed sent."""
        found = self._r.zrangebyscore(self.keys.outbox, "-inf", time.time() - older_than_s, start=0, num=limit)
        return [i.decode() for i in found]

    def reissue(self, job: Job) -> Job | None:
        """Back to queued (from queued or running) with the next generation, for a new message: the job's
        worker died holding it. None when the job has moved on meanwhile (ended, or its generation changed)."""
        ok, _ = self.transition(
            job.id,
            JobStatus.queued,
            [JobStatus.queued, JobStatus.running],
            tenant=job.tenant,
            model=job.request.model,
            generation=str(job.generation + 1),
        )
        return job.model_copy(update={"generation": job.generation + 1}) if ok else None

    def model_of(self, model: str | None) -> str:
        """The model whose ready sets hold a job naming `model` (None or "": the default model's)."""
        return model or self.default_model

    def take(self, worker: str, model: str | None = None) -> str | None:
        """The next interactive job for `model` (None: the default) in fair order (tenants in turn, each one's
        oldest first, a turn paid in rows: _TAKE), moved into the worker's held set by the same script; None when
        none is ready. Its message names no job: it only woke a worker holding the model (api/job_service.py), so
        whichever such worker wakes takes whichever job for the model is next. A job for another model is never
        taken."""
        name = self.model_of(model)
        k, ring = self.keys, self.keys.ready_tenants(name)
        pipe = self._r.pipeline(transaction=False)
        pipe.lindex(ring, 0)
        pipe.llen(ring)
        head, tenants = pipe.execute()
        rows: dict[str, int] = {}  # the cost of each job met, read once a call
        calls = 0
        # An answer without a job either gave a row of credit to a head that could not pay (a take follows within
        # tenants x (largest cost - 1) + 1 calls) or saw another worker's take or a cancel: the bound covers both,
        # with room for tenants that join meanwhile. Past it, None: the job stays ready, and the sweep wakes it
        # should no message be left (worker/sweeper.py wake_stranded).
        while head is not None and calls < (tenants + 2) * (max(rows.values(), default=1) + 1) + 16:
            calls += 1
            tenant = _text(head)
            ready = k.ready(name, tenant)
            oldest = self._r.zrange(ready, 0, 0)
            job_id = _text(oldest[0]) if oldest else ""
            if job_id and job_id not in rows:
                rows[job_id] = _rows(self._r.hget(k.job(job_id), "request"))
            answer = self._take(
                keys=[ring, ready, k.held(worker), k.holders, k.turn_credits(name)],
                args=[tenant, worker, job_id, rows.get(job_id, 1), TURN_QUANTUM_ROWS],
            ).decode()
            if answer.startswith("JOB:"):
                return answer.removeprefix("JOB:")
            head = answer.removeprefix("HEAD:") if answer else None
        return None

    def give_back(self, job: Job) -> bool:
        """An interactive job taken and not run (its worker shuts down, storage is away) is ready again, in its
        place (its seq); call before releasing it from the worker's held set. False: it is no longer queued."""
        ok, _ = self.transition(
            job.id, JobStatus.queued, [JobStatus.queued], tenant=job.tenant, model=job.request.model
        )
        return ok

    def ready_jobs(self, model: str | None = None, limit: int = 100) -> list[str]:
        """Up to `limit` ids of the interactive jobs for `model` (None: the default) that no worker has taken, each
        ready tenant's oldest first (for the sweep's stranded-job check, worker/sweeper.py wake_stranded)."""
        name = self.model_of(model)
        found: list[str] = []
        for tenant in self._r.lrange(self.keys.ready_tenants(name), 0, limit - 1):
            left = limit - len(found)
            if left <= 0:
                break
            found += [i.decode() for i in self._r.zrange(self.keys.ready(name, tenant.decode()), 0, left - 1)]
        return found

    def messages_waiting(self, queue: str) -> int:
        """The messages on a Celery queue that no worker has taken yet: kombu keeps a queue's messages (of the
        default priority, the only one the service sends) in a list named as the queue."""
        return int(self._r.llen(queue))

    def ready_count(self, tenant: str, model: str | None = None) -> int:
        """A tenant's interactive jobs for `model` (None: the default) that no worker has taken yet."""
        return self._r.zcard(self.keys.ready(self.model_of(model), tenant))

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        allowed_from: Iterable[JobStatus] | None = None,
        tenant: str | None = None,
        model: str | None = None,
        replicated: bool = False,
        **fields: Any,
    ) -> tuple[bool, JobStatus | None]:
        """Atomically move a job to `to` if its status is one of `allowed_from` (default: every status that
        may legally precede `to`). Returns (changed, status before the call; None if no such job).
        `replicated`: return once the replicas the durability asks for hold the change, or its WAIT ran out
        (then counted and logged, not raised: the change stands on the primary, and the caller goes on).
        `tenant`: the job's, when the caller knows it (the script is handed the tenant's queued set, so that
        every key it touches is named in KEYS); unknown, it is read first, one round trip more. `model`: the
        job's request's (None: the default; the script is handed its ready set): a wrong one costs a round trip
        where the job is or becomes queued."""
        if allowed_from is None:
            allowed_from = [s for s, nexts in TRANSITIONS.items() if to in nexts]
        allowed = [s.value for s in allowed_from if to in TRANSITIONS[s]]  # never an illegal edge
        encoded = json.dumps({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        k, ring = self.keys, self.model_of(model)
        if tenant is None:
            found_tenant, found_model = self._r.hmget(k.job(job_id), ["tenant", "model"])
            tenant = found_tenant.decode() if found_tenant is not None else ""
            ring = found_model.decode() if found_model is not None and model is None else ring
        for _ in range(3):  # a wrong guess of the tenant or model is answered with the right ones, before any change
            now = time.time()
            deadline = now + self.running_deadline_s
            ids = [tenant, ring, self.default_model]  # what KEYS[4..6] belong to, and the default model
            keys = [
                k.job(job_id),
                k.queued,
                k.running,
                k.tenant_queued(tenant),
                k.ready(ring, tenant),
                k.ready_tenants(ring),
                k.turn_credits(ring),
            ]
            args = [job_id, to.value, now, self.ttl_s, encoded, deadline, k.ended, *ids, *allowed]
            if replicated and self.durability.replicas:
                answer = self._replicated(self._transition, keys, args).decode()
            else:
                answer = self._transition(keys=keys, args=args).decode()
            if not answer.startswith("GUESS:"):
                break
            tenant, ring = json.loads(answer.removeprefix("GUESS:"))
        else:
            raise AssertionError(f"job {job_id}: its tenant or model kept changing")  # neither ever changes
        if answer == "":
            return False, None
        if answer.startswith("OK:"):
            return True, JobStatus(answer[3:])
        return False, JobStatus(answer)

    def succeed(self, job_id: str, images: list[ImageRecord], truncated: bool, tenant: str | None = None) -> bool:
        """running -> succeeded with the images; False when the job is no longer running (canceled). Replicated
        (the durability's replicas hold it before the worker acknowledges the job's message)."""
        ok, _ = self.transition(
            job_id,
            JobStatus.succeeded,
            [JobStatus.running],
            tenant=tenant,
            replicated=True,
            images=[i.model_dump() for i in images],
            truncated=truncated,
        )
        return ok

    def fail(
        self,
        job_id: str,
        error: str,
        allowed_from: Iterable[JobStatus] = (JobStatus.running,),
        tenant: str | None = None,
        model: str | None = None,
    ) -> bool:
        """-> failed with the error, replicated as `succeed` is."""
        ok, _ = self.transition(
            job_id, JobStatus.failed, allowed_from, tenant=tenant, model=model, replicated=True, error=error
        )
        return ok

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        return _parse(self._r.hgetall(self.keys.job(job_id)))

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Several records in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return [_parse(raw) for raw in pipe.execute()] if job_ids else []

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """Several statuses in one round trip (None: no such record)."""
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "status")
        return [JobStatus(v.decode()) if v else None for v in pipe.execute()] if job_ids else []

    def status(self, job_id: str) -> JobStatus | None:
        value = self._r.hget(self.keys.job(job_id), "status")
        return JobStatus(value.decode()) if value else None

    def existing(self, job_ids: list[str]) -> list[bool]:
        """Whether each record exists (not expired), in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self.keys.job(job_id))
        return [bool(n) for n in pipe.execute()] if job_ids else []

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start, None when not queued."""
        rank = self._r.zrank(self.keys.queued, job_id)
        return None if rank is None else rank + 1

    def queued_count(self, tenant: str | None = None) -> int:
        """Queued interactive jobs, all or one tenant's."""
        key = self.keys.queued if tenant is None else self.keys.tenant_queued(tenant)
        return int(self._r.zcard(key))

    def running_count(self) -> int:
        """Running jobs, data set lines included."""
        return int(self._r.zcard(self.keys.running))

    def recent(self, offset: int, limit: int, tenant: str = "") -> tuple[list[Job], int]:
        """A tenant's jobs, newest first; also returns the total. Expired ids are dropped from the index."""
        return page(self._r, self.keys.recent(tenant), offset, limit, self.get)

    def overdue(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Running jobs past their deadline (started + running_deadline_s)."""
        found = self._r.zrangebyscore(self.keys.running, "-inf", now or time.time(), start=0, num=limit)
        return [i.decode() for i in found]

    def running_on(self, limit: int = 1000) -> dict[str, str]:
        """The running jobs (up to `limit`, the earliest deadline first) and the worker each last started on, as
        its record says ("" when it names none)."""
        ids = [i.decode() for i in self._r.zrange(self.keys.running, 0, limit - 1)]
        return dict(zip(ids, self.workers_of(ids), strict=True))

    def workers_of(self, job_ids: list[str]) -> list[str]:
        """The worker each job last started on ("" when its record names none, or is gone): one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "worker")
        return [v.decode() if v else "" for v in pipe.execute()] if job_ids else []

    def forget_running(self, job_id: str) -> None:
        """Drop an id from the running set (its record has expired: the stuck-job sweep met it)."""
        self._r.zrem(self.keys.running, job_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _rows(request: bytes | None) -> int:
    """A job's rows in a batch (its images: worker/loop/batch.py), from its record's request; 1 for a record gone
    (expired while ready: whatever its cost, the take drops nothing)."""
    return max(int(json.loads(request).get("num_images", 1)), 1) if request else 1


def _parse(raw: dict[bytes, bytes]) -> Job | None:
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}

    def num(name: str) -> float | None:
        return float(d[name]) if name in d else None

    return Job(
        id=d["id"],
        tenant=d.get("tenant", ""),
        status=JobStatus(d["status"]),
        request=JobRequest.model_validate_json(d["request"]),
        created_at=float(d["created_at"]),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        canceled_at=num("canceled_at"),
        error=d.get("error"),
        images=[ImageRecord(**i) for i in json.loads(d.get("images", "[]"))],
        truncated=json.loads(d.get("truncated", "false")),
        attempts=int(d.get("attempts", 0)),
        progress=Progress.model_validate_json(d["progress"]) if "progress" in d else None,
        generation=int(d.get("generation", 0)),
        lane=d.get("lane", ""),
        output_key=d.get("output_key"),
        dataset=json.loads(d["dataset"]) if "dataset" in d else None,
    )


def page(r: redis.Redis, index: str, offset: int, limit: int, get: Callable[[str], T | None]) -> tuple[list[T], int]:
    """A page of a time-scored index of records, newest first, and the index's size. Ids whose records have
    expired are dropped from the index as they are met."""
    ids = [i.decode() for i in r.zrevrange(index, offset, offset + limit - 1)]
    found, gone = [], []
    for record_id in ids:
        record = get(record_id)
        if record is None:
            gone.append(record_id)
        else:
            found.append(record)
    if gone:
        r.zrem(index, *gone)
    return found, int(r.zcard(index))
