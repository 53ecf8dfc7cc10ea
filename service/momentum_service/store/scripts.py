"""Lua scripts run atomically by Redis, as documented constants (registered once per store).

Conventions: KEYS come from :mod:`.keys`; a negative first result is an error code
(-1: the model does not exist), 0 is an optimistic-concurrency conflict, 1 is success.
Each script is safe to run twice (redis-py re-sends commands after a connection error):
a repeated write finds its own fresh etag (or revision) already in place and reports success.

**All or nothing.** Redis does not roll a script back: a write made before an error stays. So
every script checks everything first (the model's incarnation, revisions, etags, keys' types
by reading them) and only then writes; a script that writes never fails after its first write.

**Memory.** Every script that writes starts with the ``#!lua`` shebang, so that Redis refuses
it *before it runs* when ``maxmemory`` is reached (a script without a shebang is refused only
at its first write that needs memory, after a ``DEL`` for instance, which is how a bulk write
could overshoot the limit). Scripts that only delete are ``allow-oom``, so that a user can
always free memory; scripts that only read are ``no-writes``.

**Incarnations.** Every key but the model's head carries the model's incarnation (see
:mod:`.keys`). Scripts are given the incarnation the caller built its keys with and check it
against the head's: ``-4`` (or a conflict, for a commit) means the model was deleted and
created again since, and the caller must read the head again.

**Idempotency records** live in one hash per incarnation, ``Idempotency-Key -> record``, with
a sorted set of their expiry times to trim it (up to 64 expired records per script call). A
record is ``state|fingerprint|owner|expiry ms|summary`` (only the summary may hold ``|``);
times come from Redis's own clock (``TIME``).
"""

from . import keys as _k

# Lua helpers shared by the scripts below.
_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_IDEM = """
local function trim_idem(hash, zset, now)
  local old = redis.call('ZRANGE', zset, '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
  if #old > 0 then
    redis.call('HDEL', hash, unpack(old))
    redis.call('ZREM', zset, unpack(old))
  end
end
-- The live record of a key: {state, fp, owner, expiry, summary}, or nil (absent or expired).
local function idem_record(hash, key, now)
  local raw = redis.call('HGET', hash, key)
  if not raw then return nil end
  local a = string.find(raw, '|', 1, true)
  local b = string.find(raw, '|', a + 1, true)
  local c = string.find(raw, '|', b + 1, true)
  local d = string.find(raw, '|', c + 1, true)
  local rec = {string.sub(raw, 1, a - 1), string.sub(raw, a + 1, b - 1), string.sub(raw, b + 1, c - 1),
               tonumber(string.sub(raw, c + 1, d - 1)), string.sub(raw, d + 1)}
  if rec[4] <= now then return nil end
  return rec
end
local function put_idem(hash, zset, key, state, fp, owner, expiry, summary)
  redis.call('HSET', hash, key, state .. '|' .. fp .. '|' .. owner .. '|' .. expiry .. '|' .. summary)
  redis.call('ZADD', zset, expiry, key)
end
"""

PUT_MODEL = """#!lua
-- KEYS[1] model head. ARGV[1] config JSON, ARGV[2] new rev, ARGV[3] new incarnation,
-- ARGV[4] '1' to only create.
-- Returns {1, inc} if the model was created, {2, inc} if its config was replaced, or
-- {0, config JSON} if only-create found it (nothing written). A re-sent create finds its own rev.
local cur = redis.call('HMGET', KEYS[1], 'config', 'rev', 'inc')
if cur[3] then
  if cur[2] == ARGV[2] then return {1, cur[3]} end
  if ARGV[4] == '1' then return {0, cur[1]} end
  redis.call('HSET', KEYS[1], 'config', ARGV[1], 'rev', ARGV[2])
  return {2, cur[3]}
end
redis.call('HSET', KEYS[1], 'config', ARGV[1], 'rev', ARGV[2], 'inc', ARGV[3])
return {1, ARGV[3]}
"""

