"""Lua scripts run atomically by Redis, as documented constants (registered once per store).

Conventions: KEYS come from :mod:`.keys`; a negative first result is an error code
(-1: the model does not exist), 0 is an optimistic-concurrency conflict, 1 is success.
Each script is safe to run twice (redis-py re-sends commands after a connection error):
a repeated write finds its own fresh etag already in place and reports success.
"""

PUT_MODEL = """
-- KEYS[1] model hash. ARGV[1] config JSON, ARGV[2] new rev.
-- Returns 1 if the model was created, 0 if its config was replaced.
local created = redis.call('EXISTS', KEYS[1]) == 0 and 1 or 0
redis.call('HSET', KEYS[1], 'config', ARGV[1], 'rev', ARGV[2])
return created
"""

REPLACE_CONFIG = """
-- KEYS[1] model hash. ARGV[1] expected rev, ARGV[2] config JSON, ARGV[3] new rev.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return -1 end
if rev == ARGV[3] then return 1 end
if rev ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'rev', ARGV[3])
return 1
"""

PUT_PARAMS = """
-- KEYS[1] model hash, KEYS[2] parameter index, KEYS[3..] parameter hashes.
-- ARGV[1] '1' to only create; then 5 per parameter: name, shape JSON, dtype, etag, value.
-- Sets value, shape, dtype, etag; step = 0; no velocity.
-- Returns {-1} without the model, {-2, names...} if only-create found existing ones,
-- else {1, created flags...}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local n = #KEYS - 2
local found = {}
local created = {1}
for i = 1, n do
  local etag = redis.call('HGET', KEYS[i + 2], 'etag')
  local mine = ARGV[2 + (i - 1) * 5 + 3]
  if etag and etag ~= mine then
    table.insert(found, ARGV[2 + (i - 1) * 5])
    table.insert(created, 0)
  else
    table.insert(created, 1)
  end
end
if ARGV[1] == '1' and #found > 0 then
  table.insert(found, 1, -2)
  return found
end
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local key = KEYS[i + 2]
  redis.call('DEL', key)
  redis.call('HSET', key, 'shape', ARGV[b + 1], 'dtype', ARGV[b + 2], 'etag', ARGV[b + 3],
             'value', ARGV[b + 4], 'step', '0')
  redis.call('SADD', KEYS[2], ARGV[b])
end
return created
"""

COMMIT_STEP = """
-- KEYS[1] model hash, KEYS[2] idempotency hash (unused without a claim), KEYS[3..] parameter hashes.
-- ARGV[1] expected model rev; ARGV[2] '1' with a claim, else '0'; ARGV[3] fingerprint,
-- ARGV[4] owner, ARGV[5] TTL in ms, ARGV[6] summary; then 3 per parameter:
-- 'expected etag|new etag|has velocity (1/0)|new step', value, velocity (empty without one).
-- Returns {-1} without the model; {0} on a conflict (the rev or an etag differs from what the
-- update was computed from); {1} applied; with a claim, {-2} if the key was used with another
-- request, {-3} if another attempt holds it, {2, owner, summary} if it was applied already.
-- Without a claim, a re-sent commit finds its own new etag in place and reports {1}; with one,
-- it finds the key done by its own owner.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return {-1} end
local n = #KEYS - 2
local expected, fresh, velocity, step = {}, {}, {}, {}
for i = 1, n do
  local meta = ARGV[7 + (i - 1) * 3]
  local a = string.find(meta, '|', 1, true)
  local b = string.find(meta, '|', a + 1, true)
  local c = string.find(meta, '|', b + 1, true)
  expected[i] = string.sub(meta, 1, a - 1)
  fresh[i] = string.sub(meta, a + 1, b - 1)
  velocity[i] = string.sub(meta, b + 1, c - 1) == '1'
  step[i] = string.sub(meta, c + 1)
end
if ARGV[2] == '1' then
  local st = redis.call('HMGET', KEYS[2], 'state', 'fp', 'owner', 'summary')
  if st[1] then
    if st[2] ~= ARGV[3] then return {-2} end
    if st[1] == 'done' then return {2, st[3], st[4]} end
    if st[3] ~= ARGV[4] then return {-3} end
  end
elseif n > 0 and redis.call('HGET', KEYS[3], 'etag') == fresh[1] then
  return {1}
end
if rev ~= ARGV[1] then return {0} end
for i = 1, n do
  if redis.call('HGET', KEYS[i + 2], 'etag') ~= expected[i] then return {0} end
end
for i = 1, n do
  local b = 7 + (i - 1) * 3
  local key = KEYS[i + 2]
  redis.call('HSET', key, 'etag', fresh[i], 'step', step[i], 'value', ARGV[b + 1])
  if velocity[i] then
    redis.call('HSET', key, 'velocity', ARGV[b + 2])
  else
    redis.call('HDEL', key, 'velocity')
  end
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'state', 'done', 'fp', ARGV[3], 'owner', ARGV[4], 'summary', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {1}
"""

