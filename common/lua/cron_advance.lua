-- cron_advance.lua: move a schedule to its next fire time, only if it still has the fire
-- time the caller fired (compare and set), so with several schedulers one tick moves once.
-- The tick's job was submitted before with the idempotency key of (schedule, tick), so
-- a scheduler that dies in between leaves a tick that fires again into the same job.
--
-- KEYS[1] cron zset           {tidal}:cron
-- ARGV[1] schedule name, ARGV[2] the fire time fired (ms), ARGV[3] the next one (ms)
-- Returns 1 when moved, 0 when another scheduler already moved it (or it was removed).

local cron = KEYS[1]
local name, fired, nxt = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if tonumber(redis.call('ZSCORE', cron, name)) ~= fired then return 0 end
redis.call('ZADD', cron, nxt, name)
return 1