REPLACE_CONFIG = """#!lua
-- KEYS[1] model head. ARGV[1] expected rev, ARGV[2] config JSON, ARGV[3] new rev.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return -1 end
if rev == ARGV[3] then return 1 end
if rev ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'rev', ARGV[3])
return 1
"""

PUT_PARAMS = """#!lua
-- KEYS[1] model head, KEYS[2] parameter index, KEYS[3..] parameter hashes.
-- ARGV[1] incarnation, ARGV[2] '1' to only create; then 5 per parameter: name, shape JSON,
-- dtype, etag, value. Sets value, shape, dtype, etag; step = 0; no velocity.
-- Returns {-1} without the model, {-4} if the incarnation moved on, {-2, names...} if
-- only-create found existing ones, else {1, created flags...}.
local inc = redis.call('HGET', KEYS[1], 'inc')
if not inc then return {-1} end
if inc ~= ARGV[1] then return {-4} end
local n = #KEYS - 2
local found = {}
local created = {1}
for i = 1, n do
  local etag = redis.call('HGET', KEYS[i + 2], 'etag')
  local mine = ARGV[3 + (i - 1) * 5 + 3]
  if etag and etag ~= mine then
    table.insert(found, ARGV[3 + (i - 1) * 5])
    table.insert(created, 0)
  else
    table.insert(created, 1)
  end
end
if ARGV[2] == '1' and #found > 0 then
  table.insert(found, 1, -2)
  return found
end
redis.call('SCARD', KEYS[2])  -- a type check before the first write
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local key = KEYS[i + 2]
  redis.call('HSET', key, 'shape', ARGV[b + 1], 'dtype', ARGV[b + 2], 'etag', ARGV[b + 3],
             'value', ARGV[b + 4], 'step', '0')
  redis.call('HDEL', key, 'velocity')
  redis.call('SADD', KEYS[2], ARGV[b])
end
return created
"""

COMMIT_STEP = (
    "#!lua\n"
    + _NOW
    + _IDEM
    + """
-- KEYS[1] model head, KEYS[2] idempotency hash, KEYS[3] its expiry set, KEYS[4..] parameter hashes.
-- ARGV[1] incarnation, ARGV[2] expected model rev; ARGV[3] '1' with a claim, else '0'; ARGV[4] key,
-- ARGV[5] fingerprint, ARGV[6] owner, ARGV[7] TTL in ms, ARGV[8] summary; then 3 per parameter:
-- 'expected etag|new etag|has velocity (1/0)|new step', value, velocity (empty without one).
-- Returns {-1} without the model; {0} on a conflict (the incarnation, rev or an etag differs from
-- what the update was computed from); {1} applied; with a claim, {-2} if the key was used with
-- another request, {-3} if another attempt holds it, {2, owner, summary} if it was applied already.
-- Without a claim, a re-sent commit finds its own new etag in place and reports {1}; with one,
-- it finds the key done by its own owner.
local head = redis.call('HMGET', KEYS[1], 'rev', 'inc')
if not head[1] then return {-1} end
if head[2] ~= ARGV[1] then return {0} end
local n = #KEYS - 3
local expected, fresh, velocity, step = {}, {}, {}, {}
for i = 1, n do
  local meta = ARGV[9 + (i - 1) * 3]
  local a = string.find(meta, '|', 1, true)
  local b = string.find(meta, '|', a + 1, true)
  local c = string.find(meta, '|', b + 1, true)
  expected[i] = string.sub(meta, 1, a - 1)
  fresh[i] = string.sub(meta, a + 1, b - 1)
  velocity[i] = string.sub(meta, b + 1, c - 1) == '1'
  step[i] = string.sub(meta, c + 1)
end
local now = now_ms()
if ARGV[3] == '1' then
  local rec = idem_record(KEYS[2], ARGV[4], now)
  if rec then
    if rec[2] ~= ARGV[5] then return {-2} end
    if rec[1] == 'done' then return {2, rec[3], rec[5]} end
    if rec[3] ~= ARGV[6] then return {-3} end
  end
elseif n > 0 and redis.call('HGET', KEYS[4], 'etag') == fresh[1] then
  return {1}
end
if head[1] ~= ARGV[2] then return {0} end
for i = 1, n do
  if redis.call('HGET', KEYS[i + 3], 'etag') ~= expected[i] then return {0} end
end
if ARGV[3] == '1' then trim_idem(KEYS[2], KEYS[3], now) end
for i = 1, n do
  local b = 9 + (i - 1) * 3
  local key = KEYS[i + 3]
  redis.call('HSET', key, 'etag', fresh[i], 'step', step[i], 'value', ARGV[b + 1])
  if velocity[i] then
    redis.call('HSET', key, 'velocity', ARGV[b + 2])
  else
    redis.call('HDEL', key, 'velocity')
  end
end
if ARGV[3] == '1' then
  put_idem(KEYS[2], KEYS[3], ARGV[4], 'done', ARGV[5], ARGV[6], now + tonumber(ARGV[7]), ARGV[8])
end
return {1}
"""
)

