"""The Redis job store: one Redis server shared by the cluster. Every write is one Lua script, so
it is atomic however many ingresses run; times come from the store's clock (script arguments,
never the server's time).

Keys, all under `{prefix}:`
  job:{id}              hash: the record's fields (JSON or text; unset fields absent) and `_seq`,
                        the last event seq
  events:{id}           stream: the job's events, entry ids 0-<seq>
  events                stream: every job's events (job_id, seq, ...), for `tail`; capped
  queue                 zset: queued `job`-kind ids, score created_at (claim order; ties by id)
  running               zset: running ids, score lease_expires (+inf without one)
  expiring              zset: terminal ids with expires_at, score expires_at
  list:{owner}:{kind}   zset: the owner's ids of that kind, score created_at
  idem:{owner}          hash: idempotency key -> id

The scripts build these key names from the prefix, so the store needs one Redis server (or a
primary with replicas), not a Redis Cluster of shards.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import redis as redis_py

from deployments.job_store import codec
from deployments.job_store.base import (
    QUEUED,
    RUNNING,
    TERMINAL,
    IdempotencyConflict,
    JobEvent,
    JobRecord,
    JobStore,
    NewEvent,
    Recovered,
)

EVENTS_MAXLEN = 100_000  # about how many events the global stream keeps for `tail`
TAIL_BATCH = 1000
CLAIM_SCAN = 100  # queue entries a claim reads at a time
_RETRIES = 100  # guarded writes tried again after a concurrent change, before giving up

# Helpers every script starts with. ARGV[1] is always the prefix.
_LIB = """
local P = ARGV[1]
local function key(s) return P .. ':' .. s end
local function job_key(id) return P .. ':job:' .. id end
local function append_event(id, ev_type, data, created_at)
  local seq = redis.call('HINCRBY', job_key(id), '_seq', 1)
  redis.call('XADD', key('events:' .. id), '0-' .. seq,
             'type', ev_type, 'data', data, 'created_at', created_at)
  redis.call('XADD', key('events'), 'MAXLEN', '~', %d, '*', 'job_id', id, 'seq', seq,
             'type', ev_type, 'data', data, 'created_at', created_at)
  return seq
end
local function apply_index(ops)
  for _, op in ipairs(ops) do
    if op[1] == 'add' then
      redis.call('ZADD', key(op[2]), op[3], op[4])
    else
      redis.call('ZREM', key(op[2]), op[3])
    end
  end
end
local function guard_holds(jk, guard)
  for field, want in pairs(guard) do
    local have = redis.call('HGET', jk, field)
    if want == cjson.null then
      if have then return false end
    elseif have ~= want then
      return false
    end
  end
  return true
end
""" % EVENTS_MAXLEN

# ARGV: prefix, id, payload {fields: [f, v, ...], idem: [owner, key] or null, index, events}.
# -> {'created'} | {'exists', <existing record's hash>} | {'duplicate'}
_CREATE = _LIB + """
local id = ARGV[2]
local p = cjson.decode(ARGV[3])
local jk = job_key(id)
if p.idem ~= cjson.null then
  local existing = redis.call('HGET', key('idem:' .. p.idem[1]), p.idem[2])
  if existing and redis.call('EXISTS', job_key(existing)) == 1 then
    return {'exists', redis.call('HGETALL', job_key(existing))}
  end
end
if redis.call('EXISTS', jk) == 1 then return {'duplicate'} end
redis.call('HSET', jk, unpack(p.fields))
if p.idem ~= cjson.null then
  redis.call('HSET', key('idem:' .. p.idem[1]), p.idem[2], id)
end
apply_index(p.index)
for _, e in ipairs(p.events) do append_event(id, e[1], e[2], e[3]) end
return {'created'}
"""

# A guarded change to one record, decided by the caller from the record as it read it.
# ARGV: prefix, id, payload {guard: {field: text or null}, set: [f, v, ...], del: [f, ...],
# index, events}. -> the record's hash after, or nil (no such record, or the guard failed).
_APPLY = _LIB + """
local id = ARGV[2]
local p = cjson.decode(ARGV[3])
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 or not guard_holds(jk, p.guard) then return false end
if #p.set > 0 then redis.call('HSET', jk, unpack(p.set)) end
if #p.del > 0 then redis.call('HDEL', jk, unpack(p.del)) end
apply_index(p.index)
for _, e in ipairs(p.events) do append_event(id, e[1], e[2], e[3]) end
return redis.call('HGETALL', jk)
"""

# A guarded delete (sweep). ARGV: prefix, id, payload {guard, index, idem: [owner, key] or null}.
# -> 1 or 0.
_DELETE = _LIB + """
local id = ARGV[2]
local p = cjson.decode(ARGV[3])
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 or not guard_holds(jk, p.guard) then return 0 end
redis.call('DEL', jk, key('events:' .. id))
apply_index(p.index)
if p.idem ~= cjson.null then
  local ik = key('idem:' .. p.idem[1])
  if redis.call('HGET', ik, p.idem[2]) == id then redis.call('HDEL', ik, p.idem[2]) end
