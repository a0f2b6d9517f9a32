"""The job store's contract (deployments/job_store/base.py), run against both backends: SQLite on a
temporary file and Redis on a throwaway `redis-server`. Time is a fake clock the tests move."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sqlite3
import stat
import threading
import time
import uuid

import pytest

from deployments.job_store import codec, open_job_store
from deployments.job_store.base import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Admission,
    AdmissionRejected,
    IdempotencyConflict,
    JobRecord,
    Load,
    NewEvent,
)
from deployments.job_store.sqlite import SCHEMA_V1, SCHEMA_VERSION

T0 = 1_700_000_000.123456  # not a round number: times must come back as the same float
LEASE = 30.0


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, tmp_path, clock):
    """Opens another store instance (its own connection) on this test's database."""
    backend = request.param
    if backend == "sqlite":
        options = {"path": str(tmp_path / "state" / "jobs.sqlite3")}
    else:
        options = {"url": request.getfixturevalue("redis_url"), "prefix": f"t-{uuid.uuid4().hex}"}
    opened = []

    def open_():
        store = open_job_store(backend, clock=clock, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store()


def job(job_id: str, **changes) -> JobRecord:
    fields = {"id": job_id, "kind": "job", "owner": "alice", "request": {"prompt": job_id}}
    return JobRecord(**{**fields, **changes})


def create(store, job_id: str, events=(), **changes) -> JobRecord:
    record, created = store.create(job(job_id, **changes), events)
    assert created
    return record


def ids(records) -> list[str]:
    return [r.id for r in records]


def seqs(events) -> list[tuple[str, int, str]]:
    return [(e.job_id, e.seq, e.type) for e in events]


# -- records -----------------------------------------------------------------------------------
def test_every_field_round_trips(store, clock):
    full = JobRecord(
        id="job-full",
        kind="sync",
        owner="tenant:ü",
        request={
            "prompt": "ünïcödé 🐱 \"quoted\"",
            "seed": 2**53 + 1,
            "size": [512, 768],
            "guidance": 3.5,
            "tiny": 1e-300,
            "nested": {"none": None, "flag": True, "empty": {}, "list": []},
        },
        status=RUNNING,
        created_at=1.0,  # the store sets it
        attempts=3,
        not_before=T0 + 0.1,
        lease_owner="ingress-1",
        lease_expires=T0 + 30.7,
        cancel_requested=True,
        progress={"step": 3, "of": 28},
        idempotency_key="key:1",
        request_hash="hash-1",
        started_at=T0 - 5.5,
        priority=2,
        rank=T0 - 20.25,
        cost=3 * 28 * 0.262144,
    )
    stored, created = store.create(full)
    assert created and stored == full.with_changes(created_at=T0)
    assert store.get("job-full") == stored

    clock.advance(0.25)
    done = JobRecord(
        id="job-done",
        kind="job",
        owner="bob",
        request={},
        status=FAILED,
        attempts=1,
        result={"data": [{"url": "/v1/files/x.png"}]},
        error={"message": "boom", "type": "server_error", "param": None, "code": "x"},
        started_at=T0,
        finished_at=T0 + 0.2,
        expires_at=T0 + 86400.5,
    )
    assert store.create(done)[0] == store.get("job-done") == done.with_changes(created_at=T0 + 0.25)

    minimal = store.create(JobRecord(id="job-min", kind="stream", owner="anonymous", request={}))[0]
    got = store.get("job-min")
    assert got == minimal == JobRecord(
        id="job-min", kind="stream", owner="anonymous", request={}, created_at=T0 + 0.25
    )
    for record in (store.get("job-full"), store.get("job-done"), got):
        for f in dataclasses.fields(JobRecord):
            value = getattr(record, f.name)
            expected = {
                "attempts": int,
                "cancel_requested": bool,
                "request": dict,
                "created_at": float,
                "not_before": float,
                "priority": int,
                "cost": float,
            }.get(f.name)
            if expected is not None:
                assert type(value) is expected, (f.name, value)
            elif f.name in ("lease_expires", "started_at", "finished_at", "expires_at", "rank"):
                assert value is None or type(value) is float, (f.name, value)
    assert got.lease_owner is got.progress is got.result is got.error is got.expires_at is None
    assert (got.priority, got.rank, got.cost, got.queue_rank) == (0, None, 0.0, T0 + 0.25)
    assert store.get("no-such-job") is None


def test_create_with_events_and_checks(store, clock):
    events = [
        NewEvent("a", "queued", {"position": 0}),
        NewEvent("a", "note", {"x": [1, 2.5]}, progress={"stage": "queued"}),
    ]
    record = create(store, "a", events)
    assert record.progress == {"stage": "queued"} == store.get("a").progress
    got = store.events("a")
    assert [(e.seq, e.type, e.data, e.created_at) for e in got] == [
        (1, "queued", {"position": 0}, T0),
        (2, "note", {"x": [1, 2.5]}, T0),
    ]
    with pytest.raises(ValueError):  # an event for another job
        store.create(job("b"), [NewEvent("other", "x")])
    assert store.get("b") is None and store.events("other") == []
    with pytest.raises(ValueError):
        store.create(job("a"))  # the id exists
    with pytest.raises(ValueError):
        store.create(job("c", kind="batch"))
    for bad in ({"cost": -1.0}, {"cost": float("nan")}, {"rank": float("inf")}, {"priority": 1.5}):
        with pytest.raises(ValueError):
            store.create(job("c", **bad))
    assert store.get("c") is None and store.load() == Load(1, 0, 0.0)
    assert store.events("a") == got


def test_idempotency(store, clock):
    first = create(store, "a", idempotency_key="k", request_hash="h1")
    clock.advance(1)
    again, created = store.create(
        job("b", idempotency_key="k", request_hash="h1"), [NewEvent("b", "queued")]
    )
    assert created is False and again == first
    assert store.get("b") is None and store.events("b") == [] and store.events("a") == []
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create(job("c", idempotency_key="k", request_hash="h2"))
    assert conflict.value.job_id == "a" and store.get("c") is None
    # Another owner's key space is its own; no key never deduplicates.
    assert store.create(job("d", owner="bob", idempotency_key="k", request_hash="h2"))[1]
    assert store.create(job("e"))[1] and store.create(job("f"))[1]
    assert store.create(job("g", idempotency_key="k2", request_hash="h1"))[1]


def test_claim_order_limit_not_before_and_kind(store, clock):
    create(store, "j-old")
    clock.advance(1)
    create(store, "j-b")  # same time as j-a: ties go by id
    create(store, "j-a")
    clock.advance(1)
    create(store, "j-later", not_before=clock.now + 100)
    create(store, "s-queued", kind="sync")  # only `job` records are claimed
    clock.advance(1)
    create(store, "j-new")
    now = clock.advance(1)

    first = store.claim("w1", LEASE, 2)
    assert ids(first) == ["j-old", "j-a"]
    for record in first:
        assert record == store.get(record.id)
        assert (record.status, record.lease_owner) == (RUNNING, "w1")
        assert record.lease_expires == now + LEASE
        assert (record.attempts, record.started_at) == (1, now)
    assert ids(store.claim("w2", LEASE, 10)) == ["j-b", "j-new"]
    assert store.claim("w2", LEASE, 10) == [] and store.claim("w2", LEASE, 0) == []
    clock.advance(99)
    assert ids(store.claim("w3", LEASE, 10)) == ["j-later"]
    assert store.get("s-queued").status == QUEUED


def test_concurrent_claimers_never_share_a_job(open_store, store):
    expected = [f"j{i:03d}" for i in range(60)]
    for job_id in expected:
        create(store, job_id)
    # Separate instances (for SQLite: separate connections to one file) and two threads on one.
    stores = [open_store(), open_store(), open_store(), store, store]
    barrier = threading.Barrier(len(stores))
    got: list[list[str]] = [[] for _ in stores]

    def claimer(i: int) -> None:
        barrier.wait()
        while batch := stores[i].claim(f"w{i}", LEASE, 3):
            got[i] += ids(batch)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    claimed = [job_id for batch in got for job_id in batch]
    assert sorted(claimed) == expected  # every job once: none twice, none lost
    for i, batch in enumerate(got):
        for job_id in batch:
            record = store.get(job_id)
            assert (record.lease_owner, record.attempts) == (f"w{i}", 1)


# -- leases ------------------------------------------------------------------------------------
def test_renew_finish_requeue_need_the_lease(store, clock):
    create(store, "a")
    create(store, "b")
    started = clock.now
    assert ids(store.claim("w1", LEASE, 2)) == ["a", "b"]
    now = clock.advance(10)

    assert store.renew("w2", ["a"], 60) == set()
    assert store.get("a").lease_expires == started + LEASE
    assert store.renew("w1", ["a", "missing"], 60) == {"a"}
    assert store.get("a").lease_expires == now + 60
    assert store.get("b").lease_expires == started + LEASE
    assert store.renew("w1", [], 60) == set()

    before = store.get("a")
    assert store.finish("a", "w2", SUCCEEDED, retention_s=100, result={"x": 1}) is None
    assert store.requeue("a", "w2", delay_s=0) is False
    assert store.finish("missing", "w1", SUCCEEDED, retention_s=100) is None
    assert store.requeue("missing", "w1", delay_s=0) is False
    assert store.get("a") == before and store.events("a") == []

    assert store.requeue("b", "w1", delay_s=5, event=NewEvent("b", "retry", {"attempt": 1}))
    b = store.get("b")
    assert (b.status, b.lease_owner, b.lease_expires) == (QUEUED, None, None)
    assert (b.not_before, b.attempts, b.started_at) == (now + 5, 1, started)
    assert seqs(store.events("b")) == [("b", 1, "retry")]
    assert store.renew("w1", ["b"], 60) == set()
    assert store.requeue("b", "w1", delay_s=0) is False  # not running any more
    assert store.claim("w3", LEASE, 10) == []  # not before its delay
    clock.advance(5)
    (again,) = store.claim("w3", LEASE, 10)
    assert (again.id, again.attempts, again.started_at) == ("b", 2, started)
    assert again.lease_owner == "w3"

    # A sync record is never claimed, so it never goes back to the queue.
    create(store, "s", kind="sync", status=RUNNING, lease_owner="w1", lease_expires=now + 60)
    assert store.requeue("s", "w1", delay_s=0) is False and store.get("s").status == RUNNING


def test_finish_writes_the_end_and_its_event_at_once(store, clock):
    create(store, "a", [NewEvent("a", "queued")])
    store.claim("w1", LEASE, 1)
    store.append_events([NewEvent("a", "step", {"i": 1}, progress={"step": 1})])
    now = clock.advance(2)
    result = {"created": 1, "data": [{"url": "/v1/files/a.png"}]}
    done = store.finish(
        "a",
        "w1",
        SUCCEEDED,
        retention_s=3600,
        result=result,
        event=NewEvent("a", "succeeded", {"result": result}),
    )
    assert done == store.get("a")
    assert (done.status, done.result, done.error) == (SUCCEEDED, result, None)
    assert (done.finished_at, done.expires_at) == (now, now + 3600)
    assert (done.lease_owner, done.lease_expires, done.progress) == (None, None, {"step": 1})
    events = store.events("a")
    assert seqs(events) == [("a", 1, "queued"), ("a", 2, "step"), ("a", 3, "succeeded")]
    assert events[-1].data == {"result": result} and events[-1].created_at == now

    assert store.finish("a", "w1", FAILED, retention_s=1, error={"message": "late"}) is None
    assert store.get("a") == done and len(store.events("a")) == 3

    create(store, "b")
    store.claim("w1", LEASE, 1)
    with pytest.raises(ValueError):
        store.finish("b", "w1", RUNNING, retention_s=1)
    with pytest.raises(ValueError):
        store.finish("b", "w1", FAILED, retention_s=1, event=NewEvent("a", "failed"))
    error = {"message": "out of memory", "type": "server_error", "param": None, "code": None}
    failed = store.finish("b", "w1", FAILED, retention_s=10, error=error)
    assert (failed.status, failed.error, failed.result) == (FAILED, error, None)
    assert store.events("b") == [] and store.get("b") == failed


# -- cancellation ------------------------------------------------------------------------------
def test_request_cancel(store, clock):
    create(store, "r")
    store.claim("w1", LEASE, 1)
    clock.advance(1)
    create(store, "q")
    now = clock.advance(1)

    cancelled = store.request_cancel("q", retention_s=60)
    assert cancelled == store.get("q")
    assert cancelled.status == CANCELLED
    assert (cancelled.finished_at, cancelled.expires_at) == (now, now + 60)
    (event,) = store.events("q")
    assert (event.seq, event.type, event.created_at) == (1, CANCELLED, now) and event.data["reason"]
    assert store.queue_position("q") is None and store.claim("w2", LEASE, 10) == []

    running = store.request_cancel("r", retention_s=60)
    assert running == store.get("r")
    assert (running.status, running.cancel_requested, running.lease_owner) == (RUNNING, True, "w1")
    assert store.events("r") == []
    assert store.request_cancel("r", retention_s=60) == running  # again: no change

    clock.advance(5)
    assert store.request_cancel("q", retention_s=600) == cancelled  # terminal: unchanged
    assert len(store.events("q")) == 1
    assert store.request_cancel("missing", retention_s=60) is None


def test_cancel_requested(store, clock):
    for job_id in ("a", "b", "c"):
        create(store, job_id)
    store.claim("w1", LEASE, 3)
    create(store, "d")  # queued
    store.request_cancel("b", retention_s=60)
    store.finish("c", "w1", SUCCEEDED, retention_s=60, result={})
    assert store.cancel_requested(["a", "b", "c", "d", "missing"]) == {"b", "c"}
    assert store.cancel_requested(["a", "d"]) == set()
    assert store.cancel_requested([]) == set()


# -- recovery ----------------------------------------------------------------------------------
def test_recover_each_branch(store, clock):
    start = clock.now
    create(store, "cancel-me")
    create(store, "retry-me")
    create(store, "exhausted", attempts=2)
    create(store, "fresh")
    create(
        store,
        "sync-lost",
        kind="sync",
        status=RUNNING,
        attempts=1,
        lease_owner="ingress-9",
        lease_expires=start + LEASE,
        started_at=start,
    )
    assert len(store.claim("w1", LEASE, 10)) == 4
    clock.advance(1)
    create(store, "queued-later")
    store.request_cancel("cancel-me", retention_s=600)
    assert store.renew("w1", ["fresh"], 1000) == {"fresh"}

    clock.advance(LEASE - 1)  # leases end now: expired only once past
    assert store.recover(max_attempts=3, retention_s=600) == []
    now = clock.advance(0.5)
    recovered = store.recover(max_attempts=3, retention_s=600)
    assert {r.job_id: r.status for r in recovered} == {
        "cancel-me": CANCELLED,
        "retry-me": QUEUED,
        "exhausted": FAILED,
        "sync-lost": FAILED,
    }
    assert all(r.reason for r in recovered)

    cancelled = store.get("cancel-me")
    assert cancelled.status == CANCELLED
    assert cancelled.lease_owner is cancelled.lease_expires is None
    assert (cancelled.finished_at, cancelled.expires_at) == (now, now + 600)
    assert seqs(store.events("cancel-me"))[-1] == ("cancel-me", 1, CANCELLED)

    retried = store.get("retry-me")
    assert (retried.status, retried.lease_owner, retried.lease_expires) == (QUEUED, None, None)
    assert (retried.not_before, retried.attempts, retried.finished_at) == (now, 1, None)
    (retry,) = store.events("retry-me")
    assert retry.type == "retry" and retry.data["attempt"] == 1 and retry.data["reason"]
    # Back in the queue by its original created_at: ahead of a job queued after it.
    assert store.queue_position("retry-me") == 0 and store.queue_position("queued-later") == 1

    for job_id in ("exhausted", "sync-lost"):
        failed = store.get(job_id)
        assert (failed.status, failed.finished_at, failed.expires_at) == (FAILED, now, now + 600)
        assert failed.lease_owner is None and failed.result is None
        assert failed.error["code"] == "job_lost" and failed.error["type"] == "server_error"
        assert failed.error["param"] is None and failed.error["message"]
        (event,) = store.events(job_id)
        assert event.type == FAILED

    assert store.get("fresh").status == RUNNING
    assert store.recover(max_attempts=3, retention_s=600) == []
    assert ids(store.claim("w2", LEASE, 10)) == ["retry-me", "queued-later"]
    assert store.get("retry-me").attempts == 2


def test_two_recover_callers_never_recover_one_record(open_store, store, clock):
    expected = [f"j{i:02d}" for i in range(30)]
    for job_id in expected:
        create(store, job_id)
    assert len(store.claim("w1", LEASE, 100)) == 30
    clock.advance(LEASE + 1)
    stores = [open_store() for _ in range(3)] + [store]
    barrier = threading.Barrier(len(stores))
    got: list[list[str]] = [[] for _ in stores]

    def recoverer(i: int) -> None:
        barrier.wait()
        got[i] = [r.job_id for r in stores[i].recover(max_attempts=5, retention_s=60)]

    threads = [threading.Thread(target=recoverer, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(job_id for batch in got for job_id in batch) == expected
    for job_id in expected:
        assert [e.type for e in store.events(job_id)] == ["retry"]
        assert store.get(job_id).status == QUEUED


def test_release_lets_recover_requeue_at_once(store, clock):
    for job_id in ("a", "b", "c"):
        create(store, job_id)
    store.claim("w1", LEASE, 2)
    store.claim("w2", LEASE, 1)
    clock.advance(1)
    assert store.recover(max_attempts=3, retention_s=60) == []
    assert store.release("w1") == 2
    assert store.release("nobody") == 0
    assert store.get("a").lease_expires < clock.now and store.get("a").status == RUNNING
    recovered = store.recover(max_attempts=3, retention_s=60)
    assert sorted((r.job_id, r.status) for r in recovered) == [("a", QUEUED), ("b", QUEUED)]
    assert store.get("c").lease_owner == "w2" and store.get("c").status == RUNNING
    assert store.release("w1") == 0


def test_sweep_deletes_expired_terminal_records(store, clock):
    create(store, "old", [NewEvent("old", "queued")], idempotency_key="k", request_hash="h1")
    store.claim("w1", LEASE, 1)
    old = store.finish(
        "old", "w1", SUCCEEDED, retention_s=10, result={}, event=NewEvent("old", "succeeded")
    )
    create(store, "young")
    young = store.request_cancel("young", retention_s=100)
    create(store, "running")
    store.claim("w1", LEASE, 1)
    create(store, "queued")
    assert store.sweep() == []

    clock.advance(10)  # `old` expires now
    assert store.sweep() == [old]
    assert store.get("old") is None and store.events("old") == []
    assert ids(store.list_jobs("alice", limit=10)[0]) == ["young", "running", "queued"]
    assert store.cancel_requested(["old"]) == set()  # no record: nothing to stop
    # The idempotency key is free again: a different body no longer conflicts.
    assert store.create(job("old-2", idempotency_key="k", request_hash="h2"))[1]
    # Appending to a swept job's log is dropped.
    assert store.append_events([NewEvent("old", "late")]) == [] and store.events("old") == []
    assert store.sweep() == []

    clock.advance(100)
    assert store.sweep() == [young]
    assert ids(store.list_jobs("alice", limit=10)[0]) == ["old-2", "running", "queued"]


# -- events ------------------------------------------------------------------------------------
def test_append_events(store, clock):
    create(store, "a", [NewEvent("a", "queued")])
    create(store, "b")
    now = clock.advance(3)
    written = store.append_events(
        [
            NewEvent("a", "stage", {"stage": "encode"}),
            NewEvent("b", "stage", {"stage": "encode"}),
            NewEvent("gone", "stage", {}),
            NewEvent("a", "step", {"i": 1}, progress={"step": 1, "of": 4}),
            NewEvent("a", "step", {"i": 2}, progress={"step": 2, "of": 4}),
        ]
    )
    assert seqs(written) == [
        ("a", 2, "stage"),
        ("b", 1, "stage"),
        ("a", 3, "step"),
        ("a", 4, "step"),
    ]
    assert all(e.created_at == now for e in written)
    assert written[3].data == {"i": 2}
    assert store.events("a")[1:] == [e for e in written if e.job_id == "a"]
    assert store.events("b") == [written[1]]
    assert store.get("a").progress == {"step": 2, "of": 4} and store.get("b").progress is None
    assert store.events("gone") == [] and store.get("gone") is None
    assert store.append_events([]) == []


def test_events_after_seq_and_limit(store):
    create(store, "a", [NewEvent("a", "queued")])
    store.append_events([NewEvent("a", "step", {"i": i}) for i in range(2, 11)])
    assert [e.seq for e in store.events("a")] == list(range(1, 11))
    assert [e.seq for e in store.events("a", after_seq=3, limit=4)] == [4, 5, 6, 7]
    assert [e.data["i"] for e in store.events("a", after_seq=8)] == [9, 10]
    assert [e.seq for e in store.events("a", limit=2)] == [1, 2]
    assert store.events("a", after_seq=10) == [] and store.events("missing") == []


def test_tail_returns_new_events_in_order(store, clock):
    start = store.tail_cursor()
    create(store, "a", [NewEvent("a", "queued")])
    cursor = store.tail_cursor()
    create(store, "b", [NewEvent("b", "queued")])
    store.append_events([NewEvent("a", "step", {"i": 1}), NewEvent("b", "step", {"i": 1})])
    store.claim("w1", LEASE, 1)
    store.finish("a", "w1", SUCCEEDED, retention_s=60, result={}, event=NewEvent("a", "succeeded"))

    events, cursor = store.tail(cursor, 0.2)
    assert seqs(events) == [
        ("b", 1, "queued"),
        ("a", 2, "step"),
        ("b", 2, "step"),
        ("a", 3, "succeeded"),
    ]
    assert events[1].data == {"i": 1} and events[0].created_at == T0
    assert seqs(store.tail(start, 0.2)[0])[:2] == [("a", 1, "queued"), ("b", 1, "queued")]

    began = time.monotonic()
    assert store.tail(cursor, 0.2) == ([], cursor)  # nothing new: empty after the timeout
    assert 0.15 <= time.monotonic() - began < 5
    store.append_events([NewEvent("b", "step", {"i": 2})])
    assert seqs(store.tail(cursor, 0.2)[0]) == [("b", 3, "step")]


def test_tail_wakes_up_when_an_event_is_appended(open_store, store):
    create(store, "a")
    cursor = store.tail_cursor()
    box = {}
    returned = threading.Event()

    def waiter() -> None:
        box["began"] = time.monotonic()
        box["result"] = store.tail(cursor, 10.0)
        box["took"] = time.monotonic() - box["began"]
        returned.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert not returned.wait(0.2)  # nothing yet: it is waiting
    open_store().append_events([NewEvent("a", "step", {"i": 1})])  # another connection writes
    assert returned.wait(5.0), "tail did not wake up for the new event"
    thread.join(5)
    events, new_cursor = box["result"]
    assert seqs(events) == [("a", 1, "step")] and box["took"] < 5.0
    assert new_cursor != cursor and store.tail(new_cursor, 0.05)[0] == []


# -- listing and the queue ---------------------------------------------------------------------
def test_list_jobs_pages(store, clock):
    # (created_at, id) order: several records share a created_at (ties go by id).
    create(store, "j1")
    clock.advance(1)
    create(store, "j3")
    create(store, "s1", kind="sync")
    create(store, "j2")
    create(store, "bob1", owner="bob")
    clock.advance(1)
    create(store, "t1", kind="stream")
    create(store, "j4")
    clock.advance(1)
    create(store, "j5")
    store.claim("w1", LEASE, 1)
    store.request_cancel("j2", retention_s=60)
    jobs_oldest = ["j1", "j2", "j3", "j4", "j5"]

    def pages(limit, newest_first, kinds=("job",)):
        out, flags, after = [], [], None
        while True:
            page, more = store.list_jobs("alice", kinds, limit, after, newest_first)
            out.append(ids(page))
            flags.append(more)
            if not more:
                return out, flags
            after = page[-1].id

    assert pages(2, False) == ([["j1", "j2"], ["j3", "j4"], ["j5"]], [True, True, False])
    assert pages(2, True) == ([["j5", "j4"], ["j3", "j2"], ["j1"]], [True, True, False])
    assert pages(5, True) == ([jobs_oldest[::-1]], [False])
    assert pages(3, False, ("job", "sync", "stream")) == (
        [["j1", "j2", "j3"], ["s1", "j4", "t1"], ["j5"]],
        [True, True, False],
    )
    assert pages(4, True, ("sync", "stream")) == ([["t1", "s1"]], [False])
    assert store.list_jobs("alice", ("job",), 2, "j3", True) == (
        [store.get("j2"), store.get("j1")],
        False,
    )
    assert ids(store.list_jobs("alice", ("job",), 2, "j3", False)[0]) == ["j4", "j5"]
    assert store.list_jobs("alice", ("job",), 10, "j5", False) == ([], False)
    # An unknown cursor, or another owner's record, starts from the beginning.
    for cursor in ("missing", "bob1"):
        assert ids(store.list_jobs("alice", ("job",), 2, cursor, False)[0]) == ["j1", "j2"]
    assert ids(store.list_jobs("alice", ("job",), 2, "s1", False)[0]) == ["j4", "j5"]
    assert store.list_jobs("bob")[0] == [store.get("bob1")]
    assert store.list_jobs("carol") == ([], False)
    assert store.list_jobs("alice", ()) == ([], False)
    assert store.list_jobs("alice")[0][0] == store.get("j5")  # defaults: jobs, newest first


def test_queue_position(store, clock):
    create(store, "q2")
    create(store, "q1")  # same created_at: ahead of q2 by id
    clock.advance(1)
    create(store, "q3")
    create(store, "s", kind="sync")  # never claimed: no place in the queue
    positions = [store.queue_position(j) for j in ("q1", "q2", "q3", "s", "missing")]
    assert positions == [0, 1, 2, None, None]
    (claimed,) = store.claim("w1", LEASE, 1)
    assert claimed.id == "q1" and store.queue_position("q1") is None
    assert [store.queue_position(j) for j in ("q2", "q3")] == [0, 1]
    store.request_cancel("q2", retention_s=60)
    assert [store.queue_position(j) for j in ("q2", "q3")] == [None, 0]
    # Requeued (even with a delay) it is back at its original place.
    assert store.requeue("q1", "w1", delay_s=30)
    assert [store.queue_position(j) for j in ("q1", "q3")] == [0, 1]


# -- priorities --------------------------------------------------------------------------------
BOOST = 10.0  # seconds of queueing one priority level is worth (the caller's setting)


def ranked(store, clock, job_id: str, priority: int, **changes) -> JobRecord:
    """Created as the caller does: rank = now - priority * boost."""
    rank = clock.now - priority * BOOST
    return create(store, job_id, priority=priority, rank=rank, **changes)


def drain(store) -> list[str]:
    """Claim one at a time: the claim order."""
    out = []
    while batch := store.claim("w-drain", LEASE, 1):
        out += ids(batch)
    return out


def test_priority_goes_ahead_of_recent_jobs_but_never_starves_old_ones(store, clock):
    low = ranked(store, clock, "low", 0)
    assert (low.priority, low.rank, low.queue_rank) == (0, T0, T0) == (0, low.created_at, T0)
    clock.advance(1)
    ranked(store, clock, "plain", 0)  # no rank at all: its created_at
    store.create(job("plain-none"))
    clock.advance(1)
    high = ranked(store, clock, "high", 1)  # queued 2 s after `low`: less than BOOST
    assert store.get("high") == high and high.rank == T0 + 2 - BOOST
    clock.advance(BOOST)
    ranked(store, clock, "late-high", 1)  # queued BOOST + 2 s after `low`: behind it
    ranked(store, clock, "late-urgent", 3)  # 3 levels: ahead of everything queued in 30 s
    order = ["late-urgent", "high", "low", "plain", "plain-none", "late-high"]
    assert [store.queue_position(j) for j in order] == list(range(len(order)))
    assert drain(store) == order


def test_queue_position_agrees_with_claim_order_and_requeue_keeps_the_rank(store, clock):
    for i in range(8):  # mixed priorities, some sharing a rank (ties go by id)
        ranked(store, clock, f"j{7 - i}", priority=(i * 5) % 3)
        if i % 2:
            clock.advance(4)
    queued = [f"j{i}" for i in range(8)]
    by_position = sorted(queued, key=store.queue_position)
    assert sorted(store.queue_position(j) for j in queued) == list(range(8))
    expected = sorted(queued, key=lambda j: (store.get(j).queue_rank, j))
    assert by_position == expected

    first, second = by_position[:2]
    (claimed,) = store.claim("w1", LEASE, 1)
    assert claimed.id == first and store.queue_position(second) == 0
    clock.advance(100)  # jobs queued now would rank after every one of these
    ranked(store, clock, "newcomer", 0)
    assert store.requeue(first, "w1", delay_s=0)
    assert store.get(first).rank == claimed.rank and store.queue_position(first) == 0
    # Recovered (its dispatcher gone) it is back at its place too.
    store.claim("w1", LEASE, 1)
    clock.advance(LEASE + 1)
    assert [(r.job_id, r.status) for r in store.recover(max_attempts=5, retention_s=60)] == [
        (first, QUEUED)
    ]
    assert store.queue_position(first) == 0 and store.queue_position("newcomer") == 8
    assert drain(store) == by_position + ["newcomer"]


# -- admission ---------------------------------------------------------------------------------
def rejected(store, record: JobRecord, admit: Admission) -> AdmissionRejected:
    with pytest.raises(AdmissionRejected) as caught:
        store.create(record, [NewEvent(record.id, "queued")], admit=admit)
    assert store.get(record.id) is None and store.events(record.id) == []  # nothing written
    return caught.value


def test_admission_by_cost(store, clock):
    budget = Admission(max_pending_cost=10.0)
    create(store, "a", cost=4.0)
    assert store.create(job("b", cost=4.0), admit=budget)[1]
    refused = rejected(store, job("c", cost=2.5), budget)
    assert (refused.reason, refused.pending_cost, refused.pending) == ("cost", 8.0, 2)
    copy = pickle.loads(pickle.dumps(refused))  # it may cross a process boundary
    assert (copy.reason, copy.pending_cost, copy.pending) == ("cost", 8.0, 2)
    assert store.create(job("c", cost=2.0), admit=budget)[1]  # exactly the budget: admitted
    # Costs add exactly (millionths): 0.1 + 0.2 fits a budget of 0.3 on both backends.
    assert rejected(store, job("d", cost=0.1), budget).pending_cost == 10.0
    # A record that adds no pending work is never refused: a terminal one, or a replay.
    done = job("e", status=FAILED, expires_at=T0 + 60, cost=50.0)
    assert store.create(done, admit=budget)[1]
    assert store.load() == Load(queued=3, running=0, pending_cost=10.0)
    assert store.create(job("f", cost=50.0))[1]  # without `admit` nothing is checked
    assert store.load().pending_cost == 60.0

    for job_id in ("a", "b", "c", "f"):
        store.request_cancel(job_id, retention_s=60)
    small = Admission(max_pending_cost=0.3)
    assert store.create(job("g", cost=0.1), admit=small)[1]
    assert store.create(job("h", cost=0.2), admit=small)[1]
    assert rejected(store, job("i", cost=0.000001), small).reason == "cost"
    assert store.load().pending_cost == pytest.approx(0.3)


def test_a_lone_big_request_is_admitted_and_a_replay_is_never_rejected(store, clock):
    budget = Admission(max_pending_cost=10.0, max_pending=2, owner_max_active=2)
    first = job("big", cost=500.0, idempotency_key="k", request_hash="h")
    big, created = store.create(first, admit=budget)
    assert created and store.load() == Load(1, 0, 500.0)
    refused = rejected(store, job("small", cost=0.0), budget)  # the budget is spent already
    assert (refused.reason, refused.pending_cost, refused.pending) == ("cost", 500.0, 1)
    assert store.create(job("other", owner="bob", kind="sync", status=RUNNING))[1]
    assert rejected(store, job("more"), budget).reason == "count"
    # The same key and body: the first record back, whatever the limits say.
    strict = Admission(max_pending_cost=0.0, max_pending=0, owner_max_active=0)
    replay = job("big-again", cost=500.0, idempotency_key="k", request_hash="h")
    assert store.create(replay, admit=strict) == (big, False)
    with pytest.raises(IdempotencyConflict):  # another body: the conflict, not a refusal
        store.create(replay.with_changes(request_hash="h2"), admit=strict)
    assert store.get("big-again") is None and store.load() == Load(1, 1, 500.0)


def test_admission_by_count_and_by_owner(store, clock):
    limits = Admission(max_pending=4, owner_max_active=2)
    for job_id, owner in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
        assert store.create(job(job_id, owner=owner), admit=limits)[1]
    refused = rejected(store, job("a3"), limits)
    assert (refused.reason, refused.pending, refused.pending_cost) == ("owner_active", 3, 0.0)
    assert store.create(job("b2", owner="bob"), admit=limits)[1]
    assert rejected(store, job("c1", owner="carol"), limits).reason == "count"
    assert rejected(store, job("a3"), limits).reason == "owner_active"  # the first limit failed
    # Running ones count too, of any kind; ending one frees its place.
    store.claim("w1", LEASE, 1)  # a1
    stream = job("s1", kind="stream", status=RUNNING)
    assert rejected(store, stream, limits).reason == "owner_active"
    store.finish("a1", "w1", SUCCEEDED, retention_s=60, result={})
    assert store.create(job("a3"), admit=limits)[1]
    assert rejected(store, job("c1", owner="carol"), limits).reason == "count"
    store.request_cancel("b1", retention_s=60)
    assert store.create(job("c1", owner="carol"), admit=limits)[1]
    assert store.counts_by_status() == {QUEUED: 4, SUCCEEDED: 1, CANCELLED: 1}


def test_pending_totals_follow_every_change(store, clock):
    def totals():
        return store.load(), store.counts_by_status()

    assert totals() == (Load(0, 0, 0.0), {})
    create(store, "q", cost=1.5)
    create(store, "r", cost=2.25)
    lease = {"lease_owner": "i1", "lease_expires": T0 + LEASE}
    create(store, "s", kind="sync", status=RUNNING, cost=4.0, **lease)
    assert totals() == (Load(2, 1, 7.75), {QUEUED: 2, RUNNING: 1})

    store.request_cancel("q", retention_s=60)  # a queued job: cancelled at once
    assert totals() == (Load(1, 1, 6.25), {QUEUED: 1, RUNNING: 1, CANCELLED: 1})
    store.claim("w1", LEASE, 1)  # r
    store.request_cancel("r", retention_s=60)  # running: only flagged
    store.append_events([NewEvent("r", "step", progress={"step": 1})])
    store.renew("w1", ["r"], LEASE)
    assert totals() == (Load(0, 2, 6.25), {RUNNING: 2, CANCELLED: 1})

    store.finish("s", "i1", SUCCEEDED, retention_s=60, result={})
    assert store.finish("s", "i1", SUCCEEDED, retention_s=60, result={}) is None  # counted once
    assert totals() == (Load(0, 1, 2.25), {RUNNING: 1, CANCELLED: 1, SUCCEEDED: 1})
    store.finish("r", "w1", CANCELLED, retention_s=60)
    assert totals() == (Load(0, 0, 0.0), {CANCELLED: 2, SUCCEEDED: 1})

    # Recovery: back to the queue keeps it pending; failed ends it.
    create(store, "t", cost=3.0)
    store.claim("w2", LEASE, 1)
    assert store.release("w2") == 1 and totals()[0] == Load(0, 1, 3.0)
    assert [r.status for r in store.recover(max_attempts=2, retention_s=60)] == [QUEUED]
    assert totals() == (Load(1, 0, 3.0), {QUEUED: 1, CANCELLED: 2, SUCCEEDED: 1})
    assert store.requeue("t", "w2", delay_s=0) is False
    store.claim("w3", LEASE, 1)
    clock.advance(LEASE + 1)
    assert [r.status for r in store.recover(max_attempts=2, retention_s=60)] == [FAILED]
    assert store.recover(max_attempts=2, retention_s=60) == []
    assert totals() == (Load(0, 0, 0.0), {FAILED: 1, CANCELLED: 2, SUCCEEDED: 1})
    # The owner's places are back: four more fit a limit of four.
    for i in range(4):
        store.create(job(f"u{i}"), admit=Admission(owner_max_active=4))

    clock.advance(60)
    assert sorted(ids(store.sweep())) == ["q", "r", "s", "t"]
    assert store.sweep() == []
    assert totals() == (Load(4, 0, 0.0), {QUEUED: 4})


def test_running_progress(store, clock):
    assert store.running_progress() == []
    for job_id in ("a", "b", "c", "q"):
        create(store, job_id)
    store.claim("w1", LEASE, 3)
    create(store, "s", kind="stream", status=RUNNING, lease_owner="i1", lease_expires=T0 + 60)
    store.append_events(
        [
            NewEvent("a", "stage", progress={"stage": "denoiser", "step": 2}),
            NewEvent("b", "stage", progress={"stage": "text_encoder"}),
            NewEvent("s", "stage", progress={"stage": "vae"}),
            NewEvent("q", "stage", progress={"stage": "queued"}),  # not running: left out
        ]
    )
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    expected = [{"stage": "denoiser", "step": 2}, {"stage": "text_encoder"}, {"stage": "vae"}, None]
    assert sorted(store.running_progress(), key=key) == sorted(expected, key=key)
    assert len(store.running_progress(limit=2)) == 2 and store.running_progress(limit=0) == []
    store.finish("a", "w1", SUCCEEDED, retention_s=60, result={})
    assert len(store.running_progress()) == 3


def test_concurrent_creators_never_overshoot_the_budget(open_store, store):
    stores = [open_store() for _ in range(20)]
    barrier = threading.Barrier(len(stores))

    def race(prefix: str, admit: Admission, **fields) -> tuple[list[str], list[str]]:
        outcome: list = [None] * len(stores)

        def creator(i: int) -> None:
            barrier.wait()
            try:
                stores[i].create(job(f"{prefix}{i:02d}", owner=f"o{i}", **fields), admit=admit)
                outcome[i] = "admitted"
            except AdmissionRejected as exc:
                outcome[i] = exc.reason

        threads = [threading.Thread(target=creator, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return outcome

    outcome = race("c", Admission(max_pending_cost=7.5), cost=1.0)
    assert sorted(outcome) == ["admitted"] * 7 + ["cost"] * 13
    assert store.load() == Load(7, 0, 7.0)
    outcome = race("n", Admission(max_pending=12), cost=0.0)
    assert sorted(outcome) == ["admitted"] * 5 + ["count"] * 15
    assert store.load() == Load(12, 0, 7.0)


# -- rate limits -------------------------------------------------------------------------------
def test_rate_hit_counts_in_fixed_windows(store, clock):
    window = 60.0
    start = (T0 // window) * window
    clock.now = start + 10.0
    assert [store.rate_hit("k", window, 3) for _ in range(3)] == [(True, 0.0)] * 3
    assert store.rate_hit("k", window, 3) == (False, 50.0)
    assert store.rate_hit("other", window, 3) == (True, 0.0)  # every key counts on its own
    assert store.rate_hit("k", 3600.0, 3) == (True, 0.0)  # and every window length
    clock.advance(49.5)
    assert store.rate_hit("k", window, 3) == (False, 0.5)  # refused hits were not counted:
    assert store.rate_hit("k", window, 4) == (True, 0.0)  # a fourth still fits a limit of 4
    clock.advance(0.5)  # the next window
    assert [store.rate_hit("k", window, 3)[0] for _ in range(4)] == [True, True, True, False]
    assert store.rate_hit("none", window, 0) == (False, 60.0)
    with pytest.raises(ValueError):
        store.rate_hit("k", 0, 3)


def test_rate_hit_is_atomic_across_stores(open_store, clock):
    stores = [open_store() for _ in range(10)]
    barrier = threading.Barrier(len(stores))
    allowed: list = [None] * len(stores)

    def hitter(i: int) -> None:
        barrier.wait()
        allowed[i] = stores[i].rate_hit("shared", 60.0, 4)[0]

    threads = [threading.Thread(target=hitter, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(allowed) == [False] * 6 + [True] * 4


# -- backend specifics -------------------------------------------------------------------------
def test_open_job_store_needs_its_settings():
    with pytest.raises(ValueError):
        open_job_store("sqlite")
    with pytest.raises(ValueError):
        open_job_store("redis")
    with pytest.raises(ValueError):
        open_job_store("postgres", path="x")


def test_sqlite_file_is_private_and_versioned(tmp_path):
    path = tmp_path / "new" / "state" / "jobs.sqlite3"
    store = open_job_store("sqlite", path=str(path), clock=FakeClock())
    create(store, "a", [NewEvent("a", "queued")])
    for name in (path, f"{path}-wal", f"{path}-shm"):  # the WAL files take the file's mode
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
    store.close()
    reopened = open_job_store("sqlite", path=str(path), clock=FakeClock())
    assert reopened.get("a").id == "a" and len(reopened.events("a")) == 1
    reopened.close()


def test_redis_keys_stay_under_the_prefix_and_go_with_sweep(redis_url, clock):
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/1"  # a database of its own
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    store = open_job_store("redis", url=url, prefix="pfx", clock=clock)
    create(store, "a", [NewEvent("a", "queued")], idempotency_key="k", request_hash="h")
    create(store, "b", kind="stream", status=RUNNING, lease_owner="w9", lease_expires=clock.now + 1)
    store.claim("w1", LEASE, 1)
    store.append_events([NewEvent("a", "step", progress={"step": 1})])
    store.finish("a", "w1", SUCCEEDED, retention_s=1, result={}, event=NewEvent("a", "succeeded"))
    assert store.rate_hit("key:1", 60, 5) == (True, 0.0)
    rate_keys = client.keys("pfx:rate:*")
    assert len(rate_keys) == 1 and 0 < client.ttl(rate_keys[0]) <= 62  # goes with its window
    client.delete(*rate_keys)
    clock.advance(2)
    assert [r.job_id for r in store.recover(max_attempts=3, retention_s=1)] == ["b"]
    assert store.counts_by_status() == {SUCCEEDED: 1, FAILED: 1}
    assert all(key.startswith("pfx:") for key in client.keys("*"))
    clock.advance(2)
    assert sorted(ids(store.sweep())) == ["a", "b"]
    # Only the global log (capped) and the totals (all back to zero) are left.
    assert sorted(client.keys("*")) == ["pfx:events", "pfx:stats"]
    assert store.counts_by_status() == {} and store.load() == Load(0, 0, 0.0)
    store.close()
    client.close()


def _v1_row(record: JobRecord) -> dict:
    """A record as schema 1 stored it: the fields it had."""
    row = codec.record_to_row(record)
    for name in ("priority", "rank", "cost"):
        del row[name]
    return row


def test_sqlite_reads_a_schema_1_file(tmp_path, clock):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:  # what the first version left behind
        for statement in SCHEMA_V1.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        old = [
            job("old-q", created_at=T0 - 100),
            job("old-r", status=RUNNING, created_at=T0 - 90,
                lease_owner="w0", lease_expires=T0 + 5),
            job("old-done", status=SUCCEEDED, created_at=T0 - 80, expires_at=T0 + 10, result={}),
        ]
        for record in old:
            row = _v1_row(record)
            conn.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                list(row.values()),
            )
    conn.close()
    store = open_job_store("sqlite", path=str(path), clock=clock)
    for record in old:  # the new fields read back as their defaults
        got = store.get(record.id)
        assert got == record and (got.priority, got.rank, got.cost) == (0, None, 0.0)
    assert store.load() == Load(1, 1, 0.0)
    assert store.counts_by_status() == {QUEUED: 1, RUNNING: 1, SUCCEEDED: 1}
    assert rejected(store, job("new", cost=1.0), Admission(owner_max_active=2)).pending == 2
    ranked(store, clock, "urgent", 11)  # 110 s of boost: ahead of the old queued job
    ranked(store, clock, "new", 0, cost=1.0)
    assert [store.queue_position(j) for j in ("urgent", "old-q", "new")] == [0, 1, 2]
    assert drain(store) == ["urgent", "old-q", "new"]
    assert store.finish("old-r", "w0", SUCCEEDED, retention_s=1, result={})
    assert store.load() == Load(0, 3, 1.0) and store.rate_hit("k", 1.0, 1)[0]
    store.close()
    reopened = open_job_store("sqlite", path=str(path), clock=clock)  # migrated once
    assert reopened.get("new").cost == 1.0 and reopened.counts_by_status()[SUCCEEDED] == 2
    reopened.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_sqlite_deletes_past_rate_windows(tmp_path, clock):
    path = tmp_path / "jobs.sqlite3"
    store = open_job_store("sqlite", path=str(path), clock=clock)

    def windows():
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT key, span, win FROM rates ORDER BY key, span").fetchall()
        conn.close()
        return rows

    store.rate_hit("a", 10.0, 5)
    store.rate_hit("a", 60.0, 5)
    store.rate_hit("b", 10.0, 5)
    now = clock.advance(10)
    assert len(windows()) == 3
    store.rate_hit("a", 10.0, 5)  # a's next window: its past one goes at once
    assert windows() == [
        ("a", 10.0, int(now // 10)),
        ("a", 60.0, int(T0 // 60)),
        ("b", 10.0, int(T0 // 10)),
    ]
    assert store.sweep() == []  # b's window has ended: swept
    assert [row[0] for row in windows()] == ["a", "a"]
    store.close()


def test_redis_reads_records_and_rebuilds_totals_written_before_them(redis_url, clock):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"old-{uuid.uuid4().hex}"
    old = [
        job("old-q", created_at=T0 - 100),
        job("old-r", status=RUNNING, created_at=T0 - 90, lease_owner="w0", lease_expires=T0 + 5),
        job("old-done", status=SUCCEEDED, created_at=T0 - 80, expires_at=T0 + 10, result={}),
    ]
    for record in old:  # as the version before wrote them: no new fields, no totals
        fields = codec.record_to_text(record)
        for name in ("priority", "cost"):
            del fields[name]
        client.hset(f"{prefix}:job:{record.id}", mapping=fields)
    client.zadd(f"{prefix}:queue", {"old-q": T0 - 100})
    client.zadd(f"{prefix}:running", {"old-r": T0 + 5})
    client.zadd(f"{prefix}:expiring", {"old-done": T0 + 10})
    store = open_job_store("redis", url=redis_url, prefix=prefix, clock=clock)
    for record in old:
        got = store.get(record.id)
        assert got == record and (got.priority, got.rank, got.cost) == (0, None, 0.0)
    create(store, "new", cost=2.0)  # a write before anything read the totals
    assert store.load() == Load(2, 1, 2.0)
    assert store.counts_by_status() == {QUEUED: 2, RUNNING: 1, SUCCEEDED: 1}
    assert rejected(store, job("more"), Admission(owner_max_active=3)).reason == "owner_active"
    assert store.finish("old-r", "w0", FAILED, retention_s=1, error={})
    assert store.load() == Load(2, 0, 2.0)
    client.delete(f"{prefix}:stats")  # lost (a flush): rebuilt, not added to
    assert store.load() == Load(2, 0, 2.0)
    assert store.counts_by_status() == {QUEUED: 2, SUCCEEDED: 1, FAILED: 1}
    store.close()
    client.close()
