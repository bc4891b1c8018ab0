-- dispatch.lua: hand the best queued jobs of one queue to its workers, but only as many
-- as live workers have free slots, so the dispatch stream never holds more than the free
-- slots and priority keeps deciding what runs next. A job also needs its resources to
-- fit the ledger (capacity x overcommit - reserve - what dispatched and running jobs
-- hold) and one live worker's whole capacity; one that does not fit stays queued with
-- wait_reason 'resources' and smaller jobs behind it may go ahead. A dispatch-stream
-- entry lives until the job ends (XDELed then), so XLEN is the number of jobs in flight.
-- The entry id is the attempt's fencing token.
--
-- Two callers. The scheduler passes the live capacity it read (ARGV[1..]) and the queue's
-- best jobs as it just read them. A worker with free slots (worker/service.py) calls it
-- before it reads its dispatch stream, with ARGV[1] = '*': the capacity is the one the
-- scheduler published in the capacity hash (none there: nothing is dispatched), and its
-- candidates are the queue head as the worker read it on its last read, maybe stale. So
-- priority still decides, only the prefix of the queue's head as it is NOW that the
-- candidates cover is dispatched: the first head job the worker did not know of (a better
-- one came in meanwhile) ends the call, and the scheduler dispatches from there.
--
-- KEYS[1] queue zset          {tidal}:queue:<queue>
-- KEYS[2] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] ledger hash         {tidal}:ledger
-- KEYS[5] stale zset          {tidal}:stale
-- KEYS[6] capacity hash       {tidal}:capacity:<queue> (read in the worker's mode only)
-- KEYS[6 + i] job hash of the i-th candidate (best first)
-- ARGV[1] slots of the live workers serving this queue, or '*': capacity from KEYS[6]
-- ARGV[2] events MAXLEN
-- ARGV[3] scheduler or worker id
-- ARGV[4..6] usable cpu, memory_mb, gpu of the live workers (after overcommit and reserve)
-- ARGV[7..9] the largest cpu, memory_mb, gpu of any one live worker
-- ARGV[9 + i] job id of the i-th candidate
-- Returns {dispatched, held back for resources}.

local queue, stream, events, ledger, stale = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local maxlen, by = ARGV[2], ARGV[3]
local cap = {ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]}
local order = {}  -- {job key, job id} in the order to try
if ARGV[1] == '*' then
  cap = redis.call('HMGET', KEYS[6], 'slots', 'cpu', 'memory_mb', 'gpu', 'max_cpu',
                   'max_memory_mb', 'max_gpu')
  if not cap[1] then return {0, 0} end
  local known = {}
  for i = 1, #KEYS - 6 do known[ARGV[9 + i]] = KEYS[6 + i] end
  for _, id in ipairs(redis.call('ZRANGE', queue, 0, #KEYS - 7)) do
    if not known[id] then break end
    order[#order + 1] = {known[id], id}
  end
else
  for i = 1, #KEYS - 6 do order[i] = {KEYS[6 + i], ARGV[9 + i]} end
end
local used = redis.call('HMGET', ledger, 'cpu', 'memory_mb', 'gpu')
local free = {tonumber(cap[2]) - (tonumber(used[1]) or 0),
              tonumber(cap[3]) - (tonumber(used[2]) or 0),
              tonumber(cap[4]) - (tonumber(used[3]) or 0)}
local largest = {tonumber(cap[5]), tonumber(cap[6]), tonumber(cap[7])}
local slots = tonumber(cap[1]) - redis.call('XLEN', stream)
local now = now_ms()
local sent, held = 0, 0

local taken = {}  -- ids dispatched: out of the stale zset with one ZREM at the end
for i = 1, #order do
  if slots <= 0 then break end
  local job, id = order[i][1], order[i][2]
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
