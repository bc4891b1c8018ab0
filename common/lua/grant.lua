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

return grant_host({host = host, hostwait = hostwait, hosts = hosts, waiter_job = waiter_job,
                   waiter_queue = waiter_queue}, released, waiter, name)
