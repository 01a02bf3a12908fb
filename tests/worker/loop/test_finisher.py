"""The finisher on the test's own thread: a batch's images written and recorded, non-finite rows, a batch that
raises run again job by job, progress reports; against an in-memory fake store (tests/helpers/loop_fakes.py, which
records every call), the stand-in engine, a local-folder storage and an upload pool that runs each call at once."""

import base64
import io
import threading
from concurrent.futures import Future

import numpy as np
from PIL import Image

from common.jobs import JobStatus
from tests.helpers.loop_fakes import FixedPending, InlineExecutor, make_job, output, redis_retry, rig
from worker.batcher import Batch
from worker.engine.standin import StandInEngine
from worker.loop import preview
from worker.loop.batch import Admitted, BatchKey
from worker.loop.finisher import Finisher, ProgressThrottle, Started, per_job, progress_report
from worker.loop.slots import Slots

KEY = BatchKey(64, 64, True, False, "")


def finisher(r) -> tuple[Finisher, Slots]:
    in_flight = Slots(1)
    assert in_flight.acquire(blocking=False)  # the slot this batch holds, given back when it ends
    f = Finisher(
        r.store,
        redis_retry(),
        r.engines,
        r.writer,
        r.recorder,
        r.presence,
        InlineExecutor(),
        in_flight,
        threading.Event(),
    )
    return f, in_flight


def started(jobs, pending, rows: int = 4) -> Started:
    running = [Admitted(job, Future()) for job in jobs]
    return Started(Batch(KEY, [a.item(0.0) for a in running], rows), running, pending, 0.0, "b1")


def test_a_batchs_images_are_written_and_recorded_and_every_job_answered(tmp_path):
    jobs = [make_job("a", JobStatus.running), make_job("b", JobStatus.running, n=2)]
    r = rig(tmp_path, *jobs)
    f, in_flight = finisher(r)
    s = started(jobs, FixedPending(output(3, truncated=[False, True, False])))
    f.finish(s)
    assert [a.future.result() for a in s.running] == ["succeeded", "succeeded"]
    a, b = (r.store.jobs[j.id] for j in jobs)
    assert len(a.images) == 1 and len(b.images) == 2 and not a.truncated and b.truncated
    assert all((r.storage.root / i.key).is_file() for i in b.images)
    assert in_flight.acquire(blocking=False)  # the slot was given back
    (line,) = r.batch_log.records
    assert line.batch_id == "b1" and line.rows == 3 and line.padding == 1


def test_a_non_finite_row_fails_only_its_job(tmp_path):
    jobs = [make_job("a", JobStatus.running), make_job("nan", JobStatus.running), make_job("c", JobStatus.running)]
    r = rig(tmp_path, *jobs)
    f, _ = finisher(r)
    s = started(jobs, FixedPending(output(3, finite=[True, False, True])))
    f.finish(s)
    assert [a.future.result() for a in s.running] == ["succeeded", "failed", "succeeded"]
    assert "non-finite" in r.store.jobs["job-nan"].error
    assert not any("job-nan" in str(path) for path in r.storage.root.rglob("*"))  # nothing written for it


def test_a_batch_that_raises_runs_again_job_by_job_and_a_poison_job_fails_alone(tmp_path):
    # the engine takes 2 rows a batch: a job of 3 cannot run at all, the others can
    jobs = [
        make_job("a", JobStatus.running),
        make_job("poison", JobStatus.running, n=3),
        make_job("c", JobStatus.running),
    ]
    r = rig(tmp_path, *jobs, engine=StandInEngine([(64, 64)], 2, 0.0))
    f, in_flight = finisher(r)
    s = started(jobs, FixedPending(error=FloatingPointError("the device failed")))
    f.finish(s)
    assert [a.future.result() for a in s.running] == ["succeeded", "failed", "succeeded"]
    assert r.store.jobs["job-poison"].error.startswith("engine error: EngineInputError: rows:")
    assert [line.jobs for line in r.batch_log.records] == [["job-a"], ["job-c"]]  # each ran alone
    assert in_flight.acquire(blocking=False) and not in_flight.acquire(blocking=False)  # one slot, given back once


def test_a_dispatch_that_raised_fails_a_lone_job_with_the_engines_error(tmp_path):
    job = make_job("a", JobStatus.running)
    r = rig(tmp_path, job)
    f, in_flight = finisher(r)
    s = started([job], None)
    f.failed_dispatch(s.batch, s.running, ValueError("bad row"))
    assert s.running[0].future.result() == "failed" and in_flight.acquire(blocking=False)
    assert r.store.jobs[job.id].error == "engine error: ValueError: bad row"


def test_progress_is_reported_for_interactive_jobs_only(tmp_path):
    jobs = [make_job("a", JobStatus.running), make_job("line", JobStatus.running, lane="bulk")]
    r = rig(tmp_path, *jobs)
    f, _ = finisher(r)
    f.finish(started(jobs, FixedPending(output(2), steps=4, marks=[1, 2, 3, 4])))
    # the first and the last are always written; those between fall within the 0.2 s interval
    assert [{k: p.step for k, p in report.items()} for report in r.store.progress] == [{"job-a": 1}, {"job-a": 4}]


