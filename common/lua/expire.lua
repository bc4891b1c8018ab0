-- expire.lua: queued jobs that waited longer than their stale_after end as `expired`
-- (reason stale) and are settled (their host handed on, their dependents told).
-- Due-ness is decided by Redis' clock; the caller proposes candidates.
--
-- KEYS[1] events stream, KEYS[2] settle stream, KEYS[3] stale zset, KEYS[4] delayed zset,
-- KEYS[5] finished stream {tidal}:finished (wakes the API's waits for the end)
-- per candidate i (stride 4, from KEYS[6]): job hash, queue zset, hostwait zset, done stream
-- ARGV[1] events MAXLEN, ARGV[2] TTL s of a finished job, ARGV[3] scheduler id
-- ARGV[3 + i] job id of the i-th candidate
-- Returns the number of jobs expired.

local events, settle_stream, stale, delayed, finished = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5]
local maxlen, ttl, by = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local expired = 0

for i = 0, (#KEYS - 5) / 4 - 1 do
  local job, queue, hostwait, done = KEYS[6 + 4 * i], KEYS[7 + 4 * i], KEYS[8 + 4 * i],
    KEYS[9 + 4 * i]
  local id = ARGV[4 + i]
  local deadline = tonumber(redis.call('ZSCORE', stale, id))
  if deadline and deadline <= now then
    redis.call('ZREM', stale, id)
    local h = redis.call('HMGET', job, 'state', 'host')
    if h[1] == 'queued' then
      redis.call('ZREM', queue, id)
      -- without a host the caller passes a stand-in key (the job hash): never ZREM that
      if h[2] and h[2] ~= '' then redis.call('ZREM', hostwait, id) end
      redis.call('ZREM', delayed, id)
      redis.call('HSET', job, 'state', 'expired', 'finished_at', now, 'reason', 'stale',
                 'error', 'waited longer than its stale_after', 'wait_reason', '')
      emit(events, maxlen, job, id, 'expired', now, by, {'reason', 'stale'})
      settle(settle_stream, job, id, 'expired')
      mark_done(done, finished, id, 'expired')
      redis.call('EXPIRE', job, ttl)
      expired = expired + 1
    end
  end
end
return expired
