-- log_append.lua: append a batch of a job's output lines to its log stream in one call
-- (one round trip and one reply for the batch: a pipeline of XADDs costs the writer a
-- command to pack and a reply to parse per line), then publish the wake-up hint.
-- Each line is still its own entry (its id is what a follower resumes after); lines that
-- share their stream and time come joined in one argument, so a flood costs the writer
-- a handful of arguments per batch, not four per line.
--
-- KEYS[1] log stream          {tidal}:log:<id>
-- ARGV[1] MAXLEN (approximate: the output cap plus the progress entries written)
-- ARGV[2] channel to PUBLISH the count on ('' for none)
-- ARGV[3] count to publish
-- ARGV[4 ..] per run of lines, four values: s (o, e, x), t (ms), l, c:
--   c = 'n': l holds several lines, each ended by '\n' (none of them continued);
--   c = '1': l is one line, a chunk the next entry continues;
--   c = '':  l is one line (it may hold '\n' itself: it is not split).
-- Returns the number of entries appended.

local key, maxlen, chan, count = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local find, sub = string.find, string.sub
local n = 0
for i = 4, #ARGV, 4 do
  local s, t, l, c = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if c == 'n' then
    local pos = 1
    while true do
      local nl = find(l, '\n', pos, true)
      if not nl then break end
      redis.call('XADD', key, '*', 's', s, 't', t, 'l', sub(l, pos, nl - 1))
      n = n + 1
      pos = nl + 1
    end
  elseif c == '1' then
    redis.call('XADD', key, '*', 's', s, 't', t, 'l', l, 'c', '1')
    n = n + 1
  else
    redis.call('XADD', key, '*', 's', s, 't', t, 'l', l)
    n = n + 1
  end
end
redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
if chan ~= '' then redis.call('PUBLISH', chan, count) end
return n
