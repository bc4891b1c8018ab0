-- _lib.lua: helpers prepended to every script by common/scripts.py (not a script itself).
-- Time always comes from Redis (TIME), never from the caller: leases, delays and
-- timestamps stay right when a client's clock is off (RELIABILITY.md finding 8).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append one transition to the events stream and bump the job's sequence number.
-- extra: optional flat list of field, value pairs carried by the event.
local function emit(events, maxlen, job_key, job_id, state, at, by, extra)
  local seq = redis.call('HINCRBY', job_key, 'seq', 1)
  local args = {'XADD', events, 'MAXLEN', '~', maxlen, '*',
                'job', job_id, 'seq', seq, 'state', state, 'at', at, 'by', by}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
  return seq
end

local function is_terminal(state)
  return state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired'
end
