"""Every Redis client the service makes, built from the settings in one place: sync and asyncio clients for the
stores, and Celery's broker URL and options, for the three ways Redis may be deployed.

- One server: `SDXL_REDIS_URL`, `redis://[user:password@]host:port/db` or `rediss://...` (TLS). An ACL user goes
  in the URL's user part (`rediss://sdxl:secret@host:6380/0`); the password alone is `redis://:secret@host/0`.
  A private CA for TLS: `?ssl_ca_certs=/path/ca.pem` on the URL (`ssl_certfile`, `ssl_keyfile` for a client
  certificate; `ssl_cert_reqs=none` turns verification off, for tests only).
- Sentinel: `SDXL_REDIS_SENTINELS=host:port,host:port,...` and `SDXL_REDIS_SENTINEL_MASTER` (the name the
  sentinels monitor; `SDXL_REDIS_SENTINEL_PASSWORD` when they ask for one). Every client asks the sentinels
  which server is the primary, and asks again after a failover (redis-py's SentinelConnectionPool; kombu's
  sentinel channel for Celery, common/broker.py). `SDXL_REDIS_URL` still gives the database, the user and
  password of the data servers, and TLS (`rediss://`); its host and port are not used.
- Redis Cluster: not here yet. A cluster URL would be one more `Topology` kind, made in `sync_client` /
  `async_client` (RedisCluster); the stores take whichever client this module returns.

During a failover the clients see the old primary's connections drop (ConnectionError), its successor not yet
promoted (MasterNotFoundError, a ConnectionError), or a demoted primary refuse writes (ReadOnlyError): all are
in common.outage.REDIS_DOWN, so the API answers 503 + Retry-After and the worker's threads wait, and both
carry on once the sentinels name the new primary.

A submit's 202 can also be made to wait for replicas (`SDXL_REDIS_WAIT_REPLICAS`, `Durability` below):
Redis replicates asynchronously, so without it a write that the primary acknowledged and then died with is
gone from the replica that takes over (docs/reliability.md, "Redis that fails over").
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

from common.settings import Settings

DEFAULT_SENTINEL_PORT = 26379
SCHEMES = ("redis", "rediss", "unix")
# TLS options read from SDXL_REDIS_URL's query string, as redis-py names them (kombu takes the same names)
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class RedisSettingError(ValueError):
    """A Redis setting that cannot be used; the message names the setting."""


class NotReplicated(redis.exceptions.ConnectionError):
    """A write the primary stored but fewer replicas than SDXL_REDIS_WAIT_REPLICAS confirmed in time: a failover now
    could lose it, so it is not acknowledged (a ConnectionError: an outage, to the API a 503)."""

    def __init__(self, wanted: int, confirmed: int, timeout_ms: int):
        super().__init__(
            f"{confirmed} of {wanted} replicas confirmed the write within {timeout_ms} ms (SDXL_REDIS_WAIT_REPLICAS)"
        )
        self.wanted, self.confirmed = wanted, confirmed


@dataclass(frozen=True)
class Durability:
    """How many replicas must hold a write before it is acknowledged to a client (Redis' WAIT), and how long to
    wait for them. replicas 0: acknowledged once the primary has it (Redis' own default)."""

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def of(cls, settings: Settings) -> Durability:
        return cls(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)

    def check(self, confirmed: int) -> None:
        """WAIT's answer (the replicas that hold the connection's writes): NotReplicated when too few."""
        if confirmed < self.replicas:
            raise NotReplicated(self.replicas, confirmed, self.timeout_ms)


@dataclass(frozen=True)
class Topology:
    """Where Redis is, as the settings say: one server (url), or the primary the sentinels name."""

    url: str
    options: dict[str, Any]  # redis-py's connection options from the URL (db, user, password, TLS)
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        url = settings.redis_url
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise RedisSettingError(
                f"SDXL_REDIS_URL must start with redis://, rediss:// (TLS) or unix://: {url.split('@')[-1]!r} does not"
            )
        try:
            options = redis.connection.parse_url(url)
        except ValueError as exc:
            raise RedisSettingError(f"SDXL_REDIS_URL: {exc}") from None
        if scheme == "rediss":
            options.pop("connection_class", None)
            options["ssl"] = True
        reqs = options.get("ssl_cert_reqs")
        if isinstance(reqs, str):
            if reqs.lower() not in CERT_REQS:
                raise RedisSettingError(f"SDXL_REDIS_URL: ssl_cert_reqs={reqs!r} is not one of {', '.join(CERT_REQS)}")
            options["ssl_cert_reqs"] = reqs.lower()
        sentinels = parse_sentinels(settings.redis_sentinels)
        if not sentinels:
            return cls(url, options)
        if scheme == "unix":
            raise RedisSettingError(
                "SDXL_REDIS_URL: with SDXL_REDIS_SENTINELS it is redis:// or rediss://, not unix://"
            )
        if not settings.redis_sentinel_master:
            raise RedisSettingError("SDXL_REDIS_SENTINEL_MASTER: the name the sentinels monitor the primary under")
        for key in ("host", "port"):  # the sentinels say where the primary is
            options.pop(key, None)
        password = settings.redis_sentinel_password
        return cls(
            url, options, sentinels, settings.redis_sentinel_master, password.get_secret_value() if password else None
        )

    @property
    def tls(self) -> bool:
        return bool(self.options.get("ssl")) or urlsplit(self.url).scheme == "rediss"

    def sentinel_kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """How to reach the sentinels themselves: the socket timeouts of the clients', and their own password."""
        kwargs = {k: v for k, v in overrides.items() if k.startswith("socket_")}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """'10.0.0.1:26379,10.0.0.2:26379,[::1]:26380' -> ((host, port), ...); a port may be left out (26379)."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, port = part, DEFAULT_SENTINEL_PORT
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            if rest.startswith(":"):
                port = _port(rest[1:], part)
        elif part.count(":") == 1:
            host, _, text_port = part.partition(":")
            port = _port(text_port, part)
        if not host:
            raise RedisSettingError(f"SDXL_REDIS_SENTINELS: {part!r} is not HOST:PORT")
        found.append((host, port))
    return tuple(found)


def _port(text: str, part: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RedisSettingError(f"SDXL_REDIS_SENTINELS: {part!r} is not HOST:PORT (a port of 1-65535)")
    return int(text)


def sync_client(settings: Settings, **overrides: Any) -> redis.Redis:
    """A client of the primary (its pool follows failovers under Sentinel). `overrides`: redis-py's connection
    options (socket_timeout, retry, client_name, ...), over those of SDXL_REDIS_URL."""
    topology = Topology.of(settings)
    if not topology.sentinels:
        return redis.Redis.from_url(topology.url, **overrides)
    manager = redis.sentinel.Sentinel(
        list(topology.sentinels), sentinel_kwargs=topology.sentinel_kwargs(overrides), **topology.options
    )
    return manager.master_for(topology.master, redis_class=redis.Redis, **overrides)


def async_client(settings: Settings, **overrides: Any) -> aioredis.Redis:
    """sync_client's asyncio twin (the API's job-event subscription)."""
    topology = Topology.of(settings)
    if not topology.sentinels:
        return aioredis.Redis.from_url(topology.url, **overrides)
    manager = aiosentinel.Sentinel(
        list(topology.sentinels), sentinel_kwargs=topology.sentinel_kwargs(overrides), **topology.options
    )
    return manager.master_for(topology.master, redis_class=aioredis.Redis, **overrides)


def broker(settings: Settings) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Celery's (broker URL, transport options to add, broker_use_ssl) for the same Redis. The transport class is
    chosen with it (`broker_transport`): common.broker's plain or sentinel transport, never by the URL's scheme
    (kombu switches a failing connection to the next URL's scheme's own transport, dropping ours)."""
    topology = Topology.of(settings)
    parts = urlsplit(topology.url)
    userinfo = ""
    if "username" in topology.options or "password" in topology.options:
        user = quote(topology.options.get("username", ""), safe="")
        password = quote(topology.options.get("password", ""), safe="")
        userinfo = f"{user}:{password}@"
    db = topology.options.get("db", 0)
    use_ssl = None
    if topology.tls:
        reqs = topology.options.get("ssl_cert_reqs", "required")
        use_ssl = {"ssl_cert_reqs": CERT_REQS[reqs] if isinstance(reqs, str) else reqs}
        use_ssl |= {k: topology.options[k] for k in TLS_OPTIONS[:3] if k in topology.options}
    if not topology.sentinels:
        if parts.scheme == "unix":
            return topology.url, {}, None
        return f"redis://{userinfo}{_host(parts.hostname or '127.0.0.1')}:{parts.port or 6379}/{db}", {}, use_ssl
    # One sentinel in the URL (no ';' list: kombu would cycle through it with its own transport, see above); the
    # whole list travels in the transport options, where common.broker's channel reads it.
    host, port = topology.sentinels[0]
    options: dict[str, Any] = {"master_name": topology.master, "sentinels": [list(s) for s in topology.sentinels]}
    if topology.sentinel_password:
        options["sentinel_kwargs"] = {"password": topology.sentinel_password}
    return f"sentinel://{userinfo}{_host(host)}:{port}/{db}", options, use_ssl


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


def check_credentials(client: redis.Redis) -> None:
    """At start: raise a RedisSettingError naming SDXL_REDIS_URL when Redis refuses its user or password (or the
    user's ACL forbids what the service runs); say nothing when Redis is merely unreachable (a process may start
    before Redis and waits it out)."""
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise RedisSettingError(
            f"SDXL_REDIS_URL: Redis refused this user or password ({type(exc).__name__}: {exc}); check the URL's "
            "user:password part (or SDXL_REDIS_SENTINEL_PASSWORD for the sentinels)"
        ) from None
    except redis.exceptions.ResponseError as exc:
        if "AUTH" not in str(exc).upper():
            raise
        raise RedisSettingError(f"SDXL_REDIS_URL: Redis refused the credentials ({exc})") from None
    except redis.exceptions.ConnectionError:
        return
