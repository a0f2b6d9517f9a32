"""The Lua scripts of the Redis job store (`redis.py`): every write to the store is one of these,
so it is atomic however many ingresses run. Key names are built from the prefix (ARGV[1]); the
layout is described in `redis.py`."""

from __future__ import annotations

from deployments.job_store.codec import COST_SCALE

EVENTS_MAXLEN = 100_000  # about how many events the global stream keeps for `tail`
CLAIM_SCAN = 100  # queue entries a claim reads at a time

# The running totals (`stats`: a count per status, `cost_u` the pending cost in whole millionths;
# `active`: each owner's pending count), kept by every script that creates, deletes or changes
# the status of a record: `track(jk, old status or nil, new status or nil)`, called while the
# record's hash holds its owner and cost. `ensure_stats` rebuilds them from the records when
# `stats` lacks its `_v` marker (a store written before the totals existed, or flushed): once,
# by a SCAN of the prefix's job hashes. Scripts that read the totals call it first; a write made
# before a rebuild is counted by the rebuild.
STATS_LIB = r"""
local function is_pending(s) return s == 'queued' or s == 'running' end
local function cost_units(text)  -- as codec.cost_units: floor(cost * scale + 0.5)
  if not text then return 0 end
  return math.floor(tonumber(text) * COST_SCALE + 0.5)
end
local function track(jk, old, new)
  if old == new then return end
  local st = key('stats')
  if old then redis.call('HINCRBY', st, old, -1) end
  if new then redis.call('HINCRBY', st, new, 1) end
  local was, is = is_pending(old), is_pending(new)
  if was == is then return end
  local d = is and 1 or -1
  local f = redis.call('HMGET', jk, 'owner', 'cost')
  local units = cost_units(f[2])
  if units ~= 0 then redis.call('HINCRBY', st, 'cost_u', string.format('%.0f', d * units)) end
  if redis.call('HINCRBY', key('active'), f[1], d) <= 0 then
    redis.call('HDEL', key('active'), f[1])
  end
end
local function ensure_stats()
  local st = key('stats')
  if redis.call('HEXISTS', st, '_v') == 1 then return end
  redis.call('DEL', st, key('active'))
  local pattern = string.gsub(P, '[%*%?%[%]\\]', '\\%0') .. ':job:*'
  local cursor = '0'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = r[1]
    for _, jk in ipairs(r[2]) do
      if redis.call('TYPE', jk).ok == 'hash' then
        local s = redis.call('HGET', jk, 'status')
        if s then track(jk, nil, s) end
      end
    end
  until cursor == '0'
  redis.call('HSET', st, '_v', 1)
end
""".replace("COST_SCALE", str(COST_SCALE))

# Helpers every script starts with. ARGV[1] is always the prefix.
LIB = """
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
""" % EVENTS_MAXLEN + STATS_LIB


# ARGV: prefix, id, payload {fields: [f, v, ...], status, owner, units (its cost in millionths),
# idem: [owner, key] or null, admit: {owner_max_active, max_pending, max_units} (each a number or
# null) or null, index, events}.
# -> {'created'} | {'exists', <existing record's hash>} | {'duplicate'}
#    | {'rejected', reason, pending cost in millionths (text), pending count}
# The admission rule is codec.refusal's, checked against the running totals.
CREATE = LIB + """
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
local a = p.admit
if a ~= cjson.null and is_pending(p.status) then
  ensure_stats()
  local f = redis.call('HMGET', key('stats'), 'queued', 'running', 'cost_u')
  local n = (tonumber(f[1]) or 0) + (tonumber(f[2]) or 0)
  local units = tonumber(f[3]) or 0
  local reason = nil
  if a.owner_max_active ~= cjson.null
      and (tonumber(redis.call('HGET', key('active'), p.owner)) or 0) + 1 > a.owner_max_active then
    reason = 'owner_active'
  elseif a.max_pending ~= cjson.null and n + 1 > a.max_pending then
    reason = 'count'
  elseif a.max_units ~= cjson.null and n > 0 and units + p.units > a.max_units then
    reason = 'cost'
  end
  if reason then return {'rejected', reason, string.format('%.0f', units), n} end
end
redis.call('HSET', jk, unpack(p.fields))
track(jk, nil, p.status)
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
APPLY = LIB + """
local id = ARGV[2]
local p = cjson.decode(ARGV[3])
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 or not guard_holds(jk, p.guard) then return false end
local old = redis.call('HGET', jk, 'status')
if #p.set > 0 then redis.call('HSET', jk, unpack(p.set)) end
if #p.del > 0 then redis.call('HDEL', jk, unpack(p.del)) end
track(jk, old, redis.call('HGET', jk, 'status'))
apply_index(p.index)
for _, e in ipairs(p.events) do append_event(id, e[1], e[2], e[3]) end
return redis.call('HGETALL', jk)
"""

# A guarded delete (sweep). ARGV: prefix, id, payload {guard, index, idem: [owner, key] or null}.
# -> 1 or 0.
DELETE = LIB + """
local id = ARGV[2]
local p = cjson.decode(ARGV[3])
local jk = job_key(id)
if redis.call('EXISTS', jk) == 0 or not guard_holds(jk, p.guard) then return 0 end
track(jk, redis.call('HGET', jk, 'status'), nil)
redis.call('DEL', jk, key('events:' .. id))
apply_index(p.index)
if p.idem ~= cjson.null then
  local ik = key('idem:' .. p.idem[1])
  if redis.call('HGET', ik, p.idem[2]) == id then redis.call('HDEL', ik, p.idem[2]) end
end
return 1
"""

# ARGV: prefix, worker, now, lease_expires, limit -> the claimed records' hashes.
CLAIM = LIB + """
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
      track(jk, 'queued', 'running')
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
RENEW = LIB + """
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
RELEASE = LIB + """
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
APPEND = LIB + """
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
PAGE = LIB + """
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

# ARGV: prefix -> the `stats` hash (rebuilt first if need be; see STATS_LIB).
STATS = LIB + """
ensure_stats()
return redis.call('HGETALL', key('stats'))
"""

# One hit in a fixed window. ARGV: prefix, key suffix (the window's own key), limit, ttl in
# seconds -> 1 (counted) or 0 (the window is full; not counted).
RATE_HIT = LIB + """
local k, limit = key(ARGV[2]), tonumber(ARGV[3])
local n = tonumber(redis.call('GET', k)) or 0
if n >= limit then return 0 end
redis.call('INCR', k)
if n == 0 then redis.call('EXPIRE', k, ARGV[4]) end
return 1
"""
