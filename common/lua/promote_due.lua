-- promote_due.lua: move jobs whose time has come from the delayed set into their queue
-- (scheduled starts and retry backoff). Due-ness is decided by Redis' clock here;
-- the caller only proposes candidates.
--
-- KEYS[1] delayed zset        {tidal}:delayed
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3 + 2(i-1)] job hash of the i-th candidate
-- KEYS[4 + 2(i-1)] queue zset of the i-th candidate
-- ARGV[1] events MAXLEN
-- ARGV[2] priority step in ms
-- ARGV[3] scheduler id
-- ARGV[4 + (i-1)] job id of the i-th candidate
-- Returns the number of jobs promoted.

local delayed, events = KEYS[1], KEYS[2]
local maxlen, step, by = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local promoted = 0

for i = 1, (#KEYS - 2) / 2 do
  local job, queue, id = KEYS[1 + 2 * i], KEYS[2 + 2 * i], ARGV[3 + i]
  local due = tonumber(redis.call('ZSCORE', delayed, id))
  if due and due <= now then
    redis.call('ZREM', delayed, id)
    local h = redis.call('HMGET', job, 'state', 'priority')
    if h[1] == 'queued' or h[1] == 'retrying' then
      -- a retry or a delayed start counts its age from when it became due
      local score = due + (tonumber(h[2]) or 2) * step
      redis.call('ZADD', queue, score, id)
      redis.call('HSET', job, 'state', 'queued', 'wait_reason', 'priority', 'score', score)
      emit(events, maxlen, job, id, 'queued', now, by, {'wait_reason', 'priority'})
      promoted = promoted + 1
    end
  end
end
return promoted
