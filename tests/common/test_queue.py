"""The Celery app's delivery settings that the service's promises rest on."""

from __future__ import annotations

from kombu.utils.scheduling import cycle_by_name

from common.queue import make_celery
from common.settings import Settings


def test_workers_ask_for_interactive_jobs_before_bulk_lines_on_every_fetch():
    settings = Settings()
    options = make_celery(settings).conf.broker_transport_options
    assert options["queue_order_strategy"] == "priority"
    assert settings.worker_queues == ["sdxl", "sdxl-bulk"]  # the order the worker passes to --queues
    # kombu's Redis transport BRPOPs the queues in the cycle's order; after taking from one it rotates the
    # cycle. With "priority" the order never changes; with the default round robin bulk would come first
    # after every interactive job taken.
    for name, after_interactive in (("priority", ["sdxl", "sdxl-bulk"]), ("round_robin", ["sdxl-bulk", "sdxl"])):
        cycle = cycle_by_name(name)()
        cycle.update(settings.worker_queues)
        cycle.rotate("sdxl")
        assert cycle.consume(2) == after_interactive, name


def test_dedicated_pools_consume_one_lane():
    assert Settings(worker_lanes="bulk").worker_queues == ["sdxl-bulk"]
    assert Settings(worker_lanes="interactive", queue_name="q").worker_queues == ["q"]
    assert make_celery(Settings()).conf.task_acks_late is True
