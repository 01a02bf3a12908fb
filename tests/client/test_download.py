"""Client.download / AsyncClient.download against a real HTTP server on loopback standing for the storage host
(S3, a CDN): it records the headers each GET brought. The API key goes to the API's own origin only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from client import AsyncClient, Client

KEY = "sdxl_abc_secretsecretsecret"


class Storage(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []  # each GET's headers, names lower-cased

    def do_GET(self):
        Storage.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"png")

    def log_message(self, *args):
        pass


@pytest.fixture
def storage_port() -> Iterator[int]:
    Storage.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_download_from_another_host_sends_no_api_key(storage_port):
    api = "http://localhost:9"  # another origin than the storage's (host and port); never called
    with Client(api, KEY, patience_s=1) as sdxl:
        assert sdxl.download(f"http://127.0.0.1:{storage_port}/bucket/a.png?X-Amz-Signature=abc") == b"png"
    (headers,) = Storage.seen
    assert "authorization" not in headers and KEY not in str(headers)


def test_async_download_from_another_host_sends_no_api_key(storage_port):
    async def download() -> bytes:
        async with AsyncClient("http://localhost:9", KEY, patience_s=1) as sdxl:
            return await sdxl.download(f"http://127.0.0.1:{storage_port}/bucket/a.png?X-Amz-Signature=abc")

    assert asyncio.run(download()) == b"png"
    (headers,) = Storage.seen
    assert "authorization" not in headers


def test_download_from_the_api_itself_keeps_the_key(storage_port):
    base = f"http://127.0.0.1:{storage_port}"  # local storage: images served by the API, at its own origin
    with Client(base, KEY, patience_s=1) as sdxl:
        assert sdxl.download(f"{base}/v1/files/a.png?sig=abc") == b"png"
    assert Storage.seen[0]["authorization"] == f"Bearer {KEY}"
