"""How the device loop answers a job's message: the value a Celery task's future resolves to, and what the task
does with it (worker/tasks.py: acknowledge, or reject with requeue)."""

from __future__ import annotations

from enum import StrEnum

from common.jobs import TERMINAL, JobStatus


class JobOutcome(StrEnum):
    succeeded = "succeeded"  # recorded with its images
    failed = "failed"  # recorded with its error
    canceled = "canceled"  # canceled while queued (never ran) or while running (its uploads discarded)
    # given back before its run ended (shutting down, storage away, an upload failed with attempts left): its
    # message is rejected with requeue and another worker runs it
    requeue = "requeue"
    missing = "missing"  # no record (expired, or never stored): nothing to do
    # a message superseded by a newer one for the same job (its worker died and the sweep sent it again), or a
    # job another message has taken over while this one ran: never run (again) by this message
    stale = "stale"
    # a model this worker does not hold (a message sent to a lane's own queue, from before there were model
    # queues): sent on to its model's queue (common/queue.py), and this message acknowledged
    rerouted = "rerouted"
    # the same, where it could not be sent on (no way to send, or the broker away): back to the queue
    not_here = "not-here"
    idle = "idle"  # a wake-up message (it names no job) found no interactive job ready: nothing to do

    @classmethod
    def of(cls, status: JobStatus | None) -> JobOutcome:
        """The outcome a job's recorded status gives: an ended job as itself, no record `missing`, and queued or
        running `stale` (the sweep sent it again, or another worker's run of it is under way)."""
        if status is None:
            return cls.missing
        return cls(status.value) if status in TERMINAL else cls.stale

    @property
    def terminal(self) -> bool:
        """The job has ended: its webhook is due and its latency is observed."""
        return self in (JobOutcome.succeeded, JobOutcome.failed, JobOutcome.canceled)

    @property
    def requeues(self) -> bool:
        """The message goes back to the queue (rejected with requeue) instead of being acknowledged."""
        return self in (JobOutcome.requeue, JobOutcome.not_here)

    @property
    def metric_label(self) -> str | None:
        """The label this outcome is counted under (common/worker_status.py OUTCOMES, the latency histogram's
        `outcome`), or None for one that is not counted."""
        if self.terminal:
            return self.value
        return "requeued" if self is JobOutcome.requeue else None
