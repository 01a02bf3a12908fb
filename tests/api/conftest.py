from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.settings import Settings


@pytest.fixture
def settings(redis_url, key_prefix, tmp_path) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        queue_name=f"{key_prefix}-queue",  # no worker listens: jobs stay queued
        image_sizes="1024x1024,96x64",
        local_storage_dir=str(tmp_path / "images"),
        url_signing_secret="s" * 32,
        public_base_url="http://testserver",
    )


@pytest.fixture
def client(settings):
    from tests.helpers.servers import authorize

    with TestClient(create_app(settings)) as c:
        authorize(c, settings)
        yield c
