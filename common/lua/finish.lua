-- finish.lua: end one attempt with all its side effects at once: acknowledge and delete
-- the dispatch entry, give back its resources, then either schedule a retry (state
-- retrying, in the delayed set; a job keeps its host meanwhile) or record the terminal
-- state, let the job's keys expire and queue its follow-up (host hand-off, dependents)
-- on the settle stream. A job with no host and no dependents needs no follow-up but
-- counting it off its owner's active jobs: when the caller names the owner (a worker
-- that dispatches for itself, so no scheduler needs waking to refill its slot), that is
-- done here and nothing goes on the settle stream. Fenced: only the attempt that holds the current dispatch entry
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
-- KEYS[9] finished stream     {tidal}:finished (wakes the API's waits for the end)
-- KEYS[10] owner's user hash  {tidal}:user:<owner> (any key stands in when ARGV[12] is '')
-- KEYS[11] dependents set     {tidal}:dependents:<id>
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
-- ARGV[12] the job's owner, to settle a job without host or dependents here ('': the
--   settle stream always; a name that is not the job's owner counts as '')
-- ARGV[13..] what the attempt used, as field/value pairs for the job hash (peak_rss_kb, cpu_s)
-- Returns the state written (completed, failed, cancelled, retrying), or
--   -1 stale token (another attempt owns the job), -2 job not running, -3 no such job.
--
-- Batch mode (a worker's finisher: every outcome ready in one call), ARGV[1] = '*':
-- KEYS[1] events stream, KEYS[2] delayed zset, KEYS[3] ledger hash, KEYS[4] settle stream,
-- KEYS[5] finished stream, then per job (stride 6, from KEYS[6]): its job hash, dispatch
-- stream, log stream, done stream, owner's user hash, dependents set;
-- ARGV[2] consumer group, ARGV[3] events MAXLEN, ARGV[4] TTL s, ARGV[5] worker id,
-- then per job: token, outcome, exit code, result, error text, reason, retry delay ms,
-- owner, n = number of usage field/value pairs, then those 2n values.
-- Returns one answer per job, as above, in order.

-- A job submitted by a request that waits for its end (POST /jobs?wait=: the hash field
-- `waited` is 1) has its document, as HGETALL gives it, carried by its finished-stream
-- entry to that request (api/watch.py), unless it is over DOC_MAX bytes: the finished
-- stream keeps 10,000 entries.
local DOC_MAX = 4096

-- k = {job, stream, events, delayed, log, ledger, settle, done, finished, user, dependents};
-- a = {token, outcome, exit_code, result, err, reason, retry_ms, owner,
--      usage (flat field/value list)};
-- c = {group, maxlen, ttl, worker, now}
local function finish_one(k, a, c)
  local job = k.job
  local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'attempt', 'retries',
                       'cancel', 'lost', 'retry_base', 'handed_back', 'seq', 'res_held',
                       'owner', 'host', 'waited')
  if not h[1] then return -3 end
  if h[2] ~= a.token then return -1 end
  if h[1] ~= 'running' then return -2 end

  redis.call('XACK', k.stream, c.group, a.token)
  redis.call('XDEL', k.stream, a.token)
  release_resources(job, k.ledger, h[11] or '')
  local now, outcome, reason = c.now, a.outcome, a.reason
  local id, attempt, retries = h[3], tonumber(h[4]) or 1, tonumber(h[5]) or 0
  -- attempts lost with their worker or handed back by it, and those before a manual retry,
  -- spend no retry
  local spent = attempt - (tonumber(h[7]) or 0) - (tonumber(h[8]) or 0) - (tonumber(h[9]) or 0)
  if h[6] == '1' then outcome = 'cancelled'; reason = 'cancelled' end

  local seq = (tonumber(h[10]) or 0) + 1  -- written with the state, then emitted
  local fields = {'exit_code', a.exit_code, 'result', a.result, 'error', a.err,
                  'reason', reason, 'dispatch_id', '', 'seq', seq}
  for i = 1, #a.usage do fields[#fields + 1] = a.usage[i] end
  if outcome == 'failed' and spent <= retries then
    local due = now + a.retry_ms
    redis.call('ZADD', k.delayed, due, id)
    redis.call('HSET', job, 'state', 'retrying', 'wait_reason', 'retry', 'retry_at', due,
               unpack(fields))
    emit_seq(k.events, c.maxlen, seq, id, 'retrying', now, c.worker,
             {'attempt', attempt, 'reason', reason, 'retry_at', due})
    return 'retrying'
  end

  redis.call('HSET', job, 'state', outcome, 'finished_at', now, 'wait_reason', '',
             unpack(fields))
  emit_seq(k.events, c.maxlen, seq, id, outcome, now, c.worker,
           {'attempt', attempt, 'exit_code', a.exit_code, 'reason', reason})
  if a.owner ~= '' and a.owner == h[12] and (h[13] or '') == ''
      and redis.call('SCARD', k.dependents) == 0 then
    -- settled here: what settle.lua does for such a job (its deps set is empty, so gone)
    if (tonumber(redis.call('HGET', k.user, 'active')) or 0) > 0 then
      redis.call('HINCRBY', k.user, 'active', -1)
    end
  else
    settle(k.settle, job, id, outcome, {h[12], h[13]})
  end
  redis.call('EXPIRE', job, c.ttl)
  redis.call('EXPIRE', k.log, c.ttl)
  local doc = nil
  if h[14] == '1' then  -- a request waits for this end: the entry carries the document
    doc = cjson.encode(redis.call('HGETALL', job))
    if #doc > DOC_MAX then doc = nil end  -- the request reads it itself
  end
  mark_done(k.done, k.finished, id, outcome, doc)
  return outcome
end

if ARGV[1] ~= '*' then
  local usage = {}
  for i = 13, #ARGV do usage[#usage + 1] = ARGV[i] end
  return finish_one(
    {job = KEYS[1], stream = KEYS[2], events = KEYS[3], delayed = KEYS[4], log = KEYS[5],
     ledger = KEYS[6], settle = KEYS[7], done = KEYS[8], finished = KEYS[9], user = KEYS[10],
     dependents = KEYS[11]},
    {token = ARGV[1], outcome = ARGV[3], exit_code = ARGV[4], result = ARGV[5],
     err = ARGV[6], reason = ARGV[7], retry_ms = tonumber(ARGV[10]), owner = ARGV[12],
     usage = usage},
    {group = ARGV[2], maxlen = ARGV[8], ttl = tonumber(ARGV[9]), worker = ARGV[11],
     now = now_ms()})
end

local events, delayed, ledger, settle_stream, finished = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5]
local c = {group = ARGV[2], maxlen = ARGV[3], ttl = tonumber(ARGV[4]), worker = ARGV[5],
           now = now_ms()}
local out = {}
local ki, ai = 6, 6
while ai <= #ARGV do
  local job, stream, log, done = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], KEYS[ki + 3]
  local user, dependents = KEYS[ki + 4], KEYS[ki + 5]
  ki = ki + 6
  local n = tonumber(ARGV[ai + 8])
  local usage = {}
  for i = 1, 2 * n do usage[i] = ARGV[ai + 8 + i] end
  out[#out + 1] = finish_one(
    {job = job, stream = stream, events = events, delayed = delayed, log = log,
     ledger = ledger, settle = settle_stream, done = done, finished = finished, user = user,
     dependents = dependents},
    {token = ARGV[ai], outcome = ARGV[ai + 1], exit_code = ARGV[ai + 2],
     result = ARGV[ai + 3], err = ARGV[ai + 4], reason = ARGV[ai + 5],
     retry_ms = tonumber(ARGV[ai + 6]), owner = ARGV[ai + 7], usage = usage}, c)
  ai = ai + 9 + 2 * n
end
return out
