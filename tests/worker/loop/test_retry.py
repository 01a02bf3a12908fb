"""The storage backoff (uploads and the reads before batching) and the Redis patience the stages share."""

import threading

import pytest
import redis

from common.outage import Outage
from worker.loop.retry import RedisRetry, StorageRetry


class Flaky:
    """Fails `failures` times with `error`, then answers "ok"; counts its calls."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_storage_calls_back_off_exponentially_up_to_the_cap_then_answer():
    sleeps: list[float] = []
    outage = Outage("test: storage")
    retry = StorageRetry(attempts=6, backoff_s=0.5, backoff_max_s=3.0, outage=outage, sleep=sleeps.append)
    flaky = Flaky(5, ConnectionError("storage away"))
    assert retry(flaky) == "ok" and flaky.calls == 6
    assert sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert not outage.down  # the answer ended the outage


def test_storage_away_beyond_the_attempts_raises_its_error():
    sleeps: list[float] = []
    retry = StorageRetry(3, 0.5, 8.0, Outage("test: storage"), sleep=sleeps.append)
    with pytest.raises(ConnectionError):
        retry(Flaky(3, ConnectionError("storage away")))
    assert sleeps == [0.5, 1.0]  # no wait after the last attempt


def test_a_missing_object_is_an_answer_raised_at_once():
    sleeps: list[float] = []
    retry = StorageRetry(5, 0.5, 8.0, Outage("test: storage"), sleep=sleeps.append)
    flaky = Flaky(1, KeyError("inputs/gone.png"))
    with pytest.raises(KeyError):
        retry(flaky)
    assert flaky.calls == 1 and sleeps == []


def test_redis_calls_wait_out_an_outage_until_stopped():
    stop = threading.Event()
    retry = RedisRetry(Outage("test: Redis", base_s=0.01, max_s=0.01), stop)
    flaky = Flaky(2, redis.exceptions.ConnectionError("away"))
    assert retry(flaky) == "ok" and flaky.calls == 3
    stop.set()  # stopping: the outage's error is raised, not waited out
    with pytest.raises(redis.exceptions.ConnectionError):
        retry(Flaky(1, redis.exceptions.ConnectionError("away")))
