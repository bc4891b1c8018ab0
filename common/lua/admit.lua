-- admit.lua: move a batch of submitted jobs without dependencies from `pending` to where
-- they wait (their queue, behind their host's holder, or the delayed set), and
-- acknowledge their submission entries. Idempotent: a job that is no longer pending is
-- only acknowledged, so a scheduler killed between reading and admitting leaves nothing
-- half done. (Jobs with dependencies are admitted by depend.lua.)
--
-- KEYS[1] submissions stream  {tidal}:submissions
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] delayed zset        {tidal}:delayed
-- KEYS[4] queue-names set     {tidal}:queues
-- KEYS[5] host-names set      {tidal}:hosts
-- KEYS[6] stale zset          {tidal}:stale
-- per job i (stride 4, from KEYS[7]): job hash, queue zset, host string, hostwait zset
--   (for a job without a host, any key may stand in for the last two: they are unused)
-- ARGV[1] consumer group
-- ARGV[2] events MAXLEN
-- ARGV[3] priority step in ms
-- ARGV[4] scheduler id (who made the change)
-- per job i (stride 2, from ARGV[5]): submissions entry id, queue name
-- Returns the number of jobs admitted.

local subs, events, delayed, queues, hosts, stale = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local group, maxlen, step, by = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local admitted = 0

for i = 0, (#KEYS - 6) / 4 - 1 do
  local k = {job = KEYS[7 + 4 * i], queue = KEYS[8 + 4 * i], host = KEYS[9 + 4 * i],
             hostwait = KEYS[10 + 4 * i], delayed = delayed, hosts = hosts}
  local entry, qname = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  redis.call('XACK', subs, group, entry)
  redis.call('XDEL', subs, entry)
  local h = redis.call('HMGET', k.job, 'state', 'id', 'created_at', 'stale_after', 'scheduled_at')
  if h[1] == 'pending' then
    redis.call('SADD', queues, qname)
    local created = tonumber(h[3]) or now
    local reason = enqueue(k, h[2], now, step, created)
    if tonumber(h[4]) then
      local from = math.max(created, tonumber(h[5]) or 0)
      redis.call('ZADD', stale, from + tonumber(h[4]), h[2])
    end
    redis.call('HSET', k.job, 'admitted_at', now)
    emit(events, maxlen, k.job, h[2], 'queued', now, by, {'wait_reason', reason})
    admitted = admitted + 1
  end
end
return admitted
