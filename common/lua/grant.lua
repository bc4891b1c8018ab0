-- grant.lua: hand a host on. The job that ended (or whichever job the caller names as
-- released) lets go of the host if it held it; the first waiter, in submission order,
-- then holds the host and joins its queue with the score it was given on admission, so
-- it goes before any newer job. The caller proposes the waiter it read at the head.
--
-- KEYS[1] host string         {tidal}:host:<host>
-- KEYS[2] hostwait zset       {tidal}:hostwait:<host>
-- KEYS[3] host-names set      {tidal}:hosts
-- KEYS[4] waiter's job hash   (any key when there is no waiter)
-- KEYS[5] waiter's queue zset (any key when there is no waiter)
-- ARGV[1] id of the released job, ARGV[2] the waiter's id ('' for none), ARGV[3] host name
-- Returns 'granted', 'held' (another job holds it), 'free' (no one waits),
--   or 'retry' (the proposed waiter is not the head any more: read again).

local host, hostwait, hosts, waiter_job, waiter_queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local released, waiter, name = ARGV[1], ARGV[2], ARGV[3]

local holder = redis.call('GET', host)
if holder and holder ~= released then return 'held' end
if holder then redis.call('DEL', host) end
if waiter == '' then
  if redis.call('ZCARD', hostwait) == 0 then redis.call('SREM', hosts, name) return 'free' end
  return 'retry'
end
local head = redis.call('ZRANGE', hostwait, 0, 0)
if head[1] ~= waiter then return 'retry' end
redis.call('ZREM', hostwait, waiter)
local h = redis.call('HMGET', waiter_job, 'state', 'score')
if h[1] ~= 'queued' then return 'retry' end
redis.call('SET', host, waiter)
redis.call('ZADD', waiter_queue, tonumber(h[2]) or 0, waiter)
redis.call('HSET', waiter_job, 'wait_reason', 'priority')
return 'granted'
