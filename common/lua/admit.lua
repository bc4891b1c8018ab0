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
local n = (#KEYS - 6) / 4

-- Commands that take many members are sent once per batch, not once per job (each
-- command run from Lua costs about a microsecond of its own).
local entries = {}
for i = 0, n - 1 do entries[i + 1] = ARGV[5 + 2 * i] end
for i = 1, #entries, 1000 do  -- in chunks: Lua's unpack has a limit
  local j = math.min(i + 999, #entries)
  redis.call('XACK', subs, group, unpack(entries, i, j))
  redis.call('XDEL', subs, unpack(entries, i, j))
end

local names, named = {}, {}
-- one key table and one extra-fields table for the whole batch (fewer Lua objects to
-- collect: garbage collection is a tenth of the server's time here)
local k = {delayed = delayed, hosts = hosts}
local extra = {'admitted_at', now}
for i = 0, n - 1 do
  k.job, k.queue, k.host, k.hostwait = KEYS[7 + 4 * i], KEYS[8 + 4 * i], KEYS[9 + 4 * i],
    KEYS[10 + 4 * i]
  local qname = ARGV[6 + 2 * i]
  -- one HMGET per job: its first four fields are the ones enqueue reads
  local h = redis.call('HMGET', k.job, 'priority', 'scheduled_at', 'host', 'sub_seq',
                       'state', 'id', 'created_at', 'stale_after')
  if h[5] == 'pending' then
    if not named[qname] then named[qname] = true names[#names + 1] = qname end
    local id, created = h[6], tonumber(h[7]) or now
    local reason = enqueue(k, id, now, step, created, h, extra)
    if tonumber(h[8]) then
      local from = math.max(created, tonumber(h[2]) or 0)
      redis.call('ZADD', stale, from + tonumber(h[8]), id)
    end
    emit(events, maxlen, k.job, id, 'queued', now, by, {'wait_reason', reason})
    admitted = admitted + 1
  end
end
if #names > 0 then redis.call('SADD', queues, unpack(names)) end
return admitted
