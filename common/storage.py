"""Where images go, behind one interface: a local folder (the default) or S3 through boto3.

Both hand out signed, expiring GET URLs. Local URLs point at the API's /v1/files route and carry an
HMAC-SHA256 of the key and expiry; S3 URLs are SigV4 presigned URLs checked by the S3 server itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote, urlencode

from common.settings import Settings


class SignatureError(Exception):
    """A local-storage URL whose signature is wrong or whose expiry has passed."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def put_file(self, key: str, file: BinaryIO, content_type: str) -> None: ...  # streamed, for large inputs
    def get(self, key: str) -> bytes: ...  # raises KeyError when there is no such object
    def delete(self, key: str) -> None: ...
    def url(self, key: str, expires_s: int) -> str: ...
    # Listing and bulk deletes, for the image sweep (worker/image_retention.py). A prefix is a folder: "images"
    def folders(self, prefix: str) -> list[str]: ...  # names of the folders directly under prefix, sorted
    def keys(self, prefix: str) -> Iterator[str]: ...  # every key under prefix, in pages as the backend lists
    def delete_many(self, keys: Iterable[str]) -> None: ...  # missing keys are no error
    def prune(self, prefix: str) -> None: ...  # drop the folder prefix, and its empty folders, if it holds nothing


# S3 (and GCS, SeaweedFS) refuse a longer key with an error that looks like an outage; a local file system a
# longer path component. Keys that come from a request are checked against both before any call is made.
MAX_KEY_BYTES = 1024
MAX_KEY_PART_BYTES = 255


def key_problem(key: str) -> str | None:
    """Why a key from a request cannot name an object here (too long for S3 or a file system), or None."""
    size = len(key.encode("utf-8", errors="replace"))
    if size > MAX_KEY_BYTES:
        return f"is {size} bytes long; object keys are at most {MAX_KEY_BYTES}"
    if any(len(part.encode("utf-8", errors="replace")) > MAX_KEY_PART_BYTES for part in key.split("/")):
        return f"has a part longer than {MAX_KEY_PART_BYTES} bytes (between two '/')"
    return None


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad storage key {key!r}")
    return key


def _temporary(path: Path) -> Path:
    """A file beside `path` that no other writer uses: two requests of one process storing the same key at once
    (one image sent twice) each rename their own, where a name from the pid alone was renamed away under one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


class LocalStorage:
    def __init__(self, root: str | Path, base_url: str, secret: bytes):
        self.root = Path(root).resolve()
        self.base_url = base_url.rstrip("/")
        self.secret = secret

    def path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file; a rewrite of the same key is atomic

    def put_file(self, key: str, file: BinaryIO, content_type: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        with tmp.open("wb") as out:
            shutil.copyfileobj(file, out, 1 << 20)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyError(key) from exc

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def folders(self, prefix: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.path(prefix)) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def keys(self, prefix: str) -> Iterator[str]:
        top = self.path(prefix)
        for folder, _, files in os.walk(top):
            rel = Path(folder).relative_to(self.root).as_posix()
            yield from (f"{rel}/{name}" for name in sorted(files))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete, then drop the folders left empty (a job's, then its hour's), as S3 has no folders to leave."""
        parents = set()
        for key in keys:
            path = self.path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root:
                try:
                    parent.rmdir()  # only when empty; a put racing this retries (worker/loop/retry.py)
                except OSError:
                    break
                parent = parent.parent

    def prune(self, prefix: str) -> None:
        with contextlib.suppress(OSError):  # gone already, or not empty
            self.path(prefix).rmdir()

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return f"{self.base_url}/v1/files/{quote(_safe_key(key))}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> Path:
        """The file behind a signed URL; SignatureError when tampered with or expired."""
        # bytes: compare_digest refuses non-ASCII str (a fuzzer found the 500 this used to be)
        if not hmac.compare_digest(self._signature(key, expires).encode(), signature.encode()):
            raise SignatureError("signature does not match")
        if expires < time.time():
            raise SignatureError("URL has expired")
        return self.path(key)


class S3Storage:
    def __init__(self, settings: Settings):
        import boto3
        from botocore.config import Config

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        # Path-style addressing works with every S3-compatible server; SigV4 is required for presigning.
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 3})
        common = {
            "region_name": settings.s3_region,
            "aws_access_key_id": settings.s3_access_key_id,
            "aws_secret_access_key": secret,
            "config": config,
        }
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **common)
        # The host is part of the signature: sign for the endpoint clients will use.
        public = settings.s3_public_endpoint_url
        self.signer = boto3.client("s3", endpoint_url=public, **common) if public else self.client
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self.page_keys = 1000  # keys per list page and per delete request: S3's maximum for both

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{_safe_key(key)}" if self.prefix else _safe_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, ContentType=content_type)

    def put_file(self, key: str, file: BinaryIO, content_type: str) -> None:
        self.client.upload_fileobj(file, self.bucket, self._full(key), ExtraArgs={"ContentType": content_type})

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as exc:
            raise KeyError(key) from exc

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def folders(self, prefix: str) -> list[str]:
        start = self._full(prefix) + "/"
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start, Delimiter="/"
        ):
            names += [p["Prefix"][len(start) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def keys(self, prefix: str) -> Iterator[str]:
        skip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix) + "/", PaginationConfig={"PageSize": self.page_keys}
        ):
            yield from (o["Key"][skip:] for o in page.get("Contents", []))

    def delete_many(self, keys: Iterable[str]) -> None:
        self._delete_objects(self._full(k) for k in keys)

    def prune(self, prefix: str) -> None:
        # S3 has no folders, but filer-backed servers (SeaweedFS) keep each emptied folder, listed as a prefix,
        # until its marker is deleted (a folder's before its parent's; they ignore the marker of one that still
        # holds objects). S3 itself lists no empty prefix, and deleting a missing key is no error.
        markers = [self._full(f"{prefix}/{name}") + "/" for name in self.folders(prefix)]  # one level down
        self._delete_objects([*markers, self._full(prefix) + "/"])  # in order: the parent's marker last

    def _delete_objects(self, full_keys: Iterable[str]) -> None:
        """DeleteObjects, up to 1,000 keys a request (S3's limit; GCS's XML API has it too), in order."""
        pending = iter(full_keys)
        while batch := list(itertools.islice(pending, self.page_keys)):
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            if errors := answer.get("Errors"):
                e = errors[0]
                raise RuntimeError(
                    f"{len(errors)} of {len(batch)} deletes failed, e.g. {e.get('Key')}: "
                    f"{e.get('Code')} {e.get('Message')}"
                )

    def url(self, key: str, expires_s: int) -> str:
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s
        )


def from_settings(settings: Settings, need_signing: bool = True) -> Storage:
    """The configured backend. The worker only writes, so it needs no URL-signing secret."""
    if settings.storage == "s3":
        return S3Storage(settings)
    secret = settings.signing_key() if need_signing else b""
    return LocalStorage(settings.local_storage_dir, settings.public_base_url, secret)
