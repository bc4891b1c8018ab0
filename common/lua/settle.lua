-- settle.lua: the follow-up of a batch of jobs that ended, one entry of the settle stream
-- each, in stream order: hand the job's host to the first waiter (grant_host), tell each
-- of its dependents (resolve_dependent: enqueued, failed in turn, or still waiting), then
-- acknowledge the entry, count the job off its owner's active jobs and drop its
-- dependency sets. The caller first proposes nothing; an entry whose host has waiters or
-- whose job has dependents is left unacknowledged and comes back with what the caller must
-- read (the waiter at the head, the dependents), so a job with neither costs no read at
-- all. Every step is idempotent and the counter moves only on the first acknowledgement,
-- so an entry processed twice (a scheduler died, or a proposal went stale) counts once.
--
-- KEYS[1] settle stream       {tidal}:settle
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] delayed zset        {tidal}:delayed
-- KEYS[4] host-names set      {tidal}:hosts
-- KEYS[5] stale zset          {tidal}:stale
-- KEYS[6] finished stream     {tidal}:finished (written should a dependent fail)
-- then per entry, in order, from KEYS[7]:
--   its owner's user hash, its deps set, its dependents set;
--   with a host: the host string, its hostwait zset;
--     with a proposed waiter: the waiter's job hash, the waiter's queue zset;
--   per dependent told: its job hash, deps set, queue zset, host string, hostwait zset,
--     done stream (woken should the dependent fail)
--     (for a dependent without a host, any key may stand in for the last two)
-- ARGV[1] consumer group, ARGV[2] events MAXLEN, ARGV[3] priority step ms,
-- ARGV[4] scheduler id
-- then per entry: settle entry id, job id, the state it ended in, host name ('' none),
--   proposed waiter ('' none), n = dependents told (-1: not read yet; their keys above)
-- Returns one row per entry left unacknowledged:
--   {entry index (from 1), host needs a waiter (0|1), the waiter at the head ('' none),
--    dependents need telling (0|1), the dependents' ids}.

local stream, events, delayed, hosts, stale = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local finished = KEYS[6]
local group, maxlen, step, by = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local ki, ai = 7, 5
local left = {}
local index = 0

while ai <= #ARGV do
  index = index + 1
  local entry, id, state, host, waiter = ARGV[ai], ARGV[ai + 1], ARGV[ai + 2], ARGV[ai + 3],
    ARGV[ai + 4]
  local n = tonumber(ARGV[ai + 5])
  ai = ai + 6
  local user, deps, dependents = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
  ki = ki + 3
  local need_host, head, need_deps, members = 0, '', 0, {}

  if host ~= '' then
    local hk = {host = KEYS[ki], hostwait = KEYS[ki + 1], hosts = hosts}
    ki = ki + 2
    if waiter ~= '' then
      hk.waiter_job, hk.waiter_queue = KEYS[ki], KEYS[ki + 1]
      ki = ki + 2
    end
    if grant_host(hk, id, waiter, host) == 'retry' then
      local hostwait = hk.hostwait
      need_host = 1
      head = redis.call('ZRANGE', hostwait, 0, 0)[1] or ''
    end
  end

  if n < 0 then
    if redis.call('SCARD', dependents) > 0 then
      need_deps = 1
      members = redis.call('SMEMBERS', dependents)
    end
  else
    for j = 1, n do
      local dk = {job = KEYS[ki], deps = KEYS[ki + 1], queue = KEYS[ki + 2], host = KEYS[ki + 3],
                  hostwait = KEYS[ki + 4], done = KEYS[ki + 5], delayed = delayed, hosts = hosts,
                  stale = stale, events = events, settle = stream, finished = finished}
      ki = ki + 6
      resolve_dependent(dk, id, state, now, maxlen, step, by)
    end
  end

  if need_host == 1 or need_deps == 1 then
    left[#left + 1] = {index, need_host, head, need_deps, members}
  else
    if redis.call('XACK', stream, group, entry) == 1
        and (tonumber(redis.call('HGET', user, 'active')) or 0) > 0 then
      redis.call('HINCRBY', user, 'active', -1)
    end
    redis.call('XDEL', stream, entry)
    redis.call('DEL', deps, dependents)
  end
end
return left
