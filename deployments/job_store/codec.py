"""What both job store backends share: how a `JobRecord` is stored as flat fields (SQLite columns,
Redis hash fields) and read back, and the state transitions whose rules must not differ between
the backends (finish, requeue, cancel, recover). A backend reads a record, asks this module for
the record after the change and the events to append, and writes both atomically."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional, Sequence

from deployments.job_store.base import (
    CANCELLED,
    FAILED,
    KINDS,
    QUEUED,
    RUNNING,
    STATUSES,
    TERMINAL,
    JobEvent,
    JobRecord,
    PENDING,
    Admission,
    NewEvent,
    Recovered,
)

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobRecord))
JSON_FIELDS = frozenset({"request", "progress", "result", "error"})
FLOAT_FIELDS = frozenset(
    {
        "created_at",
        "not_before",
        "lease_expires",
        "started_at",
        "finished_at",
        "expires_at",
        "rank",
        "cost",
    }
)
INT_FIELDS = frozenset({"attempts", "priority"})
BOOL_FIELDS = frozenset({"cancel_requested"})
# Fields that read back as the dataclass default when absent: unset Redis hash fields, and
# records stored before a field existed (priority and cost came with SQLite schema 2).
DEFAULTED_FIELDS = frozenset(
    {"attempts", "not_before", "cancel_requested", "status", "priority", "cost"}
)

# Pending cost is summed in whole millionths (COST_SCALE per unit of `cost`): integers add and
# subtract exactly, so a running total never drifts, and every backend (Python, SQL, Lua) rounds
# a cost the same way: floor(cost * COST_SCALE + 0.5), in doubles.
COST_SCALE = 1_000_000

# A dispatcher's lease expired: what `recover` writes in a failed record's `error`.
JOB_LOST_CODE = "job_lost"


# -- values ------------------------------------------------------------------------------------
def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def load_json(text: Any) -> Any:
    return json.loads(text)


def encode_float(value: float) -> str:
    """The text of a time in Redis (hash fields, sorted set scores, script arguments): `repr`,
    the shortest text that reads back as the same float."""
    return repr(float(value))


def encode_field(name: str, value: Any) -> Any:
    """A record field as a SQLite column value: JSON text, a float, an int, 0/1 or a string;
    None stays None."""
    if value is None:
        return None
    if name in JSON_FIELDS:
        return dump_json(value)
    if name in FLOAT_FIELDS:
        return float(value)
    if name in INT_FIELDS:
        return int(value)
    if name in BOOL_FIELDS:
        return 1 if value else 0
    return str(value)


def encode_text(name: str, value: Any) -> Optional[str]:
    """A record field as Redis hash text (None: the field is absent)."""
    if value is None:
        return None
    if name in FLOAT_FIELDS:
        return encode_float(value)
    if name in INT_FIELDS:
        return str(int(value))
    if name in BOOL_FIELDS:
        return "1" if value else "0"
    if name in JSON_FIELDS:
        return dump_json(value)
    return str(value)


def decode_field(name: str, value: Any) -> Any:
    """The inverse of `encode_field` and `encode_text` (both spellings read back alike)."""
    if value is None:
        return None
    if name in JSON_FIELDS:
        return load_json(value)
    if name in FLOAT_FIELDS:
        return float(value)
    if name in INT_FIELDS:
        return int(value)
    if name in BOOL_FIELDS:
        return bool(int(value))
    return value


def record_to_row(record: JobRecord) -> dict[str, Any]:
    """Every field, as SQLite column values."""
    return {name: encode_field(name, getattr(record, name)) for name in FIELDS}


def record_to_text(record: JobRecord) -> dict[str, str]:
    """The set fields as Redis hash text; unset (None) fields are left out."""
    out = {}
    for name in FIELDS:
        text = encode_text(name, getattr(record, name))
        if text is not None:
            out[name] = text
    return out


def record_from_mapping(row: Mapping[str, Any]) -> JobRecord:
    """A record from a SQLite row or a Redis hash. A field that is missing is None (the Redis
    hash leaves unset fields out); other keys (a backend's own bookkeeping) are ignored."""
    values = {}
    for name in FIELDS:
        value = row[name] if name in row.keys() else None
        if value is None and name in DEFAULTED_FIELDS:
            continue  # the dataclass default
        values[name] = decode_field(name, value)
    return JobRecord(**values)


def normalized(record: JobRecord) -> JobRecord:
    """The record as the store will read it back (JSON fields through JSON, times as floats)."""
    return record_from_mapping(record_to_row(record))


def changed_fields(old: JobRecord, new: JobRecord) -> list[str]:
    return [name for name in FIELDS if getattr(old, name) != getattr(new, name)]


def event_from_values(job_id: str, seq: Any, type_: str, data: Any, created_at: Any) -> JobEvent:
    return JobEvent(
        job_id=job_id, seq=int(seq), type=type_, data=load_json(data), created_at=float(created_at)
    )


# -- admission and rates --------------------------------------------------------------------------
def cost_units(cost: Any) -> int:
    """A cost in whole millionths (see COST_SCALE)."""
    return int(math.floor(float(cost) * COST_SCALE + 0.5))


def units_cost(units: Any) -> float:
    return int(units) / COST_SCALE


def limit_units(limit: Optional[float]) -> Optional[int]:
    return None if limit is None else cost_units(limit)


def refusal(
    admit: Optional[Admission],
    record: JobRecord,
    *,
    pending: int,
    pending_units: int,
    owner_active: int,
) -> Optional[str]:
    """Why `admit` refuses `record` given the pending totals before it (None: admitted). The
    Redis `create` script applies the same rule in Lua; the contract tests hold both to it."""
    if admit is None or record.status not in PENDING:
        return None
    if admit.owner_max_active is not None and owner_active + 1 > admit.owner_max_active:
        return "owner_active"
    if admit.max_pending is not None and pending + 1 > admit.max_pending:
        return "count"
    budget = limit_units(admit.max_pending_cost)
    if budget is not None and pending > 0 and pending_units + cost_units(record.cost) > budget:
        return "cost"  # (with nothing pending, a record is admitted whatever its cost)
    return None


def rate_window(now: float, window_s: float) -> tuple[int, float]:
    """The fixed window `now` falls in: its number (floor(now / window_s)) and the seconds left
    until it ends."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be a positive number of seconds, not {window_s!r}")
    index = math.floor(now / window_s)
    return index, max(0.0, (index + 1) * window_s - now)


# -- checks ------------------------------------------------------------------------------------
def check_new_record(record: JobRecord, events: Sequence[NewEvent]) -> None:
    if record.kind not in KINDS:
        raise ValueError(f"unknown job kind {record.kind!r}; known: {', '.join(KINDS)}")
    if record.status not in STATUSES:
        raise ValueError(f"unknown job status {record.status!r}; known: {', '.join(STATUSES)}")
    if not (math.isfinite(record.cost) and record.cost >= 0):
        raise ValueError(f"a job's cost must be a finite number >= 0, not {record.cost!r}")
    if record.rank is not None and not math.isfinite(record.rank):
        raise ValueError(f"a job's rank must be a finite number or None, not {record.rank!r}")
    if isinstance(record.priority, bool) or not isinstance(record.priority, int):
        raise ValueError(f"a job's priority must be an integer, not {record.priority!r}")
    for event in events:
        check_event_for(record.id, event)


def check_event_for(job_id: str, event: Optional[NewEvent]) -> None:
    """An event written with a change to one record belongs to that record."""
    if event is not None and event.job_id != job_id:
        raise ValueError(f"event for job {event.job_id!r} given with job {job_id!r}")


def check_terminal(status: str) -> None:
    if status not in TERMINAL:
        raise ValueError(f"finish needs a terminal status, not {status!r}")


def with_event_progress(record: JobRecord, events: Sequence[NewEvent]) -> JobRecord:
    """The record after these events' `progress` updates (the last one given wins)."""
    for event in events:
        if event.progress is not None:
            record = record.with_changes(progress=event.progress)
    return record


# -- transitions -------------------------------------------------------------------------------
# Each takes the record as read (inside the backend's transaction, or before a guarded write)
# and returns the record after, plus the events to append; None where nothing is to be written.
def holds_lease(record: Optional[JobRecord], worker: str) -> bool:
    return record is not None and record.status == RUNNING and record.lease_owner == worker


def claimed(record: JobRecord, worker: str, now: float, lease_s: float) -> JobRecord:
    return record.with_changes(
        status=RUNNING,
        lease_owner=worker,
        lease_expires=now + lease_s,
        attempts=record.attempts + 1,
        started_at=now if record.started_at is None else record.started_at,
    )


def finished(
    record: Optional[JobRecord],
    worker: str,
    status: str,
    now: float,
    retention_s: float,
    result: Optional[dict],
    error: Optional[dict],
    event: Optional[NewEvent],
) -> Optional[tuple[JobRecord, list[NewEvent]]]:
    if not holds_lease(record, worker):
        return None
    assert record is not None
    events = [] if event is None else [event]
    new = record.with_changes(
        status=status,
        result=result,
        error=error,
        finished_at=now,
        expires_at=now + retention_s,
        lease_owner=None,
        lease_expires=None,
    )
    return with_event_progress(new, events), events


def requeued(
    record: Optional[JobRecord], worker: str, now: float, delay_s: float, event: Optional[NewEvent]
) -> Optional[tuple[JobRecord, list[NewEvent]]]:
    """Only a `job` goes back to the queue: nothing claims a `sync` or `stream` record."""
    if not holds_lease(record, worker) or record.kind != "job":
        return None
    events = [] if event is None else [event]
    new = record.with_changes(
        status=QUEUED, not_before=now + delay_s, lease_owner=None, lease_expires=None
    )
    return with_event_progress(new, events), events


def cancelled(
    record: JobRecord, now: float, retention_s: float
) -> Optional[tuple[JobRecord, list[NewEvent]]]:
    """`request_cancel`'s change; None for a record it leaves as it is (terminal, or running
    with cancellation already requested)."""
    if record.status == QUEUED:
        new = record.with_changes(
            status=CANCELLED,
            finished_at=now,
            expires_at=now + retention_s,
            lease_owner=None,
            lease_expires=None,
        )
        return new, [NewEvent(record.id, CANCELLED, {"reason": "cancelled while queued"})]
    if record.status == RUNNING and not record.cancel_requested:
        return record.with_changes(cancel_requested=True), []
    return None


def lease_expired(record: Optional[JobRecord], now: float) -> bool:
    return (
        record is not None
        and record.status == RUNNING
        and record.lease_expires is not None
        and record.lease_expires < now
    )


def recovered(
    record: JobRecord, now: float, max_attempts: int, retention_s: float
) -> tuple[JobRecord, list[NewEvent], Recovered]:
    """`recover`'s change to a running record whose lease expired (see `lease_expired`)."""
    no_lease = {"lease_owner": None, "lease_expires": None}
    ended = {"finished_at": now, "expires_at": now + retention_s, **no_lease}
    if record.cancel_requested:
        reason = "cancel requested; its dispatcher stopped"
        new = record.with_changes(status=CANCELLED, **ended)
        event = NewEvent(record.id, CANCELLED, {"reason": reason})
        return new, [event], Recovered(record.id, CANCELLED, reason)
    if record.kind == "job" and record.attempts < max_attempts:
        reason = "its dispatcher stopped"
        new = record.with_changes(status=QUEUED, not_before=now, **no_lease)
        data = {"attempt": record.attempts, "reason": reason, "delay_s": 0.0}
        event = NewEvent(record.id, "retry", data)
        return new, [event], Recovered(record.id, QUEUED, reason)
    if record.kind == "job":
        reason = f"its dispatcher stopped {record.attempts} time(s), the most allowed"
        message = f"The job was lost: {reason}."
    else:
        reason = "the connection that waited for it is gone (its ingress stopped)"
        message = "The request was lost: the server that ran it stopped."
    error = {"message": message, "type": "server_error", "param": None, "code": JOB_LOST_CODE}
    new = record.with_changes(status=FAILED, error=error, **ended)
    event = NewEvent(record.id, FAILED, {"error": error})
    return new, [event], Recovered(record.id, FAILED, reason)


def sweepable(record: Optional[JobRecord], now: float) -> bool:
    return (
        record is not None
        and record.status in TERMINAL
        and record.expires_at is not None
        and record.expires_at <= now
    )
