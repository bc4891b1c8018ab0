-- promote_due.lua: jobs whose time has come leave the delayed set (scheduled starts and
-- retry backoff) and are enqueued: behind their host's holder or in their queue, with
-- their age counted from when they became due. Due-ness is decided by Redis' clock; the
-- caller only proposes candidates. The due time stays on the hash as `due_at`: the
-- mirror measures the wait of a job's last attempt from it.
--
-- KEYS[1] delayed zset        {tidal}:delayed
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] host-names set      {tidal}:hosts
-- per candidate i (stride 4, from KEYS[4]): job hash, queue zset, host string, hostwait zset
-- ARGV[1] events MAXLEN
-- ARGV[2] priority step in ms
-- ARGV[3] scheduler id
-- ARGV[3 + i] job id of the i-th candidate
-- Returns the number of jobs promoted.

local delayed, events, hosts = KEYS[1], KEYS[2], KEYS[3]
local maxlen, step, by = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local promoted = 0
local due_ids, seen = {}, {}  -- out of the delayed set with one ZREM at the end
local k = {delayed = delayed, hosts = hosts}

for i = 0, (#KEYS - 3) / 4 - 1 do
  k.job, k.queue, k.host, k.hostwait = KEYS[4 + 4 * i], KEYS[5 + 4 * i], KEYS[6 + 4 * i],
    KEYS[7 + 4 * i]
  local id = ARGV[4 + i]
  local due = tonumber(redis.call('ZSCORE', delayed, id))
  if due and due <= now and not seen[id] then  -- (an id proposed twice goes once)
    seen[id] = true
    due_ids[#due_ids + 1] = id
    -- one HMGET: its first four fields are the ones enqueue reads
    local h = redis.call('HMGET', k.job, 'priority', 'scheduled_at', 'host', 'sub_seq', 'state')
    if h[5] == 'queued' or h[5] == 'retrying' then
      redis.call('HDEL', k.job, 'scheduled_at')
      h[2] = false  -- its start time has come: enqueue must not delay it again
      local reason = enqueue(k, id, now, step, due, h, {'due_at', due})
      emit(events, maxlen, k.job, id, 'queued', now, by, {'wait_reason', reason})
      promoted = promoted + 1
    end
  end
end
for i = 1, #due_ids, 1000 do
  redis.call('ZREM', delayed, unpack(due_ids, i, math.min(i + 999, #due_ids)))
end
return promoted