end
return 1
"""

# ARGV: prefix, worker, now, lease_expires, limit -> the claimed records' hashes.
_CLAIM = _LIB + """
local worker, now, expires, limit = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local out = {}
local start = 0
while #out < limit do
  local ids = redis.call('ZRANGE', key('queue'), start, start + %d - 1)
  if #ids == 0 then break end
  local removed = 0
  for _, id in ipairs(ids) do
    local jk = job_key(id)
    local f = redis.call('HMGET', jk, 'status', 'kind', 'not_before', 'started_at')
    if f[1] ~= 'queued' or f[2] ~= 'job' then
      redis.call('ZREM', key('queue'), id)  -- not claimable (should not happen): drop it
      removed = removed + 1
    elseif tonumber(f[3] or '0') <= now then
      redis.call('HSET', jk, 'status', 'running', 'lease_owner', worker, 'lease_expires', expires)
      redis.call('HINCRBY', jk, 'attempts', 1)
      if not f[4] then redis.call('HSET', jk, 'started_at', ARGV[3]) end
      redis.call('ZREM', key('queue'), id)
      redis.call('ZADD', key('running'), expires, id)
      removed = removed + 1
      out[#out + 1] = redis.call('HGETALL', jk)
      if #out >= limit then break end
    end
  end
  start = start + #ids - removed
end
return out
""" % CLAIM_SCAN

# ARGV: prefix, worker, lease_expires, id... -> the ids still held.
_RENEW = _LIB + """
local worker, expires = ARGV[2], ARGV[3]
local held = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'status', 'lease_owner')
  if f[1] == 'running' and f[2] == worker then
    redis.call('HSET', jk, 'lease_expires', expires)
    redis.call('ZADD', key('running'), expires, id)
    held[#held + 1] = id
  end
end
return held
"""

# ARGV: prefix, worker, a time long past -> how many leases it expired.
_RELEASE = _LIB + """
local worker, past = ARGV[2], ARGV[3]
local n = 0
for _, id in ipairs(redis.call('ZRANGE', key('running'), 0, -1)) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'status', 'lease_owner')
  if f[1] == 'running' and f[2] == worker then
    redis.call('HSET', jk, 'lease_expires', past)
    redis.call('ZADD', key('running'), past, id)
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, created_at, payload [[job_id, type, data, progress or null], ...]
# -> each event's seq, 0 where its job does not exist.
_APPEND = _LIB + """
local created_at = ARGV[2]
local out = {}
for i, e in ipairs(cjson.decode(ARGV[3])) do
  local jk = job_key(e[1])
  if redis.call('EXISTS', jk) == 1 then
    out[i] = append_event(e[1], e[2], e[3], created_at)
    if e[4] ~= cjson.null then redis.call('HSET', jk, 'progress', e[4]) end
  else
    out[i] = 0
  end
end
return out
"""

# One page of ids from several (created_at, id)-ordered sorted sets, read at once.
# ARGV: prefix, payload {keys: [...], cursor: [score, id] or null, n, desc}
# -> per key, [id, score, ...] of up to n entries after the cursor, in ascending order.
_PAGE = _LIB + """
local p = cjson.decode(ARGV[2])
local n = p.n
local function before(a, b)  -- byte order, as sorted sets order equal scores
  local m = math.min(#a, #b)
  for i = 1, m do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local out = {}
for i, suffix in ipairs(p.keys) do
  local k = key(suffix)
  local lo, hi
  if p.cursor == cjson.null then
    if p.desc then lo, hi = -n, -1 else lo, hi = 0, n - 1 end
  else
    local score, cid = p.cursor[1], p.cursor[2]
    -- how many entries order before the cursor, and how many before or at it
    local lt = redis.call('ZCOUNT', k, '-inf', '(' .. score)
    local le = lt
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', k, score, score)) do
      if before(m, cid) then lt = lt + 1; le = le + 1 elseif m == cid then le = le + 1 end
    end
    if p.desc then lo, hi = math.max(0, lt - n), lt - 1 else lo, hi = le, le + n - 1 end
  end
  if hi < lo then
    out[i] = {}
  else
    out[i] = redis.call('ZRANGE', k, lo, hi, 'WITHSCORES')
  end
end
return out
"""


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
        out["queue"] = created
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
            "create": _CREATE,
            "apply": _APPLY,
            "delete": _DELETE,
            "claim": _CLAIM,
            "renew": _RENEW,
            "release": _RELEASE,
            "append": _APPEND,
            "page": _PAGE,
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
    def create(self, record: JobRecord, events: Sequence[NewEvent] = ()) -> tuple[JobRecord, bool]:
        codec.check_new_record(record, events)
        now = self._now()
        record = codec.normalized(
            codec.with_event_progress(record.with_changes(created_at=now), events)
        )
        fields: list[str] = []
        for name, text in codec.record_to_text(record).items():
            fields += [name, text]
        idem = None if record.idempotency_key is None else [record.owner, record.idempotency_key]
        payload = {
            "fields": fields,
            "idem": idem,
            "index": _index_ops(None, record),
            "events": _events_payload(events, codec.encode_float(now)),
        }
        reply = self._run("create", record.id, json.dumps(payload))
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
        # The queue holds exactly the queued `job` records, in claim order, (created_at, id); a
        # job waiting out a retry backoff (`not_before`) counts where its created_at puts it.
        rank = self.redis.zrank(self._key("queue"), job_id)
        return None if rank is None else int(rank)

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
