"""The API key store against a real Redis (and a cluster: tests/common/conftest.py): created hashed, verified,
listed and revoked."""

from __future__ import annotations

import hashlib

import pytest

from common.api_keys import ApiKeyStore


@pytest.fixture
def api_keys(store_redis, key_prefix) -> ApiKeyStore:
    return ApiKeyStore(store_redis, key_prefix)


def test_a_key_is_verified_listed_and_revoked(api_keys, store_redis):
    record, key = api_keys.create("acme", "laptop")
    other, _ = api_keys.create("zeta")
    assert api_keys.verify(key) == record and api_keys.verify(key + "x") is None
    assert {k.key_id for k in api_keys.list()} == {record.key_id, other.key_id}
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert store_redis.hget(api_keys.keys.api_key_ids, record.key_id).decode() == digest  # the key itself is not kept
    assert api_keys.revoke(record.key_id) and not api_keys.revoke("nope")
    assert api_keys.verify(key) is None
    assert {k.key_id: k.revoked for k in api_keys.list()} == {record.key_id: True, other.key_id: False}
