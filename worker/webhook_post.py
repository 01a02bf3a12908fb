"""One webhook POST to a checked Target: to the very address that was checked, within a total deadline, reading
at most a capped number of reply bytes.

- The address: httpcore is given a network backend that connects to the Target's address whatever host it is
  asked for. The URL keeps the name, so the Host header, TLS's SNI and the certificate check all say the name,
  while DNS is never asked again (an answer that changed to loopback since the check goes unused).
- The deadline: httpx's and httpcore's timeouts bound each read and write, not the request, so a receiver
  that sends a byte every few seconds keeps one going for ever. Every socket call here gets the time left
  before the deadline as its timeout; a call that would start after it fails at once.
- The reply: only its status matters (Standard Webhooks: any 2xx is a delivery). Its body is read in chunks
  and dropped, up to max_response_bytes; the connection is closed there, whatever the receiver has left.
  Headers are bounded by h11's own limit (64 KiB).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpcore

from common.webhook_target import Target

CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    read_bytes: int  # of the body, at most the cap
    truncated: bool  # the body went on past the cap (unread)


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self, timeout: float | None, what: type[Exception]) -> float:
        """The smaller of `timeout` and the time left; raises `what` when none is left."""
        left_s = self.at - time.monotonic()
        if left_s <= 0:
            raise what("webhook delivery deadline passed")
        return left_s if timeout is None else min(timeout, left_s)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline):
        self.inner = inner
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadline.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self.inner.start_tls(ssl_context, server_hostname, self.deadline.left(timeout, httpcore.ConnectTimeout))
        return _Stream(tls, self.deadline)

    def get_extra_info(self, info: str) -> object:
        return self.inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to `address` when asked for `host` (and to nothing else), every call bounded by `deadline`."""

    def __init__(self, host: str, address: str, deadline: Deadline):
        self.host = host
        self.address = address
        self.deadline = deadline
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple] | None = None,
    ) -> httpcore.NetworkStream:
        if host.strip("[]") != self.host:  # only the Target's own request comes here (no proxies, no redirects)
            raise httpcore.ConnectError(f"not the checked host: {host!r}")
        timeout = self.deadline.left(timeout, httpcore.ConnectTimeout)
        stream = self.inner.connect_tcp(self.address, port, timeout, local_address, socket_options)
        return _Stream(stream, self.deadline)

    def connect_unix_socket(self, *args: object, **kwargs: object) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks go over TCP only")


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    deadline_s: float,
    max_response_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> Reply:
    """POST `body` to `target` (its first address); httpcore's exceptions (httpcore.TimeoutException for the
    deadline) on failure. No redirects are followed (a 3xx is not a delivery)."""
    deadline = Deadline(deadline_s)
    backend = PinnedBackend(target.host, str(target.addresses[0]), deadline)
    timeouts = dict.fromkeys(("connect", "read", "write", "pool"), deadline_s)  # the backend cuts each to what is left
    pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend, retries=0)
    request_headers = {**headers, "content-length": str(len(body)), "user-agent": "sdxl-webhooks"}
    with (
        pool,
        pool.stream(
            "POST", target.url, headers=request_headers, content=body, extensions={"timeout": timeouts}
        ) as response,
    ):
        read = 0
        for chunk in response.iter_stream():
            read += len(chunk)
            if read >= max_response_bytes:  # the rest is never read: leaving the block closes the connection
                return Reply(response.status, max_response_bytes, truncated=True)
        return Reply(response.status, read, truncated=False)
