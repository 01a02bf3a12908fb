"""The stores' tests run twice: on a single Redis and on a three-master Redis Cluster (Valkey), where a script, a
transaction or a multi-key command whose keys are not all in one slot fails (CROSSSLOT): the hash tags of
common/keys.py are what keeps them in one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster


@pytest.fixture(params=["redis", "cluster"])
def store_redis(request: pytest.FixtureRequest) -> Iterator[redis.Redis | RedisCluster]:
    """The client a store test builds its store on, and reads behind its back with."""
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
    yield client
    client.close()
