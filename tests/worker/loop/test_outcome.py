"""JobOutcome: what a recorded status answers, which outcomes end a job, go back to the queue, and are counted."""

from common.jobs import JobStatus
from common.worker_status import OUTCOMES
from worker.loop.outcome import JobOutcome


def test_a_recorded_status_gives_the_outcome():
    assert JobOutcome.of(JobStatus.succeeded) is JobOutcome.succeeded
    assert JobOutcome.of(JobStatus.failed) is JobOutcome.failed
    assert JobOutcome.of(JobStatus.canceled) is JobOutcome.canceled
    assert JobOutcome.of(None) is JobOutcome.missing
    # still queued or running after this message's run: the sweep sent the job again, or another run holds it
    assert JobOutcome.of(JobStatus.queued) is JobOutcome.stale
    assert JobOutcome.of(JobStatus.running) is JobOutcome.stale


def test_only_ended_jobs_are_terminal_and_only_requeue_and_not_here_go_back():
    assert {o for o in JobOutcome if o.terminal} == {JobOutcome.succeeded, JobOutcome.failed, JobOutcome.canceled}
    assert {o for o in JobOutcome if o.requeues} == {JobOutcome.requeue, JobOutcome.not_here}


def test_the_metric_label_is_derived_and_names_the_workers_counters():
    labels = {o: o.metric_label for o in JobOutcome if o.metric_label is not None}
    assert labels == {
        JobOutcome.succeeded: "succeeded",
        JobOutcome.failed: "failed",
        JobOutcome.canceled: "canceled",
        JobOutcome.requeue: "requeued",
    }
    assert set(labels.values()) == set(OUTCOMES)  # every counter has an outcome, every counted outcome a counter


def test_outcomes_are_the_strings_the_task_returns():
    assert JobOutcome.succeeded == "succeeded" and JobOutcome.not_here.value == "not-here"
