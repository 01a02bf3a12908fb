"""Which jobs name each stored input image, and what a tenant's inputs weigh: the records that let an input live
as long as a job needs it and no longer (common/keys.py, "Input images", lists the keys).

An input is stored once per tenant by its content hash (common/inputs.py). Each submit that names it first
*claims* it for the job: the job's id joins the input's set, the claim counter goes up, and the sweep is told to
look no sooner than the grace period from now. A new input is charged to the tenant's stored bytes in the same
script, which refuses it over the tenant's quota. The sweep (worker/input_retention.py) drops the ids whose job
record has expired; an input left with none is marked `deleting`, its object deleted, then its record forgotten
and its bytes given back. A claim meeting `deleting` is answered busy (the object is going): the submit asks
again once the sweep is through; one meeting a deletion abandoned half way (ABANDONED_AFTER_S) finishes it
itself. Every key a script touches is in its KEYS.
"""

from __future__ import annotations

import enum
import json
import time

import redis

from common.keys import Keys

# A `deleting` input older than this was abandoned by its deleter (a sweep or a refused submit that died between
# deleting the object and forgetting the record): the next claim finishes the deletion and makes it anew. Far
# longer than one storage delete takes, retries included: a deletion still under way never meets a new object.
ABANDONED_AFTER_S = 300.0

# A data set run's claim on an input its lines name sits among the job ids as "run:<run id>" (a job id has no colon:
# common/keys.py RECORD_ID_PATTERN); the sweep keeps it while the run's record lives (worker/input_retention.py).
RUN_CLAIM = "run:"


def run_claim(run_id: str) -> str:
    return RUN_CLAIM + run_id


_CLAIM = """
-- KEYS: 1 the input's hash, 2 its set of job ids, 3 the tenant's stored input bytes, 4 the index of inputs
-- ARGV: 1 job id, 2 the bytes it will take if new, 3 the tenant's quota in bytes (0: none), 4 when the sweep may
--       look at it next (the grace period from now), 5 its member in the index ([tenant, hash] as JSON), 6 the
--       size its pixels are at, "<width>x<height>", 7 now, 8 how long a deletion may take before it counts as
--       abandoned (its deleter died between the object and the record)
-- Returns "new" (the caller stores the object), "shared" (stored already, or being stored by another submit),
-- "busy" (being deleted: ask again shortly), "stale" (a deletion abandoned: the caller finishes it, then asks
-- again) or "full:<bytes stored>" (new, and over the quota: nothing changed).
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'deleting' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'deleting_at') or '0')
  if tonumber(ARGV[7]) - since >= tonumber(ARGV[8]) then return 'stale' end
  return 'busy'
end
local answer = 'shared'
if not state then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  local quota = tonumber(ARGV[3])
  if quota > 0 and used + tonumber(ARGV[2]) > quota then return 'full:' .. used end
  redis.call('HSET', KEYS[1], 'state', 'storing', 'bytes', ARGV[2], 'size', ARGV[6])
  redis.call('INCRBY', KEYS[3], ARGV[2])
  answer = 'new'
end
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
return answer
"""

# After a put: the object's size as stored (a second submit that found the object missing may have stored another
# encoding of the same pixels), the tenant's count moved by the difference.
_STORED = """
-- KEYS: 1 the input's hash, 2 the tenant's stored input bytes
-- ARGV: 1 the bytes stored
-- Returns 1, or 0 when the input is not claimed (nothing changed).
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'deleting' then return 0 end
local before = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
redis.call('HSET', KEYS[1], 'state', 'stored', 'bytes', ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]) - before)
return 1
"""

# A refused submit lets go of its claim; an input it made that nobody else claimed since goes at once.
_RELEASE = """
-- KEYS: 1 the input's hash, 2 its set of job ids
-- ARGV: 1 job id, 2 "1" when this submit made the input (its claim answered "new"), 3 now
-- Returns 1 when the input is now `deleting` (the caller deletes the object, then forgets it), else 0.
redis.call('SREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '1' or redis.call('SCARD', KEYS[2]) > 0 then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'deleting' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'deleting', 'deleting_at', ARGV[3])
return 1
"""

# The sweep read the input's claims counter and job ids, then asked which records are gone. A claim since then
# (the counter moved) means a submit is naming it right now, perhaps for a job not yet stored: left alone.
_RETIRE = """
-- KEYS: 1 the input's hash, 2 its set of job ids, 3 the index of inputs
-- ARGV: 1 the claims counter as the sweep read it, 2 when to look again if it stays, 3 its member in the index,
--       4 now, 5.. the job ids whose record is gone
-- Returns "delete" (now `deleting`: the caller deletes the object, then forgets it), "kept" or "unknown" (no
-- record: dropped from the index).
local found = redis.call('HMGET', KEYS[1], 'state', 'claims')
if not found[1] then
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 'unknown'
end
if found[1] == 'deleting' then return 'delete' end  -- a sweep or a release that stopped half way
-- kept, it is not due again before ARGV[2] (GT: a later claim's time stands), so a pass never meets it twice
if (found[2] or '0') ~= ARGV[1] then
  redis.call('ZADD', KEYS[3], 'GT', ARGV[2], ARGV[3])
  return 'kept'
end
for i = 5, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
if redis.call('SCARD', KEYS[2]) > 0 then
  redis.call('ZADD', KEYS[3], 'GT', ARGV[2], ARGV[3])
  return 'kept'
end
redis.call('HSET', KEYS[1], 'state', 'deleting', 'deleting_at', ARGV[4])
return 'delete'
"""

