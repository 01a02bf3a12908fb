"""Per-owner caps on what is held open at once (api/slots.py)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from api.slots import Slots


def test_an_owner_holds_at_most_its_cap_and_others_are_apart():
    slots = Slots(2, "event streams and waits per API key", "SDXL_MAX_WAITS_PER_KEY", retry_after_s=7)
    first, second = slots.take("a"), slots.take("a")
    with pytest.raises(HTTPException) as refused:
        slots.take("a")
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "7"}
    assert "SDXL_MAX_WAITS_PER_KEY" in refused.value.detail
    slots.take("b")()  # another owner's count is its own
    first()
    first()  # giving back twice gives back once
    assert slots.held("a") == 1
    with slots.taken("a"):
        assert slots.held("a") == 2
    assert slots.held("a") == 1
    second()
    assert slots.held("a") == 0 and slots._held == {}  # nothing kept for owners holding nothing