READ_META = """#!lua flags=no-writes
-- KEYS[1] model head, KEYS[2..] parameter hashes of incarnation ARGV[1].
-- Returns {config, rev, inc, then shape, dtype, step, etag per parameter} (false where missing):
-- one command, where a pipeline of one HMGET per parameter costs the client per command.
-- If inc is not ARGV[1], the parameter rows are not the model's: read again with inc.
local out = redis.call('HMGET', KEYS[1], 'config', 'rev', 'inc')
if out[3] ~= ARGV[1] then return out end
for i = 2, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'shape', 'dtype', 'step', 'etag')
  for j = 1, 4 do table.insert(out, row[j]) end
end
return out
"""

CLAIM = (
    "#!lua\n"
    + _NOW
    + _IDEM
    + """
-- KEYS[1] model head, KEYS[2] idempotency hash, KEYS[3] its expiry set.
-- ARGV[1] incarnation, ARGV[2] key, ARGV[3] fingerprint, ARGV[4] owner, ARGV[5] lease in ms.
-- Returns {'gone'} without the model (or another incarnation), {'mismatch'},
-- {'done', owner, summary}, {'in_flight'}, or {'owned'} after taking (or renewing) the lease.
local inc = redis.call('HGET', KEYS[1], 'inc')
if inc ~= ARGV[1] then return {'gone'} end
local now = now_ms()
local rec = idem_record(KEYS[2], ARGV[2], now)
if rec then
  if rec[2] ~= ARGV[3] then return {'mismatch'} end
  if rec[1] == 'done' then return {'done', rec[3], rec[5]} end
  if rec[3] ~= ARGV[4] then return {'in_flight'} end
end
trim_idem(KEYS[2], KEYS[3], now)
put_idem(KEYS[2], KEYS[3], ARGV[2], 'pending', ARGV[3], ARGV[4], now + tonumber(ARGV[5]), '')
return {'owned'}
"""
)

