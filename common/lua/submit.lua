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
