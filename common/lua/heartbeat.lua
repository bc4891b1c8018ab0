-- heartbeat.lua: a worker says it is alive: refresh its hash and TTL, its score in the
-- worker registry (Redis' clock), and learn which of its running jobs were cancelled
-- (the fallback for a missed pub/sub message) and which it no longer owns (it was frozen
-- or cut off past its TTL and the reaper gave the job to another attempt: it must kill
-- them and not finish them).
--
-- KEYS[1] worker hash         {tidal}:worker:<id>
-- KEYS[2] worker registry     {tidal}:workers (zset by last heartbeat ms)
-- KEYS[2 + i] job hash of the i-th running job
-- ARGV[1] worker id
-- ARGV[2] TTL in ms
-- ARGV[3] running job ids, comma separated ('' for none)
-- ARGV[4] n, the number of running jobs
-- ARGV[4 + i] fencing token (dispatch entry id) of the i-th running job, i = 1..n
-- ARGV[5 + n ..] field, value pairs for the worker hash
-- Returns {ids whose cancel flag is set, ids this worker no longer owns}.

local hash, registry = KEYS[1], KEYS[2]
local id, ttl, running, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = now_ms()

local fields = {'HSET', hash, 'last_heartbeat', now, 'running', running}
for i = 5 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call(unpack(fields))
redis.call('PEXPIRE', hash, ttl)
redis.call('ZADD', registry, now, id)

local cancelled, lost = {}, {}
for i = 1, n do
  local h = redis.call('HMGET', KEYS[2 + i], 'cancel', 'id', 'state', 'dispatch_id')
  if h[3] ~= 'running' or h[4] ~= ARGV[4 + i] then
    lost[#lost + 1] = h[2] or ''
  elseif h[1] == '1' then
    cancelled[#cancelled + 1] = h[2]
  end
end
return {cancelled, lost}
