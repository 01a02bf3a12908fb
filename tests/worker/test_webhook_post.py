"""The POST over TLS (worker/webhook_post.py): connected to the checked address, it still says the name in SNI
and checks the certificate against the name, not the address. A real TLS server on loopback with a certificate
for `hook.example` made by the openssl command."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpcore
import pytest

from common.webhook_target import check_url
from worker.webhook_post import post

NAME = "hook.example"


class Hook(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []  # Host headers

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        Hook.seen.append(self.headers["host"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def tls_server(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    name = ["-days", "1", "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}"]
    subprocess.run([*make, *name, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    server.daemon_threads = True
    snis: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: snis.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.seen = []
    yield server.server_address[1], ssl.create_default_context(cafile=str(cert)), snis
    server.shutdown()
    server.server_close()


def test_tls_to_the_checked_address_says_the_name(tls_server):
    port, trusting, snis = tls_server
    target = check_url(f"https://{NAME}:{port}/hook", True, resolve=lambda host, port: ["127.0.0.1"])
    reply = post(target, b"{}", {"content-type": "application/json"}, 5.0, 1024, ssl_context=trusting)
    assert reply.status == 204
    assert snis == [NAME] and Hook.seen == [f"{NAME}:{port}"]


def test_the_certificate_is_checked_against_the_name(tls_server):
    port, trusting, _ = tls_server
    target = check_url(f"https://other.example:{port}/hook", True, resolve=lambda host, port: ["127.0.0.1"])
    with pytest.raises(httpcore.ConnectError, match="certificate"):
        post(target, b"{}", {}, 5.0, 1024, ssl_context=trusting)
    assert Hook.seen == []