RELEASE = (
    "#!lua flags=allow-oom\n"
    + _NOW
    + _IDEM
    + """
-- KEYS[1] idempotency hash, KEYS[2] its expiry set. ARGV[1] key, ARGV[2] owner.
-- Deletes the record if it is pending under owner (only ever frees memory: allowed when full).
local rec = idem_record(KEYS[1], ARGV[1], now_ms())
if rec and rec[1] == 'pending' and rec[3] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""
)

CONTRIBUTE = (
    "#!lua\n"
    + _NOW
    + f"""
-- KEYS[1] model head, KEYS[2] the step's sync hash, KEYS[3] the sync expiry set, KEYS[4..] parameter
-- hashes. ARGV[1] incarnation, ARGV[2] step, ARGV[3] worker id, ARGV[4] TTL in ms, ARGV[5] the
-- incarnation's key base (to drop expired steps); then 2 per parameter: name, gradient bytes.
-- Returns {{-1}} without the model, {{-4}} if the incarnation moved on, {{-2, i}} if parameter i is
-- missing, {{0, steps...}} if some parameter is not at the step (nothing added), else
-- {{1, duplicate (0/1), counts...}}: a worker's first contribution to a step counts, a repeat does not.
local inc = redis.call('HGET', KEYS[1], 'inc')
if not inc then return {{-1}} end
if inc ~= ARGV[1] then return {{-4}} end
local n = #KEYS - 3
local steps = {{0}}
local moved = false
for i = 1, n do
  local step = redis.call('HGET', KEYS[3 + i], 'step')
  if not step then return {{-2, i}} end
  table.insert(steps, tonumber(step))
  if tonumber(step) ~= tonumber(ARGV[2]) then moved = true end
end
if moved then return steps end
redis.call('HLEN', KEYS[2])  -- a type check before the first write
local now = now_ms()
local expired = redis.call('ZRANGE', KEYS[3], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
for _, s in ipairs(expired) do
  redis.call('UNLINK', ARGV[5] .. '{_k.SYNC}' .. s)
  redis.call('ZREM', KEYS[3], s)
end
local out = {{1, 0}}
for i = 1, n do
  local name, grad = ARGV[6 + (i - 1) * 2], ARGV[7 + (i - 1) * 2]
  local who = 'w:' .. ARGV[3] .. ':' .. name
  if redis.call('HEXISTS', KEYS[2], who) == 1 then
    out[2] = 1
    table.insert(out, tonumber(redis.call('HGET', KEYS[2], 'n:' .. name)))
  else
    redis.call('HSET', KEYS[2], who, '1', 'g:' .. ARGV[3] .. ':' .. name, grad)
    table.insert(out, redis.call('HINCRBY', KEYS[2], 'n:' .. name, 1))
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[2])
return out
"""
)

DROP_CONTRIBUTIONS = """#!lua flags=allow-oom
-- KEYS[1] a sync step's hash. ARGV: parameter names. Deletes their gradients (the ``g:`` fields),
-- keeping who contributed (``w:``) and the counts until the step expires. Only frees memory.
local wanted = {}
for _, name in ipairs(ARGV) do wanted[name] = true end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'g:' then
    local sep = string.find(field, ':', 3, true)
    if wanted[string.sub(field, sep + 1)] then redis.call('HDEL', KEYS[1], field) end
  end
end
return 1
"""

DELETE_PARAM = """#!lua flags=allow-oom
-- KEYS[1] model head, KEYS[2] parameter index, KEYS[3] parameter hash. ARGV[1] incarnation, ARGV[2] name.
-- Returns -1 without the model, -4 if the incarnation moved on, else the number of parameters
-- deleted (0 or 1). Only frees memory: allowed when Redis is full.
local inc = redis.call('HGET', KEYS[1], 'inc')
if not inc then return -1 end
if inc ~= ARGV[1] then return -4 end
redis.call('SREM', KEYS[2], ARGV[2])
return redis.call('UNLINK', KEYS[3])
"""

DELETE_MODEL = f"""#!lua flags=allow-oom
-- KEYS[1] model head. ARGV[1] what every incarnation's key base starts with ('<prefix>:{{m}}:i:').
-- Drops the head, which makes every key of the incarnation unreachable at once, then unlinks them
-- all: the parameters, the idempotency records, the sync steps (UNLINK frees large values in
-- Redis's background thread). Returns 1 if the model existed, else 0. Allowed when Redis is full.
local inc = redis.call('HGET', KEYS[1], 'inc')
redis.call('UNLINK', KEYS[1])
if not inc then return 0 end
local base = ARGV[1] .. inc .. ':'
local index = base .. '{_k.PARAMS}'
for _, name in ipairs(redis.call('SMEMBERS', index)) do redis.call('UNLINK', base .. '{_k.PARAM}' .. name) end
for _, step in ipairs(redis.call('ZRANGE', base .. '{_k.SYNC_EXPIRY}', 0, -1)) do
  redis.call('UNLINK', base .. '{_k.SYNC}' .. step)
end
redis.call('UNLINK', index, base .. '{_k.IDEM}', base .. '{_k.IDEM_EXPIRY}', base .. '{_k.SYNC_EXPIRY}')
return 1
"""
