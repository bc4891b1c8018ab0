-- admit.lua: move a batch of submitted jobs from `pending` into their queue (or the
-- delayed set for a future start), and acknowledge their submission entries.
-- Admission is idempotent: a job that is no longer pending is only acknowledged,
-- so a scheduler killed between reading and admitting leaves nothing half done.
--
-- KEYS[1] submissions stream  {tidal}:submissions
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] delayed zset        {tidal}:delayed
-- KEYS[4] queue-names set     {tidal}:queues
-- KEYS[5 + 2(i-1)] job hash of the i-th entry
-- KEYS[6 + 2(i-1)] queue zset of the i-th job
-- ARGV[1] consumer group
-- ARGV[2] events MAXLEN
-- ARGV[3] priority step in ms
-- ARGV[4] scheduler id (who made the change)
-- ARGV[5 + 2(i-1)] submissions entry id of the i-th job
-- ARGV[6 + 2(i-1)] queue name of the i-th job
-- Returns the number of jobs admitted.

local subs, events, delayed, queues = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, maxlen, step, by = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local admitted = 0

for i = 1, (#KEYS - 4) / 2 do
  local job, queue = KEYS[3 + 2 * i], KEYS[4 + 2 * i]
  local entry, qname = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  redis.call('XACK', subs, group, entry)
  redis.call('XDEL', subs, entry)
  local h = redis.call('HMGET', job, 'state', 'id', 'created_at', 'priority', 'scheduled_at')
  if h[1] == 'pending' then
    local id, created, level, due = h[2], tonumber(h[3]), tonumber(h[4]) or 2, tonumber(h[5])
    redis.call('SADD', queues, qname)
    if due and due > now then
      redis.call('ZADD', delayed, due, id)
      redis.call('HSET', job, 'state', 'queued', 'wait_reason', 'scheduled_at', 'admitted_at', now)
      emit(events, maxlen, job, id, 'queued', now, by, {'wait_reason', 'scheduled_at'})
    else
      local score = created + level * step
      redis.call('ZADD', queue, score, id)
      redis.call('HSET', job, 'state', 'queued', 'wait_reason', 'priority', 'admitted_at', now,
                 'score', score)
      emit(events, maxlen, job, id, 'queued', now, by, {'wait_reason', 'priority'})
    end
    admitted = admitted + 1
  end
end
return admitted
