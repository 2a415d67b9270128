-- apply_batch.lua: apply a batch of WAL events to the Redis projection, atomically.
--
-- KEYS[1]      the shard's meta hash (field applied_seq: the last WAL sequence applied)
-- KEYS[2..n]   every other key the operations touch (operations refer to them by index)
--
-- ARGV[2]      the identity of the data directory whose engine writes (meta field owner); in a
--              cluster, the cluster and shard (``cluster <cluster id> shard <n>``)
-- ARGV[3]      optional, cluster mode only: the lease epoch of the writing engine. A projection whose
--              meta field epoch is larger refuses the batch ({"stale", epoch}); a larger ARGV[3]
--              is written to meta epoch with the batch. Without ARGV[3] (single node) no epoch is
--              read or written.
-- ARGV[1]      msgpack: [first_seq, last_seq, money, rest], money and rest each a list of
--              [opcode, arg, ...] — the net effect of the consecutive events first_seq..last_seq
--              (the encoder folds them: one HSET per hash, one op per expiry member, summed
--              deltas, no HSET or SET of a key the batch deletes, deletes last); money holds the
--              I and C ops, rest every other. Key arguments are integer indexes into KEYS; every
--              other argument is a string, but for the sequence of an I op.
--
-- Opcodes:
--   I key field low rest seq   a user balance that must stay >= 0: HINCRBY by low (the most negative
--                              running sum of the batch's deltas, reached at event seq; "0" if it never
--                              dips, and seq the first event that moved it), check, then HINCRBY by
--                              rest (total - low); a "0" step is skipped; a refusal names seq
--   C key field delta          HINCRBY that may go negative (the system ledger)
--   N key f1 d1 [f2 d2 ...]    counts (entries per state): HINCRBY of each, once every money change passed
--   H key f1 v1 [f2 v2 ...]    HSET
--   Z key score member         ZADD
--   R key member               ZREM
--   S key value                SET
--   X key f1 v1 [...]          XADD key * f1 v1 ...
--   P stream entry f1 v1 ...   XADD stream * ..., then HSET entry poison_id <new id>
--   Q stream entry             XDEL stream <entry's poison_id>, then HDEL entry poison_id
--   D key                      DEL (a settled entry's hash, or an older stored response; it may be missing)
--
-- Returns one of:
--   {"ok", last_applied}                 the events were applied
--   {"duplicate", applied}               every event was applied before: nothing changed
--   {"foreign", owner}                   the projection belongs to another data directory (meta owner
--                                        differs from ARGV[2]): nothing changed, never write here
--   {"stale", epoch}                     the projection was written under a newer lease epoch (meta epoch
--                                        > ARGV[3]): this writer lost the shard, nothing changed
--   {"missing"}                          no applied_seq, or no owner: the projection must be rebuilt first
--   {"unwritable", error}                Redis refused the first write (maxmemory reached, read-only
--                                        replica): nothing changed; apply the batch again later
--   {"gap", applied, first_seq}          the batch does not start right after applied_seq (a hole,
--                                        or an overlap with what was applied): nothing changed
--   {"violation", seq, key, field, msg}  a balance would go negative (or overflow): nothing applied
--                                        (increments already made are undone; a field undone to 0 is
--                                        deleted, as absent and 0 mean the same to every reader)
--
-- Idempotency: a batch at or below applied_seq is a duplicate, so applying a batch twice changes
-- nothing. Money is only ever changed by HINCRBY with decimal-string deltas (msgpack strings
-- stay Lua strings); Lua numbers are used for sequences, key indexes and the sign of HINCRBY's
-- result, never for amounts.

local meta = KEYS[1]
local found = redis.call('HMGET', meta, 'applied_seq', 'owner', 'epoch')
local applied_text, owner, epoch_text = found[1], found[2], found[3]
if owner and owner ~= ARGV[2] then
  return {'foreign', owner}
end
local writer_epoch = ARGV[3]
if writer_epoch and epoch_text and tonumber(epoch_text) > tonumber(writer_epoch) then
  return {'stale', epoch_text}
end
if not applied_text or not owner then
  return {'missing'}
end
local applied = tonumber(applied_text)

-- Sequences as decimal text (a Lua number's default text turns to exponent notation past 1e14).
local function seq_text(seq)
  return string.format('%d', seq)
end

local batch = cmsgpack.unpack(ARGV[1])
local first, last, money, rest = batch[1], batch[2], batch[3], batch[4]
if last <= applied then
  return {'duplicate', applied_text}
end
if first ~= applied + 1 then
  return {'gap', applied_text, seq_text(first)}
end

-- The script's first write rewrites applied_seq unchanged. Redis refuses a script's first write
-- at maxmemory (noeviction), or on a read-only replica, and lets every later one through (a
-- script is never stopped half-way): a Redis that cannot take the batch is found here, before
-- anything changed, and the projector waits for it instead of reading a violation.
-- In a cluster the same first write raises the projection's epoch to the writer's.
local probe
if writer_epoch then
  probe = redis.pcall('HSET', meta, 'applied_seq', applied_text, 'epoch', writer_epoch)
else
  probe = redis.pcall('HSET', meta, 'applied_seq', applied_text)
end
if type(probe) == 'table' and probe.err then
  return {'unwritable', probe.err}
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

-- Pass 1: money. On a negative balance or an error, undo what was done and report.
local done = {}
local function add(key, field, delta, checked, seq)
  local after = redis.pcall('HINCRBY', key, field, delta)
  local failed = type(after) == 'table' and after.err
  if not failed then
    done[#done + 1] = {key, field, delta}
  end
  if failed or (checked and after < 0) then
    undo(done)
    return {'violation', seq_text(seq), key, field, failed or 'balance would go negative'}
  end
end

for _, op in ipairs(money) do
  if op[1] == 'I' then
    local key, field, low, remainder = KEYS[op[2]], op[3], op[4], op[5]
    local refused = (low ~= '0' and add(key, field, low, true, op[6]))
      or (remainder ~= '0' and add(key, field, remainder, true, op[6]))
    if refused then
      return refused
    end
  else -- C
    local refused = add(KEYS[op[2]], op[3], op[4], false, first)
    if refused then
      return refused
    end
  end
end

-- Pass 2: everything that is not money.
for _, op in ipairs(rest) do
  local code = op[1]
  local key = KEYS[op[2]]
  if code == 'N' then
    for i = 3, #op, 2 do
      redis.call('HINCRBY', key, op[i], op[i + 1])
    end
  elseif code == 'H' then
    redis.call('HSET', key, unpack(op, 3))
  elseif code == 'Z' then
    redis.call('ZADD', key, op[3], op[4])
  elseif code == 'R' then
    redis.call('ZREM', key, op[3])
  elseif code == 'S' then
    redis.call('SET', key, op[3])
  elseif code == 'X' then
    redis.call('XADD', key, '*', unpack(op, 3))
  elseif code == 'P' then
    local id = redis.call('XADD', key, '*', unpack(op, 4))
    redis.call('HSET', KEYS[op[3]], 'poison_id', id)
  elseif code == 'Q' then
    local entry = KEYS[op[3]]
    local id = redis.call('HGET', entry, 'poison_id')
    if id then
      redis.call('XDEL', key, id)
      redis.call('HDEL', entry, 'poison_id')
    end
  elseif code == 'D' then
    redis.call('DEL', key)
  end
end

local applied_now = seq_text(last)
redis.call('HSET', meta, 'applied_seq', applied_now)
return {'ok', applied_now}
