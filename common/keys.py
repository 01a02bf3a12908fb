"""Every Redis key and pub/sub channel the service uses, named in one place (as arq's constants.py, rq's
worker_registration.py). No other module builds a key string: the stores take a `Keys` and ask it
(tests/common/test_keys.py greps the tree for any that do).

Prefix P = settings.key_prefix (tests give each test its own, so nothing is ever flushed).

Jobs (common/job_store.py):
    P:job:<id>                hash: status, request (JSON), timestamps, error, images (JSON), attempts, tenant,
                              seq, generation, worker, progress; interactive jobs also model (the request's,
                              resolved: the default model's name for a job that names none: whose ready set);
                              data set lines also lane, output_key, dataset
    P:queued                  sorted set of queued interactive job ids by submit order: queue position = rank
                              (data set lines, lane "bulk", are in no queued set: their feeder tracks them)
    P:running                 sorted set of running job ids by deadline: the stuck-job sweep reads it
    P:recent:<tenant>         a tenant's job ids by creation time: GET /v1/jobs pages through it
    P:tenant-queued:<tenant>  a tenant's queued job ids: the per-tenant cap counts it
    P:ready:<model>:<tenant>  sorted set of a tenant's interactive jobs for one model (the job's model, resolved)
                              waiting for a worker to take them, by submit order (seq): workers holding the
                              model take from its tenants in turn (fair order, docs/reliability.md)
    P:ready-tenants:<model>   list: the ring of tenants whose ready set for the model is not empty, each once; a
                              worker takes the head tenant's oldest job and moves the tenant to the tail. The
                              scripts that add to or take from a ready set keep its ring in step with it
    P:idem:<tenant>:<sha256>  the job id and body hash behind a tenant's Idempotency-Key
    P:outbox                  sorted set of created jobs whose Celery message the API has not confirmed sent,
                              by creation time: the record and this entry are written by one script, and a
                              worker's sweep sends the message of any entry older than OUTBOX_GRACE_S
    P:seq                     submit counter
    P:ended      (channel)    the id of each interactive job as it reaches a final status (api/job_events.py)
    P:progress   (channel)    the id of a running interactive job each time its worker records its step
A record expires `job_ttl_s` after its last change; the sets are trimmed of expired ids as they are read.

Workers (common/worker_registry.py, common/batch_log.py):
    P:worker:<name>           a worker's heartbeat record (common/worker_status.py), expiring 3 periods after
                              its last beat: /metrics and GET /v1/models read them
    P:workers                 sorted set: each worker's name by when its heartbeat lapses (ms since the epoch),
                              written with the record: /readyz counts the live ones without a SCAN
    P:held:<name>             set of job ids a worker has taken off the queue and not yet answered: when its
                              heartbeat lapses, the sweep sends them again at once (worker/sweeper.py)
    P:holders                 set of the workers that have held jobs (their held sets may be empty by now):
                              the dead-worker sweep reads it instead of a SCAN for held sets
    P:sweep-lock              the worker that runs this heartbeat period's sweeps (expires after 5 s)
    P:image-sweep-lock        the worker that runs this interval's image sweep (expires after the interval)
    P:batches                 list: one JSON line per engine run, newest first, the last 1,000

Data sets (common/dataset_store.py), for run R and tenant T:
    P:dataset:R               hash: status, counters (total, cursor, succeeded, failed, canceled, shards ...),
                              options
    P:dataset:R:inflight      hash: line index -> job id, for lines fed and not yet reaped (<= the feed depth)
    P:dataset:R:done          list: manifest rows of finished lines not yet in a shard (< shard size + depth)
    P:dataset:R:rows          hash: line index -> manifest row, the same for runs in input order
    P:dataset:R:failed        hash: line index -> {"line", "id", "error"} (grows only with failures)
    P:dataset:R:canceled      hash: line index -> {"line", "id"} of lines canceled once fed (or retried)
    P:dataset:R:retry         list: line indices to feed again (a retry of failed or canceled lines)
    P:dataset:R:rate          list: "time:succeeded" samples, newest first, for images/s and the ETA
    P:dataset:R:lock          the feeder lock: one worker feeds a run at a time
    P:datasets:active         list of runs that need a feeder (a KEDA trigger can scale the bulk pool on it)
    P:datasets:recent:T       a tenant's runs by creation time
    P:dataset-idem:T:<sha256> the run an Idempotency-Key made

Input images (common/input_store.py), for tenant T and an input's content hash H (common/inputs.py):
    P:input:T:H               hash: state (storing, stored, deleting), bytes (stored), size (<w>x<h>: the pixels
                              hashed; the object may be the image as sent, of another size), claims (a counter
                              each submit that names it bumps: a sweep that read it before a claim leaves it be)
    P:input-jobs:T:H          set of the job ids that name the input: it is kept while any of their records lives
    P:input-bytes:T           the bytes of a tenant's stored inputs (SDXL_MAX_INPUT_BYTES_PER_TENANT bounds it)
    P:inputs                  sorted set of every stored input ([T, H] as JSON) by when the sweep may next look
                              at it (its last claim + SDXL_INPUT_GRACE_S)

API keys and rate limits (common/api_keys.py, common/rate_limit.py):
    P:apikey:<sha256 of key>  hash: key_id, tenant, name, created_at, revoked
    P:apikeys                 hash: key id -> sha256 of the key (listing and revoking)
    P:rate:<kind>:<key id>:<window>  a key's request count in one fixed window (kind: read or write)

Celery's own keys (its queues, named by SDXL_QUEUE_NAME and SDXL_BULK_QUEUE_NAME, and kombu's
unacknowledged-message index) are Celery's business: common/queue.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# A job's or data set run's id as a client may send it back (the service makes 32 hex digits): checked before it
# is put in a key, so that `<run>:rate` cannot name the run's rate list, nor a 300-character id a key at all.
RECORD_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


@dataclass(frozen=True)
class RunKeys:
    """The keys of one data set run (P:dataset:R and its parts)."""

    record: str  # the run's hash
    inflight: str
    done: str
    rows: str
    failed: str
    canceled: str
    retry: str
    rate: str
    lock: str

    @property
    def kept(self) -> tuple[str, ...]:
        """What a finished run keeps until it expires (given the run's TTL together): the record and what its
        status, files and a resume read. In flight, retry and lock are empty or gone by then."""
        return (self.record, self.done, self.failed, self.rate, self.rows, self.canceled)


@dataclass(frozen=True)
class Keys:
    """The key layout under one prefix."""

    prefix: str = "sdxl"

    def _join(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def everything(self) -> str:
        """A SCAN glob for every key under the prefix."""
        return self._join("*")

    # ------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> str:
        return self._join("job", job_id)

    @property
    def queued(self) -> str:
        return self._join("queued")

    @property
    def running(self) -> str:
        return self._join("running")

    def recent(self, tenant: str) -> str:
        return self._join("recent", tenant)

    def tenant_queued(self, tenant: str) -> str:
        return self._join("tenant-queued", tenant)

    def ready(self, model: str, tenant: str) -> str:
        """A tenant's jobs ready for the workers holding `model` (a job's model, resolved: the default's name for a
        job that names none)."""
        return self._join("ready", model, tenant)

    def ready_tenants(self, model: str) -> str:
        """The ring of tenants with jobs ready for `model`."""
        return self._join("ready-tenants", model)

    def idempotency(self, tenant: str, key_sha256: str) -> str:
        return self._join("idem", tenant, key_sha256)

    @property
    def outbox(self) -> str:
        return self._join("outbox")

    @property
    def seq(self) -> str:
        return self._join("seq")

    @property
    def ended(self) -> str:
        """Pub/sub channel: interactive jobs' ids as they end."""
        return self._join("ended")

    @property
    def progress(self) -> str:
        """Pub/sub channel: running interactive jobs' ids as their progress is written."""
        return self._join("progress")

    # ------------------------------------------------------------------ workers

    def worker(self, name: str) -> str:
        """A worker's heartbeat record; `name` may be a SCAN glob (`*`, `host-*`)."""
        return self._join("worker", name)

    @property
    def workers(self) -> str:
        return self._join("workers")

    def worker_name(self, key: bytes | str) -> str:
        """The worker a heartbeat key names."""
        return _text(key)[len(self.worker("")) :]

    def held(self, worker: str) -> str:
        """The jobs a worker holds; `worker` may be a SCAN glob."""
        return self._join("held", worker)

    @property
    def holders(self) -> str:
        return self._join("holders")

    def held_worker(self, key: bytes | str) -> str:
        """The worker a held-jobs key names."""
        return _text(key)[len(self.held("")) :]

    @property
    def sweep_lock(self) -> str:
        return self._join("sweep-lock")

    @property
    def image_sweep_lock(self) -> str:
        return self._join("image-sweep-lock")

    @property
    def batches(self) -> str:
        return self._join("batches")

    # ------------------------------------------------------------------ data sets

    def run(self, run_id: str) -> RunKeys:
        record = self._join("dataset", run_id)
        parts = ("inflight", "done", "rows", "failed", "canceled", "retry", "rate", "lock")
        return RunKeys(record, **{part: f"{record}:{part}" for part in parts})

    @property
    def datasets_active(self) -> str:
        return self._join("datasets", "active")

    def datasets_recent(self, tenant: str) -> str:
        return self._join("datasets", "recent", tenant)

    def dataset_idempotency(self, tenant: str, key_sha256: str) -> str:
        return self._join("dataset-idem", tenant, key_sha256)

    # ------------------------------------------------------------------ input images

    def input(self, tenant: str, digest: str) -> str:
        return self._join("input", tenant, digest)

    def input_jobs(self, tenant: str, digest: str) -> str:
        return self._join("input-jobs", tenant, digest)

    def input_bytes(self, tenant: str) -> str:
        return self._join("input-bytes", tenant)

    @property
    def inputs(self) -> str:
        return self._join("inputs")

    # ------------------------------------------------------------------ API keys and rate limits

    def api_key(self, key_sha256: str) -> str:
        return self._join("apikey", key_sha256)

    @property
    def api_key_ids(self) -> str:
        return self._join("apikeys")

    def rate_window(self, kind: str, key_id: str, window: int) -> str:
        return self._join("rate", kind, key_id, str(window))


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