_FORGET = """
-- KEYS: 1 the input's hash, 2 its set of job ids, 3 the tenant's stored input bytes, 4 the index of inputs
-- ARGV: 1 its member in the index
-- Returns the bytes given back to the tenant (0 when the input was not `deleting`: nothing changed).
if redis.call('HGET', KEYS[1], 'state') ~= 'deleting' then return 0 end
local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('DECRBY', KEYS[3], bytes) <= 0 then redis.call('DEL', KEYS[3]) end
return bytes
"""


class Claim(enum.Enum):
    new = "new"  # nobody had it: the caller stores the object (and it is charged to the tenant)
    shared = "shared"  # stored (or being stored) for another job: the caller makes sure the object is there
    busy = "busy"  # being deleted right now: ask again shortly
    stale = "stale"  # a deletion abandoned half way (its deleter died): finish it (object, then forget), ask again


class InputQuotaFull(Exception):
    """A new input would take the tenant's stored input bytes over its quota; nothing was claimed."""

    def __init__(self, used_bytes: int, quota_bytes: int):
        super().__init__(used_bytes, quota_bytes)
        self.used_bytes = used_bytes
        self.quota_bytes = quota_bytes


class InputStore:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl"):
        self._r = client
        self.keys = Keys(prefix)
        self._claim = client.register_script(_CLAIM)
        self._stored = client.register_script(_STORED)
        self._release = client.register_script(_RELEASE)
        self._retire = client.register_script(_RETIRE)
        self._forget = client.register_script(_FORGET)

    @staticmethod
    def _member(tenant: str, digest: str) -> str:
        return json.dumps([tenant, digest])

    def used_bytes(self, tenant: str) -> int:
        """The bytes of the tenant's stored inputs, new ones being stored included."""
        return int(self._r.get(self.keys.input_bytes(tenant)) or 0)

    def claim(
        self,
        tenant: str,
        digest: str,
        job_id: str,
        size_bytes: int,
        quota_bytes: int,
        look_at: float,
        pixels: tuple[int, int] = (0, 0),
        now: float | None = None,
    ) -> Claim:
        """Note that `job_id` names the input (before the job is stored: the sweep looks no sooner than
        `look_at`); a new one records `pixels`, the size (width, height) its hash is of. Raises InputQuotaFull
        when it is new and over `quota_bytes` (0: no quota)."""
        k = self.keys
        answer = self._claim(
            keys=[k.input(tenant, digest), k.input_jobs(tenant, digest), k.input_bytes(tenant), k.inputs],
            args=[
                job_id,
                size_bytes,
                quota_bytes,
                look_at,
                self._member(tenant, digest),
                f"{pixels[0]}x{pixels[1]}",
                time.time() if now is None else now,
                ABANDONED_AFTER_S,
            ],
        ).decode()
        if answer.startswith("full:"):
            raise InputQuotaFull(int(answer.removeprefix("full:")), quota_bytes)
        return Claim(answer)

    def pixels(self, tenant: str, digest: str) -> tuple[int, int] | None:
        """The size (width, height) an input's hash is of: its object may hold an image of another size (sent so,
        resized as it is read); None without a record (an input stored before records were kept: a PNG of its
        job's size)."""
        found = self._r.hget(self.keys.input(tenant, digest), "size")
        if not found:
            return None
        width, height = (int(n) for n in found.decode().split("x"))
        return (width, height) if width and height else None

    def stored(self, tenant: str, digest: str, size_bytes: int) -> bool:
        """The object is in storage, `size_bytes` long; False when the input is no longer claimed."""
        k = self.keys
        return bool(self._stored(keys=[k.input(tenant, digest), k.input_bytes(tenant)], args=[size_bytes]))

    def release(self, tenant: str, digest: str, job_id: str, made: bool, now: float | None = None) -> bool:
        """A refused submit's claim goes; True when the input it `made` is now unclaimed and `deleting`."""
        k = self.keys
        answer = self._release(
            keys=[k.input(tenant, digest), k.input_jobs(tenant, digest)],
            args=[job_id, "1" if made else "0", time.time() if now is None else now],
        )
        return bool(answer)

    def due(self, now: float, limit: int = 1000) -> list[tuple[str, str]]:
        """(tenant, hash) of the inputs the sweep may look at now, the longest due first."""
        found = self._r.zrangebyscore(self.keys.inputs, "-inf", now, start=0, num=limit)
        return [tuple(json.loads(member)) for member in found]  # type: ignore[misc]

    def references(self, tenant: str, digest: str) -> tuple[str, list[str]]:
        """The input's claims counter (as text) and the ids of the jobs that name it, read together."""
        k = self.keys
        pipe = self._r.pipeline(transaction=True)
        pipe.hget(k.input(tenant, digest), "claims")
        pipe.smembers(k.input_jobs(tenant, digest))
        claims, ids = pipe.execute()
        return (claims or b"0").decode(), sorted(i.decode() for i in ids)

    def retire(
        self, tenant: str, digest: str, claims: str, gone: list[str], look_again: float, now: float | None = None
    ) -> str:
        """Drop the `gone` job ids; "delete" when no job names the input any more (it is now `deleting`), "kept"
        (looked at again at `look_again`), or "unknown". Nothing changes if it was claimed since `claims`."""
        k = self.keys
        member = self._member(tenant, digest)
        return self._retire(
            keys=[k.input(tenant, digest), k.input_jobs(tenant, digest), k.inputs],
            args=[claims, look_again, member, time.time() if now is None else now, *gone],
        ).decode()

    def forget(self, tenant: str, digest: str) -> int:
        """A `deleting` input whose object is gone: its record goes and its bytes are given back (returned)."""
        k = self.keys
        return int(
            self._forget(
                keys=[k.input(tenant, digest), k.input_jobs(tenant, digest), k.input_bytes(tenant), k.inputs],
                args=[self._member(tenant, digest)],
            )
        )
