"""Storage backends: the local folder with HMAC URLs, and S3 against a real SeaweedFS server."""

import time

import httpx
import pytest

from common.storage import LocalStorage, S3Storage, SignatureError
from tests.helpers.servers import settings_from


def test_local_put_and_verify(tmp_path):
    store = LocalStorage(tmp_path, "http://api", b"k" * 32)
    store.put("images/j/0.png", b"data", "image/png")
    url = store.url("images/j/0.png", 60)
    assert url.startswith("http://api/v1/files/images/j/0.png?")
    query = dict(p.split("=") for p in url.split("?")[1].split("&"))
    assert store.verify("images/j/0.png", int(query["expires"]), query["signature"]).read_bytes() == b"data"
    with pytest.raises(SignatureError, match="does not match"):
        store.verify("images/j/1.png", int(query["expires"]), query["signature"])  # another key
    with pytest.raises(SignatureError, match="does not match"):
        store.verify("images/j/0.png", int(query["expires"]) + 1, query["signature"])  # a later expiry
    with pytest.raises(SignatureError, match="does not match"):
        store.verify("images/j/0.png", int(query["expires"]), "é" * 64)  # non-ASCII: refused, not a crash
    expired = int(time.time()) - 1
    with pytest.raises(SignatureError, match="expired"):
        store.verify("images/j/0.png", expired, store._signature("images/j/0.png", expired))


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", ""])
def test_local_refuses_keys_outside_the_root(tmp_path, key):
    with pytest.raises(ValueError, match="bad storage key"):
        LocalStorage(tmp_path, "http://api", b"k" * 32).put(key, b"x", "image/png")


def test_s3_presigned_urls_are_checked_by_the_server(s3):
    settings = settings_from(s3.env())
    store = S3Storage(settings)
    store.put("images/t/0.png", b"png-bytes", "image/png")
    url = store.url("images/t/0.png", 60)
    ok = httpx.get(url)
    assert ok.status_code == 200 and ok.content == b"png-bytes"
    assert httpx.get(url.replace("Signature=", "Signature=0")).status_code == 403  # tampered
    assert httpx.get(url.replace("images/t/0.png", "images/t/1.png")).status_code == 403  # another key
    short = store.url("images/t/0.png", 1)
    time.sleep(2.5)
    assert httpx.get(short).status_code == 403  # expired
    store.delete("images/t/0.png")
    assert httpx.get(store.url("images/t/0.png", 60)).status_code == 404


def test_get_and_streamed_put_on_both_backends(tmp_path, s3):
    import io

    for store in (LocalStorage(tmp_path, "http://api", b"k" * 32), S3Storage(settings_from(s3.env()))):
        store.put_file("datasets/r/input/original.jsonl", io.BytesIO(b'{"id": 1}\n' * 1000), "application/x-ndjson")
        assert store.get("datasets/r/input/original.jsonl") == b'{"id": 1}\n' * 1000
        with pytest.raises(KeyError):
            store.get("datasets/r/none.jsonl")
        store.delete("datasets/r/input/original.jsonl")
        with pytest.raises(KeyError):
            store.get("datasets/r/input/original.jsonl")


def test_writers_of_one_key_at_once_all_succeed(tmp_path):
    """Two submits of one image store one key at once: each write renames its own temporary file (one named by
    the pid alone was renamed away under the other: FileNotFoundError, a 503)."""
    import io

    from tests.helpers.servers import at_once

    storage = LocalStorage(tmp_path, "http://x", b"k" * 32)

    def write(i: int) -> None:
        for _ in range(40):
            storage.put("inputs/t/same.png", b"the same bytes", "image/png")
            storage.put_file("inputs/t/same-file.png", io.BytesIO(b"the same bytes"), "image/png")

    assert at_once(8, write) == [None] * 8
    assert storage.get("inputs/t/same.png") == b"the same bytes"
    assert not [p.name for p in (tmp_path / "inputs/t").iterdir() if p.name.endswith(".tmp")]
