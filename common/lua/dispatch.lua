-- dispatch.lua: hand the best queued jobs of one queue to its workers, but only as many
-- as live workers have free slots, so the dispatch stream never holds more than the free
-- slots and priority keeps deciding what runs next. A dispatch-stream entry lives until
-- the job finishes (finish.lua XDELs it), so XLEN is the number of jobs in flight.
-- The entry id is the attempt's fencing token.
--
-- KEYS[1] queue zset          {tidal}:queue:<queue>
-- KEYS[2] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[3] events stream       {tidal}:events
-- KEYS[3 + i] job hash of the i-th candidate (best first)
-- ARGV[1] slots of the live workers serving this queue
-- ARGV[2] events MAXLEN
-- ARGV[3] scheduler id
-- ARGV[3 + i] job id of the i-th candidate
-- Returns the number of jobs dispatched.

local queue, stream, events = KEYS[1], KEYS[2], KEYS[3]
local capacity, maxlen, by = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local free = capacity - redis.call('XLEN', stream)
local now = now_ms()
local sent = 0

for i = 1, #KEYS - 3 do
  if free <= 0 then break end
  local job, id = KEYS[3 + i], ARGV[3 + i]
  if redis.call('ZREM', queue, id) == 1 then
    if redis.call('HGET', job, 'state') == 'queued' then
      local entry = redis.call('XADD', stream, '*', 'id', id)
      redis.call('HSET', job, 'state', 'dispatched', 'dispatch_id', entry,
                 'dispatched_at', now, 'wait_reason', '')
      emit(events, maxlen, job, id, 'dispatched', now, by)
      free = free - 1
      sent = sent + 1
    end
  end
end
return sent
