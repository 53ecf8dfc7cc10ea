"""Lua scripts run atomically by Redis, as documented constants (the typed wrappers are in :mod:`.redis`).

Conventions: KEYS come from :mod:`.keys`; a script's first result says what happened (1 done, 0
or a negative code: what stopped it, with nothing written).

**Fencing.** Every script that writes a model's record checks the writer's fencing token against
the model's lease first (``-1``: the writer lost its lease) and the head's incarnation and seq
next: a process that lost its lease, however long it was paused, can never write again.

**All or nothing.** Redis does not roll a script back: a write made before an error stays. So
every script checks everything first and only then writes; a script that writes never fails
after its first write. A batch's data buffers are written by ``SET`` in the same ``MULTI`` as the
``COMMIT`` script, under *staging* names unique to the writer (fence and seq), and the script
renames them into the log (``RENAME`` moves a value without copying it) or, when a check fails,
deletes them: nobody ever sees a staged buffer.

**Memory.** Scripts that write start with the ``#!lua`` shebang, so that Redis refuses them
*before they run* when ``maxmemory`` is reached. The delete is ``allow-oom`` (a user can always
free memory), and so are the leases and the heartbeat (a few bytes in place, and without them no
replica could take a model to read or delete it from a full Redis); reads are ``no-writes``.

**Idempotency records** live in one hash per incarnation, ``key -> fingerprint|expiry ms|summary``
(only the summary may hold ``|``), with a sorted set of expiry times to trim it (64 at a time).
Times come from Redis's own clock (``TIME``).
"""

from . import keys as _k

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

HEARTBEAT = (
    "#!lua flags=allow-oom\n"
    + _NOW
    + """
-- KEYS[1] live replicas (zset by expiry), KEYS[2] their URLs. ARGV[1] replica id, ARGV[2] URL, ARGV[3] TTL ms.
-- Returns the live replicas: {id, url, id, url, ...}.
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local dead = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('HDEL', KEYS[2], unpack(dead))
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"""
)

ACQUIRE = (
    "#!lua flags=allow-oom\n"
    + _NOW
    + """
-- KEYS[1] the model's lease. ARGV[1] replica id, ARGV[2] its URL, ARGV[3] lease ms.
-- Returns {0, replica, url, fence, ms left} if another replica's lease is live, else {1, fence}: a new
-- lease whose fence is greater than every earlier one (at least Redis's clock in microseconds, so it
-- grows even after the lease key expired, a day after its last use).
local now = now_ms()
local cur = redis.call('HMGET', KEYS[1], 'replica', 'url', 'fence', 'until')
local left = tonumber(cur[4] or '0') - now
if cur[1] and cur[1] ~= ARGV[1] and left > 0 then
  return {0, cur[1], cur[2], cur[3], left}
end
local fence = string.format('%.0f', math.max(tonumber(cur[3] or '0') + 1, now * 1000))
redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'url', ARGV[2], 'fence', fence, 'until', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 86400000)
return {1, fence}
"""
)

RENEW = (
    "#!lua flags=allow-oom\n"
    + _NOW
    + """
-- KEYS[1] the model's lease. ARGV[1] replica id, ARGV[2] fence, ARGV[3] lease ms.
-- Returns 1 if the lease is still this one (extended), else 0 (lost: another replica took it).
local cur = redis.call('HMGET', KEYS[1], 'replica', 'fence')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 86400000)
return 1
"""
)

RELEASE = """#!lua flags=allow-oom
-- KEYS[1] the model's lease. ARGV[1] replica id, ARGV[2] fence. Ends the lease now if it is still this one.
local cur = redis.call('HMGET', KEYS[1], 'replica', 'fence')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'until', '0')
return 1
"""

HOLDER = (
    "#!lua flags=no-writes\n"
    + _NOW
    + """
-- KEYS[1] the model's lease. Returns {replica, url, fence, ms left} while it is live, else {}.
local cur = redis.call('HMGET', KEYS[1], 'replica', 'url', 'fence', 'until')
if not cur[1] then return {} end
local left = tonumber(cur[4] or '0') - now_ms()
if left <= 0 then return {} end
return {cur[1], cur[2], cur[3], left}
"""
)

