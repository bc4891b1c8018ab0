-- reclaim.lua: requeue jobs whose worker died, or that a stopping worker hands back. The
-- caller found dispatch entries pending on consumers whose heartbeat expired (or the
-- worker names its own); here each job goes back to its queue with its old score (a lost
-- attempt spends no retry), or fails as a poison job once it was lost more than
-- max_deliveries times. A handed-back attempt is counted apart (`handed_back`): it spends
-- no retry and never makes a job poison, so rolling restarts cannot fail a long job.
--
-- KEYS[1] dispatch stream     {tidal}:dispatch:<queue>
-- KEYS[2] queue zset          {tidal}:queue:<queue>
-- KEYS[3] events stream       {tidal}:events
-- KEYS[4] ledger hash         {tidal}:ledger
-- KEYS[5] settle stream       {tidal}:settle
-- KEYS[6] finished stream     {tidal}:finished (wakes the API's waits for the end)
-- per entry i (stride 2, from KEYS[7]): its job hash, its done stream (wakes its log
--   followers when it ends here)
-- ARGV[1] consumer group of the dispatch stream
-- ARGV[2] events MAXLEN
-- ARGV[3] max deliveries (a job lost more often fails with reason 'poison')
-- ARGV[4] TTL in seconds for a finished job's hash
-- ARGV[5] scheduler id (or the worker handing back)
-- ARGV[6] why: 'lost' (its worker died) or 'handed_back' (its worker stopped gracefully)
-- ARGV[6 + i] dispatch entry id of the i-th job
-- Returns {requeued, ended} (ended: failed as poison, or cancelled while its worker died).

local stream, queue, events, ledger, settle_stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local finished = KEYS[6]
local group, maxlen, max_deliveries, ttl, by = ARGV[1], ARGV[2], tonumber(ARGV[3]),
  tonumber(ARGV[4]), ARGV[5]
local handed_back = ARGV[6] == 'handed_back'
local now = now_ms()
local requeued, failed = 0, 0

for i = 1, (#KEYS - 6) / 2 do
  local job, done, entry = KEYS[5 + 2 * i], KEYS[6 + 2 * i], ARGV[6 + i]
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'score', 'lost', 'worker',
                       'cancel')
  if (h[1] == 'running' or h[1] == 'dispatched') and h[2] == entry then
    release_resources(job, ledger)
    local lost = tonumber(h[5]) or 0
    if h[1] == 'running' then
      if handed_back then redis.call('HINCRBY', job, 'handed_back', 1)
      else lost = redis.call('HINCRBY', job, 'lost', 1) end
    end
    local final, reason = nil, nil
    if h[7] == '1' then final, reason = 'cancelled', 'cancelled' end
    if not final and lost > max_deliveries then final, reason = 'failed', 'poison' end
    if final then
      redis.call('HSET', job, 'state', final, 'finished_at', now, 'reason', reason,
                 'error', reason == 'poison' and 'lost with its worker too many times' or '',
                 'dispatch_id', '')
      emit(events, maxlen, job, h[3], final, now, by, {'reason', reason, 'lost', lost})
      settle(settle_stream, job, h[3], final)
      mark_done(done, finished, h[3], final)
      redis.call('EXPIRE', job, ttl)
      failed = failed + 1
    else
      redis.call('ZADD', queue, tonumber(h[4]) or now, h[3])
      redis.call('HSET', job, 'state', 'queued', 'wait_reason', 'priority', 'dispatch_id', '',
                 'worker', '')
      emit(events, maxlen, job, h[3], 'queued', now, by,
           {'wait_reason', 'priority', 'reason', handed_back and 'handed_back' or 'worker_lost',
            'lost_worker', h[6] or ''})
      requeued = requeued + 1
    end
  end
end
return {requeued, failed}
