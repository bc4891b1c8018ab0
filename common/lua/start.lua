-- start.lua: a worker claims the jobs it read from a dispatch stream. A job whose entry
-- no longer matches (cancelled, or re-dispatched to someone else) is acknowledged and
-- skipped. Starting counts the attempt.
--
-- KEYS[1] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[2] events stream       {tidal}:events
-- KEYS[2 + i] job hash of the i-th entry
-- ARGV[1] consumer group
-- ARGV[2] events MAXLEN
-- ARGV[3] worker id
-- ARGV[3 + i] dispatch entry id of the i-th job
-- Returns, per entry, {id, attempt, spec} when started or {id, 0, ''} when skipped.

local stream, events = KEYS[1], KEYS[2]
local group, maxlen, worker = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local out = {}

for i = 1, #KEYS - 2 do
  local job, entry = KEYS[2 + i], ARGV[3 + i]
  local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'spec')
  if h[1] == 'dispatched' and h[2] == entry then
    local attempt = redis.call('HINCRBY', job, 'attempt', 1)
    redis.call('HSET', job, 'state', 'running', 'worker', worker, 'started_at', now)
    emit(events, maxlen, job, h[3], 'running', now, worker, {'attempt', attempt})
    out[i] = {h[3], attempt, h[4]}
  else
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    out[i] = {h[3] or '', 0, ''}
  end
end
return out
