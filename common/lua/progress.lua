-- progress.lua: a running attempt reports its progress. Sets the job hash's progress
-- fields, appends a progress entry (s = 'p') to the job's log stream, where followers
-- (SSE, WebSocket) see it in order with the output, and, when the worker asks, an event
-- (state 'running' with a `progress` field: not a transition, so a mirror that applies
-- events keeps the job running; the API shows it as state 'progress'). Fenced like
-- finish.lua: only the attempt that holds the job's current dispatch entry may write.
--
-- KEYS[1] job hash            {tidal}:job:<id>
-- KEYS[2] log stream          {tidal}:log:<id>
-- KEYS[3] events stream       {tidal}:events
-- ARGV[1] fencing token (the dispatch entry id)
-- ARGV[2] percent, as text (0 to 100, e.g. '40' or '12.5')
-- ARGV[3] stage ('' for none)
-- ARGV[4] message ('' for none)
-- ARGV[5] the report as one line of text (the log entry's `l`)
-- ARGV[6] log stream MAXLEN (~): the output cap plus the progress entries written
-- ARGV[7] '1' to also append an event, '0' not to
-- ARGV[8] events MAXLEN
-- Hash fields written: progress (the percent), progress_stage, progress_message,
-- progress_at (ms, Redis' clock), progress_attempt (the attempt that reported).
-- Returns 1 written, -1 stale token (another attempt owns the job), -2 job not running,
--   -3 no such job.

local job, log, events = KEYS[1], KEYS[2], KEYS[3]
local token, percent, stage, message, text = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local log_maxlen, event, events_maxlen = ARGV[6], ARGV[7], ARGV[8]

local h = redis.call('HMGET', job, 'state', 'dispatch_id', 'id', 'attempt', 'worker')
if not h[1] then return -3 end
if h[2] ~= token then return -1 end
if h[1] ~= 'running' then return -2 end

local now = now_ms()
redis.call('HSET', job, 'progress', percent, 'progress_stage', stage,
           'progress_message', message, 'progress_at', now, 'progress_attempt', h[4])
redis.call('XADD', log, 'MAXLEN', '~', log_maxlen, '*', 's', 'p', 't', now, 'l', text,
           'pc', percent, 'st', stage, 'm', message)
if event == '1' then
  local extra = {'attempt', h[4], 'progress', percent}
  if stage ~= '' then
    extra[#extra + 1] = 'stage'
    extra[#extra + 1] = stage
  end
  emit(events, events_maxlen, job, h[3], 'running', now, h[5] or '', extra)
end
return 1
