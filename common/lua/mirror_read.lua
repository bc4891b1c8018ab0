-- mirror_read.lua: what the recorder needs of a batch of jobs, in one call (read only).
-- A pipeline of HMGETs costs the client more than the server: every field name is packed
-- again for every job. Here the names go once, and for jobs that ended the reply also
-- says how long their log stream is, so the recorder reads only logs that exist.
--
-- KEYS[2i - 1] job hash of the i-th job, KEYS[2i] its log stream
-- ARGV[1] how many field names follow (F), ARGV[2 .. F + 1] the field names
-- ARGV[F + 1 + i] '1' when the i-th job's log length is wanted, else '0'
-- Returns per job {values (HMGET order; all false when the hash is gone), log length or -1}.

local nfields = tonumber(ARGV[1])
local fields = {}
for i = 1, nfields do fields[i] = ARGV[1 + i] end
local out = {}
for i = 1, #KEYS / 2 do
  local job, log = KEYS[2 * i - 1], KEYS[2 * i]
  local values = redis.call('HMGET', job, unpack(fields))
  local loglen = -1
  if ARGV[nfields + 1 + i] == '1' then loglen = redis.call('XLEN', log) end
  out[i] = {values, loglen}
end
return out
