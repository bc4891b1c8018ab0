-- submit.lua: accept one job: write its hash (state pending, stamped with its submission
-- order), queue its id on the submissions stream for a scheduler, count it among its
-- owner's active jobs, record the first event. Idempotent twice over: the job id is
-- chosen by the caller before the call (a retried call finds the hash), and an
-- idempotency key maps to the first job id for its TTL. Limits are checked here, so
-- they hold however many API processes submit at once.
--
-- KEYS[1] job hash            {tidal}:job:<id>
-- KEYS[2] submissions stream  {tidal}:submissions
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] idempotency string  {tidal}:idem:<owner>:<key>  (ignored when ARGV[3] = 0)
-- KEYS[5] user hash           {tidal}:user:<owner>
-- KEYS[6] queue zset          {tidal}:queue:<queue>
-- KEYS[7] submission counter  {tidal}:seq
-- ARGV[1] job id
-- ARGV[2] events MAXLEN (approximate)
-- ARGV[3] idempotency TTL in seconds (0 = no key)
-- ARGV[4] owner (who made the change)
-- ARGV[5] the owner's limit of active jobs (0 = none)
-- ARGV[6] the queue's size limit (0 = none)
-- ARGV[7..] field, value pairs of the job hash (must include queue; host if any)
-- The submissions entry carries the id, queue, host and whether it has dependencies.
-- Returns {1, id, created_ms} accepted, {0, existing_id, created_ms} deduplicated,
--   {-4, active} over the owner's limit, {-5, size} over the queue's limit.
--
-- Batch mode (ARGV[1] = '*'): many jobs of one owner in one call (the API's POST /jobs),
-- checked against the limits as a whole before anything is written, so a batch is
-- accepted whole or refused whole. The same writes per job as above, with the counters
-- (user's active jobs, submission counter) bumped once per call and the events stream
-- trimmed (MAXLEN ~) once per call.
-- KEYS[1] submissions stream, KEYS[2] events stream, KEYS[3] user hash,
-- KEYS[4] submission counter, then three keys per job: job hash, idempotency string (the
--   job hash again when it has no key), queue zset
-- ARGV[2] events MAXLEN, ARGV[3] owner, ARGV[4] limit of active jobs (0 = none),
-- ARGV[5] queue size limit (0 = none), ARGV[6] stale_after (ms) of jobs that give none
--   (0 = none), ARGV[7] the priority step (ms) for direct admission ('' = none), then per
--   job: id, idempotency TTL (0 = no key), the values of the fields
--   every job has: kind, queue, priority, retries, spec; then n = the number of
--   field/value items that follow, and those n items (host, stale_after, ndeps, ...).
--   Fixed fields by position and one default for all: about half the arguments per job
--   (each one costs the API its packing and this script a Lua string).
-- Returns {1, status, id, created_ms, status, id, created_ms, ...} with status 1 accepted or
--   0 deduplicated (id: the existing job, created_ms 0 when it is not known);
--   {-4, active} or {-5, size, i} (i: the first job of the full queue) with nothing written.
-- A job whose idempotency key an earlier job of the same call took is deduplicated to it.
--
-- Direct admission (ARGV[7] not '', a call of one job, six more keys at the end: delayed
-- zset, queue-names set, stale zset, ledger hash, the queue's dispatch stream and capacity
-- hash): a job with no host and no dependencies is admitted here, as admit.lua would, and
-- dispatched, as a worker's dispatch.lua call would (the published capacity, and only if
-- it is the queue's head), instead of going through the submissions stream and a
-- scheduler. A lone job then reaches a worker without waking the scheduler at all.

-- admit.lua for one plain job, then a head-checked dispatch on the published capacity
local function admit_direct(key, queue, id, now, step, owner, maxlen, h, stale_after)
  local n = #KEYS
  local events, delayed, queues, stale = KEYS[2], KEYS[n - 5], KEYS[n - 4], KEYS[n - 3]
  local k = {job = key, queue = queue, delayed = delayed}
  local reason = enqueue(k, id, now, step, now, h, {'admitted_at', now})
  if tonumber(stale_after) then
    redis.call('ZADD', stale, math.max(now, tonumber(h[2]) or 0) + tonumber(stale_after), id)
  end
  emit(events, maxlen, key, id, 'queued', now, owner, {'wait_reason', reason})
  redis.call('SADD', queues, h.queue)
  if reason ~= 'priority' then return end
  local cap = redis.call('HMGET', KEYS[n], 'slots', 'cpu', 'memory_mb', 'gpu', 'max_cpu',
                         'max_memory_mb', 'max_gpu')
  if cap[1] and redis.call('ZRANGE', queue, 0, 0)[1] == id then
    dispatch_jobs(queue, KEYS[n - 1], events, KEYS[n - 2], stale, cap, {{key, id}}, maxlen,
                  owner)
  end
end

local function submit_batch()
  local subs, events, user, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local maxlen, owner = ARGV[2], ARGV[3]
  local max_active, max_queue = tonumber(ARGV[4]), tonumber(ARGV[5])
  local stale_default = ARGV[6] ~= '0' and ARGV[6] or nil
  local direct = ARGV[7] ~= '' and tonumber(ARGV[7])
  -- per job (index i): where its arguments start, and 1 when it is to be written; its
  -- keys are KEYS[3i + 2 .. 3i + 4]
  local starts, fresh_at, out, taken, per_queue = {}, {}, {1}, {}, {}
  local fresh, a, i = 0, 8, 0
  while a <= #ARGV do
    i = i + 1
    local key, idem, id, ttl = KEYS[3 * i + 2], KEYS[3 * i + 3], ARGV[a], tonumber(ARGV[a + 1])
    starts[i] = a
    local status, rid, created = 1, id, 0
    local earlier = ttl > 0 and (taken[idem] or redis.call('GET', idem))
    if earlier then
      status, rid = 0, earlier
    elseif taken[key] or redis.call('EXISTS', key) == 1 then
      status = 0
      created = tonumber(redis.call('HGET', key, 'created_at')) or 0
    else
      fresh = fresh + 1
      fresh_at[i] = true
      taken[key] = id
      if ttl > 0 then taken[idem] = id end
      local queue = KEYS[3 * i + 4]
      local q = per_queue[queue]
      if not q then
        q = {count = 0, first = i}
        per_queue[queue] = q
      end
      q.count = q.count + 1
    end
    out[3 * i - 1], out[3 * i], out[3 * i + 1] = status, rid, created
    a = a + 8 + tonumber(ARGV[a + 7])
  end
  if fresh == 0 then return out end

  local active = tonumber(redis.call('HGET', user, 'active')) or 0
  if max_active > 0 and active + fresh > max_active then return {-4, active} end
  if max_queue > 0 then
    for queue, q in pairs(per_queue) do
      local size = redis.call('ZCARD', queue)
      if size + q.count > max_queue then return {-5, size, q.first} end
    end
  end

  local now = now_ms()
  local sub_seq = redis.call('INCRBY', seq, fresh) - fresh
  for j = 1, i do
    if fresh_at[j] then
      sub_seq = sub_seq + 1
      local at, key = starts[j], KEYS[3 * j + 2]
      local id, n = ARGV[at], tonumber(ARGV[at + 7])
      local host, ndeps, scheduled, stale = '', '0', nil, stale_default
      if n == 0 and stale_default then  -- the common case: one call, no table
        redis.call('HSET', key, 'id', id, 'state', 'pending', 'created_at', now,
                   'attempt', 0, 'owner', owner, 'sub_seq', sub_seq, 'seq', 1,
                   'kind', ARGV[at + 2], 'queue', ARGV[at + 3], 'priority', ARGV[at + 4],
                   'retries', ARGV[at + 5], 'spec', ARGV[at + 6], 'stale_after', stale_default)
      else
        local fields = {'HSET', key, 'id', id, 'state', 'pending', 'created_at', now,
                        'attempt', 0, 'owner', owner, 'sub_seq', sub_seq, 'seq', 1,
                        'kind', ARGV[at + 2], 'queue', ARGV[at + 3], 'priority', ARGV[at + 4],
                        'retries', ARGV[at + 5], 'spec', ARGV[at + 6]}
        local own_stale = false
        for f = at + 8, at + 7 + n, 2 do
          local name, value = ARGV[f], ARGV[f + 1]
          fields[#fields + 1], fields[#fields + 2] = name, value
          if name == 'host' then host = value
          elseif name == 'ndeps' then ndeps = value
          elseif name == 'scheduled_at' then scheduled = value
          elseif name == 'stale_after' then stale, own_stale = value, true end
        end
        if stale and not own_stale then
          fields[#fields + 1], fields[#fields + 2] = 'stale_after', stale
        end
        redis.call(unpack(fields))
      end
      local ttl = tonumber(ARGV[at + 1])
      if ttl > 0 then redis.call('SET', KEYS[3 * j + 3], id, 'EX', ttl) end
      -- the first event, as emit() writes it (the hash's seq was set to 1 above); the
      -- stream is trimmed once for the call, below
      redis.call('XADD', events, '*', 'job', id, 'seq', 1, 'state', 'pending', 'at', now,
                 'by', owner)
      if direct and i == 1 and host == '' and ndeps == '0' then
        local h = {ARGV[at + 4], scheduled, nil, sub_seq, queue = ARGV[at + 3]}
        admit_direct(key, KEYS[3 * j + 4], id, now, direct, owner, maxlen, h, stale)
      else
        redis.call('XADD', subs, '*', 'id', id, 'q', ARGV[at + 3], 'h', host, 'd', ndeps)
      end
      out[3 * j + 1] = now
    end
  end
  redis.call('XTRIM', events, 'MAXLEN', '~', maxlen)
  redis.call('HINCRBY', user, 'active', fresh)
  return out
end

if ARGV[1] == '*' then return submit_batch() end

local job, subs, events, idem, user, queue, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6], KEYS[7]
local id, maxlen, idem_ttl, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local max_active, max_queue = tonumber(ARGV[5]), tonumber(ARGV[6])

if idem_ttl > 0 then
  local existing = redis.call('GET', idem)
  if existing then return {0, existing, 0} end
end
if redis.call('EXISTS', job) == 1 then
  return {0, id, tonumber(redis.call('HGET', job, 'created_at')) or 0}
end
local active = tonumber(redis.call('HGET', user, 'active')) or 0
if max_active > 0 and active >= max_active then return {-4, active} end
local size = redis.call('ZCARD', queue)
if max_queue > 0 and size >= max_queue then return {-5, size} end

local now = now_ms()
local fields = {'HSET', job, 'id', id, 'state', 'pending', 'created_at', now, 'attempt', 0,
                'owner', owner, 'sub_seq', redis.call('INCR', seq)}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call(unpack(fields))
redis.call('HINCRBY', user, 'active', 1)
if idem_ttl > 0 then redis.call('SET', idem, id, 'EX', idem_ttl) end
local h = redis.call('HMGET', job, 'queue', 'host', 'ndeps')
redis.call('XADD', subs, '*', 'id', id, 'q', h[1] or 'default', 'h', h[2] or '',
           'd', h[3] or '0')
emit(events, maxlen, job, id, 'pending', now, owner)
return {1, id, now}
