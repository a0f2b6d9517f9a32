"""The SQLite job store: one file on one node, shared by every process there (each Ray replica
opens its own store on it). WAL mode lets readers run beside the one writer; every write is a
`BEGIN IMMEDIATE` transaction, so writers of all processes take turns and a read-modify-write
(claim, recover, admission in create, rate_hit, ...) is atomic across processes.

Pending totals are indexed queries over the queued and running rows (`jobs_pending`,
`jobs_owner`); a file of an older schema is migrated in place when a store opens it."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

from deployments.job_store import codec
from deployments.job_store.base import (
    PENDING,
    QUEUED,
    RUNNING,
    TERMINAL,
    Admission,
    AdmissionRejected,
    IdempotencyConflict,
    JobEvent,
    JobRecord,
    JobStore,
    Load,
    NewEvent,
    Recovered,
)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
TAIL_POLL_S = 0.025  # how often `tail` looks for new events while it waits
TAIL_BATCH = 1000  # the most events one `tail` returns

_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
_PENDING_SQL = ", ".join(f"'{s}'" for s in sorted(PENDING))
# A row's cost in whole millionths, rounded as codec.cost_units rounds it (cost >= 0).
_COST_UNITS_SQL = f"CAST(cost * {codec.COST_SCALE} + 0.5 AS INTEGER)"

# Schema 1, as the first version created it; a new file gets it and then every migration, so a
# new file and a migrated one are alike.
SCHEMA_V1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT,
    result TEXT,
    error TEXT,
    idempotency_key TEXT,
    request_hash TEXT,
    started_at REAL,
    finished_at REAL,
    expires_at REAL
);
CREATE INDEX jobs_queue ON jobs (status, kind, created_at, id);
CREATE INDEX jobs_list ON jobs (owner, kind, created_at, id);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_lease ON jobs (status, lease_expires);
CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (job_id, seq)
);
"""

# Version -> the statements that bring a file of the version before to it. `queue_rank` is the
# store's own column (not a record field): JobRecord.queue_rank, fixed at create, the queue's order.
_MIGRATIONS = {
    2: """
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN rank REAL;
ALTER TABLE jobs ADD COLUMN cost REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN queue_rank REAL NOT NULL DEFAULT 0;
UPDATE jobs SET queue_rank = created_at;
DROP INDEX jobs_queue;
CREATE INDEX jobs_queue ON jobs (status, kind, queue_rank, id);
CREATE INDEX jobs_pending ON jobs (status, cost);
CREATE INDEX jobs_owner ON jobs (owner, status);
CREATE TABLE rates (
    key TEXT NOT NULL,
    span REAL NOT NULL,
    win INTEGER NOT NULL,
    hits INTEGER NOT NULL,
    ends REAL NOT NULL,
    PRIMARY KEY (key, span, win)
);
CREATE INDEX rates_ends ON rates (ends);
""",
}

_COLUMNS = ", ".join((*codec.FIELDS, "queue_rank"))
_INSERT_JOB = f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' for _ in codec.FIELDS)}, ?)"
_INSERT_EVENT = "INSERT INTO events (job_id, seq, type, data, created_at) VALUES (?, ?, ?, ?, ?)"
_EVENT_COLUMNS = "job_id, seq, type, data, created_at"


def _record(row: sqlite3.Row) -> JobRecord:
    return codec.record_from_mapping(dict(zip(row.keys(), row)))


def _event(row: sqlite3.Row) -> JobEvent:
    return codec.event_from_values(
        row["job_id"], row["seq"], row["type"], row["data"], row["created_at"]
    )


def _placeholders(n: int) -> str:
    return ", ".join("?" for _ in range(n))


