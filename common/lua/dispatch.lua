-- dispatch.lua: hand the best queued jobs of one queue to its workers, but only as many
-- as live workers have free slots, so the dispatch stream never holds more than the free
-- slots and priority keeps deciding what runs next. A job also needs its resources to
-- fit the ledger (capacity x overcommit - reserve - what dispatched and running jobs
-- hold) and one live worker's whole capacity; one that does not fit stays queued with
-- wait_reason 'resources' and smaller jobs behind it may go ahead. A dispatch-stream
-- entry lives until the job ends (XDELed then), so XLEN is the number of jobs in flight.
-- The entry id is the attempt's fencing token.
--
-- KEYS[1] queue zset          {tidal}:queue:<queue>
-- KEYS[2] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] ledger hash         {tidal}:ledger
-- KEYS[5] stale zset          {tidal}:stale
-- KEYS[5 + i] job hash of the i-th candidate (best first)
-- ARGV[1] slots of the live workers serving this queue
-- ARGV[2] events MAXLEN
-- ARGV[3] scheduler id
-- ARGV[4..6] usable cpu, memory_mb, gpu of the live workers (after overcommit and reserve)
-- ARGV[7..9] the largest cpu, memory_mb, gpu of any one live worker
-- ARGV[9 + i] job id of the i-th candidate
-- Returns {dispatched, held back for resources}.

local queue, stream, events, ledger, stale = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local capacity, maxlen, by = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local used = redis.call('HMGET', ledger, 'cpu', 'memory_mb', 'gpu')
local free = {tonumber(ARGV[4]) - (tonumber(used[1]) or 0),
              tonumber(ARGV[5]) - (tonumber(used[2]) or 0),
              tonumber(ARGV[6]) - (tonumber(used[3]) or 0)}
local largest = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local slots = capacity - redis.call('XLEN', stream)
local now = now_ms()
local sent, held = 0, 0

local taken = {}  -- ids dispatched: out of the stale zset with one ZREM at the end
for i = 1, #KEYS - 5 do
  if slots <= 0 then break end
  local job, id = KEYS[5 + i], ARGV[9 + i]
  local h = redis.call('HMGET', job, 'state', 'res_cpu', 'res_mem', 'res_gpu')
  if h[1] == 'queued' then
    local need = {tonumber(h[2]) or 0, tonumber(h[3]) or 0, tonumber(h[4]) or 0}
    local fits = true
    for r = 1, 3 do
      if need[r] > 0 and (need[r] > free[r] or need[r] > largest[r]) then fits = false end
    end
    -- a queued job may have left this queue since the caller read it (another scheduler
    -- dispatched it and it was requeued elsewhere, or it waits for its host): ZREM's
    -- answer says whether it is still here, so no ZSCORE first
    if fits and redis.call('ZREM', queue, id) == 1 then
      taken[#taken + 1] = id
      for r = 1, 3 do free[r] = free[r] - need[r] end
      if need[1] + need[2] + need[3] > 0 then
        redis.call('HINCRBYFLOAT', ledger, 'cpu', need[1])
        redis.call('HINCRBY', ledger, 'memory_mb', need[2])
        redis.call('HINCRBY', ledger, 'gpu', need[3])
        redis.call('HSET', job, 'res_held', '1')
      end
      local entry = redis.call('XADD', stream, '*', 'id', id)
      redis.call('HSET', job, 'state', 'dispatched', 'dispatch_id', entry,
                 'dispatched_at', now, 'wait_reason', '')
      emit(events, maxlen, job, id, 'dispatched', now, by)
      slots = slots - 1
      sent = sent + 1
    elseif not fits and redis.call('ZSCORE', queue, id) then
      redis.call('HSET', job, 'wait_reason', 'resources')
      held = held + 1
    end
  else
    redis.call('ZREM', queue, id)  -- a stray member (e.g. left by a repair) must not block
  end
end
for i = 1, #taken, 1000 do
  redis.call('ZREM', stale, unpack(taken, i, math.min(i + 999, #taken)))
end
return {sent, held}