def test_the_throttle_writes_one_report_an_interval_and_always_the_last_step():
    throttle = ProgressThrottle(steps=10, interval_s=0.2)
    seen = [(t, done) for t, done in [(0.0, 1), (0.1, 2), (0.25, 3), (0.3, 4), (0.31, 10)] if throttle.due(t, done)]
    assert seen == [(0.0, 1), (0.25, 3), (0.31, 10)]


def test_a_report_caps_each_job_at_its_own_steps_and_flags_go_per_job():
    short, long = make_job("short", steps=2), make_job("long", steps=6)
    assert {k: (p.step, p.steps) for k, p in progress_report([short, long], 4).items()} == {
        "job-short": (2, 2),
        "job-long": (4, 6),
    }
    assert per_job([make_job("a", n=2), make_job("b")], [False, True, False]) == {"job-a": True, "job-b": False}


class CancelablePending(FixedPending):
    """A batch on the device for 8 chunks; `during(done)` runs as each chunk ends (a client canceling)."""

    def __init__(self, during, **kw):
        super().__init__(output(2), steps=8, marks=list(range(1, 9)), **kw)
        self.during, self.canceled_at, self.seen = during, None, []

    def progress(self):
        for done in self.marks:
            if self.canceled_at is not None:
                return
            self.during(done)
            self.seen.append(done)
            yield done

    def cancel(self) -> bool:
        self.canceled_at = self.seen[-1]
        return True

    def fetch(self):
        assert self.canceled_at is None, "a canceled batch's images are never fetched"
        return super().fetch()


def test_a_batch_whose_every_job_is_canceled_stops_at_the_next_chunk(tmp_path):
    jobs = [make_job("a", JobStatus.running), make_job("b", JobStatus.running)]
    r = rig(tmp_path, *jobs)
    f, in_flight = finisher(r)

    def cancel(job_id: str):
        r.store.jobs[job_id] = r.store.jobs[job_id].model_copy(update={"status": JobStatus.canceled})

    pending = CancelablePending(lambda done: done == 3 and [cancel(j.id) for j in jobs])
    s = started(jobs, pending)
    f.finish(s)
    assert pending.canceled_at == 3  # dropped right after the chunk during which they were canceled
    assert [a.future.result() for a in s.running] == ["canceled", "canceled"]
    assert not list(r.storage.root.rglob("*.png"))
    assert [line.jobs for line in r.batch_log.records] == [["job-a", "job-b"]]  # it did run on the device
    assert in_flight.acquire(blocking=False)


def test_a_batch_with_one_job_left_runs_to_its_end(tmp_path):
    jobs = [make_job("a", JobStatus.running), make_job("b", JobStatus.running)]
    r = rig(tmp_path, *jobs)
    f, _ = finisher(r)

    def cancel_a(done: int):
        if done == 2:
            r.store.jobs["job-a"] = r.store.jobs["job-a"].model_copy(update={"status": JobStatus.canceled})

    pending = CancelablePending(cancel_a)
    s = started(jobs, pending)
    f.finish(s)
    assert pending.canceled_at is None and pending.seen == list(range(1, 9))
    assert [a.future.result() for a in s.running] == ["canceled", "succeeded"]


class RowColours(FixedPending):
    """A batch whose preview after any step is row i drawn all in grey 40 i (each row its own colour)."""

    def preview(self, done: int, row: int) -> np.ndarray | None:
        return np.full((8, 8, 3), 40 * row, np.uint8)


def test_jobs_that_asked_get_a_preview_of_their_first_row_every_k_steps_and_never_at_their_last(tmp_path, monkeypatch):
    monkeypatch.setattr(ProgressThrottle, "due", lambda self, now_s, done: True)  # every step reported
    jobs = [
        make_job("a", JobStatus.running, n=2, steps=12, preview=True),  # rows 0, 1
        make_job("b", JobStatus.running, steps=12),  # row 2: did not ask
        make_job("c", JobStatus.running, steps=6, preview=True),  # row 3: done at its 6th step
    ]
    r = rig(tmp_path, *jobs)
    f, _ = finisher(r)
    f.preview_every_steps = 5
    f.finish(started(jobs, RowColours(output(4), steps=12, marks=list(range(1, 13)))))
    shown = {j.id: [(p[j.id].step, p[j.id].preview) for p in r.store.progress if p[j.id].preview] for j in jobs}
    assert [step for step, _ in shown["job-a"]] == [5, 10] and shown["job-b"] == []
    assert [step for step, _ in shown["job-c"]] == [5]
    assert len(r.store.progress) == 12 and r.store.progress[-1]["job-a"].preview is None  # the last: the image
    colour = lambda url: np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))))[4, 4]  # noqa: E731
    assert abs(int(colour(shown["job-a"][0][1])[0]) - 0) <= 4  # job a: its first row's, row 0
    assert abs(int(colour(shown["job-c"][0][1])[0]) - 120) <= 4  # job c: row 3's


def test_a_failing_preview_leaves_the_progress_report_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(ProgressThrottle, "due", lambda self, now_s, done: True)
    monkeypatch.setattr(preview, "webp_data_url", lambda rgb: 1 / 0)
    job = make_job("a", JobStatus.running, steps=6, preview=True)
    r = rig(tmp_path, job)
    f, _ = finisher(r)
    f.finish(started([job], FixedPending(output(1), steps=6, marks=list(range(1, 7)))))
    assert [p["job-a"].step for p in r.store.progress] == [1, 2, 3, 4, 5, 6]
    assert r.store.jobs["job-a"].status == JobStatus.succeeded