CREATE = """#!lua
-- KEYS[1] the model's lease, KEYS[2] its head. ARGV[1] fence, ARGV[2] config JSON, ARGV[3] rev,
-- ARGV[4] incarnation. Returns -1 (fenced), 0 (the model exists: nothing written) or 1 (created).
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'config', ARGV[2], 'rev', ARGV[3], 'inc', ARGV[4], 'seq', '0')
return 1
"""

COMMIT = (
    "#!lua\n"
    + _NOW
    + f"""
-- KEYS: [1] lease, [2] head, [3] log metadata, [4] idempotency hash, [5] its expiry set; then one
-- key per data buffer of the entries: its log key if the buffers come inline, else a pair (staging
-- key, log key); then the snapshot's keys.
-- ARGV[1]: the batch as JSON: {{"fence", "inc", "base" (the head's seq it follows), "seq" (after it),
-- "ttl" (of the idempotency records, ms), "inline" (bool), "entries": [[seq, buffers, metadata], ...],
-- "keys": [[key, fingerprint, summary], ...], "snap": snapshot metadata or null, "snapkeys":
-- "fence:seq:buffers", "config": JSON or null, "rev"}}; with inline buffers, ARGV[2..] are they.
-- Returns {{1}} written; {{-1}} fenced; {{-2}} the head is gone or another incarnation; {{-3, seq}} the head
-- is at another seq; {{-4, key, record}} a key is applied already. On any failure nothing is written and
-- the staged buffers (and the snapshot's, unless it is the current one) are deleted.
local b = cjson.decode(ARGV[1])
local nbuf_total = 0
for _, e in ipairs(b.entries) do nbuf_total = nbuf_total + e[2] end
local per = b.inline and 1 or 2
local snap0 = 6 + per * nbuf_total
local function cleanup()
  if not b.inline then
    for i = 0, nbuf_total - 1 do redis.call('UNLINK', KEYS[6 + 2 * i]) end
  end
  if b.snap ~= cjson.null and redis.call('HGET', KEYS[2], 'snapkeys') ~= b.snapkeys then
    for i = snap0, #KEYS do redis.call('UNLINK', KEYS[i]) end
  end
end
if redis.call('HGET', KEYS[1], 'fence') ~= b.fence then cleanup() return {{-1}} end
local head = redis.call('HMGET', KEYS[2], 'inc', 'seq', 'snapkeys')
if head[1] ~= b.inc then cleanup() return {{-2}} end
if head[2] ~= b.base then cleanup() return {{-3, head[2]}} end
local now = now_ms()
for _, k in ipairs(b.keys) do
  local raw = redis.call('HGET', KEYS[4], k[1])
  if raw then
    local x = string.find(raw, '|', 1, true)
    local y = string.find(raw, '|', x + 1, true)
    if tonumber(string.sub(raw, x + 1, y - 1)) > now then cleanup() return {{-4, k[1], raw}} end
  end
end
-- Checked: now write.
local base = string.sub(KEYS[3], 1, -1 - string.len('{_k.LOGMETA}'))
local buf = 0
for _, e in ipairs(b.entries) do
  for j = 1, e[2] do
    if b.inline then
      redis.call('SET', KEYS[6 + buf], ARGV[2 + buf])
    else
      redis.call('RENAME', KEYS[6 + 2 * buf], KEYS[7 + 2 * buf])
    end
    buf = buf + 1
  end
  redis.call('HSET', KEYS[3], e[1], e[2] .. ' ' .. e[3])
end
if b.snap ~= cjson.null then
  local from = 0
  if head[3] then
    local f, s, n = string.match(head[3], '^(%d+):(%d+):(%d+)$')
    from = tonumber(s)
    if head[3] ~= b.snapkeys then
      for j = 0, tonumber(n) - 1 do redis.call('UNLINK', base .. '{_k.SNAP}' .. f .. ':' .. s .. ':' .. j) end
    end
  end
  for seq = from + 1, tonumber(b.seq) do
    local meta = redis.call('HGET', KEYS[3], seq)
    if meta then
      local n = tonumber(string.match(meta, '^(%d+)'))
      for j = 0, n - 1 do redis.call('UNLINK', base .. '{_k.LOG}' .. seq .. ':' .. j) end
      redis.call('HDEL', KEYS[3], seq)
    end
  end
  redis.call('HSET', KEYS[2], 'snap', b.snap, 'snapkeys', b.snapkeys)
end
redis.call('HSET', KEYS[2], 'seq', b.seq)
if b.config ~= cjson.null then redis.call('HSET', KEYS[2], 'config', b.config, 'rev', b.rev) end
if #b.keys > 0 then
  local expiry = now + b.ttl
  for _, k in ipairs(b.keys) do
    redis.call('HSET', KEYS[4], k[1], k[2] .. '|' .. expiry .. '|' .. k[3])
    redis.call('ZADD', KEYS[5], expiry, k[1])
  end
  local old = redis.call('ZRANGE', KEYS[5], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
  if #old > 0 then
    redis.call('HDEL', KEYS[4], unpack(old))
    redis.call('ZREM', KEYS[5], unpack(old))
  end
end
return {{1}}
"""
)