READ_META = """
-- KEYS[1] model hash, KEYS[2..] parameter hashes.
-- Returns {config, rev, then shape, dtype, step, etag per parameter} (false where missing):
-- one command, where a pipeline of one HMGET per parameter costs the client per command.
local out = redis.call('HMGET', KEYS[1], 'config', 'rev')
for i = 2, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'shape', 'dtype', 'step', 'etag')
  for j = 1, 4 do table.insert(out, row[j]) end
end
return out
"""

CLAIM = """
-- KEYS[1] idempotency hash. ARGV[1] fingerprint, ARGV[2] owner, ARGV[3] lease in ms.
-- Returns {'mismatch'}, {'done', owner, summary}, {'in_flight'}, or {'owned'} after taking
-- (or renewing) the lease.
local st = redis.call('HMGET', KEYS[1], 'state', 'fp', 'owner', 'summary')
if st[1] then
  if st[2] ~= ARGV[1] then return {'mismatch'} end
  if st[1] == 'done' then return {'done', st[3], st[4]} end
  if st[3] ~= ARGV[2] then return {'in_flight'} end
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'owned'}
"""

RELEASE = """
-- KEYS[1] idempotency hash. ARGV[1] owner. Deletes the record if it is pending under owner.
local st = redis.call('HMGET', KEYS[1], 'state', 'owner')
if st[1] == 'pending' and st[2] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

CONTRIBUTE = """
-- KEYS[1] model hash; then 3 per parameter: parameter hash, gradients hash, workers set.
-- ARGV[1] step, ARGV[2] worker id, ARGV[3] TTL in ms; then one gradient (bytes) per parameter.
-- Returns {-1} without the model, {-2, i} if parameter i is missing, {0, steps...} if some
-- parameter is not at the step (nothing added), else {1, duplicate (0/1), counts...}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local n = (#KEYS - 1) / 3
local steps = {0}
local moved = false
for i = 1, n do
  local step = redis.call('HGET', KEYS[2 + (i - 1) * 3], 'step')
  if not step then return {-2, i} end
  table.insert(steps, tonumber(step))
  if tonumber(step) ~= tonumber(ARGV[1]) then moved = true end
end
if moved then return steps end
local out = {1, 0}
for i = 1, n do
  local grads, who = KEYS[3 + (i - 1) * 3], KEYS[4 + (i - 1) * 3]
  if redis.call('HSETNX', grads, ARGV[2], ARGV[3 + i]) == 0 then out[2] = 1 end
  redis.call('SADD', who, ARGV[2])
  redis.call('PEXPIRE', grads, ARGV[3])
  redis.call('PEXPIRE', who, ARGV[3])
  table.insert(out, redis.call('HLEN', grads))
end
return out
"""

DELETE_PARAM = """
-- KEYS[1] model hash, KEYS[2] parameter index, KEYS[3] parameter hash. ARGV[1] name.
-- Returns -1 without the model, else the number of parameters deleted (0 or 1).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[3])
"""
