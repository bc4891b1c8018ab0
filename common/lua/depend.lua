-- depend.lua: admit one submitted job that has dependencies. Each dependency is checked
-- against what it asks (on 'success': completed; on 'failure': failed, cancelled or
-- expired; on 'any': any end). One already settled the wrong way fails the job at once
-- with reason dependency_failed; unfinished ones are recorded both ways (deps of the job,
-- dependents of each dependency) and the job waits with wait_reason 'dependencies'; with
-- none left to wait for, it is enqueued like any job.
--
-- KEYS[1] submissions stream  {tidal}:submissions
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] settle stream       {tidal}:settle
-- KEYS[4] queue-names set     {tidal}:queues
-- KEYS[5] job hash            {tidal}:job:<id>
-- KEYS[6] deps set            {tidal}:deps:<id>
-- KEYS[7] queue zset, KEYS[8] delayed zset, KEYS[9] host string, KEYS[10] hostwait zset,
-- KEYS[11] host-names set, KEYS[12] stale zset,
-- KEYS[13] done stream        {tidal}:done:<id> (wakes its log followers if it fails here)
-- KEYS[14] finished stream    {tidal}:finished (wakes the API's waits for the end, likewise)
-- per dependency j (stride 2, from KEYS[15]): its job hash, its dependents set
-- ARGV[1] consumer group, ARGV[2] submissions entry id, ARGV[3] events MAXLEN,
-- ARGV[4] priority step ms, ARGV[5] scheduler id, ARGV[6] queue name
-- per dependency j (stride 2, from ARGV[7]): its id, its condition (success|failure|any)
-- Returns 'queued' (waiting or enqueued), 'failed' (a dependency settled the wrong way),
--   or 'skipped' (the job was no longer pending).

local subs, events, settle_stream, queues, job, deps = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local k = {job = job, queue = KEYS[7], delayed = KEYS[8], host = KEYS[9], hostwait = KEYS[10],
           hosts = KEYS[11]}
local stale, done, finished = KEYS[12], KEYS[13], KEYS[14]
local group, entry, maxlen, step, by, qname = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  ARGV[5], ARGV[6]
local now = now_ms()

redis.call('XACK', subs, group, entry)
redis.call('XDEL', subs, entry)
local h = redis.call('HMGET', job, 'state', 'id', 'created_at', 'stale_after', 'scheduled_at')
if h[1] ~= 'pending' then return 'skipped' end
local id, created = h[2], tonumber(h[3]) or now
redis.call('SADD', queues, qname)

local function satisfied(state, cond)
  if cond == 'any' then return true end
  if cond == 'failure' then return state == 'failed' or state == 'cancelled' or state == 'expired' end
  return state == 'completed'
end

local waiting = 0
for j = 0, (#KEYS - 14) / 2 - 1 do
  local dep_job, dependents = KEYS[15 + 2 * j], KEYS[16 + 2 * j]
  local dep_id, cond = ARGV[7 + 2 * j], ARGV[8 + 2 * j]
  local state = redis.call('HGET', dep_job, 'state') or 'expired'
  if is_terminal(state) then
    if not satisfied(state, cond) then
      fail_dependency({job = job, events = events, settle = settle_stream, done = done,
                       finished = finished}, id, dep_id, state, now, maxlen, by)
      return 'failed'
    end
  else
    local field = 'dep:' .. dep_id
    redis.call('HSET', job, field, cond)
    redis.call('SADD', deps, dep_id)
    redis.call('SADD', dependents, id)
    waiting = waiting + 1
  end
end

if tonumber(h[4]) then
  redis.call('ZADD', stale, math.max(created, tonumber(h[5]) or 0) + tonumber(h[4]), id)
end
redis.call('HSET', job, 'admitted_at', now)
local reason = 'dependencies'
if waiting > 0 then
  redis.call('HSET', job, 'state', 'queued', 'wait_reason', reason)
else
  reason = enqueue(k, id, now, step, created)
end
emit(events, maxlen, job, id, 'queued', now, by, {'wait_reason', reason})
return 'queued'
