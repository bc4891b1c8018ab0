-- start.lua: a worker claims the jobs it read from a dispatch stream. A job whose entry
-- no longer matches (cancelled, or re-dispatched to someone else) is acknowledged and
-- skipped. Starting counts the attempt.
--
-- The reply also carries what is left of the worker's lease (the PTTL of its heartbeat
-- hash; the reaper takes jobs only from workers whose hash is gone): the jobs became the
-- worker's while that lease held, so they stay its own at least that long, and the worker
-- needs no extra heartbeat to know it may start their processes.
--
-- KEYS[1] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[2] events stream       {tidal}:events
-- KEYS[3] the worker's hash   {tidal}:worker:<id>
-- KEYS[3 + i] job hash of the i-th entry
-- ARGV[1] consumer group
-- ARGV[2] events MAXLEN
-- ARGV[3] worker id
-- ARGV[3 + i] dispatch entry id of the i-th job
-- Returns, per entry, {id, attempt, spec, lease ms, owner} when started (lease ms < 0: no
-- lease left) or {id, 0, '', 0, ''} when skipped.

local stream, events, worker_hash = KEYS[1], KEYS[2], KEYS[3]
local group, maxlen, worker = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local lease = redis.call('PTTL', worker_hash)
local out = {}

for i = 1, #KEYS - 3 do
  local job, entry = KEYS[3 + i], ARGV[3 + i]
  local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'spec', 'attempt', 'seq',
                      'owner')
  if h[1] == 'dispatched' and h[2] == entry then
    local attempt, seq = (tonumber(h[5]) or 0) + 1, (tonumber(h[6]) or 0) + 1
    redis.call('HSET', job, 'state', 'running', 'worker', worker, 'started_at', now,
               'attempt', attempt, 'seq', seq)
    emit_seq(events, maxlen, seq, h[3], 'running', now, worker, {'attempt', attempt})
    out[i] = {h[3], attempt, h[4], lease, h[7] or ''}
  else
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    out[i] = {h[3] or '', 0, '', 0, ''}
  end
end
return out
