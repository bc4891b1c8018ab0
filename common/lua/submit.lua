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
-- (user's active jobs, submission counter) bumped once per call.
-- KEYS[1] submissions stream, KEYS[2] events stream, KEYS[3] user hash,
-- KEYS[4] submission counter, then three keys per job: job hash, idempotency string (the
--   job hash again when it has no key), queue zset
-- ARGV[2] events MAXLEN, ARGV[3] owner, ARGV[4] limit of active jobs (0 = none),
-- ARGV[5] queue size limit (0 = none), then per job: id, idempotency TTL (0 = no key),
--   n = the number of field/value items that follow, then those n items (queue among them)
-- Returns {1, status, id, created_ms, status, id, created_ms, ...} with status 1 accepted or
--   0 deduplicated (id: the existing job, created_ms 0 when it is not known);
--   {-4, active} or {-5, size, i} (i: the first job of the full queue) with nothing written.
-- A job whose idempotency key an earlier job of the same call took is deduplicated to it.

local function submit_batch()
  local subs, events, user, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local maxlen, owner = ARGV[2], ARGV[3]
  local max_active, max_queue = tonumber(ARGV[4]), tonumber(ARGV[5])
  local jobs, out, taken, per_queue = {}, {1}, {}, {}
  local fresh, a, k = 0, 6, 5
  while a <= #ARGV do
    local id, ttl, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local job = {key = KEYS[k], idem = KEYS[k + 1], queue = KEYS[k + 2], id = id, ttl = ttl,
                 from = a + 3, to = a + 2 + n, index = #jobs + 1}
    local status, rid, created = 1, id, 0
    local earlier = ttl > 0 and (taken[job.idem] or redis.call('GET', job.idem))
    if earlier then
      status, rid = 0, earlier
    elseif taken[job.key] or redis.call('EXISTS', job.key) == 1 then
      status = 0
      created = tonumber(redis.call('HGET', job.key, 'created_at')) or 0
    else
      fresh = fresh + 1
      taken[job.key] = id
      if ttl > 0 then taken[job.idem] = id end
      local q = per_queue[job.queue]
      if not q then
        q = {count = 0, first = job.index}
        per_queue[job.queue] = q
      end
      q.count = q.count + 1
    end
    job.status = status
    jobs[#jobs + 1] = job
    out[#out + 1], out[#out + 2], out[#out + 3] = status, rid, created
    a, k = a + 3 + n, k + 3
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
  for i = 1, #jobs do
    local job = jobs[i]
    if job.status == 1 then
      sub_seq = sub_seq + 1
      local fields = {'HSET', job.key, 'id', job.id, 'state', 'pending', 'created_at', now,
                      'attempt', 0, 'owner', owner, 'sub_seq', sub_seq, 'seq', 1}
      local entry = {'XADD', subs, '*', 'id', job.id, 'q', 'default', 'h', '', 'd', '0'}
      for f = job.from, job.to, 2 do
        local name, value = ARGV[f], ARGV[f + 1]
        fields[#fields + 1], fields[#fields + 2] = name, value
        if name == 'queue' then entry[7] = value
        elseif name == 'host' then entry[9] = value
        elseif name == 'ndeps' then entry[11] = value end
      end
      redis.call(unpack(fields))
      if job.ttl > 0 then redis.call('SET', job.idem, job.id, 'EX', job.ttl) end
      redis.call(unpack(entry))
      -- the first event, as emit() writes it (the hash's seq was set to 1 above)
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'job', job.id, 'seq', 1,
                 'state', 'pending', 'at', now, 'by', owner)
      out[(i - 1) * 3 + 4] = now
    end
  end
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
