"""Waiting for a job to end (api/job_events.py) through the API: `?wait_s=` on a poll, `Prefer: wait=` on a
submit. A real Redis and no worker: the tests end jobs through the job store, as a worker would."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from common.job_store import JobStore
from common.jobs import ImageRecord, JobStatus
from tests.helpers.servers import authorize, wait_for

GOOD = {"prompt": "a cat in a hat", "width": 96, "height": 64}


def store_for(settings) -> JobStore:
    return JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix, settings.job_ttl_s)


def succeed(store: JobStore, job_id: str) -> None:
    """What a worker does with a job: queued -> running -> succeeded with one image."""
    assert store.transition(job_id, JobStatus.running)[0]
    image = ImageRecord(key=f"images/{job_id}/0.png", seed=1, width=96, height=64, sha256="0" * 64)
    assert store.succeed(job_id, [image], truncated=False)


def in_thread(call) -> tuple[threading.Thread, dict]:
    """Run `call` on a thread; its answer and seconds taken land in the returned dict."""
    out: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        out["answer"] = call()
        out["s"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def events(client):
    return client.app.state.services.events


def test_a_poll_with_wait_s_answers_when_the_job_ends(client, settings):
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    wait_for(lambda: events(client).subscribed)
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait_s": 30}))
    wait_for(lambda: events(client).waiting == 1)  # the request is waiting, not answered
    assert "answer" not in out
    succeed(store_for(settings), job_id)
    thread.join(timeout=30)
    r = out["answer"]
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert r.json()["images"][0]["url"].startswith("http://testserver/v1/files/")  # signed like any poll
    assert out["s"] < 20  # woken by the end, not by the 30 s deadline
    assert events(client).waiting == 0


def test_a_wait_that_runs_out_answers_with_the_job_as_it_is(client):
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    t0 = time.monotonic()
    r = client.get(f"/v1/jobs/{job_id}", params={"wait_s": 0.5})
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["queue_position"] == 1
    assert time.monotonic() - t0 >= 0.5
    assert events(client).waiting == 0


def test_a_cancel_wakes_the_waiter(client):
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    wait_for(lambda: events(client).subscribed)
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait_s": 30}))
    wait_for(lambda: events(client).waiting == 1)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["outcome"] == "never_ran"
    thread.join(timeout=30)
    assert out["answer"].json()["status"] == "canceled" and out["s"] < 20


def test_prefer_wait_on_submit_answers_200_once_the_job_has_ended(client, settings):
    store = store_for(settings)
    wait_for(lambda: events(client).subscribed)

    def fail_the_first_queued_job() -> None:  # the job id is unknown until the submit answers
        wait_for(lambda: store.queued_count() == 1)
        queued = redis.Redis.from_url(settings.redis_url).zrange(store.keys.queued, 0, -1)
        (job_id,) = [i.decode() for i in queued]
        wait_for(lambda: events(client).waiting == 1)
        store.fail(job_id, "the model could not run it", allowed_from=[JobStatus.queued])

    helper = threading.Thread(target=fail_the_first_queued_job)
    helper.start()
    t0 = time.monotonic()
    r = client.post("/v1/jobs", json=GOOD, headers={"Prefer": "wait=30"})
    helper.join(timeout=30)
    assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=30"
    assert r.json()["status"] == "failed" and r.json()["error"] == "the model could not run it"
    assert time.monotonic() - t0 < 20


def test_prefer_wait_that_runs_out_is_202_with_the_job_queued(client):
    r = client.post("/v1/jobs", json=GOOD, headers={"Prefer": "respond-async, wait=0.5"})
    assert r.status_code == 202 and r.headers["Preference-Applied"] == "wait=0.5"
    assert r.json()["status"] == "queued"
    plain = client.post("/v1/jobs", json=GOOD, headers={"Prefer": "respond-async"})  # no wait asked: none applied
    assert plain.status_code == 202 and "Preference-Applied" not in plain.headers


def test_a_replay_with_prefer_wait_gets_the_ended_job(client, settings):
    h = {"Idempotency-Key": "wait-replay"}
    job_id = client.post("/v1/jobs", json=GOOD, headers=h).json()["id"]
    succeed(store_for(settings), job_id)
    r = client.post("/v1/jobs", json=GOOD, headers={**h, "Prefer": "wait=30"})
    assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert r.json()["id"] == job_id and r.json()["status"] == "succeeded"


def test_waits_longer_than_allowed_are_capped_or_refused(settings):
    with TestClient(create_app(settings.model_copy(update={"max_wait_s": 0.5}))) as c:
        authorize(c, settings)
        for prefer in ("wait=3600", "wait"):  # a bare `wait`: the most this deployment allows
            r = c.post("/v1/jobs", json=GOOD, headers={"Prefer": prefer})
            assert r.status_code == 202 and r.headers["Preference-Applied"] == "wait=0.5", prefer
        job_id = r.json()["id"]
        too_long = c.get(f"/v1/jobs/{job_id}", params={"wait_s": 2})
        assert too_long.status_code == 422
        assert "wait_s: at most 0.5 s on this deployment (SDXL_MAX_WAIT_S), got 2" in too_long.json()["detail"]


@pytest.mark.parametrize("prefer", ["wait=soon", "wait=-1", "wait=nan", "wait=1e999"])
def test_a_bad_prefer_wait_is_422_and_stores_nothing(client, prefer):
    r = client.post("/v1/jobs", json=GOOD, headers={"Prefer": prefer})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "Prefer" and "not a number of seconds" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_negative_wait_s_is_422(client):
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}", params={"wait_s": -1})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "wait_s"


def test_an_unknown_or_other_tenants_job_is_404_without_waiting(client, settings):
    mine = client.post("/v1/jobs", json=GOOD).json()["id"]
    t0 = time.monotonic()
    assert client.get("/v1/jobs/nope", params={"wait_s": 30}).status_code == 404
    with TestClient(create_app(settings)) as other:
        authorize(other, settings, tenant="other")
        assert other.get(f"/v1/jobs/{mine}", params={"wait_s": 30}).status_code == 404
    assert time.monotonic() - t0 < 20 and events(client).waiting == 0


def test_an_end_while_the_subscription_is_down_is_not_missed(client, settings, monkeypatch):
    """The listener's connection is killed by the server (as a Redis restart or a network cut would) and the
    job ends before it has subscribed again: the resubscription wakes the waiter, which reads the end."""
    from api import job_events

    # room to end the job while nobody listens: the listener resubscribes only after this long. 2 s was too
    # little on a loaded machine (the end was heard by the new subscription, and the check below failed)
    monkeypatch.setattr(job_events, "FIRST_BACKOFF_S", 8.0)
    store = store_for(settings)
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    wait_for(lambda: events(client).subscribed)
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait_s": 30}))
    wait_for(lambda: events(client).waiting == 1)
    name = events(client).client_name
    r = redis.Redis.from_url(settings.redis_url)
    (listener,) = [c for c in r.client_list(_type="pubsub") if c["name"] == name]
    r.client_kill_filter(_id=listener["id"])
    wait_for(lambda: not events(client).subscribed)
    succeed(store, job_id)
    assert r.pubsub_numsub(store.keys.ended) == [(store.keys.ended.encode(), 0)]  # heard by nobody
    assert "answer" not in out
    thread.join(timeout=30)
    assert out["answer"].json()["status"] == "succeeded" and out["s"] < 20
    wait_for(lambda: events(client).subscribed)
    # and the new subscription carries ends as before
    second = client.post("/v1/jobs", json=GOOD).json()["id"]
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{second}", params={"wait_s": 30}))
    wait_for(lambda: events(client).waiting == 1)
    succeed(store, second)
    thread.join(timeout=30)
    assert out["answer"].json()["status"] == "succeeded" and out["s"] < 20


@pytest.fixture
def served(redis_url, tmp_path):
    """The API under uvicorn, as deployed (no worker): (the process, an authorized client, settings, its key)."""
    import httpx

    from tests.helpers.servers import ApiProcess, settings_from, standin_env

    _, env = standin_env(redis_url, tmp_path, "uv", SDXL_IMAGE_SIZES="96x64")
    settings = settings_from(env)
    api = ApiProcess(env, tmp_path / "api.log")
    api.start()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            key = authorize(client, settings)
            yield api, client, settings, key
    finally:
        api.stop()


def test_sigterm_lets_waiting_requests_answer(served):
    """A SIGTERM stops new requests but a waiting one still gets its answer (the deployments give the API a
    stop grace period above SDXL_MAX_WAIT_S for this)."""
    import httpx

    api, client, settings, _ = served
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait_s": 10}))
    time.sleep(1)  # the request is in, and waiting
    api.proc.terminate()
    time.sleep(0.5)
    assert api.proc.poll() is None  # still up for the waiting request
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api.url}/healthz", timeout=2)  # but taking no new ones
    succeed(store_for(settings), job_id)
    thread.join(timeout=30)
    assert out["answer"].status_code == 200 and out["answer"].json()["status"] == "succeeded"
    assert api.proc.wait(timeout=10) == -signal.SIGTERM  # then it ends (uvicorn re-raises the signal)


def test_a_wait_stops_when_its_client_leaves(served):
    """A client that closes the connection mid-wait frees its wait at once, not at its deadline, on a poll
    and on a submit (the job itself stays queued); /metrics counts the waiting requests."""
    import json
    import socket

    from tests.helpers.metrics import samples

    api, client, settings, key = served
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    body = json.dumps(GOOD)
    head = f"Host: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
    requests = [
        f"GET /v1/jobs/{job_id}?wait_s=50 HTTP/1.1\r\n{head}\r\n",
        f"POST /v1/jobs HTTP/1.1\r\n{head}Prefer: wait=50\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}",
    ]

    def waiting() -> float:
        return samples(client.get("/metrics").text)["sdxl_api_waiting_requests"]

    for raw in requests:
        sock = socket.create_connection(("127.0.0.1", api.port))
        sock.sendall(raw.encode())
        wait_for(lambda: waiting() == 1, timeout_s=10)
        sock.close()
        t0 = time.monotonic()
        wait_for(lambda: waiting() == 0, timeout_s=10)
        assert time.monotonic() - t0 < 5  # the wait asked for 50 s
    statuses = [j["status"] for j in client.get("/v1/jobs").json()["jobs"]]
    assert statuses == ["queued", "queued"]  # leaving a wait cancels nothing
    # a client that stays is answered as before
    thread, out = in_thread(lambda: client.get(f"/v1/jobs/{job_id}", params={"wait_s": 20}))
    wait_for(lambda: waiting() == 1, timeout_s=10)
    succeed(store_for(settings), job_id)
    thread.join(timeout=30)
    assert out["answer"].json()["status"] == "succeeded" and waiting() == 0


def test_shutdown_does_not_wait_forever_on_a_listener_that_will_not_close(monkeypatch):
    """The listener's close hangs (it swallows its cancellation, as a connection close stuck on a lock would):
    stop() still returns after STOP_S. A stand-in connection, since no real client can be made to hang on demand:
    this is about the shutdown's bound, not about Redis."""
    import asyncio

    from api import job_events

    class Stuck:
        def pubsub(self):
            return self

        async def subscribe(self, *channels):
            await asyncio.sleep(3600)

        stuck = True

        async def aclose(self):
            while True:  # ignores every cancellation while stuck (then the test's loop can end)
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if not Stuck.stuck:
                        raise

    monkeypatch.setattr(job_events, "STOP_S", 0.5)

    async def run() -> float:
        events = job_events.JobEvents(lambda name: Stuck(), "ended")
        events.start()
        await asyncio.sleep(0.1)  # the listener is in subscribe()
        t0 = time.monotonic()
        await events.stop()
        stopped_s = time.monotonic() - t0
        Stuck.stuck = False
        return stopped_s

    assert asyncio.run(run()) < 2
