"""The Redis job store: one Redis server shared by the cluster. Every write is one Lua script, so
it is atomic however many ingresses run; times come from the store's clock (script arguments,
never the server's time).

Keys, all under `{prefix}:`
  job:{id}              hash: the record's fields (JSON or text; unset fields absent) and `_seq`,
                        the last event seq
  events:{id}           stream: the job's events, entry ids 0-<seq>
  events                stream: every job's events (job_id, seq, ...), for `tail`; capped
  queue                 zset: queued `job`-kind ids, score queue_rank (rank, else created_at):
                        claim order, ties by id
  running               zset: running ids, score lease_expires (+inf without one)
  expiring              zset: terminal ids with expires_at, score expires_at
  list:{owner}:{kind}   zset: the owner's ids of that kind, score created_at
  idem:{owner}          hash: idempotency key -> id
  stats                 hash: running totals: records per status, `cost_u` (the pending cost in
                        millionths), `_v` (set once they are complete; see redis_scripts.STATS_LIB)
  active                hash: owner -> that owner's pending (queued or running) records
  rate:{span}:{n}:{key} string: the hits of `key` in window n of span seconds; expires after it

The scripts build these key names from the prefix, so the store needs one Redis server (or a
primary with replicas), not a Redis Cluster of shards.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import redis as redis_py

from deployments.job_store import codec
from deployments.job_store import redis_scripts as lua
from deployments.job_store.base import (
    QUEUED,
    RUNNING,
    STATUSES,
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

TAIL_BATCH = 1000
_RETRIES = 100  # guarded writes tried again after a concurrent change, before giving up

def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2]))


def _list_key(owner: str, kind: str) -> str:
    return f"list:{owner}:{kind}"


def _index(record: Optional[JobRecord]) -> dict[str, str]:
    """The sorted sets a record belongs in, with its score in each."""
    if record is None:
        return {}
    created = codec.encode_float(record.created_at)
    out = {_list_key(record.owner, record.kind): created}
    if record.status == QUEUED and record.kind == "job":
        out["queue"] = codec.encode_float(record.queue_rank)
    elif record.status == RUNNING:
        lease = record.lease_expires
        out["running"] = "+inf" if lease is None else codec.encode_float(lease)
    elif record.status in TERMINAL and record.expires_at is not None:
        out["expiring"] = codec.encode_float(record.expires_at)
    return out


def _index_ops(old: Optional[JobRecord], new: Optional[JobRecord]) -> list[list[str]]:
    """The sorted set changes that move a record from `old`'s entries to `new`'s."""
    job_id = (new or old).id  # type: ignore[union-attr]
    before, after = _index(old), _index(new)
    ops = [["rem", suffix, job_id] for suffix in before if suffix not in after]
    ops += [
        ["add", suffix, score, job_id]
        for suffix, score in after.items()
        if before.get(suffix) != score
    ]
    return ops


# What a guarded write needs to hold still: the fields its decision read.
_LEASE_GUARD = ("status", "lease_owner")


@dataclass(frozen=True)
class _Change:
    """A write decided from a record as read: the record after, the events to append, the
    fields that must still hold what was read, the time, and what to report."""

    new: JobRecord
    events: Sequence[NewEvent]
    guard: Sequence[str]
    now: float
    outcome: Any = None


def _events_payload(events: Sequence[NewEvent], now: str) -> list[list[str]]:
    return [[event.type, codec.dump_json(event.data), now] for event in events]


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str = "dit-serve", clock: Callable[[], float] = time.time):
        super().__init__(clock)
        self.prefix = prefix
        self.redis = redis_py.Redis.from_url(url, decode_responses=True)
        scripts = {
            "create": lua.CREATE,
            "apply": lua.APPLY,
            "delete": lua.DELETE,
            "claim": lua.CLAIM,
            "renew": lua.RENEW,
            "release": lua.RELEASE,
            "append": lua.APPEND,
            "page": lua.PAGE,
            "stats": lua.STATS,
            "rate_hit": lua.RATE_HIT,
        }
        self._scripts = {name: self.redis.register_script(src) for name, src in scripts.items()}

    def _key(self, suffix: str) -> str:
        return f"{self.prefix}:{suffix}"

    def _run(self, script: str, *args: Any) -> Any:
        return self._scripts[script](keys=[], args=[self.prefix, *args])

    def _now(self) -> float:
        return float(self.clock())

    @staticmethod
    def _decode(flat: Sequence[Any]) -> JobRecord:
        return codec.record_from_mapping(_pairs(flat))

    def _apply(self, old: JobRecord, change: _Change) -> Optional[JobRecord]:
        """Write `old` -> `change.new` (changed fields, index entries, events) if the guard
        fields still hold what `old` has; the record after, or None if they do not."""
        sets: list[str] = []
        dels: list[str] = []
        for name in codec.changed_fields(old, change.new):
            text = codec.encode_text(name, getattr(change.new, name))
            if text is None:
                dels.append(name)
            else:
                sets += [name, text]
        payload = {
            "guard": {name: codec.encode_text(name, getattr(old, name)) for name in change.guard},
            "set": sets,
            "del": dels,
            "index": _index_ops(old, change.new),
            "events": _events_payload(change.events, codec.encode_float(change.now)),
        }
        flat = self._run("apply", old.id, json.dumps(payload))
        return None if flat is None else self._decode(flat)

    def _change(
        self, job_id: str, decide: Callable[[Optional[JobRecord]], Optional[_Change]]
    ) -> tuple[Optional[JobRecord], Optional[_Change], Optional[JobRecord]]:
        """Read the record, let `decide` say what to write (None: nothing), write it guarded,
        and again from a fresh read if the record changed in between. (The record read, the
        change written or None, the record after or None.)"""
        for _ in range(_RETRIES):
            old = self.get(job_id)
            change = decide(old)
            if change is None:
                return old, None, None
            after = self._apply(old, change)  # type: ignore[arg-type]
            if after is not None:
                return old, change, after
        raise RuntimeError(f"job {job_id!r} kept changing while the store tried to update it")

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
        fields: list[str] = []
        for name, text in codec.record_to_text(record).items():
            fields += [name, text]
        idem = None if record.idempotency_key is None else [record.owner, record.idempotency_key]
        limits = None
        if admit is not None:
            limits = {
                "owner_max_active": admit.owner_max_active,
                "max_pending": admit.max_pending,
                "max_units": codec.limit_units(admit.max_pending_cost),
            }
        payload = {
            "fields": fields,
            "status": record.status,
            "owner": record.owner,
            "units": codec.cost_units(record.cost),
            "idem": idem,
            "admit": limits,
            "index": _index_ops(None, record),
            "events": _events_payload(events, codec.encode_float(now)),
        }
        reply = self._run("create", record.id, json.dumps(payload))
        if reply[0] == "rejected":
            raise AdmissionRejected(reply[1], codec.units_cost(reply[2]), int(reply[3]))
        if reply[0] == "exists":
            existing = self._decode(reply[1])
            if existing.request_hash == record.request_hash:
                return existing, False
            raise IdempotencyConflict(existing.id)
        if reply[0] == "duplicate":
            raise ValueError(f"job {record.id!r} exists")
        return record, True

    def get(self, job_id: str) -> Optional[JobRecord]:
        flat = self.redis.hgetall(self._key(f"job:{job_id}"))
        return self._decode_hash(flat)

    def _decode_hash(self, value: Any) -> Optional[JobRecord]:
        if not value:
            return None
        return codec.record_from_mapping(value if isinstance(value, dict) else _pairs(value))

    def list_jobs(
        self,
        owner: str,
        kinds: Sequence[str] = ("job",),
        limit: int = 20,
        after: Optional[str] = None,
        newest_first: bool = True,
    ) -> tuple[list[JobRecord], bool]:
        kinds = list(dict.fromkeys(kinds))
        limit = max(0, int(limit))
        if not kinds:
            return [], False
        cursor = None
        if after is not None:
            # The cursor counts only if it is one of this owner's records.
            cursor_owner, created = self.redis.hmget(
                self._key(f"job:{after}"), "owner", "created_at"
            )
            if cursor_owner == owner and created is not None:
                cursor = [created, after]
        payload = {
            "keys": [_list_key(owner, kind) for kind in kinds],
            "cursor": cursor,
            "n": limit + 1,
            "desc": bool(newest_first),
        }
        pages = self._run("page", json.dumps(payload))
        entries = sorted(
            (float(score), job_id)
            for page in pages
            for job_id, score in zip(page[::2], page[1::2])
        )
        if newest_first:
            entries.reverse()
        entries = entries[: limit + 1]
        pipe = self.redis.pipeline(transaction=False)
        for _, job_id in entries:
            pipe.hgetall(self._key(f"job:{job_id}"))
        records = [r for r in (self._decode_hash(v) for v in pipe.execute()) if r is not None]
        return records[:limit], len(records) > limit

    def queue_position(self, job_id: str) -> Optional[int]:
        # The queue holds exactly the queued `job` records, in claim order, (queue_rank, id); a
        # job waiting out a retry backoff (`not_before`) counts where its rank puts it.
        rank = self.redis.zrank(self._key("queue"), job_id)
        return None if rank is None else int(rank)

    # -- load -----------------------------------------------------------------------------------
    def _stats(self) -> dict[str, int]:
        return {name: int(value) for name, value in _pairs(self._run("stats")).items()}

    def load(self) -> Load:
        stats = self._stats()
        return Load(
            queued=stats.get(QUEUED, 0),
            running=stats.get(RUNNING, 0),
            pending_cost=codec.units_cost(stats.get("cost_u", 0)),
        )

    def counts_by_status(self) -> dict[str, int]:
        stats = self._stats()
        return {status: stats[status] for status in STATUSES if stats.get(status, 0) > 0}

    def running_progress(self, limit: int = 10000) -> list[Optional[dict]]:
        limit = max(0, int(limit))
        if limit == 0:
            return []
        running = self.redis.zrange(self._key("running"), 0, limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in running:
            pipe.hmget(self._key(f"job:{job_id}"), "status", "progress")
        return [
            codec.decode_field("progress", progress)
            for status, progress in pipe.execute()
            if status == RUNNING  # (not one that ended since the zrange)
        ]

    def rate_hit(self, key: str, window_s: float, limit: int) -> tuple[bool, float]:
        index, left = codec.rate_window(self._now(), window_s)
        suffix = f"rate:{codec.encode_float(window_s)}:{index}:{key}"
        # The window is named by its number, from the store's clock; its key only needs to
        # outlive it (Redis's clock counts the expiry).
        ttl = max(1, math.ceil(left) + 1)
        if self._run("rate_hit", suffix, int(limit), ttl):
            return True, 0.0
        return False, left

    # -- dispatch -----------------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        now = self._now()
        expires = codec.encode_float(now + lease_s)
        reply = self._run("claim", worker, codec.encode_float(now), expires, int(limit))
        return [self._decode(flat) for flat in reply]

    def renew(self, worker: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        job_ids = list(dict.fromkeys(job_ids))
        if not job_ids:
            return set()
        expires = codec.encode_float(self._now() + lease_s)
        return set(self._run("renew", worker, expires, *job_ids))

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

        def decide(old: Optional[JobRecord]) -> Optional[_Change]:
            change = codec.finished(old, worker, status, now, retention_s, result, error, event)
            return None if change is None else _Change(*change, _LEASE_GUARD, now)

        return self._change(job_id, decide)[2]

    def requeue(
        self, job_id: str, worker: str, *, delay_s: float, event: Optional[NewEvent] = None
    ) -> bool:
        codec.check_event_for(job_id, event)
        now = self._now()

        def decide(old: Optional[JobRecord]) -> Optional[_Change]:
            change = codec.requeued(old, worker, now, delay_s, event)
            return None if change is None else _Change(*change, _LEASE_GUARD, now)

        return self._change(job_id, decide)[2] is not None

    def request_cancel(self, job_id: str, *, retention_s: float) -> Optional[JobRecord]:
        now = self._now()

        def decide(old: Optional[JobRecord]) -> Optional[_Change]:
            change = None if old is None else codec.cancelled(old, now, retention_s)
            return None if change is None else _Change(*change, ("status", "cancel_requested"), now)

        old, _, after = self._change(job_id, decide)
        return after or old  # None: no such job; `old`: left as it was

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        job_ids = list(dict.fromkeys(job_ids))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self._key(f"job:{job_id}"), "status", "cancel_requested")
        stop = set()
        for job_id, (status, flag) in zip(job_ids, pipe.execute()):
            if status in TERMINAL or flag == "1":
                stop.add(job_id)
        return stop

    def recover(self, *, max_attempts: int, retention_s: float) -> list[Recovered]:
        now = self._now()
        expired = self.redis.zrangebyscore(
            self._key("running"), "-inf", f"({codec.encode_float(now)}"
        )
        # Guarded on everything the decision reads: of two callers only the first one's write
        # finds the record as it read it.
        guard = ("status", "lease_owner", "lease_expires", "attempts", "cancel_requested")

        def decide(old: Optional[JobRecord]) -> Optional[_Change]:
            if not codec.lease_expired(old, now):
                return None
            new, events, what = codec.recovered(old, now, max_attempts, retention_s)
            return _Change(new, events, guard, now, what)

        out = []
        for job_id in expired:
            _, change, _ = self._change(job_id, decide)
            if change is not None:
                out.append(change.outcome)
        return out

    def release(self, worker: str) -> int:
        return int(self._run("release", worker, codec.encode_float(0.0)))

    def sweep(self) -> list[JobRecord]:
        now = self._now()
        due = self.redis.zrangebyscore(self._key("expiring"), "-inf", codec.encode_float(now))
        out = []
        for job_id in due:
            for _ in range(_RETRIES):
                record = self.get(job_id)
                if record is None:
                    self.redis.zrem(self._key("expiring"), job_id)
                    break
                if not codec.sweepable(record, now):
                    break
                idem = (
                    None
                    if record.idempotency_key is None
                    else [record.owner, record.idempotency_key]
                )
                payload = {
                    "guard": {
                        name: codec.encode_text(name, getattr(record, name))
                        for name in ("status", "expires_at")
                    },
                    "index": _index_ops(record, None),
                    "idem": idem,
                }
                if self._run("delete", job_id, json.dumps(payload)):
                    out.append(record)
                    break
        return out

    # -- events -------------------------------------------------------------------------------
    def append_events(self, events: Sequence[NewEvent]) -> list[JobEvent]:
        if not events:
            return []
        now = self._now()
        payload = [
            [
                event.job_id,
                event.type,
                codec.dump_json(event.data),
                None if event.progress is None else codec.dump_json(event.progress),
            ]
            for event in events
        ]
        seqs = self._run("append", codec.encode_float(now), json.dumps(payload))
        return [
            codec.event_from_values(event.job_id, seq, event.type, data, now)
            for event, seq, (_, _, data, _) in zip(events, seqs, payload)
            if seq
        ]

    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        if limit <= 0:
            return []
        first = f"0-{max(0, int(after_seq)) + 1}"  # entry ids are 0-<seq>
        entries = self.redis.xrange(
            self._key(f"events:{job_id}"), min=first, max="+", count=int(limit)
        )
        return [
            codec.event_from_values(
                job_id, entry_id.split("-", 1)[1], f["type"], f["data"], f["created_at"]
            )
            for entry_id, f in entries
        ]

    def tail_cursor(self) -> str:
        last = self.redis.xrevrange(self._key("events"), max="+", min="-", count=1)
        return last[0][0] if last else "0-0"

    def tail(self, cursor: Any, timeout_s: float) -> tuple[list[JobEvent], str]:
        cursor = str(cursor)
        block_ms = max(1, int(timeout_s * 1000))
        reply = self.redis.xread({self._key("events"): cursor}, count=TAIL_BATCH, block=block_ms)
        if not reply:
            return [], cursor
        # RESP2: [[stream, entries]]; RESP3: {stream: entries} (or [entries]).
        streams = reply.values() if isinstance(reply, dict) else [item[1] for item in reply]
        entries = [entry for stream_entries in streams for entry in stream_entries]
        if not entries:
            return [], cursor
        out = [
            codec.event_from_values(f["job_id"], f["seq"], f["type"], f["data"], f["created_at"])
            for _, f in entries
        ]
        return out, entries[-1][0]

    def close(self) -> None:
        self.redis.close()
