-- resolve.lua: a job ended; tell one of its dependents. The dependency is crossed off;
-- if it ended the wrong way for the dependent's condition, the dependent fails with
-- reason dependency_failed (and is settled in turn, so the failure runs down the
-- chain); if it was the last one the dependent waited for, the dependent is enqueued.
--
-- KEYS[1] events stream, KEYS[2] settle stream
-- KEYS[3] dependent's job hash, KEYS[4] dependent's deps set
-- KEYS[5] its queue zset, KEYS[6] delayed zset, KEYS[7] its host string,
-- KEYS[8] its hostwait zset, KEYS[9] host-names set, KEYS[10] stale zset
-- ARGV[1] id of the job that ended, ARGV[2] the state it ended in
-- ARGV[3] events MAXLEN, ARGV[4] priority step ms, ARGV[5] scheduler id
-- Returns 'enqueued', 'failed', 'waiting' or 'skipped' (not waiting for dependencies).

local events, settle_stream, job, deps = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local k = {job = job, queue = KEYS[5], delayed = KEYS[6], host = KEYS[7], hostwait = KEYS[8],
           hosts = KEYS[9]}
local stale = KEYS[10]
local dep_id, dep_state, maxlen, step, by = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]

if redis.call('SREM', deps, dep_id) == 0 then return 'skipped' end
local field = 'dep:' .. dep_id
local h = redis.call('HMGET', job, 'state', 'wait_reason', 'id', field, 'created_at')
if h[1] ~= 'queued' or h[2] ~= 'dependencies' then return 'skipped' end
local id, cond = h[3], h[4] or 'success'
local now = now_ms()

local ok = cond == 'any'
  or (cond == 'failure' and (dep_state == 'failed' or dep_state == 'cancelled' or dep_state == 'expired'))
  or (cond == 'success' and dep_state == 'completed')
if not ok then
  redis.call('DEL', deps)
  redis.call('ZREM', stale, id)
  fail_dependency({job = job, events = events, settle = settle_stream}, id, dep_id, dep_state,
                  now, maxlen, by)
  return 'failed'
end
if redis.call('SCARD', deps) > 0 then return 'waiting' end
local reason = enqueue(k, id, now, step, now)
emit(events, maxlen, job, id, 'queued', now, by, {'wait_reason', reason})
return 'enqueued'
