"""scripts/demo.py (what scripts/run.sh runs): the demo's kept API key is made again for a Redis that does not know
it, instead of a 401 at the sample job's submit (seen when the same checkout ran against another Redis)."""

from __future__ import annotations

import importlib.util
import sys

import redis

from common.api_keys import ApiKeyStore
from tests.helpers.servers import REPO


def demo():
    spec = importlib.util.spec_from_file_location("scripts_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_kept_key_this_redis_does_not_know_is_made_again(redis_url, key_prefix, tmp_path, monkeypatch):
    module = demo()
    monkeypatch.setattr(module, "VAR", tmp_path)
    monkeypatch.setenv("SDXL_KEY_PREFIX", key_prefix)
    store = ApiKeyStore(redis.Redis.from_url(redis_url), key_prefix)
    (tmp_path / "demo-api-key").write_text("sk-from-another-redis")
    key = module._api_key(redis_url)
    assert key != "sk-from-another-redis" and store.verify(key) is not None
    assert module._api_key(redis_url) == key  # kept once it is known
