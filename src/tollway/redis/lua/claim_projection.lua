-- claim_projection.lua: claim a shard's projection for a cluster's lease epoch (cluster mode only).
--
-- KEYS[1]      the shard's meta hash
--
-- ARGV[1]      the writer's owner identity (``cluster <cluster id> shard <n>``; meta field owner)
-- ARGV[2]      the writer's lease epoch (meta field epoch)
-- ARGV[3]      the shard number (meta field shard, for operators)
-- ARGV[4]      optional: the sequence a rebuild reached. With it, the claim also finishes the
--              rebuild: meta applied_seq := ARGV[4], rebuilt_at_ms := ARGV[5], rebuilding deleted
-- ARGV[5]      with ARGV[4]: the time of the rebuild (ms)
--
-- Returns one of:
--   {"ok"}               the projection is this writer's: owner, epoch and shard written
--   {"foreign", owner}   another cluster (or a single-node data directory) owns it: nothing changed
--   {"stale", epoch}     a newer epoch claimed it (this writer lost the shard): nothing changed
--
-- Idempotency: claiming again with the same owner and epoch changes nothing but the fields it
-- writes anew with the same values. Epochs only grow: a claim never lowers meta epoch.

local meta = KEYS[1]
local found = redis.call('HMGET', meta, 'owner', 'epoch')
local owner, epoch_text = found[1], found[2]
if owner and owner ~= ARGV[1] then
  return {'foreign', owner}
end
if epoch_text and tonumber(epoch_text) > tonumber(ARGV[2]) then
  return {'stale', epoch_text}
end
redis.call('HSET', meta, 'owner', ARGV[1], 'epoch', ARGV[2], 'shard', ARGV[3])
if ARGV[4] then
  redis.call('HSET', meta, 'applied_seq', ARGV[4], 'rebuilt_at_ms', ARGV[5])
  redis.call('HDEL', meta, 'rebuilding')
end
return {'ok'}
