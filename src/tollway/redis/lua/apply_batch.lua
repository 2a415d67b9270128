-- apply_batch.lua: apply a batch of WAL events to the Redis projection, atomically.
--
-- KEYS[1]      the shard's meta hash (field applied_seq: the last WAL sequence applied)
-- KEYS[2..n]   every other key the operations touch (operations refer to them by index)
--
-- ARGV[1]      number of events E
-- then, per event:   seq, number of operations K
-- then, per op:      opcode, number of arguments A, A arguments
--
-- Opcodes (key arguments are indexes into KEYS):
--   I key field delta          HINCRBY on a user balance that must stay >= 0 (checked)
--   C key field delta          HINCRBY that may go negative (system ledger accounts, counters)
--   H key f1 v1 [f2 v2 ...]    HSET
--   Z key score member         ZADD
--   R key member               ZREM
--   S key value                SET
--   X key f1 v1 [...]          XADD key * f1 v1 ...
--   P stream entry f1 v1 ...   XADD stream * ..., then HSET entry poison_id <new id>
--   Q stream entry             XDEL stream <entry's poison_id>, then HDEL entry poison_id
--
-- Returns one of:
--   {"ok", last_applied}                 the events were applied
--   {"duplicate", applied}               every event was applied before: nothing changed
--   {"missing"}                          no applied_seq: the projection must be rebuilt first
--   {"gap", applied, first_seq}          the batch does not continue the projection
--   {"violation", seq, key, field, msg}  a balance would go negative (or overflow): nothing applied
--                                        (increments already made are undone; a field undone to 0 is
--                                        deleted, as absent and 0 mean the same to every reader)
--
-- Idempotency: events at or below applied_seq are skipped, so applying a batch twice changes
-- nothing. Money is only ever changed by HINCRBY with decimal-string deltas; Lua numbers are
-- used for sequences and for the sign of HINCRBY's result, never for amounts.

local meta = KEYS[1]
local applied = redis.call('HGET', meta, 'applied_seq')
if not applied then
  return {'missing'}
end
applied = tonumber(applied)

-- Pass 1: find the events not yet applied and check that they continue the projection.
local events = {}
local expected = applied + 1
local pos = 2
for _ = 1, tonumber(ARGV[1]) do
  local seq, nops = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
  pos = pos + 2
  local first_op = pos
  for _ = 1, nops do
    pos = pos + 2 + tonumber(ARGV[pos + 1])
  end
  if seq > applied then
    if seq ~= expected then
      return {'gap', tostring(applied), tostring(seq)}
    end
    events[#events + 1] = {seq, first_op, nops}
    expected = seq + 1
  end
end
if #events == 0 then
  return {'duplicate', tostring(applied)}
end

local function negate(delta)
  if string.sub(delta, 1, 1) == '-' then
    return string.sub(delta, 2)
  end
  return '-' .. delta
end

-- Pass 2: money. Every HINCRBY in order; on a negative balance or an error, undo and report.
local done = {}
for _, event in ipairs(events) do
  local p = event[2]
  for _ = 1, event[3] do
    local op, nargs = ARGV[p], tonumber(ARGV[p + 1])
    if op == 'I' or op == 'C' then
      local key, field, delta = KEYS[tonumber(ARGV[p + 2])], ARGV[p + 3], ARGV[p + 4]
      local after = redis.pcall('HINCRBY', key, field, delta)
      local failed = type(after) == 'table' and after.err
      if failed or (op == 'I' and after < 0) then
        if not failed then
          done[#done + 1] = {key, field, delta}
        end
        for k = #done, 1, -1 do
          -- A field back at 0 is removed: it was absent (or 0, which every reader treats alike).
          if redis.call('HINCRBY', done[k][1], done[k][2], negate(done[k][3])) == 0 then
            redis.call('HDEL', done[k][1], done[k][2])
          end
        end
        return {'violation', tostring(event[1]), key, field, failed or 'balance would go negative'}
      end
      done[#done + 1] = {key, field, delta}
    end
    p = p + 2 + nargs
  end
end

-- Pass 3: everything that is not money.
local function args(p, from, count)
  local out = {}
  for i = from, count do
    out[#out + 1] = ARGV[p + 2 + i]
  end
  return out
end

for _, event in ipairs(events) do
  local p = event[2]
  for _ = 1, event[3] do
    local op, nargs = ARGV[p], tonumber(ARGV[p + 1])
    local key = KEYS[tonumber(ARGV[p + 2])]
    if op == 'H' then
      redis.call('HSET', key, unpack(args(p, 1, nargs - 1)))
    elseif op == 'Z' then
      redis.call('ZADD', key, ARGV[p + 3], ARGV[p + 4])
    elseif op == 'R' then
      redis.call('ZREM', key, ARGV[p + 3])
    elseif op == 'S' then
      redis.call('SET', key, ARGV[p + 3])
    elseif op == 'X' then
      redis.call('XADD', key, '*', unpack(args(p, 1, nargs - 1)))
    elseif op == 'P' then
      local entry = KEYS[tonumber(ARGV[p + 3])]
      local id = redis.call('XADD', key, '*', unpack(args(p, 2, nargs - 1)))
      redis.call('HSET', entry, 'poison_id', id)
    elseif op == 'Q' then
      local entry = KEYS[tonumber(ARGV[p + 3])]
      local id = redis.call('HGET', entry, 'poison_id')
      if id then
        redis.call('XDEL', key, id)
        redis.call('HDEL', entry, 'poison_id')
      end
    end
    p = p + 2 + nargs
  end
end

local last = tostring(expected - 1)
redis.call('HSET', meta, 'applied_seq', last)
return {'ok', last}
