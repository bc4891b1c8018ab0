-- submit.lua: accept one job: write its hash (state pending), queue its id on the
-- submissions stream for a scheduler, record the first event. Idempotent twice over:
-- the job id is chosen by the caller before the call (a retried call finds the hash),
-- and an idempotency key maps to the first job id for its TTL.
--
-- KEYS[1] job hash            {tidal}:job:<id>
-- KEYS[2] submissions stream  {tidal}:submissions
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] idempotency string  {tidal}:idem:<owner>:<key>  (ignored when ARGV[3] = 0)
-- ARGV[1] job id
-- ARGV[2] events MAXLEN (approximate)
-- ARGV[3] idempotency TTL in seconds (0 = no key)
-- ARGV[4] owner (who made the change)
-- ARGV[5..] field, value pairs of the job hash
-- The submissions entry carries the id and the queue name (fields id, q).
-- Returns {1, id, created_ms} when accepted, {0, existing_id, created_ms} when deduplicated.

local job, subs, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, maxlen, idem_ttl, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

if idem_ttl > 0 then
  local existing = redis.call('GET', idem)
  if existing then return {0, existing, 0} end
end
if redis.call('EXISTS', job) == 1 then
  return {0, id, tonumber(redis.call('HGET', job, 'created_at')) or 0}
end

local now = now_ms()
local fields = {'HSET', job, 'id', id, 'state', 'pending', 'created_at', now, 'attempt', 0,
                'owner', owner}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call(unpack(fields))
if idem_ttl > 0 then redis.call('SET', idem, id, 'EX', idem_ttl) end
redis.call('XADD', subs, '*', 'id', id, 'q', redis.call('HGET', job, 'queue') or 'default')
emit(events, maxlen, job, id, 'pending', now, owner)
return {1, id, now}
