"""The job store: where every request's record and event log live, outside any replica's memory.

Every generation (an async job, a synchronous call, a stream) is a record here from the moment it
is accepted until its retention ends. The ingress that runs it (its *dispatcher*) holds a lease
on it and renews it; if that process dies the lease expires and any other ingress (or the same app
after a restart) recovers the job: re-queued, or ended with a reason. Stages append progress events
(stage started/finished, denoising steps, previews) and read cancellation flags by job id; the
ingress streams the events to clients.

Writers, one per field: `status`, `attempts`, `lease_*`, `result`, `error` by the dispatcher
holding the lease (and by `request_cancel` for a job nobody runs yet, and by `recover` for a job
whose dispatcher is gone); `cancel_requested` by `request_cancel`; `progress` by the stage holding
the job, through `append_events`; `priority`, `rank` and `cost` by the creator, once.

Beside the records the store keeps what admission control needs to hold across ingresses: the
pending totals (`load`, checked by `create(admit=...)`) and fixed-window request counters
(`rate_hit`).

Two backends implement this interface: SQLite (one node, the embedded default) and Redis (a
cluster). Every method is synchronous and thread-safe; async callers run them in a thread.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
PENDING = frozenset({QUEUED, RUNNING})  # not ended: what admission and `load` count

# What created a record: an async job (POST /v1/images/jobs, run by any dispatcher that claims it)
# or a request whose HTTP connection waits for it (`sync`, `stream`: run by the ingress holding
# that connection; never claimed by another, never re-run once that connection is gone).
KINDS = ("job", "sync", "stream")


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    owner: str  # the tenant; "anonymous" without authentication
    request: dict  # the accepted request, JSON-able, with everything random already fixed (seeds)
    status: str = QUEUED
    created_at: float = 0.0
    attempts: int = 0  # dispatches so far (a claim, or the start of a sync/stream run)
    not_before: float = 0.0  # a queued job is not claimed before this time (retry backoff)
    lease_owner: Optional[str] = None
    lease_expires: Optional[float] = None
    cancel_requested: bool = False
    progress: Optional[dict] = None  # the latest progress a stage reported
    result: Optional[dict] = None  # set with status succeeded
    error: Optional[dict] = None  # set with status failed (an OpenAI-shaped error object)
    idempotency_key: Optional[str] = None
    request_hash: Optional[str] = None  # of the request body an idempotency key was first used with
    started_at: Optional[float] = None  # first dispatch
    finished_at: Optional[float] = None
    expires_at: Optional[float] = None  # terminal records are deleted after this (retention)
    # Added in store schema 2; a record stored before reads back with these defaults.
    priority: int = 0  # the caller's priority class (kept for reading; `rank` orders the queue)
    rank: Optional[float] = None  # the queue's order key; None: `created_at` (see `queue_rank`)
    cost: float = 0.0  # the caller's estimate of the work (images x steps x megapixels)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def pending(self) -> bool:
        """Not ended yet: counted in the store's pending totals (`load`, admission)."""
        return self.status in PENDING

    @property
    def queue_rank(self) -> float:
        """Where the record stands in the queue: claimed in ascending (queue_rank, id). The caller
        sets `rank = now - priority * boost`, so a job of priority p goes ahead of the jobs queued
        less than p * boost seconds before it, and never starves the ones queued earlier."""
        return self.created_at if self.rank is None else self.rank

    def with_changes(self, **changes: Any) -> "JobRecord":
        return replace(self, **changes)


@dataclass(frozen=True)
class NewEvent:
    """An event to append to a job's log. With `progress`, the job's `progress` field becomes it
    in the same write."""

    job_id: str
    type: str
    data: dict = field(default_factory=dict)
    progress: Optional[dict] = None


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    seq: int  # 1, 2, 3, ... within the job: the SSE event id a client resumes from
    type: str
    data: dict
    created_at: float


@dataclass(frozen=True)
class Recovered:
    """What `recover` did with a job whose dispatcher's lease expired."""

    job_id: str
    status: str  # the new status: queued (re-dispatched later), failed or cancelled
    reason: str


