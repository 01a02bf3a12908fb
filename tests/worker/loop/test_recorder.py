"""The recorder against an in-memory fake store and registry (tests/helpers/loop_fakes.py, which record every call;
the real store runs under the loop in tests/worker/test_device_loop.py): which store call each outcome makes,
what each future is answered, what is released, counted and notified."""

from concurrent.futures import Future

import numpy as np

from common.jobs import JobStatus
from tests.helpers.loop_fakes import make_job, rig
from worker.loop.batch import Admitted
from worker.loop.outcome import JobOutcome

PIXELS = np.zeros((64, 64, 3), np.uint8)


def done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def failed(exc: Exception) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def admitted(job) -> Admitted:
    return Admitted(job, Future())


def test_uploaded_images_succeed_the_job(tmp_path):
    job = make_job(status=JobStatus.running, attempts=1, webhook_url="https://example.com/hook")
    r = rig(tmp_path, job)
    record = r.writer.write(job, 0, PIXELS, r.engines.default)
    assert r.recorder.uploaded(job, [done(record)], truncated=True) is None
    stored = r.store.jobs[job.id]
    assert stored.status is JobStatus.succeeded and stored.images == [record] and stored.truncated


def test_a_job_canceled_while_running_has_its_uploads_discarded(tmp_path):
    job = make_job(status=JobStatus.canceled)
    r = rig(tmp_path, job)
    record = r.writer.write(job, 0, PIXELS, r.engines.default)
    assert (r.storage.root / record.key).is_file()
    r.recorder.uploaded(job, [done(record)], truncated=False)
    assert not (r.storage.root / record.key).exists() and r.store.jobs[job.id].status is JobStatus.canceled


def test_a_job_that_succeeded_in_another_run_keeps_the_objects(tmp_path):
    job = make_job(status=JobStatus.succeeded)
    r = rig(tmp_path, job)
    record = r.writer.write(job, 0, PIXELS, r.engines.default)
    r.recorder.uploaded(job, [done(record)], truncated=False)
    assert (r.storage.root / record.key).is_file()  # the winner's images, under the same keys


def test_a_failed_upload_requeues_the_job_while_attempts_are_left_then_fails_it(tmp_path):
    early = make_job("early", status=JobStatus.running, attempts=2)
    last = make_job("last", status=JobStatus.running, attempts=3)
    r = rig(tmp_path, early, last)
    assert r.recorder.uploaded(early, [failed(ConnectionError("away"))], truncated=False) is JobOutcome.requeue
    assert r.store.jobs[early.id].status is JobStatus.queued
    assert r.recorder.uploaded(last, [failed(ConnectionError("away"))], truncated=False) is None
    stored = r.store.jobs[last.id]
    assert stored.status is JobStatus.failed
    assert stored.error == "upload failed: ConnectionError: away (attempt 3 of 3)"


def test_resolve_answers_every_future_from_the_verdicts_or_the_store_and_counts_them(tmp_path):
    ok = make_job("ok", status=JobStatus.succeeded, webhook_url="https://example.com/hook")
    bad = make_job("bad", status=JobStatus.failed, webhook_url="https://example.com/hook")
    back = make_job("back", status=JobStatus.queued, webhook_url="https://example.com/hook")
    early = make_job("early", status=JobStatus.canceled, webhook_url="https://example.com/hook")
    r = rig(tmp_path, ok, bad, back, early)
    batch = [admitted(j) for j in (ok, bad, back, early)]
    batch[3].future.set_result(JobOutcome.canceled)  # answered before the run: not this run's to count
    for a in batch:
        r.registry.hold("w1", a.id)
    r.recorder.resolve(batch, {back.id: JobOutcome.requeue})
    assert [a.future.result() for a in batch] == ["succeeded", "failed", "requeue", "canceled"]
    assert r.registry.held_sets["w1"] == set()
    assert r.presence.counters.jobs == {"succeeded": 1, "failed": 1, "canceled": 0, "requeued": 1}
    assert r.notified == [ok.id, bad.id]  # ended jobs with a webhook, this run's


def test_a_job_that_must_never_run_fails_from_queued_and_is_answered_and_notified(tmp_path):
    job = make_job(status=JobStatus.queued, webhook_url="https://example.com/hook")
    r = rig(tmp_path, job)
    future: Future = Future()
    r.registry.hold("w1", job.id)
    r.recorder.fail_unrun(job, future, "input image 'inputs/x.png' is no longer in storage")
    assert r.store.jobs[job.id].status is JobStatus.failed and future.result() is JobOutcome.failed
    assert r.registry.held_sets["w1"] == set() and r.notified == [job.id]


def test_refused_and_given_back_jobs_are_released_and_answered_without_a_store_write(tmp_path):
    jobs = [make_job("j0"), make_job("j1"), make_job("j2", lane="bulk")]
    r = rig(tmp_path, *jobs)
    futures = [Future() for _ in jobs]
    r.recorder.refuse(jobs[0].id, futures[0], JobOutcome.stale)
    r.recorder.give_back(Admitted(j, f) for j, f in zip(jobs[1:], futures[1:], strict=True))
    assert [f.result() for f in futures] == ["stale", "requeue", "requeue"]
    assert r.registry.released == [[jobs[0].id], [jobs[1].id, jobs[2].id]]  # the given back in one call
    # the interactive job is ready again for any worker (its message names no job); the line's message carries it
    assert r.store.calls == [("give_back", jobs[1].id)]
    assert r.presence.counters.jobs["requeued"] == 0  # nothing ran: not counted (as before the stages)
