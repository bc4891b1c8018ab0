-- retry.lua: run a finished job again, as a new attempt of the same job: it goes back
-- to pending and through admission like a new submission (its dependencies are not
-- checked again), with a fresh retry budget. Its log continues.
--
-- KEYS[1] job hash, KEYS[2] submissions stream, KEYS[3] events stream,
-- KEYS[4] user hash of its owner, KEYS[5] its log stream, KEYS[6] its done stream
-- ARGV[1] job id, ARGV[2] who asks, ARGV[3] events MAXLEN
-- Returns 'pending', -1 when the job has not finished, -3 when there is no such job.

local job, subs, events, user, log, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local id, by, maxlen = ARGV[1], ARGV[2], ARGV[3]

local h = redis.call('HMGET', job, 'state', 'attempt', 'lost', 'queue', 'host', 'handed_back')
if not h[1] then return -3 end
if not is_terminal(h[1]) then return -1 end
local now = now_ms()
redis.call('PERSIST', job)
redis.call('PERSIST', log)
redis.call('DEL', done)  -- its followers must block again until the new attempt ends
redis.call('HDEL', job, 'finished_at', 'exit_code', 'result', 'error', 'reason', 'cancel',
           'dispatch_id', 'scheduled_at', 'ndeps', 'res_held')
redis.call('HSET', job, 'state', 'pending', 'wait_reason', '',
           'retry_base', (tonumber(h[2]) or 0) - (tonumber(h[3]) or 0) - (tonumber(h[6]) or 0))
redis.call('HINCRBY', user, 'active', 1)
redis.call('XADD', subs, '*', 'id', id, 'q', h[4] or 'default', 'h', h[5] or '', 'd', '0')
emit(events, maxlen, job, id, 'pending', now, by, {'reason', 'retry'})
return 'pending'