COMMIT_SMALL = COMMIT.replace("#!lua\n", "#!lua flags=allow-oom\n", 1)
"""``COMMIT`` for a batch without data (a deleted parameter, a new config): a few bytes, allowed when Redis is
full, so that a user can delete a parameter (its memory is freed by the next snapshot) or change a config.
(A batch with small buffers passes them inline to ``COMMIT`` itself, without ``MULTI``.)"""

DELETE = f"""#!lua flags=allow-oom
-- KEYS[1] the model's lease, KEYS[2] its head. ARGV[1] fence, ARGV[2] what every incarnation's key base
-- starts with ('<prefix>:{{m}}:i:'). Drops the head, which makes every key of the incarnation
-- unreachable at once, then unlinks them all (UNLINK frees large values in Redis's background
-- thread). Returns -1 (fenced), 0 (no such model) or 1. Allowed when Redis is full.
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -1 end
local head = redis.call('HMGET', KEYS[2], 'inc', 'snapkeys')
if not head[1] then return 0 end
redis.call('UNLINK', KEYS[2])
local base = ARGV[2] .. head[1] .. ':'
if head[2] then
  local f, s, n = string.match(head[2], '^(%d+):(%d+):(%d+)$')
  for j = 0, tonumber(n) - 1 do redis.call('UNLINK', base .. '{_k.SNAP}' .. f .. ':' .. s .. ':' .. j) end
end
local logmeta = base .. '{_k.LOGMETA}'
for _, seq in ipairs(redis.call('HKEYS', logmeta)) do
  local nbuf = tonumber(string.match(redis.call('HGET', logmeta, seq), '^(%d+)'))
  for j = 0, nbuf - 1 do redis.call('UNLINK', base .. '{_k.LOG}' .. seq .. ':' .. j) end
end
redis.call('UNLINK', logmeta, base .. '{_k.IDEM}', base .. '{_k.IDEM_EXPIRY}', base .. '{_k.POINTS}')
return 1
"""

LOOKUP = (
    "#!lua flags=no-writes\n"
    + _NOW
    + """
-- KEYS[1] head, KEYS[2] idempotency hash. ARGV[1] incarnation, ARGV[2] key.
-- Returns the key's live record 'fingerprint|expiry|summary', or false.
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return false end
local a = string.find(raw, '|', 1, true)
local b = string.find(raw, '|', a + 1, true)
if tonumber(string.sub(raw, a + 1, b - 1)) <= now_ms() then return false end
return raw
"""
)
