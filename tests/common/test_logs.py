"""common/logs.py: one line per record, as text or JSON, with the ids bound around it."""

from __future__ import annotations

import json
import logging

import pytest

from common import logs


@pytest.fixture
def captured(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configure(fmt: str) -> None:
        logs.configure(fmt)

    yield configure
    root.handlers, root.level = saved[0], saved[1]


def test_json_lines_carry_bound_and_given_ids_and_nothing_leaks(captured, capsys):
    captured("json")
    log = logging.getLogger("sdxl.test")
    with logs.bound(job_id="j1", worker="w"):
        log.info("inside %d", 1)
        log.info("given wins", extra={"job_id": "j2", "batch_id": "b"})
    log.warning("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["inside 1", "given wins", "outside", "failed"]
    assert lines[0]["job_id"] == "j1" and lines[0]["worker"] == "w" and "batch_id" not in lines[0]
    assert lines[1]["job_id"] == "j2" and lines[1]["batch_id"] == "b"
    assert "job_id" not in lines[2] and lines[2]["level"] == "WARNING" and lines[2]["logger"] == "sdxl.test"
    assert "ValueError: boom" in lines[3]["exception"]


def test_text_lines_end_with_the_ids(captured, capsys):
    captured("text")
    with logs.bound(batch_id="b7"):
        logging.getLogger("sdxl.test").info("batch started")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("INFO sdxl.test: batch started [batch_id=b7]")
