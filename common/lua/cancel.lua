-- cancel.lua: cancel a job in whatever state it is. A job that has not started is taken
-- out of every structure and never runs; a running one is flagged and its worker told on
-- its control channel (the worker kills the process tree and finishes it as cancelled).
--
-- KEYS[1] job hash            {tidal}:job:<id>
-- KEYS[2] queue zset          {tidal}:queue:<queue>
-- KEYS[3] delayed zset        {tidal}:delayed
-- KEYS[4] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[5] events stream       {tidal}:events
-- KEYS[6] log stream          {tidal}:log:<id>
-- KEYS[7] hostwait zset       {tidal}:hostwait:<host> (any key when the job has no host)
-- KEYS[8] stale zset          {tidal}:stale
-- KEYS[9] ledger hash         {tidal}:ledger
-- KEYS[10] settle stream      {tidal}:settle
-- KEYS[11] done stream        {tidal}:done:<id> (wakes the job's log followers)
-- KEYS[12] finished stream    {tidal}:finished (wakes the API's waits for the end)
-- ARGV[1] who cancels
-- ARGV[2] events MAXLEN
-- ARGV[3] TTL in seconds for the finished job's hash and log
-- ARGV[4] control channel prefix (the worker id is appended; channels are not keys)
-- ARGV[5] consumer group of the dispatch stream
-- Returns 'cancelled' (done), 'cancelling' (running: the worker was told),
--   -1 already finished, -3 no such job.

local job, queue, delayed, stream, events, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local hostwait, stale, ledger, settle_stream, done = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local finished = KEYS[12]
local by, maxlen, ttl, chan, group = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]

local h = redis.call('HMGET', job, 'state', 'id', 'dispatch_id', 'worker', 'host')
local state, id = h[1], h[2]
if not state then return -3 end
if is_terminal(state) then return -1 end
local now = now_ms()

if state == 'running' then
  redis.call('HSET', job, 'cancel', '1')
  redis.call('PUBLISH', chan .. (h[4] or ''), 'cancel ' .. id)
  return 'cancelling'
end

redis.call('ZREM', queue, id)
redis.call('ZREM', delayed, id)
redis.call('ZREM', stale, id)
if h[5] and h[5] ~= '' then redis.call('ZREM', hostwait, id) end
if state == 'dispatched' and h[3] and h[3] ~= '' then
  redis.call('XACK', stream, group, h[3])
  redis.call('XDEL', stream, h[3])
  release_resources(job, ledger)
end
redis.call('HSET', job, 'state', 'cancelled', 'finished_at', now, 'reason', 'cancelled',
           'wait_reason', '', 'dispatch_id', '')
emit(events, maxlen, job, id, 'cancelled', now, by, {'reason', 'cancelled'})
settle(settle_stream, job, id, 'cancelled')
mark_done(done, finished, id, 'cancelled')
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', log, ttl)
return 'cancelled'
