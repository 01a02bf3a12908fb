"""The image sweep (worker/image_retention.py), side by side with a one-by-one sweep, on a real SeaweedFS
server and a local folder, with a real Redis (embedded Valkey).

    python bench/retention.py --images 2000 --rounds 3 --json bench/results/retention-cpu.json

Method: each round writes `--images` one-image jobs into one hour folder old enough to be swept, 10% of
them with a live job record, then sweeps it, once per method, in turn (fresh objects each time):
- ours: list, one pipelined EXISTS per 1,000 keys' jobs, one DeleteObjects per 1,000 orphans;
- one by one: the same listing, one EXISTS and one DELETE (Storage.delete) per image.
Timed: the sweep alone, not the writing. Reported: medians over the rounds of images swept (listed and
decided) per second, the ratio, and per image the Redis commands (INFO commandstats) and S3 requests (a
botocore hook) each method made. Every expired image must be gone and every live one kept, else it stops.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from common import redis_server
from common.job_store import JobStore
from common.storage import LocalStorage, S3Storage, Storage
from tests.helpers.servers import SeaweedS3, settings_from
from worker.image_retention import ROOT, hour, sweep

LIVE_SHARE = 0.1


def one_by_one(storage: Storage, store: JobStore, now: float) -> dict:
    """The same decision as `sweep`, made a request at a time."""
    done = {"deleted": 0, "kept": 0}
    for name in storage.folders(ROOT):
        for key in list(storage.keys(f"{ROOT}/{name}")):
            if store.existing([key.split("/")[2]])[0]:
                done["kept"] += 1
            else:
                storage.delete(key)
                done["deleted"] += 1
    return done


METHODS = {"ours": lambda storage, store, now: sweep(storage, store, now=now), "one by one": one_by_one}


def fill(
    storage: Storage, store: JobStore, r: redis.Redis, images: int, now: float, pool: ThreadPoolExecutor
) -> tuple[set, set]:
    folder = hour(now - 2 * store.ttl_s)
    keys = {f"{ROOT}/{folder}/{uuid.uuid4().hex}/0.png" for _ in range(images)}
    live = set(sorted(keys)[:: round(1 / LIVE_SHARE)])
    pipe = r.pipeline(transaction=False)  # bare records: all the sweep reads of them is that they exist
    for key in live:
        pipe.hset(store.keys.job(key.split("/")[2]), "status", "succeeded")
    pipe.execute()
    list(pool.map(lambda k: storage.put(k, b"\x89PNG" + b"\0" * 4096, "image/png"), keys))
    return keys, live


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    result = harness.start("retention", args, __doc__)
    tmp = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    valkey = redis_server.start_embedded(tmp / "valkey")
    s3 = SeaweedS3(tmp / "s3")
    s3.start()
    r = redis.Redis.from_url(f"redis://127.0.0.1:{valkey.port}/0")
    pool = ThreadPoolExecutor(16)
    try:
        for backend in ("s3", "local"):
            rows: dict[str, dict[str, list[float]]] = {m: {"per_s": [], "redis": [], "s3": []} for m in METHODS}
            for round_ in range(args.rounds):
                for method, run in METHODS.items():
                    prefix = f"b{uuid.uuid4().hex[:8]}"
                    store = JobStore(r, prefix, ttl_s=3600)
                    if backend == "s3":
                        storage: Storage = S3Storage(settings_from({**s3.env(), "SDXL_S3_PREFIX": prefix}))
                        calls: Counter[str] = Counter()
                        storage.client.meta.events.register(
                            "before-call.s3", lambda model, calls=calls, **_: calls.update([model.name])
                        )
                    else:
                        storage, calls = LocalStorage(tmp / "images" / prefix, "http://x", b"k" * 32), Counter()
                    now = time.time()
                    keys, live = fill(storage, store, r, args.images, now, pool)
                    calls.clear()
                    r.config_resetstat()
                    t0 = time.perf_counter()
                    done = run(storage, store, now)
                    elapsed = time.perf_counter() - t0
                    stats = r.info("commandstats")
                    redis_calls = sum(
                        v["calls"] for k, v in stats.items() if not k.startswith(("cmdstat_config", "cmdstat_info"))
                    )
                    assert done["deleted"] == len(keys) - len(live) and done["kept"] == len(live), done
                    assert set(storage.keys(ROOT)) == live, "an expired image was kept or a live one deleted"
                    rows[method]["per_s"].append(len(keys) / elapsed)
                    rows[method]["redis"].append(redis_calls / len(keys))
                    rows[method]["s3"].append(sum(calls.values()) / len(keys))
                    line = f"{len(keys) / elapsed:,.0f} images/s ({elapsed:.2f} s), {redis_calls} Redis commands"
                    print(f"{backend} round {round_ + 1} {method}: {line}, S3 requests {dict(calls)}", flush=True)
            med = {m: {k: harness.Timing.of(v).median_s for k, v in row.items()} for m, row in rows.items()}
            figure = {
                "images_per_round": args.images,
                "live_share": LIVE_SHARE,
                "rounds": args.rounds,
                "ours_images_per_s": round(med["ours"]["per_s"]),
                "one_by_one_images_per_s": round(med["one by one"]["per_s"]),
                "ratio": round(med["ours"]["per_s"] / med["one by one"]["per_s"], 2),
                "ours_redis_commands_per_image": round(med["ours"]["redis"], 4),
                "one_by_one_redis_commands_per_image": round(med["one by one"]["redis"], 4),
                "ours_s3_requests_per_image": round(med["ours"]["s3"], 4) if backend == "s3" else None,
                "one_by_one_s3_requests_per_image": round(med["one by one"]["s3"], 4) if backend == "s3" else None,
            }
            result.add(backend, figure)
            print(json.dumps({backend: figure}, indent=1), flush=True)
    finally:
        pool.shutdown()
        s3.stop()
        valkey.stop()


if __name__ == "__main__":
    main()
