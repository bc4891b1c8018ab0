-- resolve.lua: a job ended; tell one of its dependents. The dependency is crossed off;
-- if it ended the wrong way for the dependent's condition, the dependent fails with
-- reason dependency_failed (and is settled in turn, so the failure runs down the
-- chain); if it was the last one the dependent waited for, the dependent is enqueued.
--
-- KEYS[1] events stream, KEYS[2] settle stream
-- KEYS[3] dependent's job hash, KEYS[4] dependent's deps set
-- KEYS[5] its queue zset, KEYS[6] delayed zset, KEYS[7] its host string,
-- KEYS[8] its hostwait zset, KEYS[9] host-names set, KEYS[10] stale zset,
-- KEYS[11] its done stream (wakes its log followers if it fails here)
-- KEYS[12] finished stream {tidal}:finished (wakes the API's waits for the end, likewise)
-- ARGV[1] id of the job that ended, ARGV[2] the state it ended in
-- ARGV[3] events MAXLEN, ARGV[4] priority step ms, ARGV[5] scheduler id
-- Returns 'enqueued', 'failed', 'waiting' or 'skipped' (not waiting for dependencies).

local events, settle_stream, job, deps = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local k = {job = job, queue = KEYS[5], delayed = KEYS[6], host = KEYS[7], hostwait = KEYS[8],
           hosts = KEYS[9]}
local stale = KEYS[10]
local dep_id, dep_state, maxlen, step, by = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]

k.deps, k.stale, k.events, k.settle, k.done = deps, stale, events, settle_stream, KEYS[11]
k.finished = KEYS[12]
return resolve_dependent(k, dep_id, dep_state, now_ms(), maxlen, step, by)
