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
local sent, held = dispatch_jobs(queue, stream, events, ledger, stale, cap, order, maxlen, by)
return {sent, held}
