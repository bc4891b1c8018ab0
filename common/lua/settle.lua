-- settle.lua: the last step of a settle entry (after its host was handed on and its
-- dependents resolved): acknowledge it, count the job off its owner's active jobs, drop
-- its dependency sets. The counter moves only on the first acknowledgement, so an entry
-- processed twice (a scheduler died after the first) counts once.
--
-- KEYS[1] settle stream       {tidal}:settle
-- KEYS[2] user hash           {tidal}:user:<owner>
-- KEYS[3] deps set            {tidal}:deps:<id>
-- KEYS[4] dependents set      {tidal}:dependents:<id>
-- ARGV[1] consumer group, ARGV[2] settle entry id
-- Returns 1 when this call settled it, 0 when it was already settled.

local stream, user, deps, dependents = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, entry = ARGV[1], ARGV[2]

local first = redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
redis.call('DEL', deps, dependents)
if first == 1 and (tonumber(redis.call('HGET', user, 'active')) or 0) > 0 then
  redis.call('HINCRBY', user, 'active', -1)
end
return first
