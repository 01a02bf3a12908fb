"""API keys: stored hashed, each bound to a tenant; created, listed and revoked with `python -m api.keys`.

A key reads `sdxl_<key id>_<secret>`. Redis keeps sha256(key) -> {key id, tenant, name, created_at,
revoked}, and the key id -> hash index for listing and revoking (keys: common/keys.py); the secret itself is
never stored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis

from common.keys import Keys


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    name: str
    created_at: float
    revoked: bool


class ApiKeyStore:
    def __init__(self, client: redis.Redis, prefix: str = "sdxl"):
        self._r = client
        self.keys = Keys(prefix)

    def create(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """Returns the record and the key, which is shown this once."""
        if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
            raise ValueError("tenant: letters, digits, '-' and '_' only")
        key_id = secrets.token_hex(6)
        key = f"sdxl_{key_id}_{secrets.token_urlsafe(32)}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        record = ApiKey(key_id, tenant, name, time.time(), False)
        pipe = self._r.pipeline(transaction=True)  # both or neither: a key the index lacks cannot be revoked
        pipe.hset(
            self.keys.api_key(digest),
            mapping={"key_id": key_id, "tenant": tenant, "name": name, "created_at": record.created_at, "revoked": 0},
        )
        pipe.hset(self.keys.api_key_ids, key_id, digest)
        pipe.execute()
        return record, key

    def verify(self, key: str) -> ApiKey | None:
        """The live key behind a presented key, or None (unknown or revoked)."""
        raw = self._r.hgetall(self.keys.api_key(hashlib.sha256(key.encode()).hexdigest()))
        if not raw:
            return None
        record = self._record({k.decode(): v.decode() for k, v in raw.items()})
        return None if record.revoked else record

    @staticmethod
    def _record(d: dict[str, str]) -> ApiKey:
        return ApiKey(d["key_id"], d["tenant"], d.get("name", ""), float(d["created_at"]), d.get("revoked") == "1")

    def list(self) -> list[ApiKey]:
        out = []
        for _, digest in self._r.hgetall(self.keys.api_key_ids).items():
            raw = self._r.hgetall(self.keys.api_key(digest.decode()))
            if raw:
                out.append(self._record({k.decode(): v.decode() for k, v in raw.items()}))
        return sorted(out, key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        digest = self._r.hget(self.keys.api_key_ids, key_id)
        if digest is None:
            return False
        self._r.hset(self.keys.api_key(digest.decode()), "revoked", 1)
        return True
