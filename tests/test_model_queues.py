"""A queue per model (common/queue.py), on a live stack: two worker processes holding different models
(SDXL_WORKER_MODELS) behind one API. Every job runs on a worker holding its model, and none is handed back or sent
on. The workers run the stand-in engine (SDXL_MODELS `a=standin,b=standin`): the test is about routing, not
pixels."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from api.main import create_app
from common.job_store import JobStore
from common.queue import generate_queue, worker_queues
from tests.helpers.servers import WorkerProcess, authorize, settings_from, standin_env, wait_for


def test_a_queue_per_model_and_what_a_worker_consumes():
    settings = settings_from({"SDXL_MODELS": "a=standin,b=standin", "SDXL_QUEUE_NAME": "q"})
    assert generate_queue(settings, "b") == "q.b" and generate_queue(settings, "b", "bulk") == "sdxl-bulk.b"
    # the default (a) keeps the lanes' own queues: a one-model deployment's names do not change
    assert generate_queue(settings, None) == generate_queue(settings, "a") == "q"
    assert generate_queue(settings, None, "bulk") == "sdxl-bulk"
    # interactive before bulk
    assert worker_queues(settings, ["b"]) == ["q.b", "sdxl-bulk.b"]
    assert worker_queues(settings, ["a", "b"]) == ["q", "q.b", "sdxl-bulk", "sdxl-bulk.b"]
    assert worker_queues(settings_from({"SDXL_WORKER_LANES": "bulk"}), ["tiny"]) == ["sdxl-bulk"]


def test_every_job_runs_on_a_worker_holding_its_model_and_none_is_handed_back(redis_url, tmp_path):
    prefix, env = standin_env(
        redis_url,
        tmp_path,
        "mq",
        SDXL_MODELS="a=standin,b=standin",
        SDXL_STANDIN_BATCH_S="0.2",
        SDXL_BATCH_TIMEOUT_S="0.1",
        SDXL_DATASET_FEEDER="false",
    )
    workers = {
        model: WorkerProcess({**env, "SDXL_WORKER_MODELS": model}, tmp_path / f"worker-{model}.log")
        for model in ("a", "b")
    }
    try:
        for worker in workers.values():
            worker.start(redis_url, prefix, timeout_s=120)
        settings = settings_from(env)
        with TestClient(create_app(settings)) as client:
            authorize(client, settings)
            asked = {}
            for i in range(12):
                model = [None, "a", "b"][i % 3]
                body = {"prompt": f"p{i}", "width": 64, "height": 64, "steps": 2}
                r = client.post("/v1/jobs", json=body | ({"model": model} if model else {}))
                assert r.status_code == 202, r.text
                asked[r.json()["id"]] = model or "a"

            def all_done() -> bool:
                return all(client.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in asked)

            wait_for(all_done, 60, 0.1)
        store = JobStore(redis.Redis.from_url(redis_url), prefix)
        ran_on = {
            job_id: store._r.hget(store.keys.job(job_id), "worker").decode() for job_id in asked
        }  # the worker that moved it to running
        names = {model: w for model in workers for w in {*ran_on.values()} if _holds(w, model, redis_url, prefix)}
        assert set(names) == {"a", "b"}, ran_on  # both workers ran jobs
        for job_id, model in asked.items():
            assert ran_on[job_id] == names[model], (job_id, model, ran_on)
        for worker in workers.values():
            log = worker.log_tail(200_000)
            assert "handed back" not in log and "not held here" not in log, log[-3000:]
    finally:
        for worker in workers.values():
            worker.stop()


def _holds(worker: str, model: str, redis_url: str, prefix: str) -> bool:
    from common.worker_registry import WorkerRegistry

    live = {w.name: w for w in WorkerRegistry(redis.Redis.from_url(redis_url), prefix).live()}
    return worker in live and [m["name"] for m in live[worker].models] == [model]
