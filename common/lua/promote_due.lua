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

for i = 0, (#KEYS - 3) / 4 - 1 do
  local k = {job = KEYS[4 + 4 * i], queue = KEYS[5 + 4 * i], host = KEYS[6 + 4 * i],
             hostwait = KEYS[7 + 4 * i], delayed = delayed, hosts = hosts}
  local id = ARGV[4 + i]
  local due = tonumber(redis.call('ZSCORE', delayed, id))
  if due and due <= now then
    redis.call('ZREM', delayed, id)
    local state = redis.call('HGET', k.job, 'state')
    if state == 'queued' or state == 'retrying' then
      redis.call('HDEL', k.job, 'scheduled_at')
      redis.call('HSET', k.job, 'due_at', due)
      local reason = enqueue(k, id, now, step, due)
      emit(events, maxlen, k.job, id, 'queued', now, by, {'wait_reason', reason})
      promoted = promoted + 1
    end
  end
end
return promoted
