-- heartbeat.lua: a worker says it is alive: refresh its hash and TTL, its score in the
-- worker registry (Redis' clock), and learn which of its running jobs were cancelled
-- (the fallback for a missed pub/sub message).
--
-- KEYS[1] worker hash         {tidal}:worker:<id>
-- KEYS[2] worker registry     {tidal}:workers (zset by last heartbeat ms)
-- KEYS[2 + i] job hash of the i-th running job
-- ARGV[1] worker id
-- ARGV[2] TTL in ms
-- ARGV[3] running job ids, comma separated ('' for none)
-- ARGV[4..] field, value pairs for the worker hash
-- Returns the ids of running jobs whose cancel flag is set.

local hash, registry = KEYS[1], KEYS[2]
local id, ttl, running = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()

local fields = {'HSET', hash, 'last_heartbeat', now, 'running', running}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call(unpack(fields))
redis.call('PEXPIRE', hash, ttl)
redis.call('ZADD', registry, now, id)

local cancelled = {}
for i = 3, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'cancel', 'id')
  if h[1] == '1' then cancelled[#cancelled + 1] = h[2] end
end
return cancelled
