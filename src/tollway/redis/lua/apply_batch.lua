-- apply_batch.lua: apply a batch of WAL events to the Redis projection, atomically.
--
-- KEYS[1]      the shard's meta hash (field applied_seq: the last WAL sequence applied)
-- KEYS[2..n]   every other key the operations touch (operations refer to them by index)
--
-- ARGV[1]      msgpack: [[seq, [[opcode, arg, ...], ...]], ...] — events in sequence order.
--              Key arguments are integer indexes into KEYS; every other argument is a string.
--
-- Opcodes:
--   I key f1 d1 [f2 d2 ...]    HINCRBY of each field, in order; a user balance that must stay >= 0
--   C key f1 d1 [f2 d2 ...]    HINCRBY of each field, which may go negative (the system ledger)
--   N key f1 d1 [f2 d2 ...]    counts (entries per state): summed over the batch per key and field,
--                              then one HINCRBY per non-zero sum once every money change passed
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
-- nothing. Money is only ever changed by HINCRBY with decimal-string deltas (msgpack strings
-- stay Lua strings); Lua numbers are used for sequences, key indexes, entry counts and the sign
-- of HINCRBY's result, never for amounts.

local meta = KEYS[1]
local applied = redis.call('HGET', meta, 'applied_seq')
if not applied then
  return {'missing'}
end
applied = tonumber(applied)

-- Pass 1: keep the events not yet applied and check that they continue the projection.
local events = {}
local expected = applied + 1
for _, event in ipairs(cmsgpack.unpack(ARGV[1])) do
  local seq = event[1]
  if seq > applied then
    if seq ~= expected then
      return {'gap', tostring(applied), tostring(seq)}
    end
    events[#events + 1] = event
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

local function undo(done)
  for k = #done, 1, -1 do
    -- A field back at 0 is removed: it was absent (or 0, which every reader treats alike).
    if redis.call('HINCRBY', done[k][1], done[k][2], negate(done[k][3])) == 0 then
      redis.call('HDEL', done[k][1], done[k][2])
    end
  end
end

-- Pass 2: money. Every HINCRBY in order; on a negative balance or an error, undo and report.
-- Counts are only summed here (small integers: Lua numbers are exact for them).
local done = {}
local counts, counted = {}, {}
for _, event in ipairs(events) do
  for _, op in ipairs(event[2]) do
    local code = op[1]
    if code == 'N' then
      local key = KEYS[op[2]]
      local sums = counts[key]
      if not sums then
        sums = {}
        counts[key] = sums
        counted[#counted + 1] = key
      end
      for i = 3, #op, 2 do
        sums[op[i]] = (sums[op[i]] or 0) + tonumber(op[i + 1])
      end
    elseif code == 'I' or code == 'C' then
      local key = KEYS[op[2]]
      for i = 3, #op, 2 do
        local field, delta = op[i], op[i + 1]
        local after = redis.pcall('HINCRBY', key, field, delta)
        local failed = type(after) == 'table' and after.err
        if failed or (code == 'I' and after < 0) then
          if not failed then
            done[#done + 1] = {key, field, delta}
          end
          undo(done)
          return {'violation', tostring(event[1]), key, field, failed or 'balance would go negative'}
        end
        done[#done + 1] = {key, field, delta}
      end
    end
  end
end

for _, key in ipairs(counted) do
  for field, sum in pairs(counts[key]) do
    if sum ~= 0 then
      redis.call('HINCRBY', key, field, string.format('%d', sum))
    end
  end
end

-- Pass 3: everything that is not money.
local function rest(op, from)
  local out = {}
  for i = from, #op do
    out[#out + 1] = op[i]
  end
  return out
end

for _, event in ipairs(events) do
  for _, op in ipairs(event[2]) do
    local code = op[1]
    local key = KEYS[op[2]]
    if code == 'H' then
      redis.call('HSET', key, unpack(rest(op, 3)))
    elseif code == 'Z' then
      redis.call('ZADD', key, op[3], op[4])
    elseif code == 'R' then
      redis.call('ZREM', key, op[3])
    elseif code == 'S' then
      redis.call('SET', key, op[3])
    elseif code == 'X' then
      redis.call('XADD', key, '*', unpack(rest(op, 3)))
    elseif code == 'P' then
      local id = redis.call('XADD', key, '*', unpack(rest(op, 4)))
      redis.call('HSET', KEYS[op[3]], 'poison_id', id)
    elseif code == 'Q' then
      local entry = KEYS[op[3]]
      local id = redis.call('HGET', entry, 'poison_id')
      if id then
        redis.call('XDEL', key, id)
        redis.call('HDEL', entry, 'poison_id')
      end
    end
  end
end

local last = tostring(expected - 1)
redis.call('HSET', meta, 'applied_seq', last)
return {'ok', last}
