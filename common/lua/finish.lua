-- finish.lua: end one attempt with all its side effects at once: acknowledge and delete
-- the dispatch entry, give back its resources, then either schedule a retry (state
-- retrying, in the delayed set; a job keeps its host meanwhile) or record the terminal
-- state, let the job's keys expire and queue its follow-up (host hand-off, dependents)
-- on the settle stream. Fenced: only the attempt that holds the current dispatch entry
-- may finish (a stale worker's XACK would otherwise drop the live attempt's entry:
-- RELIABILITY.md finding 1).
--
-- KEYS[1] job hash            {tidal}:job:<id>
-- KEYS[2] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] delayed zset        {tidal}:delayed
-- KEYS[5] log stream          {tidal}:log:<id>
-- KEYS[6] ledger hash         {tidal}:ledger
-- KEYS[7] settle stream       {tidal}:settle
-- KEYS[8] done stream         {tidal}:done:<id> (wakes the job's log followers)
-- ARGV[1] fencing token (the dispatch entry id)
-- ARGV[2] consumer group
-- ARGV[3] outcome: completed | failed | cancelled
-- ARGV[4] exit code ('' for none)
-- ARGV[5] result (JSON, '' for none)
-- ARGV[6] error text ('' for none)
-- ARGV[7] reason ('' for none; e.g. exit_code, timeout, exec_error, exception)
-- ARGV[8] events MAXLEN
-- ARGV[9] TTL in seconds for the finished job's hash and log
-- ARGV[10] retry delay in ms if this failure is retried (backoff computed by the caller)
-- ARGV[11] worker id
-- ARGV[12..] what the attempt used, as field/value pairs for the job hash (peak_rss_kb, cpu_s)
-- Returns the state written (completed, failed, cancelled, retrying), or
--   -1 stale token (another attempt owns the job), -2 job not running, -3 no such job.

local job, stream, events, delayed, log, ledger, settle_stream, done = KEYS[1], KEYS[2],
  KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local token, group, outcome = ARGV[1], ARGV[2], ARGV[3]
local exit_code, result, err, reason = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local maxlen, ttl, retry_ms, worker = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]

local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'attempt', 'retries', 'cancel',
                     'lost', 'retry_base', 'handed_back', 'seq', 'res_held', 'owner', 'host')
if not h[1] then return -3 end
if h[2] ~= token then return -1 end
if h[1] ~= 'running' then return -2 end

redis.call('XACK', stream, group, token)
redis.call('XDEL', stream, token)
release_resources(job, ledger, h[11] or '')
local now = now_ms()
local id, attempt, retries = h[3], tonumber(h[4]) or 1, tonumber(h[5]) or 0
-- attempts lost with their worker or handed back by it, and those before a manual retry,
-- spend no retry
local spent = attempt - (tonumber(h[7]) or 0) - (tonumber(h[8]) or 0) - (tonumber(h[9]) or 0)
if h[6] == '1' then outcome = 'cancelled'; reason = 'cancelled' end

local seq = (tonumber(h[10]) or 0) + 1  -- written with the state, then emitted
local fields = {'exit_code', exit_code, 'result', result, 'error', err, 'reason', reason,
                'dispatch_id', '', 'seq', seq}
for i = 12, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
if outcome == 'failed' and spent <= retries then
  local due = now + retry_ms
  redis.call('ZADD', delayed, due, id)
  redis.call('HSET', job, 'state', 'retrying', 'wait_reason', 'retry', 'retry_at', due,
             unpack(fields))
  emit_seq(events, maxlen, seq, id, 'retrying', now, worker,
           {'attempt', attempt, 'reason', reason, 'retry_at', due})
  return 'retrying'
end

redis.call('HSET', job, 'state', outcome, 'finished_at', now, 'wait_reason', '', unpack(fields))
emit_seq(events, maxlen, seq, id, outcome, now, worker,
         {'attempt', attempt, 'exit_code', exit_code, 'reason', reason})
settle(settle_stream, job, id, outcome, {h[12], h[13]})
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', log, ttl)
redis.call('XADD', done, 'MAXLEN', 1, '*', 'state', outcome)
redis.call('EXPIRE', done, 60)
return outcome
