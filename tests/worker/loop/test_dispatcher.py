"""The dispatcher's steps, called on the test's own thread: messages admitted into the batcher, due batches moved
to running and dispatched, jobs ended before their batch, a dispatch that raises, the drain at shutdown; against
an in-memory fake store and registry (tests/helpers/loop_fakes.py, which record every call) and the stand-in."""

import queue
import threading
import time
from concurrent.futures import Future

from common.jobs import JobStatus
from common.outage import Outage
from tests.helpers.loop_fakes import InlineExecutor, make_job, redis_retry, rig
from worker.loop.admission import Admission
from worker.loop.batch import BatchKey
from worker.loop.dispatcher import MAX_IN_FLIGHT, Dispatcher, Message
from worker.loop.finisher import Finisher, Started
from worker.loop.outcome import JobOutcome
from worker.loop.retry import StorageRetry
from worker.loop.slots import Slots

TIMEOUT_S = 0.5


class Parts:
    def __init__(self, tmp_path, *jobs):
        self.r = r = rig(tmp_path, *jobs)
        retry = StorageRetry(1, 0.5, 8.0, Outage("test: storage"), lambda _: None)
        admission = Admission(r.store, redis_retry(), r.presence, r.recorder, r.engines, r.storage, retry, 3)
        inbox: queue.Queue = queue.Queue()
        self.in_flight = Slots(MAX_IN_FLIGHT, wake=lambda: inbox.put(None))
        self.stop, self.draining = threading.Event(), threading.Event()
        finisher = Finisher(
            r.store,
            redis_retry(),
            r.engines,
            r.writer,
            r.recorder,
            r.presence,
            InlineExecutor(),
            self.in_flight,
            self.stop,
        )
        self.handed: list[Started] = []
        self.dispatcher = Dispatcher(
            r.engines,
            r.store,
            redis_retry(),
            admission,
            r.recorder,
            r.presence,
            finisher,
            self.handed.append,
            self.in_flight,
            TIMEOUT_S,
            self.stop,
            self.draining,
            inbox,
        )

    def send(self, *job_ids: str | None) -> list[Future]:
        """Messages naming these jobs (None: a wake-up, answered by the store's next ready job), then taken."""
        futures = []
        for job_id in job_ids:
            futures.append(Future())
            self.dispatcher.inbox.put(Message(job_id, None, futures[-1]))
        self.dispatcher.take_messages(0.0)
        return futures

    def started(self) -> list[list[str]]:
        return [[a.id for a in s.running] for s in self.handed]


def test_a_due_batch_moves_its_jobs_to_running_and_goes_to_the_finisher(tmp_path):
    jobs = [make_job("a"), make_job("b", n=2)]
    parts = Parts(tmp_path, *jobs)
    futures = parts.send(*(j.id for j in jobs))
    assert parts.dispatcher.batcher.waiting_rows == 3 and parts.handed == []
    parts.dispatcher.start_due(float("inf"))  # past every timeout
    (started,) = parts.handed
    assert [a.id for a in started.running] == ["job-a", "job-b"] and started.batch_id
    assert {parts.r.store.jobs[j.id].status for j in jobs} == {JobStatus.running}
    assert parts.r.store.jobs["job-a"].attempts == 1 and not any(f.done() for f in futures)
    assert list(started.pending.progress()) == [1, 2, 3, 4]  # dispatched on the stand-in: 4 steps


def test_a_job_canceled_before_its_batch_never_runs(tmp_path):
    jobs = [make_job("a"), make_job("b")]
    parts = Parts(tmp_path, *jobs)
    futures = parts.send("job-a", "job-b")
    parts.r.store.transition("job-a", JobStatus.canceled)
    parts.dispatcher.start_due(float("inf"))
    assert futures[0].result() is JobOutcome.canceled
    assert [a.id for a in parts.handed[0].running] == ["job-b"]


def test_a_batch_whose_jobs_all_ended_takes_no_slot(tmp_path):
    parts = Parts(tmp_path, make_job("a"))
    (future,) = parts.send("job-a")
    parts.r.store.transition("job-a", JobStatus.canceled)
    parts.dispatcher.start_due(float("inf"))
    assert future.result() is JobOutcome.canceled and parts.handed == []
    assert all(parts.in_flight.acquire(blocking=False) for _ in range(MAX_IN_FLIGHT))


def test_each_started_batch_holds_a_slot(tmp_path):
    parts = Parts(tmp_path, make_job("a", n=4), make_job("b", n=4))
    parts.send("job-a", "job-b")  # a's batch is full: b waits to be taken until it has started
    parts.dispatcher.start_due(0.0)
    parts.dispatcher.take_messages(0.0)  # the device clock knows no batch's time yet: b is taken at once
    parts.dispatcher.start_due(0.0)
    assert len(parts.handed) == 2 and not parts.in_flight.acquire(blocking=False)