class SqliteJobStore(JobStore):
    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        super().__init__(clock)
        self.path = path
        if path != ":memory:" and not path.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            # Create the file private to this user (SQLite would create it with the umask's
            # mode); its -wal and -shm files take the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit: transactions are the explicit BEGIN ... COMMIT
            check_same_thread=False,
        )
        self._conn.row_factory = sqlite3.Row
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._write() as conn:  # another process may be creating the schema right now
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the job store {self.path} has schema version {version}; this version of "
                    f"dit-serve reads versions up to {SCHEMA_VERSION}"
                )
            steps = [] if version else [SCHEMA_V1]
            steps += [_MIGRATIONS[v] for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1)]
            for script in steps:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: it takes the database's write lock at once (waiting for other
        processes up to the busy timeout), so what it reads stays true until it commits."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one snapshot for several statements."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    def _now(self) -> float:
        return float(self.clock())

    # -- helpers inside a transaction ---------------------------------------------------------
    @staticmethod
    def _get(conn: sqlite3.Connection, job_id: str) -> Optional[JobRecord]:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    @staticmethod
    def _update(conn: sqlite3.Connection, old: JobRecord, new: JobRecord) -> None:
        names = codec.changed_fields(old, new)
        if names:
            sets = ", ".join(f"{name} = ?" for name in names)
            values = [codec.encode_field(name, getattr(new, name)) for name in names]
            conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, old.id))

    @staticmethod
    def _append(conn: sqlite3.Connection, events: Sequence[NewEvent], now: float) -> list[JobEvent]:
        """Append events (to existing jobs; others are dropped) and apply their progress."""
        written = []
        for event in events:
            row = conn.execute(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = j.id) "
                "FROM jobs j WHERE j.id = ?",
                (event.job_id,),
            ).fetchone()
            if row is None:
                continue  # no such job
            seq = row[0] + 1
            data = codec.dump_json(event.data)
            conn.execute(_INSERT_EVENT, (event.job_id, seq, event.type, data, now))
            if event.progress is not None:
                conn.execute(
                    "UPDATE jobs SET progress = ? WHERE id = ?",
                    (codec.dump_json(event.progress), event.job_id),
                )
            written.append(codec.event_from_values(event.job_id, seq, event.type, data, now))
        return written

    @staticmethod
    def _admit(conn: sqlite3.Connection, admit: Admission, record: JobRecord) -> None:
        """Raise AdmissionRejected if `admit` refuses `record` (inside the create transaction)."""
        pending, units = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM({_COST_UNITS_SQL}), 0) FROM jobs "
            f"WHERE status IN ({_PENDING_SQL})"
        ).fetchone()
        owner_active = 0
        if admit.owner_max_active is not None:
            owner_active = conn.execute(
                f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ({_PENDING_SQL})",
                (record.owner,),
            ).fetchone()[0]
        reason = codec.refusal(
            admit, record, pending=pending, pending_units=units, owner_active=owner_active
        )
        if reason is not None:
            raise AdmissionRejected(reason, codec.units_cost(units), int(pending))

    # -- records ------------------------------------------------------------------------------
    def create(
        self,
        record: JobRecord,
        events: Sequence[NewEvent] = (),
        *,
        admit: Optional[Admission] = None,
    ) -> tuple[JobRecord, bool]:
        codec.check_new_record(record, events)
        now = self._now()
        record = codec.normalized(
            codec.with_event_progress(record.with_changes(created_at=now), events)
        )
        with self._write() as conn:
            if record.idempotency_key is not None:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                    (record.owner, record.idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = _record(row)
                    if existing.request_hash == record.request_hash:
                        return existing, False
                    raise IdempotencyConflict(existing.id)
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (record.id,)).fetchone():
                raise ValueError(f"job {record.id!r} exists")
            if admit is not None and record.pending:
                self._admit(conn, admit, record)
            row = codec.record_to_row(record)
            try:
                values = [row[name] for name in codec.FIELDS]
                conn.execute(_INSERT_JOB, [*values, record.queue_rank])
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"job {record.id!r} exists") from exc
            self._append(conn, events, now)
        return record, True

    def get(self, job_id: str) -> Optional[JobRecord]:
        with self._lock:
            return self._get(self._conn, job_id)

    def list_jobs(
        self,
        owner: str,
        kinds: Sequence[str] = ("job",),
        limit: int = 20,
        after: Optional[str] = None,
        newest_first: bool = True,
    ) -> tuple[list[JobRecord], bool]:
        kinds = list(kinds)
        limit = max(0, int(limit))
        if not kinds:
            return [], False
        direction = "DESC" if newest_first else "ASC"
        sql = "SELECT * FROM jobs WHERE owner = ? AND kind = ?"
        rows: list[sqlite3.Row] = []
        with self._read() as conn:
            cursor: tuple = ()
            if after is not None:
                # The cursor counts only if it is one of this owner's records.
                found = conn.execute(
                    "SELECT created_at, id FROM jobs WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                if found is not None:
                    sql += f" AND (created_at, id) {'<' if newest_first else '>'} (?, ?)"
                    cursor = (found[0], found[1])
            sql += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
            # One indexed query per kind, merged: `kind IN (...)` would sort every match.
            for kind in dict.fromkeys(kinds):
                rows += conn.execute(sql, (owner, kind, *cursor, limit + 1)).fetchall()
        rows.sort(key=lambda row: (row["created_at"], row["id"]), reverse=newest_first)
        rows = rows[: limit + 1]
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def queue_position(self, job_id: str) -> Optional[int]:
        # Counted in claim order, (queue rank, id), among queued jobs; it ignores `not_before`
        # (a job waiting out a retry backoff counts where its rank puts it).
        with self._lock:
            row = self._conn.execute(
                "SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = ? AND q.kind = 'job' "
                "AND (q.queue_rank, q.id) < (j.queue_rank, j.id)) "
                "FROM jobs j WHERE j.id = ? AND j.status = ? AND j.kind = 'job'",
                (QUEUED, job_id, QUEUED),
            ).fetchone()
        return None if row is None else int(row[0])

    # -- load -----------------------------------------------------------------------------------
    def load(self) -> Load:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT status, COUNT(*), COALESCE(SUM({_COST_UNITS_SQL}), 0) FROM jobs "
                f"WHERE status IN ({_PENDING_SQL}) GROUP BY status"
            ).fetchall()
        counts = {row[0]: int(row[1]) for row in rows}
        units = sum(int(row[2]) for row in rows)
        return Load(
            queued=counts.get(QUEUED, 0),
            running=counts.get(RUNNING, 0),
            pending_cost=codec.units_cost(units),
        )

    def counts_by_status(self) -> dict[str, int]:
        # A scan of a status index (jobs_pending): proportional to the records retained.
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, COUNT(*) FROM jobs GROUP BY status"
            ).fetchall()
        return {row[0]: int(row[1]) for row in rows}

    def running_progress(self, limit: int = 10000) -> list[Optional[dict]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT progress FROM jobs WHERE status = ? LIMIT ?", (RUNNING, max(0, int(limit)))
            ).fetchall()
        return [codec.decode_field("progress", row[0]) for row in rows]

    def rate_hit(self, key: str, window_s: float, limit: int) -> tuple[bool, float]:
        index, left = codec.rate_window(self._now(), window_s)
        window = (key, float(window_s), index)
        with self._write() as conn:
            row = conn.execute(
                "SELECT hits FROM rates WHERE key = ? AND span = ? AND win = ?", window
            ).fetchone()
            if (0 if row is None else row[0]) >= limit:
                return False, left
            if row is None:  # the window's first hit: the key's past windows go
                conn.execute("DELETE FROM rates WHERE key = ? AND span = ? AND win < ?", window)
                conn.execute(
                    "INSERT INTO rates (key, span, win, hits, ends) VALUES (?, ?, ?, 1, ?)",
                    (*window, (index + 1) * float(window_s)),
                )
            else:
                conn.execute(
                    "UPDATE rates SET hits = hits + 1 WHERE key = ? AND span = ? AND win = ?",
                    window,
                )
        return True, 0.0

    # -- dispatch -----------------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        now = self._now()
        out = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status = ? AND kind = 'job' AND not_before <= ? "
                "ORDER BY queue_rank, id LIMIT ?",
                (QUEUED, now, int(limit)),
            ).fetchall()
            for row in rows:
                old = _record(row)
                new = codec.claimed(old, worker, now, lease_s)
                self._update(conn, old, new)
                out.append(new)
        return out

    def renew(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        job_ids = list(dict.fromkeys(job_ids))
        if not job_ids:
            return set()
        expires = self._now() + lease_s
        where = f"id IN ({_placeholders(len(job_ids))}) AND status = ? AND lease_owner = ?"
        with self._write() as conn:
            held = {
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM jobs WHERE {where}", (*job_ids, RUNNING, worker)
                )
            }
            conn.execute(
                f"UPDATE jobs SET lease_expires = ? WHERE {where}",
                (expires, *job_ids, RUNNING, worker),
            )
        return held

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
        codec.check_terminal(status)
        codec.check_event_for(job_id, event)
        now = self._now()
        with self._write() as conn:
            old = self._get(conn, job_id)
            change = codec.finished(old, worker, status, now, retention_s, result, error, event)
            if change is None:
                return None
            new, events = change
            self._update(conn, old, new)
            self._append(conn, events, now)
        return codec.normalized(new)

    def requeue(
        self, job_id: str, worker: str, *, delay_s: float, event: Optional[NewEvent] = None
    ) -> bool:
        codec.check_event_for(job_id, event)
        now = self._now()
        with self._write() as conn:
            old = self._get(conn, job_id)
            change = codec.requeued(old, worker, now, delay_s, event)
            if change is None:
                return False
            new, events = change
            self._update(conn, old, new)
            self._append(conn, events, now)
        return True

    def request_cancel(self, job_id: str, *, retention_s: float) -> Optional[JobRecord]:
        now = self._now()
        with self._write() as conn:
            old = self._get(conn, job_id)
            if old is None:
                return None
            change = codec.cancelled(old, now, retention_s)
            if change is None:
                return old
            new, events = change
            self._update(conn, old, new)
            self._append(conn, events, now)
        return new

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        job_ids = list(dict.fromkeys(job_ids))
        if not job_ids:
            return set()
        with self._lock:
            return {
                row[0]
                for row in self._conn.execute(
                    f"SELECT id FROM jobs WHERE id IN ({_placeholders(len(job_ids))}) "
                    f"AND (cancel_requested = 1 OR status IN ({_TERMINAL_SQL}))",
                    job_ids,
                )
            }

    def recover(self, *, max_attempts: int, retention_s: float) -> list[Recovered]:
        now = self._now()
        out = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status = ? AND lease_expires < ? "
                "ORDER BY created_at, id",
                (RUNNING, now),
            ).fetchall()
            for row in rows:
                old = _record(row)
                new, events, what = codec.recovered(old, now, max_attempts, retention_s)
                self._update(conn, old, new)
                self._append(conn, events, now)
                out.append(what)
        return out

    def release(self, worker: str) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires = 0.0 WHERE status = ? AND lease_owner = ?",
                (RUNNING, worker),
            )
            return cursor.rowcount

    def sweep(self) -> list[JobRecord]:
        now = self._now()
        with self._write() as conn:
            # (Without INDEXED BY the planner may pick the status index: every terminal record.)
            rows = conn.execute(
                "SELECT * FROM jobs INDEXED BY jobs_expiry "
                f"WHERE expires_at IS NOT NULL AND expires_at <= ? AND status IN ({_TERMINAL_SQL})",
                (now,),
            ).fetchall()
            records = [_record(row) for row in rows]
            for record in records:  # their events go with them (ON DELETE CASCADE)
                conn.execute("DELETE FROM jobs WHERE id = ?", (record.id,))
            conn.execute("DELETE FROM rates WHERE ends <= ?", (now,))  # past rate windows
        return records

    # -- events -------------------------------------------------------------------------------
    def append_events(self, events: Sequence[NewEvent]) -> list[JobEvent]:
        if not events:
            return []
        now = self._now()
        with self._write() as conn:
            return self._append(conn, events, now)

    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (job_id, int(after_seq), max(0, int(limit))),
            ).fetchall()
        return [_event(row) for row in rows]

    def tail_cursor(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def tail(self, cursor: Any, timeout_s: float) -> tuple[list[JobEvent], int]:
        cursor = int(cursor)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT id, {_EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                    (cursor, TAIL_BATCH),
                ).fetchall()
            if rows:
                return [_event(row) for row in rows], int(rows[-1]["id"])
            left = deadline - time.monotonic()
            if left <= 0:
                return [], cursor
            time.sleep(min(TAIL_POLL_S, left))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
