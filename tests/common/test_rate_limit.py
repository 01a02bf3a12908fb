"""The fixed-window rate limiter against a real Redis (and a cluster: tests/common/conftest.py)."""

from __future__ import annotations

from common.rate_limit import RateLimiter

WINDOW_S = 10**9  # one window from 2001 to 2033: the test cannot straddle two


def test_a_key_is_refused_past_its_limit_in_a_window_and_others_are_not(store_redis, key_prefix):
    limiter = RateLimiter(store_redis, key_prefix)
    assert [limiter.hit("write", "k1", limit=2, window_s=WINDOW_S) for _ in range(2)] == [None, None]
    retry_after_s = limiter.hit("write", "k1", limit=2, window_s=WINDOW_S)
    assert retry_after_s is not None and retry_after_s >= 1
    assert limiter.hit("read", "k1", limit=2, window_s=WINDOW_S) is None  # each kind counts on its own
    assert limiter.hit("write", "k2", limit=2, window_s=WINDOW_S) is None  # and each key
