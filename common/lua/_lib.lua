-- _lib.lua: helpers prepended to every script by common/scripts.py (not a script itself).
-- Time always comes from Redis (TIME), never from the caller: leases, delays and
-- timestamps stay right when a client's clock is off (RELIABILITY.md finding 8).
-- Every key a helper touches is passed in by the script, which got it in KEYS.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append one transition, numbered `seq`, to the events stream: for a script that read the
-- job's seq and writes the new number in its own HSET of the job (one command less per
-- event on the hot path). extra: optional flat list of field, value pairs of the event.
local function emit_seq(events, maxlen, seq, job_id, state, at, by, extra)
  local args = {'XADD', events, 'MAXLEN', '~', maxlen, '*',
                'job', job_id, 'seq', seq, 'state', state, 'at', at, 'by', by}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

-- Append one transition to the events stream and bump the job's sequence number.
local function emit(events, maxlen, job_key, job_id, state, at, by, extra)
  local seq = redis.call('HINCRBY', job_key, 'seq', 1)
  emit_seq(events, maxlen, seq, job_id, state, at, by, extra)
  return seq
end

local function is_terminal(state)
  return state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired'
end

-- Put an admitted job where it waits, and return its wait reason:
--   the delayed set while its start time is in the future ('scheduled_at');
--   behind its host's holder, in submission order ('host:<name>');
--   else its queue, by score = base ms + level x step ('priority').
-- A job that already holds its host (a retry, or a waiter just granted) goes to its queue.
-- k = {job, queue, delayed, host, hostwait, hosts}: keys, all from the script's KEYS.
-- h: the job's priority, scheduled_at, host, sub_seq as h[1..4] if the caller already
-- read them (nil: read here); extra: field, value pairs to set on the job hash as well.
-- The hash is written with one HSET (admission runs this per job: each command counts).
local function enqueue(k, id, now, step, base, h, extra)
  h = h or redis.call('HMGET', k.job, 'priority', 'scheduled_at', 'host', 'sub_seq')
  local set = {'HSET', k.job, 'state', 'queued'}
  local reason = 'priority'
  local due = tonumber(h[2])
  if due and due > now then
    redis.call('ZADD', k.delayed, due, id)
    reason = 'scheduled_at'
  else
    local score = base + (tonumber(h[1]) or 2) * step
    set[#set + 1], set[#set + 2] = 'score', score
    local host = h[3]
    if host and host ~= '' then
      local holder = redis.call('GET', k.host)
      if holder ~= id then
        if holder or redis.call('ZCARD', k.hostwait) > 0 then
          -- held or waited for: the name is in the host-names set already (grant_host
          -- takes it out only when the host is free and no one waits)
          redis.call('ZADD', k.hostwait, tonumber(h[4]) or now, id)
          reason = 'host:' .. host
        else
          redis.call('SADD', k.hosts, host)
          redis.call('SET', k.host, id)
        end
      end
    end
    if reason == 'priority' then redis.call('ZADD', k.queue, score, id) end
  end
  set[#set + 1], set[#set + 2] = 'wait_reason', reason
  if extra then
    for i = 1, #extra do set[#set + 1] = extra[i] end
  end
  redis.call(unpack(set))
  return reason
end

-- Give back what a dispatched or running job held in the resource ledger. held: the
-- job's res_held field if the caller read it already (nil: read here).
local function release_resources(job, ledger, held)
  if held ~= nil and held ~= '1' then return end
  local r = redis.call('HMGET', job, 'res_cpu', 'res_mem', 'res_gpu', 'res_held')
  if r[4] == '1' then
    redis.call('HINCRBYFLOAT', ledger, 'cpu', -(tonumber(r[1]) or 0))
    redis.call('HINCRBY', ledger, 'memory_mb', -(tonumber(r[2]) or 0))
    redis.call('HINCRBY', ledger, 'gpu', -(tonumber(r[3]) or 0))
    redis.call('HSET', job, 'res_held', '0')
  end
end

-- A job reached a terminal state: queue its follow-up for the schedulers (hand its host
-- to the next waiter, resolve its dependents, count it off its owner's active jobs).
-- known: the job's {owner, host} if the caller read them already (nil: read here).
local function settle(stream, job, id, state, known)
  local h = known or redis.call('HMGET', job, 'owner', 'host')
  redis.call('XADD', stream, '*', 'id', id, 'state', state, 'owner', h[1] or '',
             'host', h[2] or '')
end

-- A job reached a terminal state: wake its live log followers, which block on its done
-- stream {tidal}:done:<id> beside its log stream (api/routes/logs.py `tail`), so a follow
-- ends at once on every path to a terminal state (finish, cancel, expire, poison, a failed
-- dependency), not at the end of its read block. Only a followed job has that stream: a
-- follower creates it (a `follow` marker, common/streams.py `watch_done`) before it reads
-- the job's state, so either it sees the end in that read or the stream exists here; a
-- job nobody follows costs an EXISTS, not a stream key created, expired and freed (~20 us
-- of server CPU a job, the most of any single step of a finish). And append one entry
-- (`job`, `state`) to
-- the global finished stream {tidal}:finished, which the API's long-polls that wait only
-- for a job's end (until=finished, POST /jobs?wait=) read, so they wake once per job, not
-- at each of its transitions. done, finished: keys from KEYS (either nil: that one skipped).
-- doc: the job hash as JSON (a flat [field, value, ...] list) for the entry to carry to
-- the request that waits for it (finish.lua: a job submitted with POST /jobs?wait=), so
-- that request need not read the job again; nil: the entry names the job only.
local function mark_done(done, finished, id, state, doc)
  if done and redis.call('EXISTS', done) == 1 then
    redis.call('XADD', done, 'MAXLEN', 1, '*', 'state', state)
    redis.call('EXPIRE', done, 60)
  end
  if finished then
    if doc then
      redis.call('XADD', finished, 'MAXLEN', '~', 10000, '*', 'job', id, 'state', state,
                 'doc', doc)
    else
      redis.call('XADD', finished, 'MAXLEN', '~', 10000, '*', 'job', id, 'state', state)
    end
  end
end

-- A dependency ended against what the job asked of it: the job fails with reason
-- dependency_failed and is settled, so its own dependents hear of it in turn.
-- k = {job, events, settle, done, finished}: keys from the script's KEYS (done: the job's
-- done stream, whose followers are woken; finished: the global finished stream).
local function fail_dependency(k, id, dep_id, dep_state, now, maxlen, by)
  local text = 'dependency ' .. dep_id .. ' ended ' .. dep_state
  redis.call('HSET', k.job, 'state', 'failed', 'finished_at', now, 'reason', 'dependency_failed',
             'error', text, 'wait_reason', '')
  emit(k.events, maxlen, k.job, id, 'failed', now, by, {'reason', 'dependency_failed'})
  settle(k.settle, k.job, id, 'failed')
  mark_done(k.done, k.finished, id, 'failed')
end

-- Hand a host on (grant.lua and settle.lua): the released job lets go of the host if it
-- held it; the first waiter, in submission order, then holds it and joins its queue with
-- the score it was given on admission. `waiter` is the head the caller proposes ('' for
-- none). k = {host, hostwait, hosts, waiter_job, waiter_queue}: keys from the script's KEYS.
-- Returns 'granted', 'held' (another job holds it), 'free' (no one waits), or 'retry' (the
-- proposed waiter is not the head, or no waiter was proposed while some wait: read again).
local function grant_host(k, released, waiter, name)
  local holder = redis.call('GET', k.host)
  if holder and holder ~= released then return 'held' end
  if holder then redis.call('DEL', k.host) end
  if waiter == '' then
    if redis.call('ZCARD', k.hostwait) == 0 then redis.call('SREM', k.hosts, name) return 'free' end
    return 'retry'
  end
  local head = redis.call('ZRANGE', k.hostwait, 0, 0)
  if head[1] ~= waiter then return 'retry' end
  redis.call('ZREM', k.hostwait, waiter)
  local h = redis.call('HMGET', k.waiter_job, 'state', 'score')
  if h[1] ~= 'queued' then return 'retry' end
  redis.call('SET', k.host, waiter)
  redis.call('ZADD', k.waiter_queue, tonumber(h[2]) or 0, waiter)
  redis.call('HSET', k.waiter_job, 'wait_reason', 'priority')
  return 'granted'
end

-- A job ended (dep_id, in dep_state): tell one of its dependents (resolve.lua and
-- settle.lua). The dependency is crossed off; if it ended the wrong way for the
-- dependent's condition, the dependent fails with reason dependency_failed (and is settled
-- in turn); if it was the last one the dependent waited for, the dependent is enqueued.
-- k = {job, deps, queue, delayed, host, hostwait, hosts, stale, events, settle, done,
--      finished}.
-- Returns 'enqueued', 'failed', 'waiting' or 'skipped' (not waiting for dependencies).
local function resolve_dependent(k, dep_id, dep_state, now, maxlen, step, by)
  if redis.call('SREM', k.deps, dep_id) == 0 then return 'skipped' end
  local h = redis.call('HMGET', k.job, 'state', 'wait_reason', 'id', 'dep:' .. dep_id)
  if h[1] ~= 'queued' or h[2] ~= 'dependencies' then return 'skipped' end
  local id, cond = h[3], h[4] or 'success'
  local ok = cond == 'any'
    or (cond == 'failure' and (dep_state == 'failed' or dep_state == 'cancelled'
                               or dep_state == 'expired'))
    or (cond == 'success' and dep_state == 'completed')
  if not ok then
    redis.call('DEL', k.deps)
    redis.call('ZREM', k.stale, id)
    fail_dependency(k, id, dep_id, dep_state, now, maxlen, by)
    return 'failed'
  end
  if redis.call('SCARD', k.deps) > 0 then return 'waiting' end
  local reason = enqueue(k, id, now, step, now)
  emit(k.events, maxlen, k.job, id, 'queued', now, by, {'wait_reason', reason})
  return 'enqueued'
end

-- Hand the jobs of `order` ({job key, job id}, best first) to the queue's workers: as many
-- as the capacity `cap` (slots, cpu, memory_mb, gpu, max_cpu, max_memory_mb, max_gpu)
-- has free slots for, counting the dispatch stream's entries, and only those whose
-- resources fit the ledger and one worker. dispatch.lua's loop, shared with submit.lua's
-- direct admission. Returns dispatched, held back for resources.
local function dispatch_jobs(queue, stream, events, ledger, stale, cap, order, maxlen, by)
  local used = redis.call('HMGET', ledger, 'cpu', 'memory_mb', 'gpu')
  local free = {tonumber(cap[2]) - (tonumber(used[1]) or 0),
                tonumber(cap[3]) - (tonumber(used[2]) or 0),
                tonumber(cap[4]) - (tonumber(used[3]) or 0)}
  local largest = {tonumber(cap[5]), tonumber(cap[6]), tonumber(cap[7])}
  local slots = tonumber(cap[1]) - redis.call('XLEN', stream)
  local now = now_ms()
  local sent, held = 0, 0

  local taken = {}  -- ids dispatched: out of the stale zset with one ZREM at the end
  for i = 1, #order do
    if slots <= 0 then break end
    local job, id = order[i][1], order[i][2]
    local h = redis.call('HMGET', job, 'state', 'res_cpu', 'res_mem', 'res_gpu')
    if h[1] == 'queued' then
      local need = {tonumber(h[2]) or 0, tonumber(h[3]) or 0, tonumber(h[4]) or 0}
      local fits = true
      for r = 1, 3 do
        if need[r] > 0 and (need[r] > free[r] or need[r] > largest[r]) then fits = false end
      end
      -- a queued job may have left this queue since the caller read it (another scheduler
      -- dispatched it and it was requeued elsewhere, or it waits for its host): ZREM's
      -- answer says whether it is still here, so no ZSCORE first
      if fits and redis.call('ZREM', queue, id) == 1 then
        taken[#taken + 1] = id
        for r = 1, 3 do free[r] = free[r] - need[r] end
        if need[1] + need[2] + need[3] > 0 then
          redis.call('HINCRBYFLOAT', ledger, 'cpu', need[1])
          redis.call('HINCRBY', ledger, 'memory_mb', need[2])
          redis.call('HINCRBY', ledger, 'gpu', need[3])
          redis.call('HSET', job, 'res_held', '1')
        end
        local entry = redis.call('XADD', stream, '*', 'id', id)
        redis.call('HSET', job, 'state', 'dispatched', 'dispatch_id', entry,
                   'dispatched_at', now, 'wait_reason', '')
        emit(events, maxlen, job, id, 'dispatched', now, by)
        slots = slots - 1
        sent = sent + 1
      elseif not fits and redis.call('ZSCORE', queue, id) then
        redis.call('HSET', job, 'wait_reason', 'resources')
        held = held + 1
      end
    else
      redis.call('ZREM', queue, id)  -- a stray member (e.g. left by a repair) must not block
    end
  end
  for i = 1, #taken, 1000 do
    redis.call('ZREM', stale, unpack(taken, i, math.min(i + 999, #taken)))
  end
  return sent, held
end