def test_a_dispatch_that_raises_is_settled_on_the_spot(tmp_path):
    job = make_job("wide", width=96)  # a size the stand-in does not serve: its dispatch raises
    parts = Parts(tmp_path, job)
    (future,) = parts.send(job.id)
    parts.dispatcher.start_due(float("inf"))
    assert future.result() is JobOutcome.failed and parts.handed == []
    assert "engine error: EngineInputError: size: 64x96 is not served" in parts.r.store.jobs[job.id].error
    assert all(parts.in_flight.acquire(blocking=False) for _ in range(MAX_IN_FLIGHT))  # the slot came back


def test_draining_answers_new_messages_and_gives_back_the_waiting(tmp_path):
    parts = Parts(tmp_path, make_job("waiting"), make_job("late"))
    (waiting,) = parts.send("job-waiting")
    parts.draining.set()
    (late,) = parts.send("job-late")
    assert late.result() is JobOutcome.requeue and "job-late" not in parts.r.registry.held_sets.get("w1", set())
    parts.dispatcher.recorder.give_back(item.payload for item in parts.dispatcher.batcher.drain())
    assert waiting.result() is JobOutcome.requeue and parts.r.registry.held_sets["w1"] == set()
    assert {j.status for j in parts.r.store.jobs.values()} == {JobStatus.queued}


def test_no_job_is_taken_while_each_free_slot_has_a_batch_waiting(tmp_path):
    parts = Parts(tmp_path, *(make_job(name, n=4) for name in "abc"))
    assert parts.in_flight.acquire(blocking=False)  # a batch in flight: one slot free
    parts.send("job-a", "job-b", "job-c")
    assert parts.r.registry.held_sets["w1"] == {"job-a"} and len(parts.dispatcher.waiting) == 2  # b, c not even held
    parts.dispatcher.start_due(0.0)
    assert parts.started() == [["job-a"]] and parts.in_flight.free == 0
    parts.dispatcher.take_messages(0.0)
    assert parts.r.registry.held_sets["w1"] == {"job-a"}  # no slot free: nothing taken
    parts.in_flight.release()  # a batch ended: the slot's wake-up is in the inbox
    parts.dispatcher.take_messages(0.0)
    assert parts.r.registry.held_sets["w1"] == {"job-a", "job-b"} and len(parts.dispatcher.waiting) == 1


def test_a_tenant_ready_after_a_flood_was_taken_from_goes_into_the_next_batch(tmp_path):
    """Wake-ups name no job: the job is picked when taken. The flood's jobs are taken only as slots come free, so
    a job that becomes ready meanwhile, first in the fair order, runs in the next batch rather than after every
    wake-up already delivered (the store's fair order itself: tests/common/test_job_store.py)."""
    flood = [make_job(f"flood {i}", n=4) for i in range(4)]
    parts = Parts(tmp_path, *flood, make_job("honest"))
    parts.r.store.ready = [j.id for j in flood]
    assert parts.in_flight.acquire(blocking=False)  # a batch in flight: one slot free
    parts.send(None, None, None, None, None)
    parts.dispatcher.start_due(0.0)
    assert parts.started() == [["job-flood-0"]]
    parts.r.store.ready.insert(0, "job-honest")  # its tenant's turn comes first
    parts.in_flight.release()  # the batch in flight ended
    parts.dispatcher.take_messages(0.0)
    parts.dispatcher.start_due(0.0)  # not a timeout: a job waits that the honest one's batch cannot take
    assert parts.started() == [["job-flood-0"], ["job-honest"]]
    assert parts.r.store.jobs["job-flood-1"].status is JobStatus.queued  # taken, waiting for a slot
    assert parts.r.store.ready == ["job-flood-2", "job-flood-3"]


def test_jobs_are_taken_only_once_the_batches_in_flight_near_their_end(tmp_path):
    """With a batch in flight that the device clock expects for about another second, a free slot does not take the
    next job yet: it would wait on the device behind that batch (worker/loop/device_clock.py). Once the batch has
    left, it is taken."""
    a, b = make_job("a", n=4), make_job("b", n=4)
    parts = Parts(tmp_path, a, b)
    clock = parts.dispatcher.clock
    clock.dispatched("earlier", BatchKey.of(a), steps=4, now_s=0.0)  # a batch of their kind: 0.25 s a step
    clock.left("earlier", done_s=1.0, device_s=1.0)
    parts.send("job-a")
    parts.dispatcher.start_due(0.0)
    (started,) = parts.handed  # 4 steps: on the device for about a second from now
    parts.send("job-b")
    assert [m.job_id for m in parts.dispatcher.waiting] == ["job-b"] and parts.in_flight.free == 1
    assert parts.r.registry.held_sets["w1"] == {"job-a"}
    clock.left(started.batch_id, done_s=time.monotonic(), device_s=None)
    parts.dispatcher.take_messages(0.0)
    assert not parts.dispatcher.waiting and parts.r.registry.held_sets["w1"] == {"job-a", "job-b"}