@dataclass(frozen=True)
class Admission:
    """Limits `create` checks atomically with the insert (None: no limit). Pending = every
    non-terminal record (queued or running, any kind), of every ingress sharing the store."""

    max_pending_cost: Optional[float] = None  # the most summed `cost` pending (see `create`)
    max_pending: Optional[int] = None  # the most records pending
    owner_max_active: Optional[int] = None  # the most records pending of one owner


class AdmissionRejected(Exception):
    """`create` did not admit a record (nothing was written). `reason`: "owner_active", "count"
    or "cost" (the first limit that failed, checked in that order); the pending totals seen."""

    def __init__(self, reason: str, pending_cost: float, pending: int):
        super().__init__(f"{reason} (pending: {pending} records, cost {pending_cost:g})")
        self.reason = reason
        self.pending_cost = pending_cost
        self.pending = pending

    def __reduce__(self):  # pickled with its fields (Exception's default keeps only the message)
        return type(self), (self.reason, self.pending_cost, self.pending)


@dataclass(frozen=True)
class Load:
    """The store's pending work, over every ingress: records queued and running (any kind) and
    their summed `cost`."""

    queued: int
    running: int
    pending_cost: float


class IdempotencyConflict(Exception):
    """An idempotency key reused with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class JobStore(abc.ABC):
    """See the module docstring. `clock` gives the time (seconds since the epoch); tests pass their
    own to move time forward without sleeping."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock

    # -- records ------------------------------------------------------------------------------
    @abc.abstractmethod
    def create(
        self,
        record: JobRecord,
        events: Sequence[NewEvent] = (),
        *,
        admit: Optional[Admission] = None,
    ) -> tuple[JobRecord, bool]:
        """Insert `record` (its `created_at` is set to now) and append `events` to its log, in one
        write. With an `idempotency_key` already used by the same owner: the existing record and
        False if `request_hash` matches, IdempotencyConflict if it does not; nothing is written
        (a replay is never rejected by `admit`). A record may be created `running` with a lease
        (a sync or stream request its ingress runs at once); `started_at` and `attempts` are then
        the caller's. `cost` must be finite and >= 0.

        With `admit`, a pending record is only inserted if, counting it, the owner's pending
        records stay within `owner_max_active`, all pending records within `max_pending`, and
        their summed cost within `max_pending_cost` (except that a record is admitted whatever
        its cost when nothing else is pending: one big request can always run alone); otherwise
        nothing is written and AdmissionRejected says which limit failed. The check and the
        insert are one atomic step across processes: concurrent creators never overshoot.
        (Costs are summed in millionths, exactly, so both backends agree on the boundary.)"""

    @abc.abstractmethod
    def get(self, job_id: str) -> Optional[JobRecord]: ...

    @abc.abstractmethod
    def list_jobs(
        self,
        owner: str,
        kinds: Sequence[str] = ("job",),
        limit: int = 20,
        after: Optional[str] = None,
        newest_first: bool = True,
    ) -> tuple[list[JobRecord], bool]:
        """One page of `owner`'s records of these kinds, ordered by (created_at, id), starting
        after the record `after` (a cursor: its id; unknown -> starts from the beginning) and
        whether more follow."""

    @abc.abstractmethod
    def queue_position(self, job_id: str) -> Optional[int]:
        """How many queued jobs will be claimed before this one (0: next), in claim order (see
        `claim`; a job waiting out a retry backoff counts where its rank puts it); None unless
        queued."""

    # -- load -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> Load:
        """The pending work of the whole store (every kind): cheap (kept as running totals, or
        an indexed query), for admission estimates and status pages."""

    @abc.abstractmethod
    def counts_by_status(self) -> dict[str, int]:
        """How many records of each status the store holds (terminal ones until swept); statuses
        with none are left out."""

    @abc.abstractmethod
    def running_progress(self, limit: int = 10000) -> list[Optional[dict]]:
        """The `progress` of up to `limit` running records (None for one with none yet), in no
        particular order: what each running request is doing, for per-stage queue depths."""

    @abc.abstractmethod
    def rate_hit(self, key: str, window_s: float, limit: int) -> tuple[bool, float]:
        """Count one hit for `key` in its current fixed window of `window_s` seconds (starting
        at floor(now / window_s) * window_s, by the store's clock): (True, 0.0) if the window
        held fewer than `limit` hits; else the hit is not counted and (False, seconds until the
        window ends). Atomic across processes; past windows are deleted (on their own, or by
        `sweep`)."""

    # -- dispatch -----------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, worker: str, lease_s: float, limit: int) -> list[JobRecord]:
        """Up to `limit` queued `job`-kind records whose `not_before` has passed, in queue order,
        ascending (`queue_rank`, id) (oldest first when no rank is set): each becomes running,
        leased to `worker` for `lease_s`, `attempts` + 1, `started_at` set on the first claim.
        Never hands one job to two callers (atomic across processes)."""

    @abc.abstractmethod
    def renew(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend the leases `worker` still holds on these running jobs; the ids it still holds."""

    @abc.abstractmethod
    def finish(
        self,
        job_id: str,
        worker: str,
        status: str,
        *,
        retention_s: float,
        result: Optional[dict] = None,
        error: Optional[dict] = None,
        event: Optional[NewEvent] = None,
    ) -> Optional[JobRecord]:
        """End a running job `worker` holds: terminal `status`, `result` or `error`,
        `finished_at` now, `expires_at` now + retention, lease cleared, `event` appended, one
        write. None (nothing written) if the job is not running under `worker`'s lease."""

    @abc.abstractmethod
    def requeue(
        self, job_id: str, worker: str, *, delay_s: float, event: Optional[NewEvent] = None
    ) -> bool:
        """A running `job` `worker` holds goes back to queued (claimable after `delay_s`, lease
        cleared, its place in the queue by its original `queue_rank`), `event` appended. False if
        `worker` does not hold it."""

    @abc.abstractmethod
    def request_cancel(self, job_id: str, *, retention_s: float) -> Optional[JobRecord]:
        """Cancel: a queued job becomes cancelled at once (terminal, a `cancelled` event appended);
        a running one gets `cancel_requested` (its dispatcher and stages stop it); a terminal one
        is unchanged. The record after the change; None if there is no such job."""

    @abc.abstractmethod
    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs should stop: cancel requested, or already ended. An id with no
        record is not stopped (a stage called directly, with no job behind the call)."""

    @abc.abstractmethod
    def recover(self, *, max_attempts: int, retention_s: float) -> list[Recovered]:
        """Every running record whose lease has expired (its dispatcher is gone): with
        `cancel_requested` -> cancelled; a `job` with attempts < max_attempts -> queued again at
        once, at its original `queue_rank` (a `retry` event appended); otherwise -> failed with
        an error saying why (a `failed` event appended; `sync`/`stream` records fail: the
        connection that waited is gone).
        Atomic per record: two callers never both recover one."""

    @abc.abstractmethod
    def release(self, worker: str) -> int:
        """Expire every lease `worker` holds now (a graceful shutdown: `recover` then re-queues its
        jobs at once instead of after the lease time). How many."""

    @abc.abstractmethod
    def sweep(self) -> list[JobRecord]:
        """Delete terminal records whose `expires_at` has passed, with their events and
        idempotency keys (and past `rate_hit` windows); the deleted records (their stored images
        are the caller's to delete)."""

    # -- events -------------------------------------------------------------------------------
    @abc.abstractmethod
    def append_events(self, events: Sequence[NewEvent]) -> list[JobEvent]:
        """Append to each job's log in order (seq = that job's last + 1) and apply `progress`
        updates, in one write. Events for jobs that no longer exist are dropped."""

    @abc.abstractmethod
    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events with seq > after_seq, in order."""

    @abc.abstractmethod
    def tail_cursor(self) -> Any:
        """A cursor at the current end of the log of all jobs' events (opaque)."""

    @abc.abstractmethod
    def tail(self, cursor: Any, timeout_s: float) -> tuple[list[JobEvent], Any]:
        """Events of any job appended after `cursor`, in append order, and the new cursor; waits
        up to `timeout_s` for the first one (returns an empty list on timeout)."""

    def close(self) -> None:
        """Release connections."""
