"""Every Redis key and pub/sub channel the service uses, named in one place (as arq's constants.py, rq's
worker_registration.py). No other module builds a key string: the stores take a `Keys` and ask it
(tests/common/test_keys.py greps the tree for any that do).

Prefix P = settings.key_prefix (tests give each test its own, so nothing is ever flushed).

Hash tags (Redis Cluster): a script, a MULTI and a multi-key command must touch keys of one slot, and on a
cluster only the part of a key between its first `{` and `}` is hashed. The keys below that a script or a
transaction touches together with another start with `{P}` (the prefix as a hash tag), so they all share the
slot of P: a job's hash is changed by one script with the global queued and running sets, its tenant's sets,
its model's ring and, for a data set line, its run's hashes; a take moves a job from a ready set into a worker's
held set; the active-run caps read other runs' hashes. Those links join every record of the service into one
group, so on a cluster that group lives on the one master owning P's slot (docs/reliability.md "Redis Cluster").
The keys no script or transaction shares with another key start with a bare `P:` and spread over the masters:
the rate windows, the batch log, the sweep locks and data set idempotency keys. On a single Redis the braces
are only characters. Channels are no keys: P:ended and P:progress reach every node of a cluster.

Jobs (common/job_store.py):
    {P}:job:<id>              hash: status, request (JSON), timestamps, error, images (JSON), attempts, tenant,
                              seq, generation, worker, progress; interactive jobs also model (the request's,
                              resolved: the default model's name for a job that names none: whose ready set);
                              data set lines also lane, output_key, dataset
    {P}:queued                sorted set of queued interactive job ids by submit order: queue position = rank
                              (data set lines, lane "bulk", are in no queued set: their feeder tracks them)
    {P}:running               sorted set of running job ids by deadline: the stuck-job sweep reads it
    {P}:recent:<tenant>       a tenant's job ids by creation time: GET /v1/jobs pages through it
    {P}:tenant-queued:<tenant>  a tenant's queued job ids: the per-tenant cap counts it
    {P}:ready:<model>:<tenant>  sorted set of a tenant's interactive jobs for one model (the job's model, resolved)
                              waiting for a worker to take them, by submit order (seq): workers holding the
                              model take from its tenants in turn (fair order, docs/reliability.md)
    {P}:ready-tenants:<model> list: the ring of tenants whose ready set for the model is not empty, each once; a
                              worker takes the head tenant's oldest job and moves the tenant to the tail. The
                              scripts that add to or take from a ready set keep its ring in step with it
    {P}:idem:<tenant>:<sha256>  the job id and body hash behind a tenant's Idempotency-Key
    {P}:outbox                sorted set of created jobs whose Celery message the API has not confirmed sent,
                              by creation time: the record and this entry are written by one script, and a
                              worker's sweep sends the message of any entry older than OUTBOX_GRACE_S
    {P}:seq                   submit counter
    P:ended      (channel)    the id of each interactive job as it reaches a final status (api/job_events.py)
    P:progress   (channel)    the id of a running interactive job each time its worker records its step
A record expires `job_ttl_s` after its last change; the sets are trimmed of expired ids as they are read.

Workers (common/worker_registry.py, common/batch_log.py):
    {P}:worker:<name>         a worker's heartbeat record (common/worker_status.py), expiring 3 periods after
                              its last beat: /metrics and GET /v1/models read them
    {P}:workers               sorted set: each worker's name by when its heartbeat lapses (ms since the epoch),
                              written with the record: /readyz counts the live ones without a SCAN
    {P}:held:<name>           set of job ids a worker has taken off the queue and not yet answered: when its
                              heartbeat lapses, the sweep sends them again at once (worker/sweeper.py)
    {P}:holders               set of the workers that have held jobs (their held sets may be empty by now):
                              the dead-worker sweep reads it instead of a SCAN for held sets
    P:sweep-lock              the worker that runs this heartbeat period's sweeps (expires after 5 s)
    P:image-sweep-lock        the worker that runs this interval's image sweep (expires after the interval)
    P:batches                 list: one JSON line per engine run, newest first, the last 1,000

Data sets (common/dataset_store.py), for run R and tenant T:
    {P}:dataset:R             hash: status, counters (total, cursor, succeeded, failed, canceled, shards ...),
                              options
    {P}:dataset:R:inflight    hash: line index -> job id, for lines fed and not yet reaped (<= the feed depth)
    {P}:dataset:R:done        list: manifest rows of finished lines not yet in a shard (< shard size + depth)
    {P}:dataset:R:rows        hash: line index -> manifest row, the same for runs in input order
    {P}:dataset:R:failed      hash: line index -> {"line", "id", "error"} (grows only with failures)
    {P}:dataset:R:canceled    hash: line index -> {"line", "id"} of lines canceled once fed (or retried)
    {P}:dataset:R:retry       list: line indices to feed again (a retry of failed or canceled lines)
    {P}:dataset:R:rate        list: "time:succeeded" samples, newest first, for images/s and the ETA
    {P}:dataset:R:lock        the feeder lock: one worker feeds a run at a time
    {P}:datasets:active       list of runs that need a feeder (a KEDA trigger can scale the bulk pool on it)
    {P}:datasets:recent:T     a tenant's runs by creation time
    P:dataset-idem:T:<sha256> the run an Idempotency-Key made

API keys and rate limits (common/api_keys.py, common/rate_limit.py):
    {P}:apikey:<sha256 of key>  hash: key_id, tenant, name, created_at, revoked
    {P}:apikeys               hash: key id -> sha256 of the key (listing and revoking)
    P:rate:<kind>:<key id>:<window>  a key's request count in one fixed window (kind: read or write)

Celery's own keys (its queues, named by SDXL_QUEUE_NAME and SDXL_BULK_QUEUE_NAME, and kombu's
unacknowledged-message index) are Celery's business: common/queue.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# A job's or data set run's id as a client may send it back (the service makes 32 hex digits): checked before it
# is put in a key, so that `<run>:rate` cannot name the run's rate list, nor a 300-character id a key at all.
RECORD_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


# The parts (a key's first name after the prefix) whose keys carry the tag; the rest are `P:<part>...`
TAGGED_PARTS = frozenset(
    {
        *("job", "queued", "running", "recent", "tenant-queued", "ready", "ready-tenants", "idem", "outbox", "seq"),
        *("worker", "workers", "held", "holders", "dataset", "datasets", "apikey", "apikeys"),
    }
)


@dataclass(frozen=True)
class RunKeys:
    """The keys of one data set run ({P}:dataset:R and its parts)."""

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

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:  # it becomes the hash tag: braces in it would cut the tag short
            raise ValueError(f"a key prefix has no braces: {self.prefix!r}")

    @property
    def tag(self) -> str:
        """The hash tag of the keys that scripts and transactions touch together (the module's docstring)."""
        return "{" + self.prefix + "}"

    def _tagged(self, *parts: str) -> str:
        """A key in the tagged group: on a cluster, in the slot of the prefix."""
        return ":".join((self.tag, *parts))

    def _alone(self, *parts: str) -> str:
        """A key no script or transaction touches with another: on a cluster, in a slot of its own name's."""
        return ":".join((self.prefix, *parts))

    @property
    def everything(self) -> tuple[str, ...]:
        """SCAN globs that, together, match every key under the prefix (braces are no glob characters)."""
        return (self._tagged("*"), self.untagged)

    @property
    def untagged(self) -> str:
        """A SCAN glob for the keys without the tag: those that spread over a cluster, and every key of the layout
        before hash tags (`renamed`)."""
        return self._alone("*")

    def renamed(self, key: bytes | str) -> str | None:
        """A key of the layout before hash tags (every key was `P:<part>...`): its name now, or None where that is
        unchanged (common/key_migration.py renames a deployment's keys with it)."""
        name = _text(key)
        rest = name[len(self.prefix) + 1 :]
        if not name.startswith(self._alone("")) or rest.split(":")[0] not in TAGGED_PARTS:
            return None
        return self._tagged(rest)

    # ------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> str:
        return self._tagged("job", job_id)

    @property
    def queued(self) -> str:
        return self._tagged("queued")

    @property
    def running(self) -> str:
        return self._tagged("running")

    def recent(self, tenant: str) -> str:
        return self._tagged("recent", tenant)

    def tenant_queued(self, tenant: str) -> str:
        return self._tagged("tenant-queued", tenant)

    def ready(self, model: str, tenant: str) -> str:
        """A tenant's jobs ready for the workers holding `model` (a job's model, resolved: the default's name for a
        job that names none)."""
        return self._tagged("ready", model, tenant)

    def ready_tenants(self, model: str) -> str:
        """The ring of tenants with jobs ready for `model`."""
        return self._tagged("ready-tenants", model)

    def idempotency(self, tenant: str, key_sha256: str) -> str:
        return self._tagged("idem", tenant, key_sha256)

    @property
    def outbox(self) -> str:
        return self._tagged("outbox")

    @property
    def seq(self) -> str:
        return self._tagged("seq")

    @property
    def ended(self) -> str:
        """Pub/sub channel: interactive jobs' ids as they end."""
        return self._alone("ended")

    @property
    def progress(self) -> str:
        """Pub/sub channel: running interactive jobs' ids as their progress is written."""
        return self._alone("progress")

    # ------------------------------------------------------------------ workers

    def worker(self, name: str) -> str:
        """A worker's heartbeat record; `name` may be a SCAN glob (`*`, `host-*`)."""
        return self._tagged("worker", name)

    @property
    def workers(self) -> str:
        return self._tagged("workers")

    def worker_name(self, key: bytes | str) -> str:
        """The worker a heartbeat key names."""
        return _text(key)[len(self.worker("")) :]

    def held(self, worker: str) -> str:
        """The jobs a worker holds; `worker` may be a SCAN glob."""
        return self._tagged("held", worker)

    @property
    def holders(self) -> str:
        return self._tagged("holders")

    def held_worker(self, key: bytes | str) -> str:
        """The worker a held-jobs key names."""
        return _text(key)[len(self.held("")) :]

    @property
    def sweep_lock(self) -> str:
        return self._alone("sweep-lock")

    @property
    def image_sweep_lock(self) -> str:
        return self._alone("image-sweep-lock")

    @property
    def batches(self) -> str:
        return self._alone("batches")

    # ------------------------------------------------------------------ data sets

    def run(self, run_id: str) -> RunKeys:
        record = self._tagged("dataset", run_id)
        parts = ("inflight", "done", "rows", "failed", "canceled", "retry", "rate", "lock")
        return RunKeys(record, **{part: f"{record}:{part}" for part in parts})

    @property
    def datasets_active(self) -> str:
        return self._tagged("datasets", "active")

    def datasets_recent(self, tenant: str) -> str:
        return self._tagged("datasets", "recent", tenant)

    def dataset_idempotency(self, tenant: str, key_sha256: str) -> str:
        return self._alone("dataset-idem", tenant, key_sha256)

    # ------------------------------------------------------------------ API keys and rate limits

    def api_key(self, key_sha256: str) -> str:
        return self._tagged("apikey", key_sha256)

    @property
    def api_key_ids(self) -> str:
        return self._tagged("apikeys")

    def rate_window(self, kind: str, key_id: str, window: int) -> str:
        return self._alone("rate", kind, key_id, str(window))


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
