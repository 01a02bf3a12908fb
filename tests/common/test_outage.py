"""common/outage.py: one warning per outage and one when it ends, retries only for outages, and a thread that
dies takes its process down (checked in a child process: it exits)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest
import redis

from common.outage import EXIT_THREAD_DIED, Outage


def test_an_outage_is_logged_once_and_its_end_once(caplog):
    outage = Outage("test: Redis", base_s=0.001, max_s=0.002)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise redis.exceptions.ConnectionError("refused")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert outage.call(flaky) == "ok"
        assert outage.call(flaky) == "ok"  # healthy: nothing more logged
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in line for line in lines) == 1
    assert sum("is back after" in line and "(5 failed calls)" in line for line in lines) == 1
    assert not outage.down


def test_only_outages_are_retried():
    outage = Outage("test: Redis", base_s=0.001, max_s=0.002)
    with pytest.raises(ValueError):
        outage.call(lambda: (_ for _ in ()).throw(ValueError("a bug, not an outage")))
    stop = threading.Event()
    stop.set()  # stopping: the outage's error comes out instead of another try
    with pytest.raises(redis.exceptions.TimeoutError):
        outage.call(lambda: (_ for _ in ()).throw(redis.exceptions.TimeoutError("slow")), stop=stop)


def test_the_backoff_grows_to_its_ceiling_with_jitter():
    outage = Outage("test", base_s=0.1, max_s=1.0)
    waits = [outage.failed(redis.exceptions.ConnectionError()) for _ in range(10)]
    assert 0.05 <= waits[0] <= 0.1 and all(0.5 <= w <= 1.0 for w in waits[5:])
    assert len(set(waits[5:])) > 1  # jittered: workers that lost Redis together do not retry in step


def test_a_supervised_thread_that_dies_takes_the_process_down():
    script = (
        "import time\n"
        "from common.outage import supervised\n"
        "def broken():\n"
        "    raise RuntimeError('a bug in a long-lived thread')\n"
        "supervised(broken, 'device').start()\n"
        "time.sleep(30)\n"
        "print('still alive')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_THREAD_DIED and "still alive" not in proc.stdout
    assert "thread 'device' died; exiting" in proc.stderr and "a bug in a long-lived thread" in proc.stderr
