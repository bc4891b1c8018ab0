-- log_append.lua: append a batch of a job's output lines to its log stream in one call
-- (one round trip and one reply for the batch: a pipeline of XADDs costs the writer a
-- command to pack and a reply to parse per line), then publish the wake-up hint.
--
-- KEYS[1] log stream          {tidal}:log:<id>
-- ARGV[1] MAXLEN (approximate: the output cap plus the progress entries written)
-- ARGV[2] channel to PUBLISH the count on ('' for none)
-- ARGV[3] count to publish
-- ARGV[4 ..] per line, four values: s (o, e, x), t (ms), l (text), c ('1': a chunk the
--   next entry continues, '' otherwise)
-- Returns the number of entries appended.

local key, maxlen, chan, count = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV, 4 do
  if ARGV[i + 3] == '1' then
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 's', ARGV[i], 't', ARGV[i + 1],
               'l', ARGV[i + 2], 'c', '1')
  else
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 's', ARGV[i], 't', ARGV[i + 1],
               'l', ARGV[i + 2])
  end
  n = n + 1
end
if chan ~= '' then redis.call('PUBLISH', chan, count) end
return n
